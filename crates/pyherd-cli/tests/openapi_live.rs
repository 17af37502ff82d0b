//! The live API against its OpenAPI document: every documented operation is called on a
//! real `pyherd serve` (its success and its errors), every answer's status must be
//! documented for its operation and its body must fit the schema documented for that
//! status; objects may not carry undocumented fields.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpStream;
use std::time::Duration;

use common::Server;
use reqwest::Method;
use serde_json::{Value, json};

/// The token of the server under test.
const TOKEN: &str = "openapi-live-token-0123456789";

/// A documented path with its parameters filled in.
fn instance(template: &str) -> String {
    template
        .replace("{id}", "s1")
        .replace("{program_id}", "qa")
        .replace("{request_id}", "r-none")
}

/// What a call sends.
enum Body {
    Empty,
    Json(Value),
    Raw(&'static str),
}

/// The document, and which operations the test has seen succeed and fail.
struct Checker {
    doc: Value,
    client: reqwest::Client,
    base: String,
    /// (METHOD, path template) → (a 2xx seen, an error seen).
    seen: BTreeMap<(String, String), (bool, bool)>,
}

/// Forbids fields no schema names: every object schema with `properties` and no
/// `additionalProperties` gets `additionalProperties: false`.
fn strict(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            map.values_mut().for_each(strict);
        }
        Value::Array(items) => items.iter_mut().for_each(strict),
        _ => {}
    }
}

/// Validates `instance` against `schema`, whose `$ref`s point into the document's
/// components.
fn validate(doc: &Value, schema: &Value, instance: &Value, what: &str) {
    let mut root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": doc["components"].clone(),
        "allOf": [schema],
    });
    strict(&mut root);
    let validator = jsonschema::validator_for(&root)
        .unwrap_or_else(|e| panic!("{what}: the documented schema does not compile: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what}: the body does not fit its documented schema: {errors:#?}\nbody: {instance}"
    );
}

/// The events of a Server-Sent Events body, each as `{"event": name, "data": JSON}`
/// (comments, such as keep-alives, left out).
fn sse_events(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    name = Some(value.trim_start().to_owned());
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push(value.strip_prefix(' ').unwrap_or(value));
                }
            }
            let name = name?;
            let data: Value = serde_json::from_str(&data.join("\n"))
                .unwrap_or_else(|e| panic!("an event's data is not JSON ({e}): {block}"));
            Some(json!({"event": name, "data": data}))
        })
        .collect()
}

impl Checker {
    async fn new(server: &Server) -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        let bearer = format!("Bearer {TOKEN}").parse().unwrap();
        headers.insert(reqwest::header::AUTHORIZATION, bearer);
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap();
        let doc: Value = client
            .get(server.url("/openapi.json"))
            .send()
            .await
            .expect("GET /openapi.json")
            .json()
            .await
            .expect("the document is JSON");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
        let mut seen = BTreeMap::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("a path item").keys() {
                seen.insert((method.to_uppercase(), path.clone()), (false, false));
            }
        }
        Self {
            doc,
            client,
            base: server.base.clone(),
            seen,
        }
    }

    /// Calls `url` (an instance of the documented `template`) and checks the answer;
    /// returns its status and body (a JSON string for non-JSON bodies).
    async fn call(
        &mut self,
        method: Method,
        template: &str,
        url: &str,
        body: Body,
    ) -> (u16, Value) {
        let client = self.client.clone();
        self.call_with(&client, method, template, url, body).await
    }

    /// [`call`](Self::call) through `client`.
    async fn call_with(
        &mut self,
        client: &reqwest::Client,
        method: Method,
        template: &str,
        url: &str,
        body: Body,
    ) -> (u16, Value) {
        let what = format!("{method} {url}");
        let mut request = client.request(method.clone(), format!("{}{url}", self.base));
        match body {
            Body::Empty => {}
            Body::Json(value) => request = request.json(&value),
            Body::Raw(text) => {
                request = request
                    .header("content-type", "application/json")
                    .body(text);
            }
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let text = response.text().await.expect("a body");
        let key = (method.as_str().to_owned(), template.to_owned());
        let Some(seen) = self.seen.get_mut(&key) else {
            panic!("{what}: {key:?} is not documented");
        };
        if status < 300 {
            seen.0 = true;
        } else {
            seen.1 = true;
        }
        let documented = &self.doc["paths"][template][method.as_str().to_lowercase()]["responses"]
            [status.to_string()];
        assert!(
            documented.is_object(),
            "{what} answered {status}, which is not documented for it: {text}"
        );
        let content = documented["content"]
            .as_object()
            .expect("documented content");
        let (documented_type, media) = content.iter().next().expect("one media type");
        assert_eq!(&content_type, documented_type, "{what}: content type");
        let body = if content_type.starts_with("application/json") {
            let body: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"));
            validate(&self.doc, &media["schema"], &body, &what);
            body
        } else {
            validate(
                &self.doc,
                &media["schema"],
                &Value::String(text.clone()),
                &what,
            );
            if content_type == "text/event-stream" {
                let schema = &media["x-event-schema"];
                assert!(schema.is_object(), "{what}: no x-event-schema");
                for event in sse_events(&text) {
                    validate(&self.doc, schema, &event, &format!("{what}, event {event}"));
                }
            }
            Value::String(text)
        };
        (status, body)
    }

    /// Calls and asserts the status.
    async fn expect(
        &mut self,
        method: Method,
        template: &str,
        url: &str,
        body: Body,
        status: u16,
    ) -> Value {
        let (got, body) = self.call(method.clone(), template, url, body).await;
        assert_eq!(got, status, "{method} {url}: {body}");
        body
    }

    /// The documented operations, as (method, path template).
    fn operations(&self) -> Vec<(Method, String)> {
        self.seen
            .keys()
            .map(|(method, path)| (method.parse().unwrap(), path.clone()))
            .collect()
    }

    /// Every operation the token guards answers 401 with the error body when the request
    /// carries no token or a wrong one.
    async fn operations_without_the_token_are_refused(&mut self) {
        let anonymous = reqwest::Client::new();
        let mut headers = reqwest::header::HeaderMap::new();
        let wrong = "Bearer not-the-token-at-all".parse().unwrap();
        headers.insert(reqwest::header::AUTHORIZATION, wrong);
        let impostor = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap();
        for (method, template) in self.operations() {
            if self.doc["paths"][&template][method.as_str().to_lowercase()]["security"].is_null() {
                continue;
            }
            for client in [&anonymous, &impostor] {
                let url = instance(&template);
                let (status, body) = self
                    .call_with(client, method.clone(), &template, &url, Body::Empty)
                    .await;
                assert_eq!(status, 401, "{method} {url}: {body}");
                assert_eq!(body["error"]["kind"], "unauthorized", "{method} {url}");
            }
        }
    }

    /// With `max_connections` held open by idle connections, every operation answers 503
    /// `too_many_connections` with the error body.
    async fn connections_over_the_limit_are_refused(&mut self) {
        let address = self.base.trim_start_matches("http://").to_owned();
        let fresh = || {
            reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap()
        };
        let mut held = Vec::new();
        for (method, template) in self.operations() {
            let url = instance(&template);
            // Until the connections held fill every place (the server frees a place only
            // once it notices a closed connection), a call is answered as usual.
            loop {
                let (status, body) = self
                    .call_with(&fresh(), method.clone(), &template, &url, Body::Empty)
                    .await;
                if status == 503 && body["error"]["kind"] == "too_many_connections" {
                    break;
                }
                assert!(held.len() < 256, "the connection limit never applied");
                held.push(TcpStream::connect(&address).unwrap());
            }
        }
    }

    /// A method a documented path does not take answers 405 with the error body.
    async fn methods_not_documented_are_refused(&self) {
        let error = json!({"$ref": "#/components/schemas/ErrorResponse"});
        for (path, item) in self.doc["paths"].as_object().unwrap() {
            let url = instance(path);
            for method in [
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ] {
                if item.get(method.as_str().to_lowercase()).is_some() {
                    continue;
                }
                let response = self
                    .client
                    .request(method.clone(), format!("{}{url}", self.base))
                    .send()
                    .await
                    .unwrap();
                let what = format!("{method} {url}");
                assert_eq!(response.status().as_u16(), 405, "{what}");
                let body: Value = response.json().await.unwrap();
                validate(&self.doc, &error, &body, &what);
                assert_eq!(body["error"]["kind"], "method_not_allowed", "{what}");
            }
        }
        let response = self
            .client
            .get(format!("{}/v2/nothing", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 404);
        let body: Value = response.json().await.unwrap();
        validate(&self.doc, &error, &body, "GET /v2/nothing");
        assert_eq!(body["error"]["kind"], "not_found");
    }

    /// Every operation was seen succeed, and fail when it documents errors.
    fn assert_all_seen(&self) {
        for ((method, path), (ok, err)) in &self.seen {
            let responses = self.doc["paths"][path][method.to_lowercase()]["responses"]
                .as_object()
                .unwrap();
            let has_errors = responses.keys().any(|status| !status.starts_with('2'));
            assert!(*ok, "{method} {path} was never called with success");
            assert!(
                *err || !has_errors,
                "{method} {path}: none of its errors was produced"
            );
        }
    }
}

#[tokio::test]
async fn every_documented_operation_answers_as_documented() {
    let server = Server::start(&[
        "--workers",
        "2",
        "--dspy",
        "--handlers",
        "pyherd_worker.testing",
        "--max-sessions",
        "3",
        "--max-frame-bytes",
        "65536",
        "--startup-timeout-ms",
        "60000",
        "--token",
        TOKEN,
        "--max-connections",
        "32",
    ]);
    let mut c = Checker::new(&server).await;
    use Body::{Empty, Json, Raw};
    use Method as M;

    // Operations.
    c.expect(M::GET, "/healthz", "/healthz", Empty, 200).await;
    let ready = c.expect(M::GET, "/readyz", "/readyz", Empty, 200).await;
    assert_eq!(ready["ready"], true);
    c.expect(M::GET, "/v1/stats", "/v1/stats", Empty, 200).await;
    let workers = c
        .expect(M::GET, "/v1/workers", "/v1/workers", Empty, 200)
        .await;
    assert_eq!(workers["workers"].as_array().unwrap().len(), 2);
    let metrics = c.expect(M::GET, "/metrics", "/metrics", Empty, 200).await;
    assert!(metrics.as_str().unwrap().contains("# TYPE"), "{metrics}");
    c.expect(M::GET, "/openapi.json", "/openapi.json", Empty, 200)
        .await;
    let page = c.expect(M::GET, "/", "/", Empty, 200).await;
    assert!(page.as_str().unwrap().contains("<html"), "{page}");
    let timeline = c
        .expect(M::GET, "/v1/timeline", "/v1/timeline", Empty, 200)
        .await;
    assert_eq!(timeline["interval_ms"], 1000);

    // Calls: a success and each error status a call can produce here.
    let x = "/v1/execute";
    let ok = c
        .expect(
            M::POST,
            x,
            x,
            Json(json!({"command": "echo", "args": {"a": [1]}})),
            200,
        )
        .await;
    assert_eq!(ok["result"], json!({"a": [1]}));
    c.expect(M::POST, x, x, Raw("{not json"), 400).await;
    c.expect(
        M::POST,
        x,
        x,
        Json(json!({"command": "echo", "timeout_ms": 0})),
        400,
    )
    .await;
    c.expect(M::POST, x, x, Json(json!({"command": "nope"})), 404)
        .await;
    let big = "y".repeat(100_000);
    c.expect(
        M::POST,
        x,
        x,
        Json(json!({"command": "echo", "args": {"s": big}})),
        413,
    )
    .await;
    c.expect(M::POST, x, x, Json(json!({"command": "raise_error"})), 500)
        .await;
    c.expect(M::POST, x, x, Json(json!({"command": "crash"})), 502)
        .await;
    let slow = json!({"command": "sleep", "args": {"seconds": 30}, "timeout_ms": 300});
    let timeout = c.expect(M::POST, x, x, Json(slow), 504).await;
    assert_eq!(timeout["error"]["kind"], "execution_timeout");

    // Streams, and cancelling a call in flight by its request id.
    let st = "/v1/stream";
    let count = json!({"command": "count", "args": {"to": 2}});
    let events = c.expect(M::POST, st, st, Json(count), 200).await;
    let names: Vec<Value> = sse_events(events.as_str().unwrap())
        .into_iter()
        .map(|e| e["event"].clone())
        .collect();
    assert_eq!(names, ["chunk", "chunk", "end"], "{events}");
    let failing = json!({"command": "count_then_fail", "args": {"n": 1}});
    let events = c.expect(M::POST, st, st, Json(failing), 200).await;
    let events = sse_events(events.as_str().unwrap());
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[1]["event"], "error");
    assert_eq!(events[1]["data"]["kind"], "python_exception");
    c.expect(M::POST, st, st, Json(json!({"command": "nope"})), 404)
        .await;
    let running = {
        let client = c.client.clone();
        let url = format!("{}{x}", c.base);
        tokio::spawn(async move {
            let body = json!({"command": "sleep", "args": {"seconds": 20}});
            let response = client
                .post(url)
                .header("x-request-id", "slow-1")
                .json(&body)
                .send()
                .await
                .unwrap();
            response.status().as_u16()
        })
    };
    let cancel = "/v1/calls/{request_id}";
    c.expect(M::DELETE, cancel, "/v1/calls/r-none", Empty, 404)
        .await;
    c.expect(M::DELETE, cancel, "/v1/calls/bad%20id", Empty, 400)
        .await;
    let client = c.client.clone();
    let cancel_url = format!("{}/v1/calls/slow-1", c.base);
    common::wait_until(
        Duration::from_secs(20),
        "the slow call to be in flight",
        || {
            let (client, url) = (client.clone(), cancel_url.clone());
            async move {
                let response = client.delete(url).send().await.unwrap();
                response.status().as_u16() == 200
            }
        },
    )
    .await;
    assert_eq!(running.await.unwrap(), 409, "the cancelled caller hears so");
    let cancelled = c
        .expect(M::POST, x, x, Json(json!({"command": "echo"})), 200)
        .await;
    assert_eq!(cancelled["ok"], true, "the pool serves on");
    c.seen
        .get_mut(&("DELETE".to_owned(), cancel.to_owned()))
        .unwrap()
        .0 = true;

    // Sessions (at most 3 live).
    let s = "/v1/sessions";
    let created = c
        .expect(
            M::POST,
            s,
            s,
            Json(json!({"session_id": "s1", "metadata": {"a": 1}})),
            201,
        )
        .await;
    assert_eq!(created["session_id"], "s1");
    c.expect(M::POST, s, s, Json(json!({"session_id": "s1"})), 409)
        .await;
    c.expect(
        M::POST,
        s,
        s,
        Json(json!({"session_id": "s2", "ttl_s": 60})),
        201,
    )
    .await;
    c.expect(M::POST, s, s, Json(json!({})), 201).await;
    c.expect(M::POST, s, s, Json(json!({"session_id": "s4"})), 429)
        .await;
    c.expect(M::POST, s, s, Json(json!({"bogus": 1})), 400)
        .await;
    let page = c
        .expect(M::GET, s, "/v1/sessions?limit=2", Empty, 200)
        .await;
    assert_eq!(page["sessions"].as_array().unwrap().len(), 2);
    c.expect(M::GET, s, "/v1/sessions?limit=0", Empty, 400)
        .await;

    let one = "/v1/sessions/{id}";
    c.expect(M::GET, one, "/v1/sessions/s1", Empty, 200).await;
    c.expect(M::GET, one, "/v1/sessions/nope", Empty, 404).await;
    c.expect(M::GET, one, "/v1/sessions/bad%20id", Empty, 400)
        .await;
    c.expect(
        M::PATCH,
        one,
        "/v1/sessions/s1",
        Json(json!({"ttl_s": 600})),
        200,
    )
    .await;
    c.expect(
        M::PATCH,
        one,
        "/v1/sessions/nope",
        Json(json!({"ttl_s": 600})),
        404,
    )
    .await;
    c.expect(M::PATCH, one, "/v1/sessions/s1", Json(json!({"x": 1})), 400)
        .await;

    let run = "/v1/sessions/{id}/execute";
    let lm = json!({"provider": "dummy", "answers": {"": {"answer": "Paris"}}});
    let configure = json!({"command": "configure_lm", "args": lm});
    c.expect(
        M::POST,
        run,
        "/v1/sessions/s1/execute",
        Json(configure),
        200,
    )
    .await;
    let other = json!({"command": "echo", "session_id": "s2"});
    c.expect(
        M::POST,
        run,
        "/v1/sessions/s1/execute",
        Json(other.clone()),
        400,
    )
    .await;
    let sst = "/v1/sessions/{id}/stream";
    let events = c
        .expect(
            M::POST,
            sst,
            "/v1/sessions/s1/stream",
            Json(json!({"command": "count", "args": {"to": 1}})),
            200,
        )
        .await;
    assert!(
        events.as_str().unwrap().contains("event: chunk"),
        "{events}"
    );
    c.expect(M::POST, sst, "/v1/sessions/s1/stream", Json(other), 400)
        .await;

    // Programs of a session, then global ones.
    let p = "/v1/sessions/{id}/programs/{program_id}";
    let qa = "/v1/sessions/s1/programs/qa";
    let signature = json!({"signature": "question -> answer"});
    let program = c.expect(M::PUT, p, qa, Json(signature.clone()), 200).await;
    assert_eq!(program["program_id"], "qa");
    c.expect(M::PUT, p, qa, Json(json!({"signature": "no arrow"})), 400)
        .await;
    c.expect(M::GET, p, qa, Empty, 200).await;
    c.expect(M::GET, p, "/v1/sessions/s1/programs/nope", Empty, 404)
        .await;
    c.methods_not_documented_are_refused().await;
    c.expect(M::DELETE, p, qa, Empty, 200).await;
    c.expect(M::DELETE, p, qa, Empty, 404).await;

    let g = "/v1/programs/{program_id}";
    c.expect(M::PUT, g, "/v1/programs/g", Json(signature), 200)
        .await;
    c.expect(
        M::PUT,
        g,
        "/v1/programs/g",
        Json(json!({"nothing": 1})),
        400,
    )
    .await;
    let list = c
        .expect(M::GET, "/v1/programs", "/v1/programs", Empty, 200)
        .await;
    assert_eq!(list["programs"][0]["program_id"], "g");
    c.expect(M::GET, g, "/v1/programs/g", Empty, 200).await;
    c.expect(M::GET, g, "/v1/programs/nope", Empty, 404).await;
    c.expect(M::DELETE, g, "/v1/programs/g", Empty, 200).await;
    c.expect(M::DELETE, g, "/v1/programs/g", Empty, 404).await;

    c.expect(M::DELETE, one, "/v1/sessions/s2", Empty, 200)
        .await;
    c.expect(M::DELETE, one, "/v1/sessions/s2", Empty, 404)
        .await;

    let reloaded = c
        .expect(M::POST, "/v1/reload", "/v1/reload", Empty, 200)
        .await;
    assert_eq!(reloaded["reload"]["workers"].as_array().unwrap().len(), 2);

    c.operations_without_the_token_are_refused().await;
    c.connections_over_the_limit_are_refused().await;
    server.terminate();

    // A server whose workers cannot start: not ready, and calls are refused at once.
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("broken");
    let mut cmd = common::pyherd(None);
    cmd.env("PYHERD_TEST_BREAK_FILE", &marker);
    let breakable = common::fixture("breakable.py");
    let handlers = [
        "--handlers",
        &breakable,
        "--handlers",
        "pyherd_worker.testing",
    ];
    let server = Server::start_with(cmd, &[&["--workers", "1"][..], &handlers].concat());
    c.base.clone_from(&server.base);
    std::fs::write(&marker, "").unwrap();
    c.expect(M::POST, x, x, Json(json!({"command": "crash"})), 502)
        .await;
    let readyz = server.url("/readyz");
    common::wait_until(
        Duration::from_secs(30),
        "the spawn breaker to open",
        || async {
            common::get_json(&readyz)
                .await
                .get("spawn_failing")
                .is_some()
        },
    )
    .await;
    let ready = c.expect(M::GET, "/readyz", "/readyz", Empty, 503).await;
    assert_eq!(ready["spawn_failing"]["kind"], "spawn_failing");
    let refused = c
        .expect(M::POST, x, x, Json(json!({"command": "echo"})), 503)
        .await;
    assert_eq!(refused["error"]["kind"], "spawn_failing");
    server.terminate();

    c.assert_all_seen();
    let seen: BTreeSet<_> = c.seen.keys().map(|(_, path)| path.as_str()).collect();
    assert!(seen.contains("/v1/execute") && seen.len() >= 12, "{seen:?}");
}

#[tokio::test]
async fn a_body_off_its_schema_is_caught() {
    let doc = json!({"components": {"schemas": {"Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    }}}});
    let schema = json!({"$ref": "#/components/schemas/Health"});
    validate(&doc, &schema, &json!({"status": "ok"}), "fits");
    for wrong in [
        json!({"status": 1}),
        json!({}),
        json!({"status": "ok", "extra": true}),
    ] {
        let result = std::panic::catch_unwind(|| validate(&doc, &schema, &wrong, "wrong"));
        assert!(result.is_err(), "{wrong} passed");
    }
}
