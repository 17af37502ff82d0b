//! The bearer token and the bind rule: with a token every route but `/healthz` and the
//! dashboard's page `/` needs it; a non-loopback address needs a token or `--insecure`,
//! else `serve` exits 2.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{Server, pyherd};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const TOKEN: &str = "s3cr3t-t0ken-0123456789";

/// A request with an optional `Authorization` value; status, `WWW-Authenticate`, body.
async fn call(
    method: Method,
    url: &str,
    authorization: Option<&str>,
) -> (StatusCode, Option<String>, Value) {
    let mut request = reqwest::Client::new().request(method.clone(), url);
    if method == Method::POST {
        request = request.json(&json!({"command": "echo", "args": {"n": 1}}));
    }
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, challenge, body)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn assert_guarded(server: &Server) {
    let routes = [
        (Method::POST, "/v1/execute"),
        (Method::GET, "/v1/stats"),
        (Method::GET, "/v1/workers"),
        (Method::GET, "/v1/sessions"),
        (Method::GET, "/v1/programs"),
        (Method::GET, "/readyz"),
        (Method::GET, "/metrics"),
        (Method::GET, "/no/such/route"),
    ];
    for (method, path) in routes {
        let url = server.url(path);
        let (status, challenge, body) = call(method.clone(), &url, None).await;
        assert_eq!(status, 401, "{method} {path}: {body}");
        assert_eq!(body["ok"], false);
        assert_eq!(body["error"]["category"], "invalid_request");
        assert_eq!(body["error"]["kind"], "unauthorized");
        assert!(challenge.unwrap().starts_with("Bearer"), "{path}");
        let wrong = [
            bearer("s3cr3t-t0ken-0123456788"),
            bearer(&TOKEN[..TOKEN.len() - 1]),
            bearer(&format!("{TOKEN}x")),
            format!("Basic {TOKEN}"),
            TOKEN.to_owned(),
            "Bearer ".to_owned(),
        ];
        for value in &wrong {
            let (status, challenge, body) = call(method.clone(), &url, Some(value)).await;
            assert_eq!(status, 401, "{method} {path} with {value:?}: {body}");
            assert!(challenge.unwrap().contains("invalid_token"));
        }
    }
    // A refusal answers the call the client named.
    let refused = reqwest::Client::new()
        .post(server.url("/v1/execute"))
        .header("x-request-id", "unauthorized-7")
        .json(&json!({"command": "echo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["x-request-id"], "unauthorized-7");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["context"]["request_id"], "unauthorized-7");
    for value in [bearer(TOKEN), format!("bearer {TOKEN}")] {
        let (status, _, body) = call(Method::POST, &server.url("/v1/execute"), Some(&value)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["result"], json!({"n": 1}));
    }
    let (status, _, _) = call(Method::GET, &server.url("/metrics"), Some(&bearer(TOKEN))).await;
    assert_eq!(status, 200);
    // The two open paths: liveness and the dashboard's page, for GET and HEAD only.
    for path in ["/healthz", "/"] {
        for method in [Method::GET, Method::HEAD] {
            let (status, _, body) = call(method.clone(), &server.url(path), None).await;
            assert_eq!(status, 200, "{method} {path}: {body}");
        }
        for method in [Method::POST, Method::DELETE] {
            let (status, _, body) = call(method.clone(), &server.url(path), None).await;
            assert_eq!(status, 405, "{method} {path}: {body}");
        }
    }
}

#[tokio::test]
async fn with_a_token_from_a_file_every_route_but_healthz_needs_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let server = Server::start(&["--workers", "1", "--token-file", file.to_str().unwrap()]);
    assert_guarded(&server).await;
    assert!(!server.stderr().contains(TOKEN), "the token was logged");
}

#[tokio::test]
async fn the_token_may_come_from_the_environment_or_pyherd_toml() {
    let mut cmd = pyherd(None);
    cmd.env("PYHERD_TOKEN", TOKEN);
    let server = Server::start_with(cmd, &["--workers", "1"]);
    assert_guarded(&server).await;
    drop(server);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pyherd.toml"),
        format!("token = \"{TOKEN}\"\nworkers = 1\n"),
    )
    .unwrap();
    let server = Server::start_with(pyherd(Some(dir.path())), &[]);
    assert_guarded(&server).await;
}

#[tokio::test]
async fn without_a_token_nothing_asks_for_one() {
    let server = Server::start(&["--workers", "1"]);
    let (status, _, body) = call(Method::POST, &server.url("/v1/execute"), None).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = call(Method::GET, &server.url("/v1/stats"), Some("Bearer x")).await;
    assert_eq!(status, 200);
}

/// Runs `pyherd serve ARGS`, which must exit by itself within 30 s; exit code, stderr.
fn serve_refused(args: &[&str], dir: Option<&std::path::Path>) -> (Option<i32>, String) {
    let mut child = pyherd(dir)
        .arg("serve")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let Some(status) = common::wait_exit(&mut child, Duration::from_secs(30)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("pyherd serve {args:?} did not exit by itself");
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code(), stderr)
}

#[test]
fn a_non_loopback_bind_without_a_token_refuses_to_start() {
    for bind in ["0.0.0.0:0", "[::]:0"] {
        let (code, stderr) = serve_refused(&["--bind", bind, "--workers", "1"], None);
        assert_eq!(code, Some(2), "{bind}: {stderr}");
        assert!(stderr.contains("refusing to listen"), "{stderr}");
        assert!(stderr.contains("--token-file"), "{stderr}");
        assert!(stderr.contains("--insecure"), "{stderr}");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pyherd.toml"), "bind = \"0.0.0.0:0\"\n").unwrap();
    let (code, stderr) = serve_refused(&["--workers", "1"], Some(dir.path()));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("refusing to listen"), "{stderr}");
}

#[test]
fn a_bad_token_refuses_to_start() {
    let (code, stderr) = serve_refused(&["--token", "short", "--workers", "1"], None);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("16..=1024"), "{stderr}");
    let (code, stderr) = serve_refused(&["--token-file", "/nonexistent/token"], None);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("token file"), "{stderr}");
    let (code, stderr) = serve_refused(&["--token", TOKEN, "--token-file", "/x"], None);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("once"), "{stderr}");
}

/// A `pyherd serve` on every address; killed on drop.
struct Everywhere {
    child: Child,
    port: u16,
}

impl Everywhere {
    fn start(args: &[&str]) -> Self {
        let mut child = pyherd(None)
            .args(["serve", "--bind", "0.0.0.0:0", "--workers", "1"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("pyherd serve did not start");
        let port = line
            .split("http://0.0.0.0:")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        Self { child, port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Everywhere {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn insecure_or_a_token_lets_it_listen_beyond_loopback() {
    let open = Everywhere::start(&["--insecure"]);
    let (status, _, body) = call(Method::POST, &open.url("/v1/execute"), None).await;
    assert_eq!(status, 200, "{body}");
    drop(open);
    let guarded = Everywhere::start(&["--token", TOKEN]);
    let (status, _, _) = call(Method::POST, &guarded.url("/v1/execute"), None).await;
    assert_eq!(status, 401);
    let url = guarded.url("/v1/execute");
    let (status, _, body) = call(Method::POST, &url, Some(&bearer(TOKEN))).await;
    assert_eq!(status, 200, "{body}");
}
