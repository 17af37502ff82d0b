//! Streaming over Server-Sent Events, request ids and cancellation, through a real
//! `pyherd serve` on loopback: chunk/end/error events, errors before the stream starts,
//! `X-Request-Id` both ways, `DELETE /v1/calls/{id}`, a client that disconnects, a
//! client that stops reading (backpressure), and the limit on open streams.

mod common;

use std::time::Duration;

use common::{Server, get_json, wait_until};
use serde_json::{Value, json};

const TESTING: [&str; 4] = ["--handlers", "pyherd_worker.testing", "--workers", "1"];

/// One Server-Sent Event: its name and its data parsed as JSON.
#[derive(Debug)]
struct Event {
    name: String,
    data: Value,
}

/// An open event stream.
struct Events {
    response: reqwest::Response,
    buffer: String,
}

impl Events {
    /// The next event, skipping keep-alive comments; `None` at the end of the body.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(at) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..at + 2).collect();
                let mut name = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if name.is_empty() {
                    continue;
                }
                let data = serde_json::from_str(&data).expect("event data is JSON");
                return Some(Event { name, data });
            }
            let chunk = self.response.chunk().await.expect("read the stream")?;
            self.buffer
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }

    /// Every remaining event.
    async fn rest(&mut self) -> Vec<Event> {
        let mut all = Vec::new();
        while let Some(e) = self.next().await {
            all.push(e);
        }
        all
    }
}

async fn post(url: String, body: Value, rid: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new().post(url).json(&body);
    if let Some(rid) = rid {
        request = request.header("x-request-id", rid);
    }
    request.send().await.expect("POST")
}

/// Opens a stream that must start (200, text/event-stream).
async fn open(server: &Server, path: &str, body: Value, rid: Option<&str>) -> Events {
    let response = post(server.url(path), body, rid).await;
    assert_eq!(response.status(), 200);
    let kind = response.headers()["content-type"].to_str().unwrap();
    assert!(kind.starts_with("text/event-stream"), "{kind}");
    Events {
        response,
        buffer: String::new(),
    }
}

fn header(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn a_stream_sends_one_event_per_chunk_then_end() {
    let server = Server::start(&TESTING);
    let mut events = open(
        &server,
        "/v1/stream",
        json!({"command": "acount", "args": {"to": 3}}),
        Some("sse-1"),
    )
    .await;
    assert_eq!(header(&events.response).as_deref(), Some("sse-1"));
    let all = events.rest().await;
    let names: Vec<&str> = all.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["chunk", "chunk", "chunk", "end"]);
    assert_eq!(all[1].data, json!({"i": 1}));
    let end = &all[3].data;
    assert_eq!(
        (end["request_id"].as_str(), end["chunks"].as_u64()),
        (Some("sse-1"), Some(3))
    );
    assert_eq!(end["worker_id"], "w1");
    assert!(end["duration_us"].as_u64().unwrap() > 0);
    // In a session too.
    let mut events = open(
        &server,
        "/v1/sessions/s1/stream",
        json!({"command": "ctx_info"}),
        None,
    )
    .await;
    let all = events.rest().await;
    assert_eq!(all[0].data["session_id"], "s1");
    assert_eq!(all[1].name, "end");
    assert!(header(&events.response).unwrap().starts_with('r'));
}

#[tokio::test]
async fn an_error_mid_stream_is_an_error_event_after_the_chunks() {
    let server = Server::start(&TESTING);
    let mut events = open(
        &server,
        "/v1/stream",
        json!({"command": "count_then_fail", "args": {"n": 2}}),
        None,
    )
    .await;
    let all = events.rest().await;
    let names: Vec<&str> = all.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["chunk", "chunk", "error"]);
    let error = &all[2].data;
    assert_eq!(
        (error["category"].as_str(), error["kind"].as_str()),
        (Some("python"), Some("python_exception"))
    );
    assert_eq!(error["context"]["python_type"], "ValueError");
    assert_eq!(
        error["context"]["request_id"].as_str(),
        header(&events.response).as_deref()
    );
}

#[tokio::test]
async fn errors_before_the_stream_starts_are_json_error_responses() {
    let server = Server::start(&TESTING);
    let response = post(
        server.url("/v1/stream"),
        json!({"command": "nope"}),
        Some("early-1"),
    )
    .await;
    assert_eq!(response.status(), 404);
    assert_eq!(header(&response).as_deref(), Some("early-1"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["kind"], "unknown_command");
    let response = post(server.url("/v1/stream"), json!({"cmd": "count"}), None).await;
    assert_eq!(response.status(), 400);
    let response = post(
        server.url("/v1/stream"),
        json!({"command": "count"}),
        Some("bad id"),
    )
    .await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["kind"], "invalid_request_id");
    let response = post(
        server.url("/v1/sessions/a%2Fb/stream"),
        json!({"command": "count"}),
        None,
    )
    .await;
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn execute_takes_and_answers_the_request_id() {
    let server = Server::start(&TESTING);
    let response = post(
        server.url("/v1/execute"),
        json!({"command": "ctx_info"}),
        Some("exec-7"),
    )
    .await;
    assert_eq!(header(&response).as_deref(), Some("exec-7"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["result"]["request_id"], "exec-7");
    let response = post(
        server.url("/v1/sessions/s2/execute"),
        json!({"command": "ctx_info"}),
        None,
    )
    .await;
    let generated = header(&response).expect("a generated id");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["result"]["request_id"].as_str(),
        Some(generated.as_str())
    );
    let response = post(
        server.url("/v1/execute"),
        json!({"command": "crash"}),
        Some("exec-8"),
    )
    .await;
    assert_eq!(response.status(), 502);
    assert_eq!(header(&response).as_deref(), Some("exec-8"));
    let response = reqwest::Client::new()
        .post(server.url("/v1/execute"))
        .json(&json!({"command": "echo"}))
        .header(
            "x-request-id",
            reqwest::header::HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["kind"], "invalid_request_id");
    let long = "x".repeat(129);
    let response = post(
        server.url("/v1/execute"),
        json!({"command": "echo"}),
        Some(&long),
    )
    .await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["kind"], "invalid_request_id");
}

#[tokio::test]
async fn errors_before_the_call_is_admitted_still_carry_its_request_id() {
    let server = Server::start(&TESTING);
    let cases = [
        (
            "/v1/execute",
            json!({"command": "echo", "timeout_ms": 0}),
            400,
        ),
        ("/v1/execute", json!(["echo"]), 400),
        (
            "/v1/sessions/s1/execute",
            json!({"command": "echo", "session_id": "s2"}),
            400,
        ),
        ("/v1/stream", json!({"command": "count", "bogus": 1}), 400),
        (
            "/v1/sessions/s1/stream",
            json!({"command": "count", "timeout_ms": -1}),
            400,
        ),
        (
            "/v1/execute",
            json!({"command": "echo", "args": [1e300, "x"]}),
            200,
        ),
    ];
    for (i, (path, body, status)) in cases.into_iter().enumerate() {
        let rid = format!("early-{i}");
        let response = post(server.url(path), body, Some(&rid)).await;
        assert_eq!(response.status(), status, "{path}");
        assert_eq!(header(&response).as_deref(), Some(rid.as_str()), "{path}");
        if status == 400 {
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["context"]["request_id"], rid, "{path}");
        }
    }
    // Refused by the body checks, before any route: too deep, not JSON.
    let deep = (0..200).fold(json!(1), |inner, _| json!([inner]));
    let refusals = [
        reqwest::Client::new()
            .post(server.url("/v1/execute"))
            .json(&json!({"command": "echo", "args": deep})),
        reqwest::Client::new()
            .post(server.url("/v1/execute"))
            .header("content-type", "text/plain")
            .body("echo"),
    ];
    for (request, status) in refusals.into_iter().zip([400, 415]) {
        let response = request
            .header("x-request-id", "early-body")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status);
        assert_eq!(header(&response).as_deref(), Some("early-body"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["context"]["request_id"], "early-body");
    }
}

#[tokio::test]
async fn delete_cancels_a_call_in_flight() {
    let server = Server::start(&TESTING);
    let url = server.url("/v1/execute");
    let call = tokio::spawn(async move {
        let response = post(
            url,
            json!({"command": "sleep", "args": {"seconds": 60}}),
            Some("slow-1"),
        )
        .await;
        (
            response.status().as_u16(),
            response.json::<Value>().await.unwrap(),
        )
    });
    let stats = server.url("/v1/stats");
    wait_until(Duration::from_secs(10), "the call to run", || {
        let stats = stats.clone();
        async move { get_json(&stats).await["busy"] == 1 }
    })
    .await;
    let client = reqwest::Client::new();
    let response = client
        .delete(server.url("/v1/calls/slow-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({"request_id": "slow-1", "cancelled": true}));
    let (status, body) = call.await.unwrap();
    assert_eq!(status, 409);
    assert_eq!(
        (
            body["error"]["category"].as_str(),
            body["error"]["kind"].as_str()
        ),
        (Some("invalid_request"), Some("cancelled"))
    );
    let response = client
        .delete(server.url("/v1/calls/slow-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["kind"], "call_not_found");
    for bad in ["a%20b", "%FF"] {
        let url = server.url(&format!("/v1/calls/{bad}"));
        let response = client.delete(url).send().await.unwrap();
        assert_eq!(response.status(), 400, "{bad}");
    }
    // The killed worker is replaced and the server serves on.
    wait_until(Duration::from_secs(20), "a replacement worker", || {
        let stats = stats.clone();
        async move { get_json(&stats).await["available"] == 1 }
    })
    .await;
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("pyherd_worker_restarts_total{reason=\"cancelled\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_its_stream_and_frees_the_worker() {
    let server = Server::start(&TESTING);
    let dir = tempfile::tempdir().unwrap();
    let closed = dir.path().join("closed");
    let body =
        json!({"command": "count", "args": {"to": 1_000_000, "delay": 0.005, "closed": closed}});
    let mut events = open(&server, "/v1/stream", body, None).await;
    assert_eq!(events.next().await.unwrap().name, "chunk");
    drop(events);
    let closed_seen = closed.clone();
    wait_until(
        Duration::from_secs(20),
        "the generator to be closed",
        || {
            let closed = closed_seen.clone();
            async move { closed.exists() }
        },
    )
    .await;
    let stats = server.url("/v1/stats");
    wait_until(Duration::from_secs(20), "the worker to be free", || {
        let stats = stats.clone();
        async move { get_json(&stats).await["available"] == 1 }
    })
    .await;
    let (status, _) = common::execute(&server, json!({"command": "echo"})).await;
    assert_eq!(status, 200);
}

/// The most a kernel socket buffer may hold, from `/proc/sys/net/ipv4/<name>`.
fn socket_buffer_max(name: &str) -> usize {
    let text = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).unwrap();
    text.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_slow_http_reader_holds_the_worker_back() {
    let server = Server::start(&TESTING);
    let dir = tempfile::tempdir().unwrap();
    let progress = dir.path().join("progress");
    let produced = || {
        std::fs::read_to_string(&progress)
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(0)
    };
    // 4 KiB chunks, 160 MiB in all.
    let total = 40_000;
    let body =
        json!({"command": "count", "args": {"to": total, "pad": 4096, "progress": progress}});
    let mut events = open(&server, "/v1/stream", body, None).await;
    assert_eq!(events.next().await.unwrap().name, "chunk");
    // Between the worker and this reader that reads no more, chunks can wait in: the
    // worker's pipe (64 KiB), the host's buffer, the HTTP stacks' buffers (1 MiB is
    // generous) and the two sockets' kernel buffers.
    let buffered =
        64 * 1024 + 1024 * 1024 + socket_buffer_max("tcp_wmem") + socket_buffer_max("tcp_rmem");
    let bound = buffered / 4096 + pyherd::STREAM_BUFFER + 2;
    assert!(bound < total / 2, "{bound}");
    let ran = || async { produced() > 64 };
    wait_until(Duration::from_secs(20), "the worker to run ahead", ran).await;
    let watched = std::time::Instant::now();
    let mut most = 0;
    while watched.elapsed() < Duration::from_millis(1500) {
        most = most.max(produced());
        assert!(
            most <= bound,
            "the worker produced {most} chunks ahead of 1 read (bound {bound})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Reading on lets it go on.
    for i in 1..=most + 100 {
        let event = events.next().await.unwrap();
        assert_eq!(
            (event.name.as_str(), &event.data["i"]),
            ("chunk", &json!(i))
        );
    }
    // (The progress file is rewritten before each chunk: a read may catch it empty.)
    let further = || async { produced() > most };
    wait_until(Duration::from_secs(20), "the worker to go on", further).await;
}

#[tokio::test]
async fn streams_over_the_limit_are_refused_with_503() {
    let server = Server::start(&[
        "--handlers",
        "pyherd_worker.testing",
        "--workers",
        "2",
        "--max-streams",
        "1",
    ]);
    let body = json!({"command": "count", "args": {"to": 1_000_000, "delay": 0.01}});
    let mut first = open(&server, "/v1/stream", body.clone(), None).await;
    assert_eq!(first.next().await.unwrap().name, "chunk");
    let response = post(server.url("/v1/stream"), body.clone(), None).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_some());
    let refused: Value = response.json().await.unwrap();
    assert_eq!(
        (
            refused["error"]["category"].as_str(),
            refused["error"]["kind"].as_str()
        ),
        (Some("resource"), Some("too_many_streams"))
    );
    // Plain calls are not streams.
    let (status, _) = common::execute(&server, json!({"command": "echo"})).await;
    assert_eq!(status, 200);
    drop(first);
    let url = server.url("/v1/stream");
    wait_until(
        Duration::from_secs(20),
        "the stream's slot to be free",
        || {
            let url = url.clone();
            async move {
                let response =
                    post(url, json!({"command": "count", "args": {"to": 1}}), None).await;
                response.status() == 200
            }
        },
    )
    .await;
}

#[test]
fn a_stream_limit_of_zero_is_refused() {
    let mut child = common::pyherd(None)
        .args(["serve", "--bind", "127.0.0.1:0", "--max-streams", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = common::wait_exit(&mut child, Duration::from_secs(30)).expect("it exits");
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("max_streams"), "{err}");
}
