//! What pyherd tells a `tracing` subscriber: the span of each call, the events of a
//! worker's life and of sessions, and the Python output of a worker (with its worker id,
//! pid and the request id of the call that wrote it, rate-limited).
//!
//! Each test runs on a current-thread runtime, so the capturing subscriber set for the
//! test's thread sees every task of its pool.

mod common;

use std::time::Duration;

use common::capture::{Captured, Seen, capture};
use common::{testing_pool, wait_until};
use futures::StreamExt;
use pyherd::{CallOptions, ErrorKind};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

fn request_spans(captured: &Captured, command: &str) -> Vec<Seen> {
    captured
        .spans()
        .into_iter()
        .filter(|s| s.name == "request" && s.get("command") == Some(command))
        .collect()
}

fn number(seen: &Seen, field: &str) -> u64 {
    seen.get(field)
        .unwrap_or_else(|| panic!("no {field} in {seen:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{field} is not a number in {seen:?}"))
}

#[tokio::test]
async fn each_call_has_a_request_span_with_worker_queue_wait_execution_and_outcome() {
    let (captured, _guard) = capture();
    let pool = testing_pool(1).build().await.unwrap();
    let slept = pool
        .execute_with("sleep", json!({"seconds": 0.05}), &CallOptions::new())
        .await
        .unwrap();
    let failed = pool.execute("raise_error", json!({})).await.unwrap_err();
    assert_eq!(failed.kind(), &ErrorKind::PythonException);
    let in_session = CallOptions::new().session_id("s-span").request_id("job-7");
    pool.execute_with("echo", json!(1), &in_session)
        .await
        .unwrap();
    let unknown = pool.execute("no_such", json!({})).await.unwrap_err();
    assert_eq!(unknown.kind(), &ErrorKind::UnknownCommand);

    let spans = request_spans(&captured, "sleep");
    assert_eq!(spans.len(), 1, "{spans:?}");
    let span = &spans[0];
    assert_eq!(span.get("worker"), Some("w1"));
    assert_eq!(span.get("outcome"), Some("ok"));
    assert_eq!(span.get("request_id"), Some(slept.request_id()));
    assert!(number(span, "execution_us") >= 50_000, "{span:?}");
    number(span, "queue_wait_us");
    assert_eq!(span.get("session_id"), None);

    let raised = &request_spans(&captured, "raise_error")[0];
    assert_eq!(raised.get("outcome"), Some("python_exception"));
    assert_ne!(raised.get("request_id"), span.get("request_id"));
    let in_session = &request_spans(&captured, "echo")[0];
    assert_eq!(in_session.get("session_id"), Some("s-span"));
    assert_eq!(in_session.get("request_id"), Some("job-7"));
    assert_eq!(in_session.get("outcome"), Some("ok"));

    let refused = &request_spans(&captured, "no_such")[0];
    assert_eq!(refused.get("outcome"), Some("unknown_command"));
    assert_eq!(refused.get("worker"), None, "no worker took it");

    let executed = captured.with_message("call executed");
    let event = executed
        .iter()
        .find(|e| e.get("outcome") == Some("python_exception"))
        .expect("an execution event for the failed call");
    let (parent, fields) = event.parent.as_ref().expect("inside the request span");
    assert_eq!(parent, "request");
    assert_eq!(
        fields.get("request_id").map(String::as_str),
        raised.get("request_id")
    );
    number(event, "execution_us");
    pool.shutdown().await;
}

#[tokio::test]
async fn each_stream_has_a_request_span_like_a_call() {
    let (captured, _guard) = capture();
    let pool = testing_pool(1).build().await.unwrap();
    let options = CallOptions::new().request_id("stream-1");
    let mut stream = pool
        .stream_with("count", json!({"to": 2, "delay": 0.02}), &options)
        .await
        .unwrap();
    while let Some(chunk) = stream.next().await {
        chunk.unwrap();
    }
    let mut failing = pool
        .stream("count_then_fail", json!({"n": 1}))
        .await
        .unwrap();
    while failing.next().await.is_some() {}

    let spans = request_spans(&captured, "count");
    assert_eq!(spans.len(), 1, "{spans:?}");
    let span = &spans[0];
    assert_eq!(span.get("request_id"), Some("stream-1"));
    assert_eq!(span.get("worker"), Some("w1"));
    assert_eq!(span.get("outcome"), Some("ok"));
    assert!(number(span, "execution_us") >= 40_000, "{span:?}");
    number(span, "queue_wait_us");
    let failed = &request_spans(&captured, "count_then_fail")[0];
    assert_eq!(failed.get("outcome"), Some("python_exception"));
    pool.shutdown().await;
}

#[tokio::test]
async fn growing_on_queue_pressure_and_stopping_idle_workers_say_why() {
    let (captured, _guard) = capture();
    let pool = testing_pool(1)
        .max_workers(2)
        .idle_timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let calls: Vec<_> = (0..4)
        .map(|_| common::spawn_call(&pool, "sleep", json!({"seconds": 0.3})))
        .collect();
    wait_until(WAIT, "a second worker", || pool.stats().workers == 2).await;
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let grown = captured.with_message("starting another worker");
    assert!(!grown.is_empty(), "no event for the growth");
    assert_eq!(grown[0].get("reason"), Some("queue_pressure"));
    number(&grown[0], "queued");
    wait_until(WAIT, "the pool back to one worker", || {
        pool.stats().workers == 1
    })
    .await;
    let retired = captured
        .with_message("worker state")
        .into_iter()
        .any(|e| e.get("reason") == Some("idle_timeout"));
    assert!(retired, "no state change said idle_timeout");
    pool.shutdown().await;
}

#[tokio::test]
async fn spawn_recycle_exit_and_state_changes_are_events_with_worker_and_pid() {
    let (captured, _guard) = capture();
    let pool = testing_pool(1).max_requests(1).build().await.unwrap();
    let first = pool.workers()[0].pid.unwrap().to_string();
    pool.execute("echo", json!(1)).await.unwrap();
    wait_until(WAIT, "the replacement to be ready", || {
        pool.stats().restarts == 1 && pool.is_ready()
    })
    .await;

    let spawned = captured.with_message("worker spawned");
    assert!(spawned.len() >= 2, "{spawned:?}");
    for event in &spawned {
        assert_eq!(event.get("how"), Some("spawn"));
        number(event, "ms");
        number(event, "pid");
    }
    assert_eq!(spawned[0].get("worker"), Some("w1"));
    assert_eq!(spawned[0].get("pid"), Some(first.as_str()));
    assert_eq!(spawned[1].get("worker"), Some("w2"));

    let recycled = captured.with_message("worker recycled");
    assert_eq!(recycled.len(), 1, "{recycled:?}");
    assert_eq!(recycled[0].get("reason"), Some("max_requests"));
    assert_eq!(recycled[0].get("pid"), Some(first.as_str()));

    let exited = captured.with_message("worker exited");
    assert_eq!(exited.len(), 1, "{exited:?}");
    assert_eq!(exited[0].get("worker"), Some("w1"));
    assert_eq!(exited[0].get("status"), Some("exit status: 0"));

    let states = captured.with_message("worker state");
    let w1: Vec<(&str, &str)> = states
        .iter()
        .filter(|e| e.get("worker") == Some("w1"))
        .map(|e| (e.get("from").unwrap(), e.get("to").unwrap()))
        .collect();
    assert_eq!(
        w1,
        [
            ("starting", "ready"),
            ("ready", "busy"),
            ("busy", "draining"),
            ("draining", "stopped")
        ]
    );
    pool.shutdown().await;
    wait_until(WAIT, "w2's exit to be logged", || {
        captured
            .with_message("worker exited")
            .iter()
            .any(|e| e.get("worker") == Some("w2"))
    })
    .await;
}

/// A worker that stops because it failed (here: crashed, or ran past a call's timeout)
/// says so at WARN; one recycled, as planned, at INFO.
#[tokio::test]
async fn a_failed_workers_stop_is_a_warning_and_a_recycled_ones_is_not() {
    let (captured, _guard) = capture();
    let pool = testing_pool(1).max_requests(2).build().await.unwrap();
    pool.execute("crash", json!({})).await.unwrap_err();
    let options = pyherd::CallOptions::new().timeout(std::time::Duration::from_millis(200));
    pool.execute_with("sleep", json!({"seconds": 30}), &options)
        .await
        .unwrap_err();
    pool.execute("echo", json!(1)).await.unwrap();
    pool.execute("echo", json!(2)).await.unwrap();
    wait_until(WAIT, "the recycled worker's replacement", || {
        pool.stats().restarts == 3 && pool.is_ready()
    })
    .await;
    let stops: Vec<(String, tracing::Level)> = captured
        .with_message("worker state")
        .iter()
        .filter(|e| e.get("to") == Some("stopped"))
        .map(|e| (e.get("reason").unwrap().to_owned(), e.level))
        .collect();
    assert_eq!(
        stops,
        [
            ("crashed".to_owned(), tracing::Level::WARN),
            ("execution_timeout".to_owned(), tracing::Level::WARN),
            ("max_requests".to_owned(), tracing::Level::INFO),
        ]
    );
    pool.shutdown().await;
}

/// A command named in `breaker_commands` or `idempotent_commands` that no handler has
/// (a typo, say) is warned about when the pool starts.
#[tokio::test]
async fn a_setting_naming_no_handler_is_warned_about() {
    let (captured, _guard) = capture();
    let pool = testing_pool(1)
        .breaker_command("crahs")
        .idempotent_command("echo")
        .idempotent_command("pnig")
        .build()
        .await
        .unwrap();
    let warned: Vec<String> = captured
        .with_message("no handler has this name: the setting does nothing for it")
        .iter()
        .map(|e| {
            let (setting, command) = (e.get("setting").unwrap(), e.get("command").unwrap());
            format!("{} {setting} {command}", e.level)
        })
        .collect();
    assert_eq!(
        warned,
        [
            "WARN idempotent_commands pnig",
            "WARN breaker_commands crahs"
        ]
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn sessions_created_and_expired_are_events() {
    let (captured, _guard) = capture();
    let pool = testing_pool(1)
        .session_ttl(Duration::from_millis(200))
        .session_sweep_interval(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    pool.execute_with("echo", json!(1), &CallOptions::new().session_id("s-tel"))
        .await
        .unwrap();
    let created = captured.with_message("session created");
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(created[0].get("session_id"), Some("s-tel"));
    wait_until(WAIT, "the sweep to expire the session", || {
        !captured.with_message("expired sessions removed").is_empty()
    })
    .await;
    assert_eq!(
        captured.with_message("expired sessions removed")[0].get("expired"),
        Some("1")
    );
    pool.shutdown().await;
}

/// Events of the worker's captured stderr.
fn python_lines(captured: &Captured) -> Vec<Seen> {
    captured
        .events()
        .into_iter()
        .filter(|e| e.name == "pyherd::python")
        .collect()
}

#[tokio::test]
async fn python_log_lines_carry_worker_pid_and_request_id_and_end_up_in_the_tail() {
    let (captured, _guard) = capture();
    let pool = testing_pool(1).build().await.unwrap();
    let pid = pool.workers()[0].pid.unwrap().to_string();
    pool.execute("log_lines", json!({"lines": 3}))
        .await
        .unwrap();
    let request_id = request_spans(&captured, "log_lines")[0]
        .get("request_id")
        .unwrap()
        .to_owned();
    wait_until(WAIT, "the root logger's line", || {
        python_lines(&captured)
            .iter()
            .any(|e| e.message().contains("root logger line"))
    })
    .await;
    let lines = python_lines(&captured);
    let tag = format!("[w1 r={request_id}]");
    assert_eq!(
        lines
            .iter()
            .map(Seen::message)
            .filter(|m| m.contains(&tag))
            .collect::<Vec<_>>(),
        [
            format!("INFO pyherd.handler {tag} handler line 0 of 3"),
            format!("INFO pyherd.handler {tag} handler line 1 of 3"),
            format!("INFO pyherd.handler {tag} handler line 2 of 3"),
            format!("WARNING root {tag} root logger line"),
        ]
    );
    for line in &lines {
        assert_eq!(line.get("worker"), Some("w1"));
        assert_eq!(line.get("pid"), Some(pid.as_str()));
    }

    let crashed = pool.execute("crash", json!({})).await.unwrap_err();
    assert_eq!(crashed.kind(), &ErrorKind::WorkerCrashed);
    let tail = crashed.context().stderr_tail.clone().unwrap_or_default();
    assert!(
        tail.contains(&format!("WARNING root {tag} root logger line")),
        "{tail}"
    );
    assert!(
        tail.ends_with("testing.crash: exiting on purpose"),
        "{tail}"
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn ten_thousand_lines_are_rate_limited_and_the_suppressed_ones_counted() {
    const LINES: u64 = 10_000;
    let (captured, _guard) = capture();
    let pool = testing_pool(1).build().await.unwrap();
    let answer = pool
        .execute("log_lines", json!({"lines": LINES}))
        .await
        .unwrap();
    assert_eq!(answer["logged"], LINES + 1);
    let accounted = || {
        let lines = python_lines(&captured);
        let suppressed: u64 = lines
            .iter()
            .filter_map(|e| e.get("suppressed"))
            .map(|n| n.parse::<u64>().unwrap())
            .sum();
        let logged = lines
            .iter()
            .filter(|e| e.get("suppressed").is_none())
            .count() as u64;
        (logged, suppressed)
    };
    // Every line is either logged or counted in a report, once the output is quiet.
    wait_until(WAIT, "every line to be logged or counted", || {
        let (logged, suppressed) = accounted();
        logged + suppressed == LINES + 1
    })
    .await;
    let (logged, suppressed) = accounted();
    eprintln!("{LINES} lines: {logged} logged, {suppressed} counted as suppressed");
    assert!(logged < 2_000, "{logged} lines logged");
    assert!(suppressed > 8_000, "{suppressed} lines suppressed");
    let reports: Vec<Seen> = python_lines(&captured)
        .into_iter()
        .filter(|e| e.get("suppressed").is_some())
        .collect();
    assert!(
        reports[0]
            .message()
            .starts_with("python output was rate-limited: "),
        "{reports:?}"
    );
    assert!(
        reports
            .iter()
            .all(|e| e.get("worker") == Some("w1") && e.get("pid").is_some())
    );
    pool.shutdown().await;
}
