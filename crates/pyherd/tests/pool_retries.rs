//! Retries of idempotent calls, with real workers that crash or fail on the call a test
//! chooses: only retryable errors of idempotent calls are retried, never on the worker
//! that just failed when another can take the call, and the final error counts attempts.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{fixture, wait_until};
use pyherd::{Backoff, CallOptions, Category, ErrorKind, Pool, PoolBuilder};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// A marker file (absent until a handler or the test makes it) and the attempts log.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn marker(&self) -> PathBuf {
        self.dir.path().join("marker")
    }

    fn args(&self) -> Value {
        json!({"marker": self.marker(), "log": self.dir.path().join("log")})
    }

    /// The worker of every attempt, in order.
    fn attempts(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

fn flaky_pool(workers: usize) -> PoolBuilder {
    Pool::builder()
        .workers(workers)
        .handlers(fixture("flaky.py"))
        .startup_timeout(Duration::from_secs(20))
        .retry_base(Duration::from_millis(10))
        .retry_cap(Duration::from_millis(100))
}

fn idempotent() -> CallOptions {
    CallOptions::new().idempotent(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_call_that_crashed_its_worker_succeeds_on_another() {
    let pool = flaky_pool(2).build().await.unwrap();
    let files = Files::new();
    let reply = pool
        .execute_with("crash_first", files.args(), &idempotent())
        .await
        .unwrap();
    let attempts = files.attempts();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_ne!(attempts[0], attempts[1]);
    assert_eq!(reply.worker_id(), attempts[1]);
    assert_eq!(reply.value().unwrap()["worker"], attempts[1]);
    let stats = pool.stats();
    assert_eq!((stats.retries, stats.requests, stats.errors), (1, 1, 0));
    wait_until(
        Duration::from_secs(10),
        "the crashed worker's replacement",
        || {
            let s = pool.stats();
            s.restarts == 1 && s.available == 2
        },
    )
    .await;
    assert!(pool.workers().iter().all(|w| w.id != attempts[0]));
    assert!(
        pool.render_metrics().contains("\npyherd_retries_total 1\n"),
        "{}",
        pool.render_metrics()
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backoff_retries_a_crashed_idempotent_call_to_success() {
    for backoff in [
        Backoff::Linear,
        Backoff::Exponential,
        Backoff::Fibonacci,
        Backoff::DecorrelatedJitter,
    ] {
        let pool = flaky_pool(2)
            .retry_backoff(backoff)
            .retry_base(Duration::from_millis(40))
            .build()
            .await
            .unwrap();
        let files = Files::new();
        let started = std::time::Instant::now();
        let reply = pool
            .execute_with("crash_first", files.args(), &idempotent())
            .await
            .unwrap_or_else(|e| panic!("{backoff:?}: {e}"));
        let attempts = files.attempts();
        assert_eq!(attempts.len(), 2, "{backoff:?}: {attempts:?}");
        assert_eq!(reply.worker_id(), attempts[1], "{backoff:?}");
        assert_eq!(pool.stats().retries, 1, "{backoff:?}");
        // Every backoff waits at least its base before the first retry.
        assert!(
            started.elapsed() >= Duration::from_millis(40),
            "{backoff:?}"
        );
        pool.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_not_marked_idempotent_that_crashed_its_worker_is_not_retried() {
    let pool = flaky_pool(2).build().await.unwrap();
    let files = Files::new();
    let e = pool.execute("crash_first", files.args()).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::WorkerCrashed, "{e}");
    assert_eq!(e.category(), Category::Communication);
    assert!(
        e.is_retryable(),
        "retryable, but the call was not idempotent"
    );
    assert_eq!(e.context().attempts, None);
    assert_eq!(files.attempts().len(), 1);
    assert_eq!(pool.stats().retries, 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_exception_is_never_retried() {
    let pool = flaky_pool(2).build().await.unwrap();
    let files = Files::new();
    let e = pool
        .execute_with("raise_always", files.args(), &idempotent())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::PythonException, "{e}");
    assert!(!e.is_retryable());
    assert_eq!(e.context().attempts, Some(1));
    assert_eq!(files.attempts().len(), 1);
    assert_eq!(pool.stats().retries, 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_call_gives_up_after_its_attempts_and_says_how_many() {
    let pool = flaky_pool(2)
        .retry_attempts(3)
        .retry_backoff(Backoff::Linear)
        .build()
        .await
        .unwrap();
    let files = Files::new();
    std::fs::write(files.marker(), "").unwrap();
    let e = pool
        .execute_with("crash_while", files.args(), &idempotent())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::WorkerCrashed, "{e}");
    assert_eq!(e.context().attempts, Some(3));
    let attempts = files.attempts();
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    for pair in attempts.windows(2) {
        assert_ne!(
            pair[0], pair[1],
            "a retry ran on the worker that just failed"
        );
    }
    assert_eq!(pool.stats().retries, 2);
    assert_eq!(pool.stats().errors, 1);
    wait_until(Duration::from_secs(10), "three replacements", || {
        let s = pool.stats();
        s.restarts == 3 && s.available == 2
    })
    .await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_configured_idempotent_are_retried_unless_the_call_says_no() {
    let pool = flaky_pool(2)
        .idempotent_command("crash_first")
        .build()
        .await
        .unwrap();
    let files = Files::new();
    let reply = pool.execute("crash_first", files.args()).await.unwrap();
    assert_eq!(reply["worker"], files.attempts()[1]);
    let other = Files::new();
    let e = pool
        .execute_with(
            "crash_first",
            other.args(),
            &CallOptions::new().idempotent(false),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::WorkerCrashed);
    assert_eq!(other.attempts().len(), 1);
    let unlisted = Files::new();
    std::fs::write(unlisted.marker(), "").unwrap();
    let e = pool
        .execute("crash_while", unlisted.args())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::WorkerCrashed);
    assert_eq!(unlisted.attempts().len(), 1);
    assert_eq!(pool.stats().retries, 1);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_avoids_the_live_worker_that_failed_even_against_session_affinity() {
    let pool = flaky_pool(2).build().await.unwrap();
    for round in 0..5 {
        let session = format!("s{round}");
        let options = idempotent().session_id(&session);
        let first = pool
            .execute_with("echo", json!(round), &options)
            .await
            .unwrap();
        let home = first.worker_id().to_owned();
        let files = Files::new();
        let reply = pool
            .execute_with("busy_first", files.args(), &options)
            .await
            .unwrap();
        let attempts = files.attempts();
        assert_eq!(attempts.len(), 2, "{attempts:?}");
        assert_eq!(
            attempts[0], home,
            "the first attempt ran on the session's worker"
        );
        assert_ne!(
            attempts[1], home,
            "the retry ran on the worker that failed it"
        );
        assert_eq!(reply.worker_id(), attempts[1]);
    }
    let stats = pool.stats();
    assert_eq!((stats.retries, stats.restarts), (5, 0));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_worker_a_retry_runs_on_it_and_unmarked_errors_are_not_retried() {
    let pool = flaky_pool(1).build().await.unwrap();
    let files = Files::new();
    pool.execute_with("busy_first", files.args(), &idempotent())
        .await
        .unwrap();
    assert_eq!(files.attempts(), ["w1", "w1"]);
    let files = Files::new();
    let e = pool.execute("busy_first", files.args()).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Other("upstream_away".into()));
    assert_eq!(e.category(), Category::Connection);
    assert!(e.is_retryable());
    assert_eq!(files.attempts().len(), 1);
    pool.shutdown().await;
}

/// A pool whose `crash_first` call (request id `backing-off`) has crashed its first
/// attempt and waits 30 s before the next; the call's task, and the attempts log.
async fn backing_off() -> (
    Pool,
    JoinHandle<Result<pyherd::Reply, pyherd::Error>>,
    Files,
) {
    let pool = flaky_pool(2)
        .retry_base(Duration::from_secs(30))
        .retry_cap(Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    let files = Files::new();
    let call = {
        let (pool, args) = (pool.clone(), files.args());
        let options = idempotent().request_id("backing-off");
        tokio::spawn(async move { pool.execute_with("crash_first", args, &options).await })
    };
    wait_until(
        Duration::from_secs(10),
        "the first attempt to crash",
        || files.attempts().len() == 1 && pool.stats().restarts == 1,
    )
    .await;
    (pool, call, files)
}

/// The error `call` ended with, within 10 s.
async fn ended(call: JoinHandle<Result<pyherd::Reply, pyherd::Error>>) -> pyherd::Error {
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call ended")
        .unwrap()
        .unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_the_backoff_ends_the_call_at_once() {
    let (pool, call, files) = backing_off().await;
    pool.shutdown().await;
    let e = ended(call).await;
    assert_eq!(e.kind(), &ErrorKind::ShuttingDown, "{e}");
    assert_eq!(e.context().attempts, Some(1), "{e}");
    assert_eq!(files.attempts().len(), 1);
    assert_eq!(pool.stats().retries, 0, "a retry never made was counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_the_backoff_ends_the_call_at_once_and_it_is_not_retried() {
    let (pool, call, files) = backing_off().await;
    assert!(pool.cancel("backing-off"));
    let e = ended(call).await;
    assert_eq!(e.kind(), &ErrorKind::Cancelled, "{e}");
    assert_eq!(e.context().attempts, Some(1), "{e}");
    assert_eq!(files.attempts().len(), 1);
    assert_eq!(pool.stats().retries, 0, "a retry never made was counted");
    // The id is free again, and the pool serves on.
    assert!(!pool.cancel("backing-off"));
    let again = idempotent().request_id("backing-off");
    let reply = pool.execute_with("crash_first", files.args(), &again).await;
    assert!(reply.is_ok(), "{reply:?}");
    pool.shutdown().await;
}

/// A call whose failure opened its command's breaker is not retried: it ends at once with
/// the error of the attempt that ran (not `circuit_open`, as it did reach a worker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_failure_opened_the_breaker_ends_with_its_error_unretried() {
    let pool = flaky_pool(2)
        .retry_base(Duration::from_secs(30))
        .retry_cap(Duration::from_secs(30))
        .breaker_command("crash_first")
        .breaker_failures(1)
        .build()
        .await
        .unwrap();
    let files = Files::new();
    let options = idempotent();
    let call = pool.execute_with("crash_first", files.args(), &options);
    let e = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("no backoff before a retry the breaker refuses")
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::WorkerCrashed, "{e}");
    assert_eq!(e.context().attempts, Some(1), "{e}");
    assert_eq!(files.attempts().len(), 1);
    assert_eq!(pool.stats().retries, 0);
    pool.shutdown().await;
}

/// A retry leaves the worker that failed it only for an idle one: with the other worker
/// busy for long, it runs on the first worker free, the one that failed it, instead of
/// waiting for the busy one until its queue timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_does_not_wait_for_a_busy_worker_while_the_one_that_failed_it_is_free() {
    let pool = flaky_pool(2)
        .queue_timeout(Duration::from_secs(2))
        .retry_attempts(2)
        .build()
        .await
        .unwrap();
    let busy = Files::new();
    let long = sleeping(&pool, &busy, 30.0).await;
    let files = Files::new();
    let reply = pool
        .execute_with("busy_first", files.args(), &idempotent())
        .await
        .unwrap();
    let attempts = files.attempts();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0], attempts[1], "{attempts:?}");
    assert_ne!(attempts[0], busy.attempts()[0]);
    assert_eq!(reply.worker_id(), attempts[0]);
    assert_eq!(pool.stats().queue_timeouts, 0);
    long.abort();
    pool.shutdown_with(Duration::ZERO).await;
}

/// A long call of `crash_while` (no marker: it sleeps, then answers), logged in `files`,
/// once it runs on a worker.
async fn sleeping(
    pool: &Pool,
    files: &Files,
    seconds: f64,
) -> JoinHandle<Result<Value, pyherd::Error>> {
    let mut args = files.args();
    args["sleep"] = json!(seconds);
    let caller = pool.clone();
    let call = tokio::spawn(async move { caller.execute("crash_while", args).await });
    wait_until(Duration::from_secs(10), "the long call to run", || {
        files.attempts().len() == 1
    })
    .await;
    call
}

/// A session's retry does not go back to its own worker that failed it, even under
/// `strict_queue`: with that worker taken meanwhile, it runs on the first worker free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_retry_waits_for_the_first_worker_free_not_the_one_that_failed_it() {
    let pool = flaky_pool(2)
        .queue_timeout(Duration::from_secs(5))
        .retry_attempts(2)
        .retry_base(Duration::from_millis(600))
        .retry_cap(Duration::from_millis(600))
        .build()
        .await
        .unwrap();
    let short = Files::new();
    // Long enough to still run when the retry comes, 600 ms after the first attempt.
    let _short = sleeping(&pool, &short, 3.0).await;
    let other = short.attempts()[0].clone();
    let options = idempotent()
        .session_id("s")
        .affinity(pyherd::Affinity::StrictQueue);
    let home = pool
        .execute_with("echo", json!(1), &options)
        .await
        .unwrap()
        .worker_id()
        .to_owned();
    assert_ne!(home, other);
    let files = Files::new();
    let call = {
        let (pool, args, options) = (pool.clone(), files.args(), options.clone());
        tokio::spawn(async move { pool.execute_with("busy_first", args, &options).await })
    };
    wait_until(Duration::from_secs(10), "the first attempt", || {
        files.attempts().len() == 1
    })
    .await;
    // The session's worker takes a long call while the retry waits out its backoff.
    let long = Files::new();
    let long_call = sleeping(&pool, &long, 30.0).await;
    assert_eq!(long.attempts()[0], home);
    let reply = call.await.unwrap().unwrap();
    assert_eq!(files.attempts(), [home.clone(), other.clone()]);
    assert_eq!(reply.worker_id(), other);
    long_call.abort();
    pool.shutdown_with(Duration::ZERO).await;
}
