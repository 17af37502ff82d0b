//! Circuit breakers with real workers: a command that keeps crashing its workers stops
//! being sent, half-opens after the open time, closes after successful trials and opens
//! again when a trial crashes.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{fixture, wait_until};
use futures::StreamExt;
use pyherd::{BreakerInfo, BreakerState, CallOptions, Category, ErrorKind, Pool};
use serde_json::{Value, json};

const OPEN_FOR: Duration = Duration::from_millis(1500);

struct Marker {
    dir: tempfile::TempDir,
}

impl Marker {
    /// Present: `crash_while` crashes its worker.
    fn present() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("marker"), "").unwrap();
        Self { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("marker")
    }

    fn remove(&self) {
        std::fs::remove_file(self.path()).unwrap();
    }

    fn args(&self) -> Value {
        json!({"marker": self.path(), "log": self.dir.path().join("log")})
    }

    fn calls(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("log"))
            .unwrap_or_default()
            .lines()
            .count()
    }
}

async fn breaker_pool() -> Pool {
    Pool::builder()
        .workers(2)
        .handlers(fixture("flaky.py"))
        .startup_timeout(Duration::from_secs(20))
        .breaker_command("crash_while")
        .breaker_failures(3)
        .breaker_successes(2)
        .breaker_open(OPEN_FOR)
        .build()
        .await
        .unwrap()
}

fn breaker(pool: &Pool) -> BreakerInfo {
    let breakers = pool.stats().breakers;
    assert_eq!(breakers.len(), 1, "{breakers:?}");
    breakers[0].clone()
}

/// Three calls that crash their worker: the breaker opens.
async fn open(pool: &Pool, marker: &Marker) {
    for _ in 0..3 {
        let e = pool
            .execute("crash_while", marker.args())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::WorkerCrashed, "{e}");
    }
}

async fn half_open(pool: &Pool) {
    wait_until(Duration::from_secs(10), "the breaker to half-open", || {
        breaker(pool).state == BreakerState::HalfOpen
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_command_opens_its_breaker_fails_fast_then_half_opens_and_closes() {
    let pool = breaker_pool().await;
    let marker = Marker::present();
    let b = breaker(&pool);
    assert_eq!(
        (b.command.as_str(), b.state, b.opens),
        ("crash_while", BreakerState::Closed, 0)
    );
    open(&pool, &marker).await;
    let b = breaker(&pool);
    assert_eq!((b.state, b.opens), (BreakerState::Open, 1));
    assert!(b.half_open_in_ms.is_some_and(|ms| ms <= 1500), "{b:?}");

    let t = Instant::now();
    let e = pool
        .execute("crash_while", marker.args())
        .await
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(e.kind(), &ErrorKind::CircuitOpen, "{e}");
    assert_eq!(e.category(), Category::Resource);
    assert!(!e.is_retryable());
    assert!(e.context().retry_after_ms.is_some_and(|ms| ms <= 1500));
    assert_eq!(e.context().command.as_deref(), Some("crash_while"));
    assert_eq!(
        marker.calls(),
        3,
        "an open breaker sent the call to a worker"
    );
    // An idempotent call is refused the same way, without attempts.
    let e = pool
        .execute_with(
            "crash_while",
            marker.args(),
            &CallOptions::new().idempotent(true),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::CircuitOpen);
    assert_eq!(marker.calls(), 3);
    assert_eq!(pool.execute("echo", json!(1)).await.unwrap(), json!(1));

    let metrics = pool.render_metrics();
    for line in [
        "pyherd_circuit_breaker_state{command=\"crash_while\",state=\"open\"} 1",
        "pyherd_circuit_breaker_state{command=\"crash_while\",state=\"closed\"} 0",
        "pyherd_circuit_breaker_opens_total{command=\"crash_while\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }

    marker.remove();
    half_open(&pool).await;
    pool.execute("crash_while", marker.args()).await.unwrap();
    assert_eq!(breaker(&pool).state, BreakerState::HalfOpen);
    pool.execute("crash_while", marker.args()).await.unwrap();
    let b = breaker(&pool);
    assert_eq!((b.state, b.opens, b.failures), (BreakerState::Closed, 1, 0));
    assert_eq!(marker.calls(), 5);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trial_call_that_crashes_reopens_the_breaker() {
    let pool = breaker_pool().await;
    let marker = Marker::present();
    open(&pool, &marker).await;
    half_open(&pool).await;
    let e = pool
        .execute("crash_while", marker.args())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::WorkerCrashed, "{e}");
    let b = breaker(&pool);
    assert_eq!((b.state, b.opens), (BreakerState::Open, 2));
    let e = pool
        .execute("crash_while", marker.args())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::CircuitOpen);
    assert_eq!(marker.calls(), 4);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_that_leave_the_worker_alive_do_not_open_the_breaker() {
    let pool = Pool::builder()
        .workers(1)
        .handlers(fixture("flaky.py"))
        .breaker_command("raise_always")
        .breaker_failures(1)
        .build()
        .await
        .unwrap();
    let marker = Marker::present();
    for _ in 0..3 {
        let e = pool
            .execute("raise_always", marker.args())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::PythonException);
    }
    let b = breaker(&pool);
    assert_eq!((b.state, b.opens), (BreakerState::Closed, 0));
    pool.shutdown().await;
}

/// Streams go through their command's breaker as plain calls do: streams that crash
/// their worker open it, and an open breaker refuses a stream before any worker runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_open_the_breaker_and_an_open_breaker_refuses_them() {
    let pool = breaker_pool().await;
    let marker = Marker::present();
    for _ in 0..3 {
        let mut stream = pool.stream("crash_while", marker.args()).await.unwrap();
        let e = stream.next().await.expect("an item").unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::WorkerCrashed, "{e}");
    }
    assert_eq!(breaker(&pool).state, BreakerState::Open);
    let e = pool.stream("crash_while", marker.args()).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::CircuitOpen, "{e}");
    assert_eq!(marker.calls(), 3, "an open breaker let a stream through");
    marker.remove();
    half_open(&pool).await;
    for _ in 0..2 {
        let mut stream = pool.stream("crash_while", marker.args()).await.unwrap();
        while let Some(chunk) = stream.next().await {
            chunk.unwrap();
        }
    }
    assert_eq!(breaker(&pool).state, BreakerState::Closed);
    pool.shutdown().await;
}

/// A call of `crash_while` that sleeps, cancelled while it runs (its worker is killed).
async fn cancelled_call(pool: &Pool, marker: &Marker, id: &str) {
    let before = marker.calls();
    let call = {
        let (pool, options) = (pool.clone(), CallOptions::new().request_id(id));
        let mut args = marker.args();
        args["sleep"] = json!(30);
        tokio::spawn(async move { pool.execute_with("crash_while", args, &options).await })
    };
    wait_until(Duration::from_secs(10), "the call to run", || {
        marker.calls() > before
    })
    .await;
    assert!(pool.cancel(id));
    let e = call.await.unwrap().unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Cancelled, "{e}");
}

/// A cancelled call says nothing about its command: it neither clears the failures of a
/// closed breaker nor counts as a successful trial of a half-open one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_is_neither_a_failure_nor_a_success() {
    let pool = breaker_pool().await;
    let marker = Marker::present();
    for _ in 0..2 {
        pool.execute("crash_while", marker.args())
            .await
            .unwrap_err();
    }
    assert_eq!(breaker(&pool).failures, 2);
    cancelled_call(&pool, &marker, "closed").await;
    assert_eq!(
        breaker(&pool).failures,
        2,
        "the cancel cleared the failures"
    );
    pool.execute("crash_while", marker.args())
        .await
        .unwrap_err();
    assert_eq!(breaker(&pool).state, BreakerState::Open);
    marker.remove();
    half_open(&pool).await;
    for id in ["trial-1", "trial-2"] {
        cancelled_call(&pool, &marker, id).await;
        assert_eq!(breaker(&pool).state, BreakerState::HalfOpen, "{id}");
    }
    pool.shutdown().await;
}

/// A stream whose worker crashed counts for the breaker even when its reader leaves
/// without reading on: the crash is not lost with the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_dropped_after_its_worker_crashed_still_counts() {
    let pool = breaker_pool().await;
    let marker = Marker::present();
    let stream = pool.stream("crash_while", marker.args()).await.unwrap();
    wait_until(
        Duration::from_secs(10),
        "the worker to crash and be replaced",
        || marker.calls() == 1 && pool.stats().restarts == 1,
    )
    .await;
    drop(stream);
    wait_until(Duration::from_secs(10), "the crash to be counted", || {
        breaker(&pool).failures == 1
    })
    .await;
    pool.shutdown().await;
}

/// A plain call whose worker crashed counts for the breaker even when its caller leaves
/// before it hears back: the crash is recorded where it is seen, not by the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_dropped_after_its_worker_crashed_still_counts() {
    let pool = breaker_pool().await;
    let marker = Marker::present();
    let mut call = Box::pin(pool.execute("crash_while", marker.args()));
    // Polled once: the call is admitted and waits for its answer, which is never read.
    assert!(futures::poll!(call.as_mut()).is_pending());
    wait_until(
        Duration::from_secs(10),
        "the worker to crash and be replaced",
        || marker.calls() == 1 && pool.stats().restarts == 1,
    )
    .await;
    drop(call);
    assert_eq!(breaker(&pool).failures, 1, "the crash was not counted");
    pool.shutdown().await;
}

/// A half-open breaker's trial call that gives up waiting in the queue frees the trial
/// at once, though it stays queued until a worker reaches it: the next call is a trial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trial_that_gave_up_in_the_queue_frees_the_trial() {
    let pool = Pool::builder()
        .workers(1)
        .handlers(fixture("flaky.py"))
        .handlers("pyherd_worker.testing")
        .startup_timeout(Duration::from_secs(20))
        .breaker_command("crash_while")
        .breaker_failures(1)
        .breaker_open(OPEN_FOR)
        .build()
        .await
        .unwrap();
    let marker = Marker::present();
    pool.execute("crash_while", marker.args())
        .await
        .unwrap_err();
    assert_eq!(breaker(&pool).state, BreakerState::Open);
    marker.remove();
    half_open(&pool).await;
    let busy = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.execute("sleep", json!({"seconds": 3})).await })
    };
    wait_until(Duration::from_secs(10), "the worker to be busy", || {
        pool.stats().busy == 1
    })
    .await;
    let quick = CallOptions::new().queue_timeout(Duration::from_millis(100));
    for attempt in ["the first trial", "the trial after it"] {
        let e = pool
            .execute_with("crash_while", marker.args(), &quick)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::QueueTimeout, "{attempt}: {e}");
    }
    assert_eq!(breaker(&pool).state, BreakerState::HalfOpen);
    busy.await.unwrap().unwrap();
    assert_eq!(marker.calls(), 1, "a call that gave up ran");
    pool.shutdown().await;
}
