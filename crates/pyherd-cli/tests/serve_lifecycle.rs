//! `pyherd serve` as a process: graceful drain on SIGTERM/SIGINT, a clear non-zero exit
//! when workers cannot start, and settings from file < environment < flags.

mod common;

use std::time::{Duration, Instant};

use common::{Server, execute, exists, get_json, pyherd, wait_exit, wait_until};
use nix::sys::signal::Signal;
use serde_json::json;

#[tokio::test]
async fn sigterm_lets_the_call_in_flight_finish_then_exits_zero_leaving_no_worker() {
    let server = Server::start(&["--workers", "2", "--handlers", "pyherd_worker.testing"]);
    let pids: Vec<u32> = common::workers(&server)
        .await
        .into_iter()
        .map(|(pid, _)| pid)
        .collect();
    let body = json!({"command": "sleep", "args": {"seconds": 0.5}});
    let in_flight = tokio::spawn(common::post_execute(server.url("/v1/execute"), body));
    let stats = server.url("/v1/stats");
    wait_until(Duration::from_secs(5), "the call to run", || async {
        get_json(&stats).await["busy"] == 1
    })
    .await;
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    let (code, body) = in_flight.await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["result"], json!({"slept": 0.5}));
    for pid in pids {
        assert!(!exists(pid), "worker {pid} outlived the server");
    }
}

#[tokio::test]
async fn sigint_also_drains_and_exits_zero() {
    let server = Server::start(&["--workers", "1"]);
    assert_eq!(execute(&server, json!({"command": "ping"})).await.0, 200);
    common::signal(server.pid(), Signal::SIGINT);
    let mut server = server;
    let status = tokio::task::spawn_blocking(move || server.wait(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("exit after SIGINT");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn a_second_signal_ends_the_grace_period_at_once() {
    let server = Server::start(&["--workers", "2", "--handlers", "pyherd_worker.testing"]);
    let body = json!({"command": "sleep", "args": {"seconds": 600}});
    let stuck = tokio::spawn(common::post_execute(server.url("/v1/execute"), body));
    let stats = server.url("/v1/stats");
    wait_until(Duration::from_secs(5), "the call to run", || async {
        get_json(&stats).await["busy"] == 1
    })
    .await;
    let workers = common::workers(&server).await;
    let pid_in = |state: &str| {
        workers
            .iter()
            .find(|(_, s)| s == state)
            .map(|(pid, _)| *pid)
            .unwrap()
    };
    let (busy, idle) = (pid_in("busy"), pid_in("ready"));
    let pid = server.pid();
    common::signal(pid, Signal::SIGTERM);
    // Draining (the grace is 30 s): the idle worker is stopped, the busy one keeps its call.
    wait_until(
        Duration::from_secs(10),
        "the idle worker to stop",
        || async { !common::running(idle) },
    )
    .await;
    assert!(common::running(busy));
    assert!(!stuck.is_finished());
    let began = Instant::now();
    common::signal(pid, Signal::SIGTERM);
    let (code, body) = tokio::time::timeout(Duration::from_secs(10), stuck)
        .await
        .expect("the second signal ends the call")
        .unwrap();
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["error"]["kind"], "shutting_down");
    let mut server = server;
    let status = tokio::task::spawn_blocking(move || server.wait(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("exit after the second signal");
    assert!(status.success(), "{status}");
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    assert!(!common::running(busy));
}

/// A call still waiting for a worker when the grace period ends is answered
/// `shutting_down`, as the running one is, before `serve` exits.
#[tokio::test]
async fn a_call_still_queued_when_the_grace_ends_gets_503_shutting_down() {
    let server = Server::start(&[
        "--workers",
        "1",
        "--handlers",
        "pyherd_worker.testing",
        "--shutdown-grace-ms",
        "300",
        "--queue-timeout-ms",
        "600000",
    ]);
    let url = server.url("/v1/execute");
    let body = json!({"command": "sleep", "args": {"seconds": 600}});
    let running = tokio::spawn(common::post_execute(url.clone(), body));
    let stats = server.url("/v1/stats");
    wait_until(Duration::from_secs(5), "the call to run", || async {
        get_json(&stats).await["busy"] == 1
    })
    .await;
    let queued = tokio::spawn(common::post_execute(url, json!({"command": "ping"})));
    wait_until(Duration::from_secs(5), "a queued call", || async {
        get_json(&stats).await["queued"] == 1
    })
    .await;
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    for call in [running, queued] {
        let (code, body) = call.await.unwrap();
        assert_eq!(code, 503, "{body}");
        assert_eq!(body["error"]["kind"], "shutting_down", "{body}");
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_a_stream_does_not_keep_serve_up_after_sigterm() {
    use std::io::Write;
    let server = Server::start(&[
        "--workers",
        "1",
        "--handlers",
        "pyherd_worker.testing",
        "--shutdown-grace-ms",
        "1000",
    ]);
    // Chunks of 100 kB without end, on a connection that never reads them: the socket's
    // buffers fill, and the server can write no more to it.
    let address = server.url("").trim_start_matches("http://").to_owned();
    let mut client = std::net::TcpStream::connect(address.trim_end_matches('/')).unwrap();
    let body = r#"{"command":"count","args":{"to":1000000,"pad":100000}}"#;
    let head = format!(
        "POST /v1/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    client.write_all(head.as_bytes()).unwrap();
    client.write_all(body.as_bytes()).unwrap();
    let stats = server.url("/v1/stats");
    wait_until(Duration::from_secs(5), "the stream to run", || async {
        get_json(&stats).await["busy"] == 1
    })
    .await;
    let began = Instant::now();
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    // The grace (1 s), then 2 s for the answers still being written.
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    drop(client);
}

#[test]
fn workers_that_cannot_start_make_serve_exit_non_zero_with_the_python_error() {
    let began = Instant::now();
    let mut child = common::spawn_serve_with_fixture("raise_at_import.py", 20_000);
    let stderr = common::drain(child.stderr.take().unwrap());
    let status = wait_exit(&mut child, Duration::from_secs(25)).expect("serve must exit");
    assert!(began.elapsed() < Duration::from_secs(20));
    assert_eq!(status.code(), Some(3), "initialization failures exit 3");
    let needles = ["OPENAI_API_KEY is not set", "handler_import_failed"];
    let text = common::drained(&stderr, &needles, Duration::from_secs(5));
    assert!(text.contains("OPENAI_API_KEY is not set"), "{text}");
    assert!(text.contains("handler_import_failed"), "{text}");
}

#[test]
fn workers_that_keep_dying_at_start_make_serve_exit_3_after_five_tries() {
    let began = Instant::now();
    let mut child = common::spawn_serve_with_fixture("hard_exit_at_import.py", 20_000);
    let stderr = common::drain(child.stderr.take().unwrap());
    let status = wait_exit(&mut child, Duration::from_secs(25)).expect("serve must exit");
    // Four waits between a worker's five starts: 50 + 100 + 200 + 400 ms.
    assert!(began.elapsed() >= Duration::from_millis(750));
    assert_eq!(status.code(), Some(3), "initialization failures exit 3");
    let needles = ["startup_failed", "leaving now"];
    let text = common::drained(&stderr, &needles, Duration::from_secs(5));
    assert!(text.contains("startup_failed"), "{text}");
    assert!(text.contains("leaving now"), "{text}");
    // The first worker to fail five times ends the build: its four retries were logged.
    let retries = text
        .matches("a worker failed to start at the pool's start")
        .count();
    assert!(retries >= 4, "{retries} retries logged: {text}");
}

#[tokio::test]
async fn settings_come_from_file_then_environment_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pyherd.toml"),
        "workers = 3\nmax_queue = 7\nqueue_timeout_ms = 1234\n",
    )
    .unwrap();
    let workers = |server: &Server| {
        let url = server.url("/v1/stats");
        async move { get_json(&url).await["workers"].as_u64().unwrap() }
    };
    let capacity = |server: &Server| {
        let url = server.url("/metrics");
        async move {
            let text = reqwest::get(url).await.unwrap().text().await.unwrap();
            text.lines()
                .find(|l| l.starts_with("pyherd_queue_capacity "))
                .unwrap()
                .to_owned()
        }
    };
    // File only.
    let server = Server::start_with(pyherd(Some(dir.path())), &[]);
    assert_eq!(workers(&server).await, 3);
    assert_eq!(capacity(&server).await, "pyherd_queue_capacity 7");
    drop(server);
    // Environment over file.
    let mut cmd = pyherd(Some(dir.path()));
    cmd.env("PYHERD_WORKERS", "2");
    let server = Server::start_with(cmd, &[]);
    assert_eq!(workers(&server).await, 2);
    assert_eq!(capacity(&server).await, "pyherd_queue_capacity 7");
    drop(server);
    // Flag over environment.
    let mut cmd = pyherd(Some(dir.path()));
    cmd.env("PYHERD_WORKERS", "2");
    let server = Server::start_with(cmd, &["--workers", "1", "--max-queue", "9"]);
    assert_eq!(workers(&server).await, 1);
    assert_eq!(capacity(&server).await, "pyherd_queue_capacity 9");
}

#[test]
fn an_unknown_key_or_bad_value_in_the_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pyherd.toml"),
        "workers = 2\nmax_qeue = 5\n",
    )
    .unwrap();
    let out = pyherd(Some(dir.path()))
        .args(["serve", "--bind", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("max_qeue") && text.contains("pyherd.toml"),
        "{text}"
    );
    let out = pyherd(None)
        .args(["serve", "--workers", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("workers"));
    let out = pyherd(None)
        .args(["serve", "--bind", "not-an-address"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not-an-address"));
}

#[test]
fn sigterm_while_workers_start_exits_zero_and_kills_them() {
    let mut child = common::spawn_serve_with_fixture("hang_at_import.py", 60_000);
    let began = Instant::now();
    let workers = loop {
        let workers = common::children_of(child.id());
        if workers.len() == 2 {
            break workers;
        }
        assert!(
            began.elapsed() < Duration::from_secs(20),
            "workers never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    common::signal(child.id(), Signal::SIGTERM);
    let status = wait_exit(&mut child, Duration::from_secs(10)).expect("serve must exit");
    assert!(status.success(), "{status}");
    let began = Instant::now();
    while workers.iter().any(|&pid| common::running(pid)) {
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "starting workers outlived the server"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn a_server_killed_with_sigkill_leaves_no_worker_behind() {
    let server = Server::start(&["--workers", "3"]);
    let pids: Vec<u32> = common::workers(&server)
        .await
        .into_iter()
        .map(|(pid, _)| pid)
        .collect();
    let children = common::children_of(server.pid());
    assert!(
        pids.iter().all(|p| children.contains(p)),
        "{pids:?} are the server's children {children:?}"
    );
    common::signal(server.pid(), Signal::SIGKILL);
    drop(server);
    wait_until(
        Duration::from_secs(2),
        "the orphaned workers to exit",
        || async { pids.iter().all(|&pid| !common::running(pid)) },
    )
    .await;
}
