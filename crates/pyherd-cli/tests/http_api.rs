//! The HTTP API of `pyherd serve`, through a real server on loopback with real workers:
//! every documented status code and body shape.

mod common;

use std::time::Duration;

use common::{Server, execute, get_json, request, wait_until};
use reqwest::Method;
use serde_json::{Value, json};

const TESTING: [&str; 2] = ["--handlers", "pyherd_worker.testing"];

fn assert_error(body: &Value, category: &str, kind: &str) {
    assert_eq!(body["ok"], false, "{body}");
    let error = &body["error"];
    assert_eq!(error["category"], category, "{body}");
    assert_eq!(error["kind"], kind, "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["retryable"].is_boolean(), "{body}");
    assert!(error["context"].is_object(), "{body}");
}

#[tokio::test]
async fn a_call_answers_with_result_worker_and_duration() {
    let server = Server::start(&["--workers", "2"]);
    let (status, body) =
        execute(&server, json!({"command": "echo", "args": {"x": [1, "é"]}})).await;
    assert_eq!(status, 200);
    assert_eq!(body["ok"], true);
    assert_eq!(body["result"], json!({"x": [1, "é"]}));
    assert!(body["worker_id"].as_str().unwrap().starts_with('w'));
    assert!(body["duration_us"].as_u64().unwrap() > 0);
    assert!(body.get("error").is_none(), "a success carries no error");
    // args default to {}, an explicit null stays null.
    let (_, body) = execute(&server, json!({"command": "echo"})).await;
    assert_eq!(body["result"], json!({}));
    let (_, body) = execute(&server, json!({"command": "echo", "args": null})).await;
    assert_eq!(body["result"], Value::Null);
    let (status, body) = execute(
        &server,
        json!({"command": "ping", "timeout_ms": 5000, "session_id": "s1"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["result"]["pong"], true);
}

#[tokio::test]
async fn malformed_requests_are_400_and_unknown_commands_404() {
    let server = Server::start(&["--workers", "1"]);
    let client = reqwest::Client::new();
    for raw in [
        "{not json",
        "[]",
        "{}",
        r#"{"command": 5}"#,
        r#"{"command": "echo", "extra": 1}"#,
        r#"["echo", {"x": 1}, null, 5000, null, null]"#,
    ] {
        let r = client
            .post(server.url("/v1/execute"))
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{raw}");
        assert_error(
            &r.json().await.unwrap(),
            "invalid_request",
            "malformed_request",
        );
    }
    let (status, body) = execute(&server, json!({"command": "echo", "timeout_ms": 0})).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timeout_ms")
    );
    let (status, body) = execute(&server, json!({"command": "nope"})).await;
    assert_eq!(status, 404);
    assert_error(&body, "invalid_request", "unknown_command");
    assert_eq!(body["error"]["context"]["command"], "nope");
    // A struct's fields in an array, which serde alone would take, are refused by name.
    let (status, body) = request(
        Method::POST,
        &server.url("/v1/sessions"),
        Some(json!(["arr-sess", 10, {"k": 1}])),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error"]["message"],
        "the request body must be a JSON object"
    );
    // The server kept serving.
    assert_eq!(execute(&server, json!({"command": "ping"})).await.0, 200);
}

#[tokio::test]
async fn a_body_over_the_frame_limit_is_413() {
    let server = Server::start(&["--workers", "1", "--max-frame-bytes", "65536"]);
    let big = "x".repeat(200_000);
    let (status, body) = execute(&server, json!({"command": "echo", "args": big})).await;
    assert_eq!(status, 413);
    assert_error(&body, "invalid_request", "payload_too_large");
    // Under the body limit but over the frame once wrapped: refused by the pool, same answer.
    let just_over = "x".repeat(65_536 - 100);
    let (status, body) = execute(&server, json!({"command": "echo", "args": just_over})).await;
    assert_eq!(status, 413);
    assert_error(&body, "invalid_request", "payload_too_large");
    assert_eq!(
        execute(&server, json!({"command": "echo", "args": "small"}))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn python_exceptions_are_500_and_crashes_502() {
    let server = Server::start(&["--workers", "2", TESTING[0], TESTING[1]]);
    let (status, body) = execute(
        &server,
        json!({"command": "raise_error", "args": {"message": "no"}}),
    )
    .await;
    assert_eq!(status, 500);
    assert_error(&body, "python", "python_exception");
    assert_eq!(body["error"]["context"]["python_type"], "ValueError");
    assert!(
        body["error"]["context"]["traceback"]
            .as_str()
            .unwrap()
            .contains("ValueError: no")
    );
    let (status, body) = execute(&server, json!({"command": "not_json"})).await;
    assert_eq!(status, 500);
    assert_error(&body, "python", "result_not_serializable");
    let (status, body) = execute(&server, json!({"command": "crash", "args": {"code": 9}})).await;
    assert_eq!(status, 502);
    assert_error(&body, "communication", "worker_crashed");
    assert_eq!(body["error"]["context"]["exit_status"], "exit status: 9");
    assert_eq!(body["error"]["retryable"], true);
    assert_eq!(
        execute(&server, json!({"command": "echo", "args": 1}))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn an_execution_timeout_is_504() {
    let server = Server::start(&["--workers", "1", TESTING[0], TESTING[1]]);
    let (status, body) = execute(
        &server,
        json!({"command": "sleep", "args": {"seconds": 60}, "timeout_ms": 200}),
    )
    .await;
    assert_eq!(status, 504);
    assert_error(&body, "timeout", "execution_timeout");
    assert_eq!(body["error"]["context"]["timeout_ms"], 200);
    wait_until(Duration::from_secs(10), "the replacement", || async {
        get_json(&server.url("/v1/stats")).await["restarts"] == 1
    })
    .await;
    assert_eq!(execute(&server, json!({"command": "ping"})).await.0, 200);
}

fn occupy(server: &Server, seconds: f64) -> tokio::task::JoinHandle<(u16, Value)> {
    let body = json!({"command": "sleep", "args": {"seconds": seconds}});
    tokio::spawn(common::post_execute(server.url("/v1/execute"), body))
}

#[tokio::test]
async fn saturation_and_queue_timeout_are_503_with_retry_after() {
    let server = Server::start(&[
        "--workers",
        "1",
        "--max-queue",
        "1",
        "--queue-timeout-ms",
        "300",
        TESTING[0],
        TESTING[1],
    ]);
    let stats = server.url("/v1/stats");
    let busy = occupy(&server, 1.5);
    wait_until(Duration::from_secs(5), "a busy worker", || async {
        get_json(&stats).await["busy"] == 1
    })
    .await;
    let queued = occupy(&server, 0.0);
    wait_until(Duration::from_secs(5), "a queued call", || async {
        get_json(&stats).await["queued"] == 1
    })
    .await;
    let r = reqwest::Client::new()
        .post(server.url("/v1/execute"))
        .json(&json!({"command": "echo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_error(&r.json().await.unwrap(), "resource", "pool_saturated");
    // The queued call gives up after its queue timeout.
    let (status, body) = queued.await.unwrap();
    assert_eq!(status, 503);
    assert_error(&body, "timeout", "queue_timeout");
    assert_eq!(busy.await.unwrap().0, 200);
    let stats = get_json(&stats).await;
    assert_eq!(stats["queue_timeouts"], 1);
}

#[tokio::test]
async fn stats_workers_health_and_metrics_describe_the_pool() {
    let server = Server::start(&[
        "--workers",
        "2",
        "--max-workers",
        "3",
        "--health-interval-ms",
        "60000",
        "--max-requests",
        "1000",
    ]);
    for _ in 0..5 {
        execute(&server, json!({"command": "echo"})).await;
    }
    execute(&server, json!({"command": "missing"})).await;
    let stats = get_json(&server.url("/v1/stats")).await;
    for key in [
        "workers",
        "available",
        "busy",
        "queued",
        "requests",
        "errors",
        "queue_timeouts",
        "restarts",
    ] {
        assert!(stats[key].is_u64(), "{key} in {stats}");
    }
    assert_eq!(
        (
            stats["workers"].as_u64(),
            stats["requests"].as_u64(),
            stats["errors"].as_u64()
        ),
        (Some(2), Some(6), Some(1))
    );
    let workers = get_json(&server.url("/v1/workers")).await;
    let workers = workers["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    let served: u64 = workers
        .iter()
        .map(|w| w["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(served, 5);
    for w in workers {
        assert!(
            w["pid"].as_u64().is_some() && w["rss_bytes"].as_u64().unwrap() > 1 << 20,
            "{w}"
        );
        assert_eq!(w["state"], "ready");
        assert!(w["rss_mb"].as_u64().unwrap() >= 1, "{w}");
        assert!(w["uptime_ms"].is_u64() && w["id"].is_string());
    }
    assert_eq!(get_json(&server.url("/healthz")).await["status"], "ok");
    let ready = reqwest::get(server.url("/readyz")).await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let metrics = reqwest::get(server.url("/metrics")).await.unwrap();
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = metrics.text().await.unwrap();
    for needle in [
        "pyherd_requests_total{command=\"echo\",outcome=\"ok\"} 5",
        "pyherd_request_duration_seconds_bucket{command=\"echo\",outcome=\"ok\",le=\"+Inf\"} 5",
        "pyherd_requests_total{command=\"(unknown)\",outcome=\"unknown_command\"} 1",
        "pyherd_queue_depth 0",
        "pyherd_workers{state=\"ready\"} 2",
        "pyherd_worker_restarts_total{reason=\"crashed\"} 0",
        "pyherd_worker_transitions_total{from=\"starting\",to=\"ready\"} 2",
        "pyherd_worker_transitions_total{from=\"ready\",to=\"busy\"} 5",
        "pyherd_spawn_breaker_open 0",
    ] {
        assert!(text.contains(needle), "missing {needle}:\n{text}");
    }
    let r = reqwest::get(server.url("/v2/nothing")).await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_error(&r.json().await.unwrap(), "invalid_request", "not_found");
    let r = reqwest::get(server.url("/v1/execute")).await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_error(
        &r.json().await.unwrap(),
        "invalid_request",
        "method_not_allowed",
    );
}

#[tokio::test]
async fn readiness_tells_the_truth_while_no_worker_can_start() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("broken");
    let mut cmd = common::pyherd(None);
    cmd.env("PYHERD_TEST_BREAK_FILE", &marker);
    let breakable = common::fixture("breakable.py");
    let server = Server::start_with(
        cmd,
        &[
            "--workers",
            "1",
            "--handlers",
            &breakable,
            TESTING[0],
            TESTING[1],
        ],
    );
    let readyz = server.url("/readyz");
    assert_eq!(reqwest::get(&readyz).await.unwrap().status().as_u16(), 200);
    // From now on no worker can start; the one worker dies.
    std::fs::write(&marker, "").unwrap();
    assert_eq!(execute(&server, json!({"command": "crash"})).await.0, 502);
    wait_until(Duration::from_secs(10), "readyz to say 503", || async {
        reqwest::get(&readyz).await.unwrap().status().as_u16() == 503
    })
    .await;
    let body = get_json(&readyz).await;
    assert_eq!(body["ready"], false);
    // Once the starts keep failing, readiness says why and calls fail at once.
    wait_until(
        Duration::from_secs(15),
        "the spawn breaker to open",
        || async { get_json(&readyz).await.get("spawn_failing").is_some() },
    )
    .await;
    let why = &get_json(&readyz).await["spawn_failing"];
    assert_eq!(why["kind"], "spawn_failing");
    assert!(
        why["context"]["stderr_tail"]
            .as_str()
            .is_some_and(|t| t.contains("broken on purpose")),
        "{why}"
    );
    let (status, body) = execute(&server, json!({"command": "alive"})).await;
    assert_eq!(status, 503);
    assert_error(&body, "initialization", "spawn_failing");
    // Healed: a replacement starts and readiness comes back.
    std::fs::remove_file(&marker).unwrap();
    wait_until(
        Duration::from_secs(15),
        "readyz to say 200 again",
        || async { reqwest::get(&readyz).await.unwrap().status().as_u16() == 200 },
    )
    .await;
    assert_eq!(execute(&server, json!({"command": "alive"})).await.0, 200);
}

#[tokio::test]
async fn idempotent_calls_are_retried_and_an_open_breaker_answers_503() {
    let flaky = common::fixture("flaky.py");
    let server = Server::start(&[
        "--workers",
        "2",
        "--handlers",
        &flaky,
        "--retry-base-ms",
        "5",
        "--breaker-commands",
        "crash_while",
        "--breaker-failures",
        "1",
        "--breaker-open-ms",
        "60000",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let args = json!({"marker": dir.path().join("marker"), "log": dir.path().join("log")});
    let (status, body) = execute(
        &server,
        json!({"command": "crash_first", "args": args, "idempotent": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for wrong in [json!("yes"), json!(1), json!({})] {
        let (status, body) =
            execute(&server, json!({"command": "echo", "idempotent": wrong})).await;
        assert_eq!(status, 400, "{body}");
        assert_error(&body, "invalid_request", "malformed_request");
        assert!(
            body["error"]["message"].as_str().unwrap().contains("bool"),
            "{body}"
        );
    }
    let url = server.url("/v1/sessions/retry-1/execute");
    let (status, body) = common::post_execute(
        url,
        json!({"command": "echo", "args": 7, "idempotent": false}),
    )
    .await;
    assert_eq!((status, &body["result"]), (200, &json!(7)), "{body}");

    let (status, body) = execute(&server, json!({"command": "crash_while", "args": args})).await;
    assert_eq!(status, 502, "{body}");
    let response = reqwest::Client::new()
        .post(server.url("/v1/execute"))
        .json(&json!({"command": "crash_while", "args": args}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body: Value = response.json().await.unwrap();
    assert_error(&body, "resource", "circuit_open");
    assert_eq!(body["error"]["retryable"], false);
    assert!(body["error"]["context"]["retry_after_ms"].as_u64().unwrap() <= 60_000);

    let stats = get_json(&server.url("/v1/stats")).await;
    assert_eq!(stats["retries"], 1, "{stats}");
    assert_eq!(stats["breakers"][0]["command"], "crash_while", "{stats}");
    assert_eq!(stats["breakers"][0]["state"], "open", "{stats}");
    assert_eq!(stats["breakers"][0]["opens"], 1, "{stats}");
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("\npyherd_retries_total 1\n"), "{metrics}");
    assert!(
        metrics.contains("pyherd_circuit_breaker_state{command=\"crash_while\",state=\"open\"} 1"),
        "{metrics}"
    );
}
