//! `pyherd status` against a real `pyherd serve`: the table lists every worker, `--json`
//! parses, `--watch` refreshes until Ctrl-C, a token is sent as a bearer, and a server
//! that cannot be reached is a clear error with exit code 1.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Server, pyherd, run, wait_exit};
use nix::sys::signal::Signal;
use serde_json::Value;

#[tokio::test]
async fn the_table_lists_every_worker_with_its_pid() {
    let server = Server::start(&["--workers", "2"]);
    let workers = common::workers(&server).await;
    let url = server.base.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || run(&["status", "--url", &url]))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(&format!("pyherd at {}: 2 workers", server.base)),
        "{out}"
    );
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip_while(|l| !l.starts_with("ID"))
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    for (pid, state) in &workers {
        let row = rows
            .iter()
            .find(|r| r[2] == pid.to_string())
            .unwrap_or_else(|| panic!("no row for pid {pid}:\n{out}"));
        assert!(row[0].starts_with('w'), "{out}");
        assert_eq!(row[1], state, "{out}");
        assert_eq!(row[4], "MiB", "{out}");
    }
    assert!(server.terminate().success());
}

#[tokio::test]
async fn json_output_parses_and_has_stats_and_workers() {
    let server = Server::start(&["--workers", "2"]);
    let url = format!("{}/", server.base);
    let (code, out, err) =
        tokio::task::spawn_blocking(move || run(&["status", "--url", &url, "--json"]))
            .await
            .unwrap();
    assert_eq!(code, Some(0), "{err}");
    let doc: Value = serde_json::from_str(&out).expect("one JSON document");
    assert_eq!(doc["stats"]["workers"], 2, "{doc}");
    let ids: Vec<&str> = doc["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["w1", "w2"], "{doc}");
    assert!(server.terminate().success());
}

#[tokio::test]
async fn watch_refreshes_until_ctrl_c() {
    let server = Server::start(&["--workers", "1"]);
    let mut child = pyherd(None)
        .args(["status", "--watch", "--json", "--url", &server.base])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        let began = Instant::now();
        let second: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        (first, second, began.elapsed())
    });
    let (first, second, between) = tokio::time::timeout(Duration::from_secs(30), lines)
        .await
        .expect("two refreshes")
        .unwrap();
    assert_eq!(first["stats"]["workers"], 1);
    assert_eq!(second["workers"][0]["id"], "w1");
    assert!(between >= Duration::from_millis(500), "{between:?}");
    common::signal(child.id(), Signal::SIGINT);
    let stderr = common::drain(child.stderr.take().unwrap());
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(10)))
            .await
            .unwrap()
            .expect("exit after Ctrl-C");
    assert!(status.success(), "{status}: {}", stderr.lock().unwrap());
    assert!(server.terminate().success());
}

#[test]
fn an_unreachable_server_is_a_clear_error_with_exit_code_1() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let (code, out, err) = run(&["status", "--url", &url]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains(&format!("cannot reach the pyherd server at {url}")),
        "{err}"
    );
    let (code, _, err) = run(&["status", "--url", "not a url"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot reach the pyherd server"), "{err}");
}

/// A one-connection HTTP server that answers 401 with the API's error object and
/// returns the request it read.
fn refusing_server() -> (String, std::thread::JoinHandle<String>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "the request ended early");
            request.extend_from_slice(&buf[..n]);
        }
        let body = r#"{"ok":false,"error":{"category":"invalid_request","kind":"unauthorized","message":"a valid bearer token is required","retryable":false,"context":{}}}"#;
        write!(
            stream,
            "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        String::from_utf8_lossy(&request).into_owned()
    });
    (url, handle)
}

#[test]
fn the_token_is_sent_as_a_bearer_and_a_refusal_is_reported() {
    let (url, server) = refusing_server();
    let out = pyherd(None)
        .args(["status", "--url", &url])
        .env("PYHERD_TOKEN", "s3cret")
        .output()
        .unwrap();
    let request = server.join().unwrap();
    assert!(
        request
            .to_ascii_lowercase()
            .contains("authorization: bearer s3cret"),
        "{request}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("401"), "{err}");
    assert!(err.contains("a valid bearer token is required"), "{err}");
}
