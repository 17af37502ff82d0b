//! DSPy over HTTP: `pyherd serve --dspy` with the real adapter and dspy's DummyLM.

mod common;

use common::{Server, get_json, request};
use reqwest::Method;
use serde_json::{Value, json};

fn assert_error(status: u16, body: &Value, expected: u16, category: &str, kind: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error"]["category"], category, "{body}");
    assert_eq!(body["error"]["kind"], kind, "{body}");
}

#[tokio::test]
async fn programs_run_in_sessions_over_http() {
    let server = Server::start(&["--workers", "2", "--dspy", "--startup-timeout-ms", "60000"]);
    let url = |path: &str| server.url(path);
    let run = |session: &str, command: &str, args: Value| {
        let url = server.url(&format!("/v1/sessions/{session}/execute"));
        let body = json!({"command": command, "args": args});
        async move { request(Method::POST, &url, Some(body)).await }
    };
    let lm = json!({"provider": "dummy", "answers": {
        "France": {"reasoning": "It is the capital.", "answer": "Paris"},
        "": {"reasoning": "No idea.", "answer": "unknown"},
    }});
    let (status, body) = run("ana", "configure_lm", lm).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["result"],
        json!({"provider": "dummy", "model": "dummy"})
    );

    // A session program by PUT, a global one too; both run in the session.
    let (status, body) = request(
        Method::PUT,
        &url("/v1/sessions/ana/programs/qa"),
        Some(json!({"signature": "question -> answer"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["program_id"], "qa");
    assert_eq!(body["signature"], "question -> answer");
    let (status, body) = request(
        Method::PUT,
        &url("/v1/programs/cot"),
        Some(json!({"signature": "question -> answer", "program_type": "chain_of_thought"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for program in ["qa", "cot"] {
        let ask = json!({"program_id": program, "inputs": {"question": "Capital of France?"}});
        let (status, body) = run("ana", "execute_program", ask).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["result"]["outputs"]["answer"], "Paris", "{program}");
    }
    // The order of the LM's answers survived the host: "" is a fallback, checked last.
    let ask = json!({"program_id": "qa", "inputs": {"question": "Capital of Spain?"}});
    assert_eq!(
        run("ana", "execute_program", ask).await.1["result"]["outputs"]["answer"],
        "unknown"
    );

    let program = get_json(&url("/v1/sessions/ana/programs/qa")).await;
    assert_eq!(program["execution_count"], 2);
    let global = get_json(&url("/v1/programs/cot")).await;
    assert_eq!(global["execution_count"], 1);
    let session = get_json(&url("/v1/sessions/ana")).await;
    assert_eq!(session["programs"], json!(["qa"]));
    assert_eq!(session["lm"]["provider"], "dummy");

    // Errors of the adapter keep their status.
    for path in ["/v1/sessions/ana/programs/bad", "/v1/programs/bad"] {
        let (status, body) = request(
            Method::PUT,
            &url(path),
            Some(json!({"signature": "question answer"})),
        )
        .await;
        assert_error(status, &body, 400, "invalid_request", "invalid_signature");
    }
    let (status, body) = request(Method::GET, &url("/v1/programs/bad"), None).await;
    assert_error(status, &body, 404, "session", "program_not_found");
    let (status, body) = request(
        Method::PUT,
        &url("/v1/sessions/nobody/programs/qa"),
        Some(json!({"signature": "q -> a"})),
    )
    .await;
    assert_error(status, &body, 404, "session", "session_not_found");
    let (status, body) = run("ana", "execute_program", json!({"program_id": "nope"})).await;
    assert_error(status, &body, 404, "session", "program_not_found");
    let unreachable = json!({"model": "openai/gpt-4o-mini", "api_base": "http://127.0.0.1:9/v1", "api_key": "sk-x"});
    assert_eq!(run("ben", "configure_lm", unreachable).await.0, 200);
    let (status, body) = run(
        "ben",
        "execute_program",
        json!({"program_id": "cot", "inputs": {"question": "q"}}),
    )
    .await;
    assert_error(status, &body, 502, "python", "lm_error");
    let session = get_json(&url("/v1/sessions/ben")).await;
    assert_eq!(session["lm"]["api_key"], "***");
    let (status, body) = request(
        Method::POST,
        &url("/v1/execute"),
        Some(json!({"command": "list_programs"})),
    )
    .await;
    assert_error(status, &body, 400, "invalid_request", "session_required");

    let (status, body) = request(Method::DELETE, &url("/v1/sessions/ana/programs/qa"), None).await;
    assert_eq!((status, &body["deleted"]), (200, &json!(true)));
    let (status, body) = request(Method::DELETE, &url("/v1/programs/cot"), None).await;
    assert_eq!((status, &body["deleted"]), (200, &json!(true)));
    let (_, listed) = run("ana", "list_programs", json!({})).await;
    assert_eq!(
        listed["result"],
        json!({"programs": [], "global_programs": []})
    );
    let metrics = reqwest::get(url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .contains("pyherd_requests_total{command=\"execute_program\",outcome=\"lm_error\"} 1"),
        "{metrics}"
    );
    // Programs stored by PUT are validated on a worker and counted like the command.
    for line in [
        "pyherd_requests_total{command=\"create_program\",outcome=\"ok\"} 2",
        "pyherd_requests_total{command=\"create_program\",outcome=\"invalid_signature\"} 2",
        "pyherd_requests_total{command=\"create_program\",outcome=\"session_not_found\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
}
