//! Helpers shared by the integration tests: real pools of real Python workers.
#![allow(dead_code, unreachable_pub)]

pub mod capture;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pyherd::{Pool, PoolBuilder};
use serde_json::Value;
use tokio::task::JoinHandle;

/// A fixture module under `tests/fixtures`.
pub fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// A builder with the fault handlers of `pyherd_worker.testing` loaded.
pub fn testing_pool(workers: usize) -> PoolBuilder {
    Pool::builder()
        .workers(workers)
        .handlers("pyherd_worker.testing")
        .startup_timeout(Duration::from_secs(20))
}

/// Polls `cond` every 10 ms until it holds; panics with `what` after `limit`.
pub async fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The process exists in the process table (running or a zombie not yet reaped).
pub fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The process is running (exists and is not a zombie).
pub fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Every worker pid of the pool right now.
pub fn worker_pids(pool: &Pool) -> Vec<u32> {
    pool.workers().iter().filter_map(|w| w.pid).collect()
}

/// SIGKILLs a process from outside.
pub fn sigkill(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits i32")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
}

/// Runs `pool.execute(command, args)` in its own task.
pub fn spawn_call(
    pool: &Pool,
    command: &'static str,
    args: Value,
) -> JoinHandle<Result<Value, pyherd::Error>> {
    let pool = pool.clone();
    tokio::spawn(async move { pool.execute(command, args).await })
}

/// A `sleep` child of the worker handed its protocol pipes (handler `spawn_child` of
/// `pyherd_worker.testing`): it keeps them open after the worker dies, so the pipes alone
/// never tell the host of that death. Its pid.
pub async fn child_holding_the_pipes(pool: &Pool) -> u32 {
    let answer = pool
        .execute("spawn_child", serde_json::json!({"hold_pipes": true}))
        .await
        .expect("spawn_child");
    let child = u32::try_from(answer["pid"].as_u64().expect("a pid")).expect("pid fits u32");
    assert!(running(child));
    child
}

/// Crashes the pool's one worker mid-call after it started a child holding its pipes:
/// the call fails at once as `worker_crashed` with the exit status, not at its timeout,
/// and the child ends with the worker's process group.
pub async fn crash_with_a_child_holding_the_pipes(pool: &Pool) {
    let child = child_holding_the_pipes(pool).await;
    let t = Instant::now();
    let opts = pyherd::CallOptions::new().timeout(Duration::from_secs(20));
    let e = pool
        .execute_with("crash", serde_json::json!({"code": 7}), &opts)
        .await
        .expect_err("the worker crashed");
    assert_eq!(e.kind(), &pyherd::ErrorKind::WorkerCrashed, "{e}");
    assert!(e.is_retryable());
    assert_eq!(e.context().exit_status.as_deref(), Some("exit status: 7"));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    wait_until(Duration::from_secs(5), "the child to die", || {
        !running(child)
    })
    .await;
}
