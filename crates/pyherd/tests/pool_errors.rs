//! Every error a call can get, each against real workers, and the worker keeps serving
//! after each one.

mod common;

use common::{fixture, testing_pool};
use pyherd::{CallOptions, Category, ErrorKind, Pool};
use serde::Deserialize;
use serde_json::json;

async fn still_serves(pool: &Pool) {
    let v = pool
        .execute("echo", json!({"after": "error"}))
        .await
        .unwrap();
    assert_eq!(v, json!({"after": "error"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_command_is_refused_without_reaching_a_worker() {
    let pool = testing_pool(1).build().await.unwrap();
    let e = pool
        .execute("no_such_handler", json!({}))
        .await
        .unwrap_err();
    assert_eq!(e.category(), Category::InvalidRequest);
    assert_eq!(e.kind(), &ErrorKind::UnknownCommand);
    assert!(
        e.message().contains("no_such_handler") && e.message().contains("echo"),
        "{e}"
    );
    assert_eq!(e.context().command.as_deref(), Some("no_such_handler"));
    assert!(!e.is_retryable());
    assert_eq!(pool.workers()[0].requests, 0, "no worker was bothered");
    still_serves(&pool).await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_exception_carries_type_message_and_traceback() {
    let pool = testing_pool(1).build().await.unwrap();
    let e = pool
        .execute("raise_error", json!({"message": "bad input: x"}))
        .await
        .unwrap_err();
    assert_eq!(e.category(), Category::Python);
    assert_eq!(e.kind(), &ErrorKind::PythonException);
    assert_eq!(e.message(), "bad input: x");
    let ctx = e.context();
    assert_eq!(ctx.python_type.as_deref(), Some("ValueError"));
    let tb = ctx.traceback.as_deref().unwrap();
    assert!(
        tb.contains("Traceback")
            && tb.contains("testing.py")
            && tb.contains("ValueError: bad input: x"),
        "{tb}"
    );
    assert_eq!(ctx.worker_id.as_deref(), Some("w1"));
    assert!(ctx.pid.is_some());
    assert_eq!(
        pool.stats().restarts,
        0,
        "an exception does not cost the worker"
    );
    still_serves(&pool).await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_json_cannot_hold_is_an_error_not_a_dead_worker() {
    let pool = testing_pool(1).build().await.unwrap();
    let pid = pool.workers()[0].pid;
    let e = pool.execute("not_json", json!({})).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::ResultNotSerializable);
    assert_eq!(e.category(), Category::Python);
    assert!(e.message().contains("not_json"), "{e}");
    still_serves(&pool).await;
    assert_eq!(pool.workers()[0].pid, pid);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_nested_too_deep_is_an_error_with_either_codec() {
    for codec in ["stdlib", "auto"] {
        let pool = testing_pool(1)
            .env("PYHERD_JSON", codec)
            .build()
            .await
            .unwrap();
        let pid = pool.workers()[0].pid;
        let e = pool.execute("deep_result", json!({})).await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::ResultNotSerializable, "{codec}: {e}");
        still_serves(&pool).await;
        assert_eq!(pool.workers()[0].pid, pid, "{codec}: the worker survived");
        pool.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frames_are_refused_on_the_side_that_would_send_them() {
    let pool = testing_pool(1)
        .max_frame_bytes(64 * 1024)
        .build()
        .await
        .unwrap();
    // Host side: the call itself is too large.
    let big = "é".repeat(40 * 1024);
    let e = pool
        .execute("echo", json!({"text": big}))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::PayloadTooLarge);
    assert_eq!(e.category(), Category::InvalidRequest);
    assert_eq!(e.context().limit_bytes, Some(64 * 1024));
    // Worker side: the result is too large.
    let e = pool
        .execute("big_result", json!({"bytes": 100_000}))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::ResultTooLarge);
    assert!(e.message().contains("over the frame limit of 65536"), "{e}");
    assert_eq!(e.context().limit_bytes, Some(64 * 1024));
    // Escaping can make a call grow past the limit after admission (9 kB of control
    // characters in a command name are 54 kB on the wire): still refused, and the worker
    // is kept.
    let odd = testing_pool(1)
        .max_frame_bytes(64 * 1024)
        .handlers(fixture("control_names.py"))
        .build()
        .await
        .unwrap();
    let pid = odd.workers()[0].pid;
    let e = odd
        .execute(&"\u{1}".repeat(9_000), json!({"text": "a".repeat(12_000)}))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::PayloadTooLarge, "{e}");
    assert!(e.message().contains("once encoded"), "{e}");
    assert_eq!(odd.workers()[0].pid, pid);
    assert_eq!(odd.workers()[0].state, pyherd::WorkerState::Ready);
    assert_eq!(odd.stats().restarts, 0);
    odd.shutdown().await;
    let fits = pool
        .execute("big_result", json!({"bytes": 60_000}))
        .await
        .unwrap();
    assert_eq!(fits.as_str().unwrap().len(), 60_000);
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_calls_decode_results_and_name_a_mismatch() {
    #[derive(Deserialize, Debug, PartialEq)]
    struct Pong {
        pong: bool,
        worker_id: String,
    }
    let pool = testing_pool(1).build().await.unwrap();
    let pong: Pong = pool.call("ping", &json!({})).await.unwrap();
    assert_eq!(
        pong,
        Pong {
            pong: true,
            worker_id: "w1".into()
        }
    );
    let squares: u64 = pool.call("cpu", &json!({"n": 4})).await.unwrap();
    assert_eq!(squares, 14);
    let e = pool
        .call::<_, Vec<u8>>("ping", &json!({}))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::ResultTypeMismatch);
    let mut not_json_keys = std::collections::HashMap::new();
    not_json_keys.insert(vec![1u8], 1);
    let e = pool
        .call::<_, serde_json::Value>("echo", &not_json_keys)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::MalformedRequest);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_counted_and_measured() {
    let pool = testing_pool(1).build().await.unwrap();
    pool.execute("echo", json!(1)).await.unwrap();
    let _ = pool.execute("raise_error", json!({})).await;
    let _ = pool.execute("nope", json!({})).await;
    let stats = pool.stats();
    assert_eq!((stats.requests, stats.errors), (3, 2));
    let metrics = pool.render_metrics();
    for line in [
        "pyherd_requests_total{command=\"echo\",outcome=\"ok\"} 1",
        "pyherd_requests_total{command=\"raise_error\",outcome=\"python_exception\"} 1",
        "pyherd_requests_total{command=\"(unknown)\",outcome=\"unknown_command\"} 1",
        "pyherd_workers{state=\"ready\"} 1",
        "pyherd_queue_depth 0",
        "pyherd_worker_restarts_total{reason=\"crashed\"} 0",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    let e = pool
        .execute_with("echo", json!({}), &CallOptions::new().session_id("s-1"))
        .await
        .map(|r| r.worker_id().to_owned())
        .unwrap();
    assert_eq!(e, "w1");
    pool.shutdown().await;
}
