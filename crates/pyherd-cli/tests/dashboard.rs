//! The live dashboard at `/`: its page and timeline over HTTP, and the page itself in a
//! real headless Chromium (from the system's packages, driven over the DevTools protocol
//! by `tests/browser/cdp_driver.py`) against a real `pyherd serve` under load.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::{Server, drain, get_json};
use serde_json::{Value, json};

const TESTING: [&str; 2] = ["--handlers", "pyherd_worker.testing"];
/// The bound of every wait on the browser: generous, the machine may be busy.
const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn the_page_and_the_timeline_are_served() {
    let server = Server::start(&["--workers", "1", TESTING[0], TESTING[1]]);
    let page = reqwest::get(server.url("/")).await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let header = |name: &str| {
        page.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(header("content-type"), "text/html; charset=utf-8");
    assert!(header("content-security-policy").contains("connect-src 'self'"));
    let html = page.text().await.unwrap();
    assert!(html.contains("<h1>pyherd</h1>") && html.contains("data-throughput-points"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "the page loads nothing from elsewhere"
    );

    for _ in 0..5 {
        common::execute(&server, json!({"command": "echo"})).await;
    }
    let (status, _) = common::execute(
        &server,
        json!({"command": "raise_error", "args": {"message": "shown on the dashboard"}}),
    )
    .await;
    assert_eq!(status, 500);
    let timeline = get_json(&server.url("/v1/timeline")).await;
    assert_eq!(timeline["interval_ms"], 1000);
    let samples = timeline["samples"].as_array().unwrap();
    let count = |key: &str| {
        samples
            .iter()
            .map(|s| s[key].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!((count("ok"), count("err")), (5, 1), "{timeline}");
    for key in [
        "at_ms",
        "p50_us",
        "p95_us",
        "p99_us",
        "queue_depth",
        "busy_workers",
    ] {
        assert!(samples[0].get(key).is_some(), "{key} in {}", samples[0]);
    }
    let errors = timeline["recent_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["kind"], "python_exception");
    assert_eq!(errors[0]["category"], "python");
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap()
            .contains("shown on the dashboard")
    );
    server.terminate();
}

#[test]
fn the_dashboard_shows_the_workers_and_its_charts_follow_the_load() {
    let server = Server::start(&["--workers", "3", TESTING[0], TESTING[1]]);
    let browser = Chromium::launch();
    let mut page = Driver::start(&browser);
    page.navigate(&server.url("/"));
    page.wait_for(
        "document.body.dataset.status === 'ok' && document.body.dataset.workers === '3'",
        "three workers on the page",
    );
    let rows = page.eval("document.querySelectorAll('#workers tbody tr').length");
    assert_eq!(rows, 3);
    // It refreshes every second: five more refreshes within six seconds.
    let updates = page.number("updates");
    page.wait_within(
        &format!("Number(document.body.dataset.updates) >= {}", updates + 5),
        "five refreshes",
        Duration::from_secs(6),
    );
    let headers = page.eval("[...document.querySelectorAll('th')].map(t => t.textContent)");
    for name in [
        "id",
        "state",
        "pid",
        "RSS (MiB)",
        "requests",
        "started by",
        "kind",
    ] {
        assert!(headers.as_array().unwrap().contains(&json!(name)), "{name}");
    }
    let before = page.number("lastTotal");
    let drawn = page.eval("document.getElementById('throughput').toDataURL()");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let load = runtime.block_on(async {
        for id in ["dash-a", "dash-b"] {
            let (status, _) = common::request(
                reqwest::Method::POST,
                &server.url("/v1/sessions"),
                Some(json!({"session_id": id})),
            )
            .await;
            assert_eq!(status, 201);
        }
        let load = Load::start(&runtime, &server, 8);
        while load.done() < 200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        load
    });
    page.wait_for(
        &format!(
            "Number(document.body.dataset.lastTotal) >= {} && Number(document.body.dataset.throughputSum) >= 200 \
             && Number(document.body.dataset.throughputPoints) >= 3 && Number(document.body.dataset.errors) > 0 \
             && document.body.dataset.sessions === '2' && document.body.dataset.latencyP99Us !== ''",
            before + 200
        ),
        "the charts to follow 200 calls and more",
    );
    assert_ne!(
        page.eval("document.getElementById('throughput').toDataURL()"),
        drawn,
        "the throughput chart was redrawn"
    );
    let kinds =
        page.eval("[...document.querySelectorAll('#errors tbody td')].map(t => t.textContent)");
    assert!(
        kinds
            .as_array()
            .unwrap()
            .contains(&json!("python_exception")),
        "{kinds}"
    );
    let listed = page.eval("document.querySelectorAll('#sessions tbody tr').length");
    assert_eq!(listed, 2);

    // DASHBOARD_SCREENSHOT=docs/dashboard.png makes the README's picture: after 45 s of load.
    let shot = match std::env::var_os("DASHBOARD_SCREENSHOT") {
        Some(path) => {
            page.wait_within(
                "Number(document.body.dataset.throughputPoints) >= 45",
                "45 seconds of load on the charts",
                Duration::from_secs(90),
            );
            PathBuf::from(path)
        }
        None => browser.dir.path().join("dashboard.png"),
    };
    page.screenshot(&shot, 1280, 1100);
    load.stop();
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000,
        "{}",
        png.len()
    );

    // The server goes away: the page says so instead of freezing its last picture.
    server.terminate();
    page.wait_for(
        "document.body.dataset.status === 'error' && !document.getElementById('notice').hidden",
        "the page to notice the server is gone",
    );
    let title = page.eval("document.getElementById('notice-title').textContent");
    assert_eq!(title, "Cannot load the data");
}

#[test]
fn the_page_sends_the_token_from_its_address_or_its_form_and_explains_a_401() {
    // `+`, `/` and `=` survive the address: the fragment is percent-decoded, `+` kept.
    const TOKEN: &str = "s3c+r/t=0123456789abcdef";
    let server = Server::start(&["--workers", "1", "--token", TOKEN]);
    let browser = Chromium::launch();
    let mut page = Driver::start(&browser);
    page.navigate(&format!("{}/#token=not-the-token-at-all", server.base));
    page.wait_for(
        "document.body.dataset.status === 'unauthorized'",
        "the page to say a token is needed",
    );
    let notice = page.eval(
        "document.getElementById('notice').hidden ? '' : document.getElementById('notice').innerText",
    );
    let notice = notice.as_str().unwrap();
    assert!(
        notice.contains("requires a token") && notice.contains("#token="),
        "{notice}"
    );

    // A query makes it a new document: a change of fragment alone loads nothing.
    page.navigate(&format!(
        "{}/?again#token=s3c+r/t%3D0123456789abcdef",
        server.base
    ));
    page.wait_for(
        "document.body.dataset.status === 'ok' && document.body.dataset.workers === '1'",
        "the page to load with the token from its address",
    );

    page.navigate(&format!("{}/", server.base));
    page.wait_for(
        "document.body.dataset.status === 'unauthorized' && !document.getElementById('token-form').hidden",
        "the token form",
    );
    page.eval(&format!(
        "document.getElementById('token-input').value = '{TOKEN}'; \
         document.getElementById('token-form').requestSubmit(); location.hash"
    ));
    page.wait_for(
        "document.body.dataset.status === 'ok' && document.body.dataset.workers === '1'",
        "the page to load with the typed token",
    );
}

/// A 503 on the page's data calls cannot be had from a real server on demand, so a
/// stand-in answers them: the page shows the server's message and keeps trying.
#[test]
fn the_page_shows_the_servers_error_and_retries() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let status = Arc::new(AtomicU16::new(503));
    let (base, seen) = runtime.block_on(refusing_server(status.clone()));
    let browser = Chromium::launch();
    let mut page = Driver::start(&browser);
    page.navigate(&format!("{base}/#token=given"));
    page.wait_for(
        "document.body.dataset.status === 'error' && document.getElementById('token-form').hidden",
        "the page to show the server's error",
    );
    let text = page.eval("document.getElementById('notice-text').textContent");
    assert!(
        text.as_str().unwrap().contains("refused on purpose"),
        "{text}"
    );
    let calls = seen.lock().unwrap().len();
    wait_until_more(&seen, calls);
    assert!(seen.lock().unwrap().iter().all(|h| h == "Bearer given"));
}

/// Waits (bounded) until the refusing server saw more than `calls` calls.
fn wait_until_more(seen: &Mutex<Vec<String>>, calls: usize) {
    let start = Instant::now();
    while seen.lock().unwrap().len() <= calls {
        assert!(start.elapsed() < LIMIT, "the page stopped calling");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A server that serves the dashboard's page and refuses every API call with `status`;
/// it notes each call's `Authorization` header.
async fn refusing_server(status: Arc<AtomicU16>) -> (String, Arc<Mutex<Vec<String>>>) {
    use axum::http::{HeaderMap, StatusCode, Uri, header};
    use axum::response::{Html, IntoResponse};
    let seen = Arc::new(Mutex::new(Vec::new()));
    let noted = seen.clone();
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(|| async { Html(include_str!("../assets/dashboard.html")) }),
        )
        .fallback(move |uri: Uri, headers: HeaderMap| {
            let (noted, status) = (noted.clone(), status.clone());
            async move {
                let auth = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                // The browser asks for /favicon.ico by itself; the page's calls are /v1/.
                if uri.path().starts_with("/v1/") {
                    noted.lock().unwrap().push(auth.to_owned());
                }
                let error = json!({"ok": false, "error": {"category": "system",
                    "kind": "refused", "message": "refused on purpose",
                    "retryable": false, "context": {}}});
                let status = StatusCode::from_u16(status.load(Ordering::Relaxed)).unwrap();
                (status, axum::Json(error)).into_response()
            }
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, seen)
}

/// Calls sent to a server by `concurrency` tasks until stopped: mostly `echo`, some
/// short `sleep`s, one in twenty a `raise_error`.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
}

impl Load {
    fn start(runtime: &tokio::runtime::Runtime, server: &Server, concurrency: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        for task in 0..concurrency {
            let (stop, done, url) = (stop.clone(), done.clone(), server.url("/v1/execute"));
            runtime.spawn(async move {
                let client = reqwest::Client::new();
                let mut i = task;
                while !stop.load(Ordering::Relaxed) {
                    let body = match i % 20 {
                        0 => json!({"command": "raise_error", "args": {"message": "a planned failure"}}),
                        n if n % 4 == 0 => json!({"command": "sleep", "args": {"seconds": 0.02}}),
                        _ => json!({"command": "echo", "args": {"i": i}}),
                    };
                    if client.post(&url).json(&body).send().await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    i += concurrency;
                }
            });
        }
        Self { stop, done }
    }

    fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A headless Chromium in its own process group, killed with it when dropped.
struct Chromium {
    child: Child,
    devtools: String,
    dir: tempfile::TempDir,
}

impl Chromium {
    /// Starts the system's Chromium; the test fails when there is none.
    fn launch() -> Self {
        let binary = ["chromium", "chromium-browser"]
            .into_iter()
            .find_map(find_on_path)
            .unwrap_or_else(|| {
                panic!("no chromium on PATH: install it (Debian: apt-get install -y chromium; scripts/test does)")
            });
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-background-timer-throttling",
                "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", dir.path().display()))
            .arg("about:blank")
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
            for line in lines.by_ref() {
                if let Some(ws) = line.split("DevTools listening on ").nth(1) {
                    let _ = tx.send(ws.to_owned());
                    break;
                }
            }
            lines.for_each(drop);
        });
        let Ok(ws) = rx.recv_timeout(LIMIT) else {
            let _ = child.kill();
            panic!("chromium did not open its DevTools port within {LIMIT:?}");
        };
        let port = ws
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        Self {
            child,
            devtools: format!("http://{port}"),
            dir,
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `tests/browser/cdp_driver.py` driving the browser's page: one JSON line per command.
struct Driver {
    child: Child,
    stdin: Option<ChildStdin>,
    answers: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Driver {
    fn start(browser: &Chromium) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/cdp_driver.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(&browser.devtools)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = drain(child.stderr.take().unwrap());
        let stdout = child.stdout.take().unwrap();
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self {
            stdin: child.stdin.take(),
            child,
            answers,
            stderr,
        }
    }

    fn send(&mut self, command: Value) -> Value {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        let line = self.answers.recv_timeout(LIMIT).unwrap_or_else(|_| {
            panic!(
                "the browser driver did not answer {command} within {LIMIT:?}; stderr:\n{}",
                self.stderr.lock().unwrap()
            )
        });
        let answer: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(answer["ok"], true, "{command} → {answer}");
        answer
    }

    fn navigate(&mut self, url: &str) {
        self.send(json!({"cmd": "navigate", "url": url}));
    }

    fn eval(&mut self, expr: &str) -> Value {
        self.send(json!({"cmd": "eval", "expr": expr}))["value"].take()
    }

    /// A `data-*` attribute of the page's body, as a number.
    fn number(&mut self, key: &str) -> u64 {
        let value = self.eval(&format!("document.body.dataset.{key}"));
        value
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key}: {value}"))
    }

    /// Polls `expr` until it is true; fails with the page's data attributes after `LIMIT`.
    fn wait_for(&mut self, expr: &str, what: &str) {
        self.wait_within(expr, what, LIMIT);
    }

    fn wait_within(&mut self, expr: &str, what: &str, limit: Duration) {
        let start = Instant::now();
        while self.eval(expr) != json!(true) {
            if start.elapsed() > limit {
                let state = self.eval("JSON.stringify(document.body.dataset)");
                panic!("timed out after {limit:?} waiting for {what}; page: {state}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&mut self, path: &Path, width: u32, height: u32) {
        let path = path.to_string_lossy();
        self.send(json!({"cmd": "screenshot", "path": path, "width": width, "height": height}));
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if common::wait_exit(&mut self.child, Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
