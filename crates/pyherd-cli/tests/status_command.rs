//! `pyherd status` against a real `pyherd serve`: the table lists every worker, `--json`
//! parses, `--watch` refreshes until Ctrl-C, a token is sent as a bearer, and a server
//! that cannot be reached is a clear error with exit code 1.

mod common;

use std::io::{BufRead, BufReader};
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

#[tokio::test]
async fn the_token_is_sent_as_a_bearer_and_a_refusal_is_reported() {
    const TOKEN: &str = "status-token-0123456789";
    let server = Server::start(&["--workers", "1", "--token", TOKEN]);
    let url = server.base.clone();
    let status = move |token: Option<&'static str>| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let mut cmd = pyherd(None);
            cmd.args(["status", "--url", &url, "--json"]);
            if let Some(token) = token {
                cmd.env("PYHERD_TOKEN", token);
            }
            cmd.output().unwrap()
        })
    };
    let out = status(Some(TOKEN)).await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["workers"].as_array().unwrap().len(), 1, "{shown}");
    for refused in [None, Some("not-the-token-at-all")] {
        let out = status(refused).await.unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("401"), "{err}");
        assert!(err.contains("401 Unauthorized"), "{err}");
    }
}
