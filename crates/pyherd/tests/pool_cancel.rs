//! Cancellation: a dropped call future or stream, and `Pool::cancel`. A queued call never
//! reaches a worker; a running stream is stopped by its worker (which closes the
//! generator) or the worker is killed after the grace; a running plain call's worker is
//! killed and replaced.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{spawn_call, testing_pool, wait_until, worker_pids};
use futures::StreamExt;
use pyherd::{CallOptions, ErrorKind, Pool};
use serde_json::json;

fn restarts_cancelled(pool: &Pool) -> u64 {
    let metrics = pool.render_metrics();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("pyherd_worker_restarts_total{reason=\"cancelled\"} "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no cancelled restarts in\n{metrics}"))
}

/// The calls the recent errors show as cancelled.
fn cancelled_counts(pool: &Pool) -> usize {
    let errors = pool.recent_errors();
    errors.iter().filter(|e| e.kind == "cancelled").count()
}

/// Starts `count` as a plain call that leaves `progress` behind if it ever runs.
fn marked_call(
    pool: &Pool,
    progress: &Path,
    rid: &str,
) -> tokio::task::JoinHandle<Result<pyherd::Reply, pyherd::Error>> {
    let pool = pool.clone();
    let args = json!({"to": 1, "progress": progress});
    let options = CallOptions::new().request_id(rid);
    tokio::spawn(async move { pool.execute_with("count", args, &options).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_call_dropped_or_cancelled_never_reaches_a_worker() {
    let pool = testing_pool(1).build().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let busy = spawn_call(&pool, "sleep", json!({"seconds": 1.0}));
    wait_until(Duration::from_secs(5), "the worker to be busy", || {
        pool.stats().busy == 1
    })
    .await;
    let dropped = marked_call(&pool, &dir.path().join("dropped"), "q-dropped");
    let cancelled = marked_call(&pool, &dir.path().join("cancelled"), "q-cancelled");
    wait_until(Duration::from_secs(5), "two queued calls", || {
        pool.stats().queued == 2
    })
    .await;
    dropped.abort();
    let t = Instant::now();
    wait_until(Duration::from_secs(5), "the id to be free", || {
        !pool.cancel("q-dropped")
    })
    .await;
    assert!(pool.cancel("q-cancelled"));
    let e = cancelled.await.unwrap().unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "a queued call is cancelled at once"
    );
    assert_eq!(e.kind(), &ErrorKind::Cancelled);
    assert_eq!(e.category(), pyherd::Category::InvalidRequest);
    busy.await.unwrap().unwrap();
    // The worker served on: the calls given up were skipped, never run.
    assert_eq!(pool.execute("echo", json!(1)).await.unwrap(), json!(1));
    assert!(!dir.path().join("dropped").exists());
    assert!(!dir.path().join("cancelled").exists());
    assert_eq!(restarts_cancelled(&pool), 0);
    assert!(
        !pool.cancel("q-cancelled"),
        "a finished call is not in flight"
    );
    // Both count, as cancelled, the dropped one too: sleep, two counts, echo.
    let stats = pool.stats();
    assert_eq!((stats.requests, stats.errors), (4, 2), "{stats:?}");
    assert_eq!(cancelled_counts(&pool), 2);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_plain_call_cancelled_or_dropped_kills_and_replaces_its_worker() {
    let pool = testing_pool(1).build().await.unwrap();
    for how in ["cancel", "drop"] {
        let before = worker_pids(&pool);
        let caller = pool.clone();
        let call = tokio::spawn(async move {
            let options = CallOptions::new().request_id("long");
            caller
                .execute_with("sleep", json!({"seconds": 60}), &options)
                .await
        });
        wait_until(Duration::from_secs(5), "the worker to be busy", || {
            pool.stats().busy == 1
        })
        .await;
        if how == "cancel" {
            assert!(pool.cancel("long"));
            let e = call.await.unwrap().unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::Cancelled);
            assert_eq!(e.context().worker_id.as_deref(), Some("w1"));
        } else {
            call.abort();
        }
        wait_until(Duration::from_secs(20), "a replacement worker", || {
            pool.stats().available == 1 && worker_pids(&pool) != before
        })
        .await;
        assert!(!common::running(before[0]), "{how}: the old worker is gone");
    }
    assert_eq!(restarts_cancelled(&pool), 2);
    assert_eq!(pool.execute("echo", json!(2)).await.unwrap(), json!(2));
    let stats = pool.stats();
    assert_eq!((stats.requests, stats.errors), (3, 2), "{stats:?}");
    assert_eq!(cancelled_counts(&pool), 2);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_stream_cancelled_or_dropped_is_closed_by_its_worker() {
    let pool = testing_pool(1).build().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pids = worker_pids(&pool);
    for how in ["cancel", "drop"] {
        let closed = dir.path().join(how);
        let options = CallOptions::new().request_id(format!("stream-{how}"));
        let args = json!({"to": 100_000, "delay": 0.005, "closed": closed});
        let mut stream = pool.stream_with("count", args, &options).await.unwrap();
        assert!(stream.next().await.unwrap().is_ok());
        if how == "cancel" {
            assert!(pool.cancel(&format!("stream-{how}")));
            let mut error = None;
            while let Some(item) = stream.next().await {
                if let Err(e) = item {
                    error = Some(e);
                }
            }
            assert_eq!(error.unwrap().kind(), &ErrorKind::Cancelled);
        } else {
            drop(stream);
        }
        wait_until(
            Duration::from_secs(10),
            "the generator to be closed",
            || closed.exists(),
        )
        .await;
        wait_until(Duration::from_secs(10), "the worker to be free", || {
            pool.stats().available == 1
        })
        .await;
        let note = std::fs::read_to_string(&closed).unwrap();
        assert!(note.starts_with("closed after "), "{note}");
    }
    // Stopped in time: the same worker, no restart.
    assert_eq!(worker_pids(&pool), pids);
    assert_eq!(restarts_cancelled(&pool), 0);
    assert_eq!(pool.execute("echo", json!(3)).await.unwrap(), json!(3));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_does_not_stop_within_the_grace_loses_its_worker() {
    let pool = testing_pool(1).build().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hanging = dir.path().join("hanging");
    let before = worker_pids(&pool);
    let args = json!({ "hanging": hanging });
    let mut stream = pool.stream("stubborn_stream", args).await.unwrap();
    assert!(stream.next().await.unwrap().is_ok());
    // A cancel sent before the worker looked for one after the chunk would be seen.
    wait_until(Duration::from_secs(5), "the worker to hang", || {
        hanging.exists()
    })
    .await;
    let t = Instant::now();
    assert!(pool.cancel(stream.request_id()));
    let e = stream.next().await.unwrap().unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Cancelled);
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "the worker had its grace"
    );
    wait_until(Duration::from_secs(20), "a replacement worker", || {
        pool.stats().available == 1 && worker_pids(&pool) != before
    })
    .await;
    assert_eq!(restarts_cancelled(&pool), 1);
    assert_eq!(pool.execute("echo", json!(4)).await.unwrap(), json!(4));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_an_unknown_id_says_so() {
    let pool = testing_pool(1).build().await.unwrap();
    assert!(!pool.cancel("never-made"));
    pool.shutdown().await;
}
