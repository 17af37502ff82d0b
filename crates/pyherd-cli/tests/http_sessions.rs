//! Sessions over HTTP, through a real server with real workers: create, read, change,
//! list, delete, calls in a session, and every error with its status.

mod common;

use std::time::Duration;

use common::{Server, get_json, post_execute, request, wait_until};
use reqwest::Method;
use serde_json::{Value, json};

fn assert_error(status: u16, body: &Value, expected: u16, category: &str, kind: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["ok"], false, "{body}");
    assert_eq!(body["error"]["category"], category, "{body}");
    assert_eq!(body["error"]["kind"], kind, "{body}");
}

#[tokio::test]
async fn sessions_are_created_read_changed_listed_and_deleted() {
    let server = Server::start(&["--workers", "1", "--handlers", "pyherd_worker.testing"]);
    let url = |path: &str| server.url(path);
    let (status, body) = request(
        Method::POST,
        &url("/v1/sessions"),
        Some(json!({"session_id": "alice", "ttl_s": 600, "metadata": {"plan": "pro"}})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["session_id"], "alice");
    assert_eq!(body["ttl_s"], 600);
    assert_eq!(body["metadata"], json!({"plan": "pro"}));
    assert_eq!(body["programs"], json!([]));
    assert!(body["created_at"].as_str().unwrap().ends_with('Z'));
    // A generated id.
    let (status, body) = request(Method::POST, &url("/v1/sessions"), Some(json!({}))).await;
    assert_eq!(status, 201);
    let generated = body["session_id"].as_str().unwrap().to_owned();
    assert_eq!(body["ttl_s"], 3600);

    let (status, body) = request(
        Method::PATCH,
        &url("/v1/sessions/alice"),
        Some(json!({"metadata": {"plan": "free"}})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["metadata"], json!({"plan": "free"}));
    assert_eq!(body["ttl_s"], 600);
    let (status, body) = request(
        Method::PATCH,
        &url("/v1/sessions/alice"),
        Some(json!({"ttl_s": 900})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["ttl_s"], &body["metadata"]),
        (&json!(900), &json!({"plan": "free"}))
    );

    // A call in the session: the handler sees it, the session remembers the worker.
    let (status, body) = request(
        Method::POST,
        &url("/v1/sessions/alice/execute"),
        Some(json!({"command": "ctx_info"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["session_id"], "alice");
    let session = get_json(&url("/v1/sessions/alice")).await;
    assert_eq!(session["last_worker"], body["worker_id"]);
    // /v1/execute with a session id creates the session on first use.
    let (status, _) = request(
        Method::POST,
        &url("/v1/execute"),
        Some(json!({"command": "echo", "session_id": "bob", "affinity": "strict_queue"})),
    )
    .await;
    assert_eq!(status, 200);

    let page = get_json(&url("/v1/sessions?limit=2")).await;
    let ids: Vec<&str> = page["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["alice", "bob"]);
    assert_eq!(page["next_after"], "bob");
    let page = get_json(&url("/v1/sessions?limit=2&after=bob")).await;
    assert_eq!(page["sessions"][0]["session_id"], generated.as_str());
    assert_eq!(page["next_after"], Value::Null);

    let stats = get_json(&url("/v1/stats")).await;
    assert_eq!(stats["sessions"]["live"], 3, "{stats}");
    assert_eq!(stats["affinity_hits"], 0);
    let metrics = reqwest::get(url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("pyherd_sessions 3"), "{metrics}");
    assert!(metrics.contains("pyherd_session_affinity_total{result=\"miss\"} 0"));

    let (status, body) = request(Method::DELETE, &url("/v1/sessions/alice"), None).await;
    assert_eq!((status, &body["deleted"]), (200, &json!(true)));
    let (status, body) = request(Method::GET, &url("/v1/sessions/alice"), None).await;
    assert_error(status, &body, 404, "session", "session_not_found");
}

#[tokio::test]
async fn strict_fail_fast_answers_503_while_the_sessions_worker_is_busy() {
    let server = Server::start(&["--workers", "2", "--handlers", "pyherd_worker.testing"]);
    let execute = server.url("/v1/sessions/s/execute");
    let (status, _) = post_execute(execute.clone(), json!({"command": "echo"})).await;
    assert_eq!(status, 200);
    // The session's worker is held by a call that only ends when it is cancelled.
    let held = reqwest::Client::new()
        .post(&execute)
        .header("X-Request-Id", "held")
        .json(&json!({"command": "sleep", "args": {"seconds": 60}}))
        .send();
    let held = tokio::spawn(held);
    let stats = server.url("/v1/stats");
    wait_until(
        Duration::from_secs(5),
        "the sleep call to start",
        || async { get_json(&stats).await["busy"] == 1 },
    )
    .await;
    let response = reqwest::Client::new()
        .post(&execute)
        .json(&json!({"command": "echo", "affinity": "strict_fail_fast"}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_error(status, &body, 503, "resource", "worker_busy");
    assert_eq!(body["error"]["retryable"], true);
    assert_eq!(body["error"]["context"]["session_id"], "s");
    let (status, _) = request(Method::DELETE, &server.url("/v1/calls/held"), None).await;
    assert_eq!(status, 200);
    assert_eq!(held.await.unwrap().unwrap().status().as_u16(), 409);
    // Its worker was replaced: the session moves to a free one.
    let (status, body) = post_execute(
        execute,
        json!({"command": "echo", "affinity": "strict_fail_fast"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn session_errors_have_their_status_and_the_server_keeps_serving() {
    let server = Server::start(&["--workers", "1", "--max-sessions", "2"]);
    let url = |path: &str| server.url(path);
    let sessions = server.url("/v1/sessions");
    let create = |body: Value| request(Method::POST, &sessions, Some(body));
    assert_eq!(create(json!({"session_id": "a"})).await.0, 201);
    let (status, body) = create(json!({"session_id": "a"})).await;
    assert_error(status, &body, 409, "session", "session_exists");
    for bad in [json!({"session_id": "no/slash"}), json!({"session_id": ""})] {
        let (status, body) = create(bad).await;
        assert_error(status, &body, 400, "invalid_request", "invalid_id");
    }
    for bad in [
        json!({"ttl_s": 0}),
        json!({"surprise": 1}),
        json!({"ttl_s": "long"}),
    ] {
        let (status, body) = create(bad.clone()).await;
        assert_error(status, &body, 400, "invalid_request", "malformed_request");
    }
    assert_eq!(create(json!({"session_id": "b"})).await.0, 201);
    let (status, body) = create(json!({"session_id": "c"})).await;
    assert_error(status, &body, 429, "session", "quota_exceeded");
    let (status, body) = request(
        Method::POST,
        &url("/v1/sessions/c/execute"),
        Some(json!({"command": "echo"})),
    )
    .await;
    assert_error(status, &body, 429, "session", "quota_exceeded");

    for path in ["/v1/sessions/nobody", "/v1/sessions/nobody/programs/p"] {
        let (status, body) = request(Method::GET, &url(path), None).await;
        assert_error(status, &body, 404, "session", "session_not_found");
    }
    let (status, body) = request(
        Method::PATCH,
        &url("/v1/sessions/nobody"),
        Some(json!({"metadata": {}})),
    )
    .await;
    assert_error(status, &body, 404, "session", "session_not_found");
    let (status, body) = request(Method::DELETE, &url("/v1/sessions/nobody"), None).await;
    assert_error(status, &body, 404, "session", "session_not_found");
    let (status, body) = request(Method::GET, &url("/v1/sessions/b%2F..%2Fx"), None).await;
    assert_error(status, &body, 400, "invalid_request", "invalid_id");
    for query in ["limit=0", "limit=1001", "limit=abc", "surprise=1"] {
        let (status, body) =
            request(Method::GET, &url(&format!("/v1/sessions?{query}")), None).await;
        assert_error(status, &body, 400, "invalid_request", "malformed_request");
    }
    for path in ["/v1/programs/bad%20id", "/v1/sessions/a/programs/bad%20id"] {
        for method in [Method::GET, Method::DELETE] {
            let (status, body) = request(method, &url(path), None).await;
            assert_error(status, &body, 400, "invalid_request", "invalid_id");
        }
    }
    let (status, body) = request(
        Method::PATCH,
        &url("/v1/sessions/a"),
        Some(json!({"ttl_s": 0, "metadata": {"lost": false}})),
    )
    .await;
    assert_error(status, &body, 400, "invalid_request", "malformed_request");
    let kept = get_json(&url("/v1/sessions/a")).await;
    assert_eq!(
        (&kept["ttl_s"], &kept["metadata"]),
        (&json!(3600), &json!({}))
    );
    // Metadata is kept as given: an integer beyond 64 bits is refused, not rounded.
    let raw = |method: Method, path: &str, body: &'static str| {
        reqwest::Client::new()
            .request(method, url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (method, path) in [
        (Method::POST, "/v1/sessions"),
        (Method::PATCH, "/v1/sessions/a"),
    ] {
        let response = raw(
            method,
            path,
            r#"{"metadata": {"id": 12345678901234567890123}}"#,
        )
        .await
        .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        assert_error(status, &body, 400, "invalid_request", "malformed_request");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("beyond 64 bits"), "{message}");
    }
    let edges = r#"{"metadata": {"high": 18446744073709551615, "low": -9223372036854775808}}"#;
    let response = raw(Method::PATCH, "/v1/sessions/a", edges).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["metadata"]["high"], json!(u64::MAX), "{body}");
    assert_eq!(body["metadata"]["low"], json!(i64::MIN), "{body}");
    let (status, body) =
        request(Method::DELETE, &url("/v1/sessions/nobody/programs/p"), None).await;
    assert_error(status, &body, 404, "session", "session_not_found");
    for path in ["/v1/sessions/a/programs/p", "/v1/programs/p"] {
        let (status, body) = request(Method::DELETE, &url(path), None).await;
        assert_error(status, &body, 404, "session", "program_not_found");
    }
    for path in ["/v1/programs/qa", "/v1/sessions/a/programs/qa"] {
        let (status, body) = request(Method::PUT, &url(path), Some(json!(["q -> a"]))).await;
        assert_error(status, &body, 400, "invalid_request", "malformed_request");
    }
    let (status, body) = request(
        Method::POST,
        &url("/v1/sessions/a/execute"),
        Some(json!({"command": "echo", "session_id": "b"})),
    )
    .await;
    assert_error(status, &body, 400, "invalid_request", "malformed_request");
    // Programs need the DSPy adapter.
    let (status, body) = request(
        Method::PUT,
        &url("/v1/programs/qa"),
        Some(json!({"signature": "question -> answer"})),
    )
    .await;
    assert_error(status, &body, 404, "invalid_request", "unknown_command");
    let (status, body) = request(Method::GET, &url("/v1/programs/qa"), None).await;
    assert_error(status, &body, 404, "session", "program_not_found");
    let (status, body) = request(Method::GET, &url("/v1/programs"), None).await;
    assert_eq!((status, body), (200, json!({"programs": []})));

    let (status, body) = request(
        Method::POST,
        &url("/v1/sessions/a/execute"),
        Some(json!({"command": "echo", "args": [1]})),
    )
    .await;
    assert_eq!((status, &body["result"]), (200, &json!([1])));
}
