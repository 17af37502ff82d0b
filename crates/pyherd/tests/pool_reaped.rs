//! A host that ignores `SIGCHLD` has its children reaped by the kernel, so waiting for a
//! worker fails once it ends. In a test binary of its own: the disposition is the whole
//! process's, and other tests expect their workers' exit statuses.

mod common;

use std::time::{Duration, Instant};

use common::{child_holding_the_pipes, running, testing_pool, wait_until};
use pyherd::{CallOptions, ErrorKind};
use serde_json::json;

/// The host ignores `SIGCHLD` from now on: the kernel reaps its children as they end, so
/// waiting for one fails.
#[allow(unsafe_code)]
fn ignore_sigchld() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: no handler is installed (SIG_IGN), so nothing runs in signal context.
    unsafe { signal(Signal::SIGCHLD, SigHandler::SigIgn) }.expect("SIGCHLD ignored");
}

/// A host that ignores `SIGCHLD` (or whose other code waits for any child) cannot wait
/// for its workers: the worker's death is still found at once, its status unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_reaped_by_another_is_found_dead_at_once_though_its_child_holds_the_pipes() {
    let pool = testing_pool(1).build().await.unwrap();
    let child = child_holding_the_pipes(&pool).await;
    ignore_sigchld();
    let t = Instant::now();
    let opts = CallOptions::new().timeout(Duration::from_secs(20));
    let e = pool
        .execute_with("crash", json!({"code": 7}), &opts)
        .await
        .expect_err("the worker crashed");
    assert_eq!(e.kind(), &ErrorKind::WorkerCrashed, "{e}");
    let status = e.context().exit_status.clone().unwrap_or_default();
    assert!(
        status.starts_with("unknown (waiting for it failed"),
        "{status}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    wait_until(Duration::from_secs(5), "the child to die", || {
        !running(child)
    })
    .await;
    wait_until(Duration::from_secs(10), "the replacement worker", || {
        let s = pool.stats();
        s.restarts == 1 && s.available == 1
    })
    .await;
    assert_eq!(pool.execute("echo", json!(1)).await.unwrap(), json!(1));
    pool.shutdown().await;
}
