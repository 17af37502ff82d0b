//! Starting a pool: workers start concurrently; every way a worker can fail to start
//! makes `build` fail with an `initialization` error carrying the Python side's words,
//! and leaves no process behind.

mod common;

use std::time::{Duration, Instant};

use common::{exists, fixture, testing_pool};
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

async fn start_failure(module: &str, startup_timeout: Duration) -> pyherd::Error {
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
    assert!(began.elapsed() < startup_timeout + Duration::from_secs(5));
    assert_eq!(error.category(), Category::Initialization, "{error}");
    let pid = error.context().pid.expect("the failed worker's pid");
    assert!(
        !exists(pid),
        "the failed worker {pid} is still in the process table"
    );
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_raising_at_import_is_reported_with_its_traceback() {
    let e = start_failure(&fixture("raise_at_import.py"), Duration::from_secs(20)).await;
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
    let e = start_failure(&fixture("exit_at_import.py"), Duration::from_secs(20)).await;
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
async fn a_process_dying_before_hello_is_reported_with_exit_status_and_stderr() {
    let e = start_failure(&fixture("hard_exit_at_import.py"), Duration::from_secs(20)).await;
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
async fn a_worker_without_hello_in_time_is_killed() {
    let e = start_failure(&fixture("hang_at_import.py"), Duration::from_millis(1500)).await;
    assert_eq!(e.kind(), &ErrorKind::StartupTimeout);
    assert!(e.message().contains("1.5s"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_of_another_protocol_is_refused() {
    let e = start_failure(&fixture("bad_hello.py"), Duration::from_secs(20)).await;
    assert_eq!(e.kind(), &ErrorKind::HandshakeFailed);
    assert!(e.message().contains("protocol 99"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_interpreter_or_module_is_a_typed_error() {
    let e = Pool::builder()
        .python("/nonexistent/python3")
        .build()
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind(), &ErrorKind::SpawnFailed);
    let e = start_failure("no_such_module_anywhere", Duration::from_secs(20)).await;
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
