//! Starting a pool: workers start concurrently; a start that fails for a reason that may
//! pass is tried again, and when a worker cannot start `build` fails with an
//! `initialization` error carrying the Python side's words, and leaves no process behind.

mod common;

use std::time::{Duration, Instant};

use common::{exists, fixture, sigkill, testing_pool, wait_until};
use pyherd::{Category, ErrorKind, Pool, WorkerState};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_workers_start_and_report_themselves() {
    let pool = testing_pool(4).build().await.unwrap();
    let workers = pool.workers();
    assert_eq!(workers.len(), 4);
    let mut ids: Vec<_> = workers.iter().map(|w| w.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["w1", "w2", "w3", "w4"]);
    for w in &workers {
        assert_eq!(w.state, WorkerState::Ready);
        let pid = w.pid.unwrap();
        assert!(exists(pid));
        assert!(
            w.rss_bytes.unwrap() > 1 << 20,
            "a Python process holds more than 1 MiB"
        );
    }
    let stats = pool.stats();
    assert_eq!(
        (stats.workers, stats.available, stats.busy, stats.queued),
        (4, 4, 0, 0)
    );
    assert!(pool.is_ready());
    assert!(pool.handlers().contains(&"sleep".to_owned()));

    let ping = pool.execute("ping", json!({})).await.unwrap();
    assert_eq!(ping["pong"], true);
    let pid = u32::try_from(ping["pid"].as_u64().unwrap()).unwrap();
    assert!(workers.iter().any(|w| w.pid == Some(pid)));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_eight_workers_is_concurrent() {
    // A sequential start would take about 8 times one worker's start; a worker's start
    // is bounded below here by measuring one first.
    let t = Instant::now();
    let one = Pool::builder().workers(1).build().await.unwrap();
    let single = t.elapsed();
    one.shutdown().await;
    let t = Instant::now();
    let eight = Pool::builder().workers(8).build().await.unwrap();
    let all = t.elapsed();
    eight.shutdown().await;
    assert!(
        all < single * 7,
        "8 workers took {all:?}, one took {single:?}"
    );
}

/// Waits between the five starts of a worker whose start keeps failing for a reason that
/// may pass: 50 + 100 + 200 + 400 ms.
const RETRY_BACKOFF: Duration = Duration::from_millis(750);

/// How long a worker whose start failed is given to exit by itself before it is killed.
const FAILED_START_PATIENCE: Duration = Duration::from_secs(1);

/// The number in a worker id (`w7` → 7).
fn worker_number(e: &pyherd::Error) -> u64 {
    let id = e
        .context()
        .worker_id
        .as_deref()
        .expect("the failed worker's id");
    id.trim_start_matches('w').parse().unwrap()
}

/// Builds a pool of 2 workers loading `module`, which must fail; `retried` says whether the
/// failure is one that may pass, so each worker is started five times before the build fails.
async fn start_failure(module: &str, startup_timeout: Duration, retried: bool) -> pyherd::Error {
    let began = Instant::now();
    let error = match Pool::builder()
        .workers(2)
        .handlers(module)
        .startup_timeout(startup_timeout)
        .build()
        .await
    {
        Ok(_) => panic!("a pool with {module} must not start"),
        Err(error) => error,
    };
    let took = began.elapsed();
    assert_eq!(error.category(), Category::Initialization, "{error}");
    let pid = error.context().pid.expect("the failed worker's pid");
    assert!(
        !exists(pid),
        "the failed worker {pid} is still in the process table"
    );
    if retried {
        // The fifth start of a worker: its four retries took ids after w1 and w2.
        assert!(worker_number(&error) >= 6, "{error:?}");
        assert!(took >= RETRY_BACKOFF, "{took:?}");
        let most = (startup_timeout + FAILED_START_PATIENCE) * 5 + RETRY_BACKOFF;
        assert!(took < most + Duration::from_secs(5), "{took:?}");
    } else {
        // The first start of w1 or w2, and the build failed without waiting.
        assert!(worker_number(&error) <= 2, "{error:?}");
        assert!(took < startup_timeout, "{took:?}");
    }
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_raising_at_import_is_reported_with_its_traceback() {
    let e = start_failure(
        &fixture("raise_at_import.py"),
        Duration::from_secs(20),
        false,
    )
    .await;
    assert_eq!(e.kind(), &ErrorKind::HandlerImportFailed);
    assert!(e.message().contains("OPENAI_API_KEY is not set"), "{e}");
    assert_eq!(e.context().python_type.as_deref(), Some("RuntimeError"));
    assert!(
        e.context()
            .traceback
            .as_deref()
            .unwrap()
            .contains("raise_at_import.py")
    );
    assert!(
        e.context()
            .stderr_tail
            .as_deref()
            .unwrap()
            .contains("RuntimeError")
    );
    assert_eq!(e.context().exit_status.as_deref(), Some("exit status: 3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_exiting_at_import_is_reported() {
    let e = start_failure(
        &fixture("exit_at_import.py"),
        Duration::from_secs(20),
        false,
    )
    .await;
    assert_eq!(e.kind(), &ErrorKind::HandlerImportFailed);
    assert!(e.message().contains("SystemExit"), "{e}");
    assert!(
        e.context()
            .stderr_tail
            .as_deref()
            .unwrap()
            .contains("exit_at_import: giving up")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_dying_before_hello_five_times_is_reported_with_exit_status_and_stderr() {
    let e = start_failure(
        &fixture("hard_exit_at_import.py"),
        Duration::from_secs(20),
        true,
    )
    .await;
    assert_eq!(e.kind(), &ErrorKind::StartupFailed);
    assert_eq!(e.context().exit_status.as_deref(), Some("exit status: 5"));
    assert!(
        e.context()
            .stderr_tail
            .as_deref()
            .unwrap()
            .contains("leaving now")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_hello_in_time_is_killed_and_tried_again() {
    let e = start_failure(
        &fixture("hang_at_import.py"),
        Duration::from_millis(1500),
        true,
    )
    .await;
    assert_eq!(e.kind(), &ErrorKind::StartupTimeout);
    assert!(e.message().contains("1.5s"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_of_another_protocol_is_refused_at_every_try() {
    let e = start_failure(&fixture("bad_hello.py"), Duration::from_secs(20), true).await;
    assert_eq!(e.kind(), &ErrorKind::HandshakeFailed);
    assert!(e.message().contains("protocol 99"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_interpreter_or_module_is_a_typed_error() {
    let began = Instant::now();
    let e = Pool::builder()
        .python("/nonexistent/python3")
        .build()
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind(), &ErrorKind::SpawnFailed);
    assert!(began.elapsed() < RETRY_BACKOFF, "not retried");
    // A program that is not Python at all: its guardian's end is said in plain words.
    let e = Pool::builder()
        .python("/bin/false")
        .build()
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind(), &ErrorKind::SpawnFailed);
    assert!(
        e.message()
            .contains("/bin/false -m pyherd_worker.guardian ended with exit status: 1"),
        "{e}"
    );
    let e = start_failure("no_such_module_anywhere", Duration::from_secs(20), false).await;
    assert_eq!(e.kind(), &ErrorKind::HandlerImportFailed);
    assert_eq!(
        e.context().python_type.as_deref(),
        Some("ModuleNotFoundError")
    );
}

#[tokio::test]
async fn invalid_settings_are_refused_before_anything_starts() {
    let e = Pool::builder().workers(0).build().await.err().unwrap();
    assert_eq!(e.kind(), &ErrorKind::InvalidConfig);
    let e = Pool::builder()
        .max_frame_bytes(10)
        .build()
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind(), &ErrorKind::InvalidConfig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_during_its_first_start_is_started_again_and_the_pool_serves() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("killed");
    let pool = testing_pool(2)
        .handlers(fixture("killed_once_at_start.py"))
        .env("PYHERD_TEST_MARKER", marker.to_string_lossy())
        .build()
        .await
        .unwrap();
    assert!(marker.exists(), "no start was killed");
    // The retry took the next id; a retried first start is not a replacement.
    let mut ids: Vec<_> = pool.workers().into_iter().map(|w| w.id).collect();
    ids.sort();
    assert!(ids == ["w1", "w3"] || ids == ["w2", "w3"], "{ids:?}");
    let stats = pool.stats();
    assert_eq!((stats.available, stats.restarts), (2, 0));
    assert_eq!(pool.execute("ping", json!({})).await.unwrap()["pong"], true);
    // Replacements go on from there.
    let victim = pool.workers()[0].pid.unwrap();
    sigkill(victim);
    wait_until(Duration::from_secs(10), "the replacement worker", || {
        let s = pool.stats();
        s.restarts == 1 && s.available == 2
    })
    .await;
    assert!(
        pool.workers().iter().any(|w| w.id == "w4"),
        "{:?}",
        pool.workers()
    );
    pool.shutdown().await;
}
