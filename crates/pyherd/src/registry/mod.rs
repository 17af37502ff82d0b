//! The run registry: which processes each host run started, so that none outlives it.
//!
//! Every pool is a *run* with a random id. Its workers carry the id on their command
//! line (`--run-id <id>`) and in their environment (`PYHERD_RUN_ID`, inherited by any
//! process a handler starts). While the host lives, `<state_dir>/runs/<id>.json` lists
//! the host (pid, start time) and every live worker (worker id, pid, process group, start
//! time from `/proc/<pid>/stat`), rewritten atomically (temporary file + rename) as
//! workers start and end, and removed when the pool is dropped.
//!
//! The layers that end a run's processes:
//! 1. each worker gets `PR_SET_PDEATHSIG` (SIGKILL) from the pool's spawner thread, exits
//!    on EOF of its request pipe and when its parent changes, and leads its own process
//!    group, which is killed whole when the worker ends;
//! 2. a *guardian* per run (`python -m pyherd_worker.guardian`), detached from the host,
//!    waits on a pipe only the host holds: when the host exits (even by SIGKILL) it kills
//!    every process carrying the run id and the groups of the recorded workers, then
//!    removes the file (and the temporary file of a rewrite the host died in);
//! 3. at start, a pool [`sweep`]s the state directory: runs whose host is dead lose their
//!    remaining processes, PID-reuse safe (start time and marker checked), and their
//!    files, temporary ones included. `pyherd cleanup` runs the same sweep by hand.

mod procfs;
mod record;
mod run;
mod sweep;

use std::path::PathBuf;

pub(crate) use run::{Run, RunEntry};
pub(crate) use sweep::kill_strays;
pub use sweep::{Killed, SkipReason, Skipped, SweepReport, sweep};

/// The default state directory (see [`PoolConfig::state_dir`](crate::PoolConfig::state_dir)):
/// `$XDG_STATE_HOME/pyherd`, else `~/.local/state/pyherd`, else `pyherd` in the temp
/// directory.
pub fn default_state_dir() -> PathBuf {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("XDG_STATE_HOME")
        .map(|d| d.join("pyherd"))
        .or_else(|| var("HOME").map(|d| d.join(".local").join("state").join("pyherd")))
        .unwrap_or_else(|| std::env::temp_dir().join("pyherd"))
}

/// Sweeps `state_dir` before a pool starts (off the async threads) and logs the outcome.
pub(crate) async fn sweep_at_start(state_dir: PathBuf) {
    // `sweep` does not panic, so the task always has its report.
    let report = tokio::task::spawn_blocking(move || sweep(&state_dir))
        .await
        .unwrap_or_default();
    for k in &report.killed {
        tracing::warn!(pid = k.pid, worker = k.worker_id.as_deref().unwrap_or("-"),
            run_id = %k.run_id, group = k.group, "killed a process left by a dead run");
    }
    for s in &report.skipped {
        let file = s.file.display();
        match s.reason {
            SkipReason::HostAlive | SkipReason::NotRunning => tracing::debug!(%file,
                pid = s.pid, reason = %s.reason, "sweep: skipped"),
            _ => tracing::warn!(%file, pid = s.pid, worker = s.worker_id.as_deref().unwrap_or("-"),
                reason = %s.reason, detail = %s.detail, "sweep: skipped"),
        }
    }
}
