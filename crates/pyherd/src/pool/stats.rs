//! What the pool reports about itself: counters, per-worker status, snapshots.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::session::SessionStats;
use crate::worker::{StartedBy, WorkerState};

/// A snapshot of the pool, from [`Pool::stats`](crate::Pool::stats).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PoolStats {
    /// Worker slots in service (the pool's size; a slot being restarted counts).
    pub workers: usize,
    /// Workers idle and ready for a call.
    pub available: usize,
    /// Workers running a call.
    pub busy: usize,
    /// Workers starting (first start or replacement).
    pub starting: usize,
    /// Calls waiting for a worker.
    pub queued: usize,
    /// Calls submitted since the pool started (answered, failed or refused).
    pub requests: u64,
    /// Calls that ended in an error of any kind.
    pub errors: u64,
    /// Calls that waited in the queue past their queue timeout.
    pub queue_timeouts: u64,
    /// Replacement workers started after a worker died or was killed.
    pub restarts: u64,
    /// Session calls run on the worker the session preferred.
    pub affinity_hits: u64,
    /// Session calls that preferred a worker and ran on another (it was busy or gone).
    pub affinity_misses: u64,
    /// The session store's counts.
    pub sessions: SessionStats,
}

/// A snapshot of one worker, from [`Pool::workers`](crate::Pool::workers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// The worker's id (`w1`, `w2`, …; a replacement gets a new one).
    pub id: String,
    /// The Python process id (none before it is spawned).
    pub pid: Option<u32>,
    /// Where it is in its life.
    pub state: WorkerState,
    /// Calls this process has answered.
    pub requests: u64,
    /// Resident memory of the Python process, from `/proc/<pid>/statm`.
    pub rss_bytes: Option<u64>,
    /// Milliseconds since the process was spawned.
    pub uptime_ms: u64,
    /// How the process was started: `spawn`, or `fork` from the zygote (with `preload`).
    pub started_by: StartedBy,
}

/// Pool-wide counters, updated without locks.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) queue_timeouts: AtomicU64,
    pub(crate) restarts: AtomicU64,
    pub(crate) affinity_hits: AtomicU64,
    pub(crate) affinity_misses: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

struct Process {
    id: Arc<str>,
    pid: Option<u32>,
    started: Instant,
    started_by: StartedBy,
}

/// The live status of one worker slot, shared between its task and readers.
pub(crate) struct SlotStatus {
    state: AtomicU8,
    requests: AtomicU64,
    process: Mutex<Process>,
}

impl SlotStatus {
    pub(crate) fn new(id: Arc<str>, pid: u32, started: Instant, started_by: StartedBy) -> Self {
        Self {
            state: AtomicU8::new(WorkerState::Ready as u8),
            requests: AtomicU64::new(0),
            process: Mutex::new(Process {
                id,
                pid: Some(pid),
                started,
                started_by,
            }),
        }
    }

    pub(crate) fn state(&self) -> WorkerState {
        WorkerState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub(crate) fn set_state(&self, state: WorkerState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// A new process is being started in this slot.
    pub(crate) fn starting(&self, id: Arc<str>) {
        self.set_state(WorkerState::Starting);
        self.requests.store(0, Ordering::Relaxed);
        if let Ok(mut p) = self.process.lock() {
            *p = Process {
                id,
                pid: None,
                started: Instant::now(),
                started_by: p.started_by,
            };
        }
    }

    /// The new process said hello.
    pub(crate) fn running(&self, pid: u32, started: Instant, started_by: StartedBy) {
        if let Ok(mut p) = self.process.lock() {
            p.pid = Some(pid);
            p.started = started;
            p.started_by = started_by;
        }
    }

    /// Whether this slot runs the worker `id` and can take calls (ready or busy).
    pub(crate) fn runs(&self, id: &str) -> bool {
        matches!(self.state(), WorkerState::Ready | WorkerState::Busy)
            && self.process.lock().is_ok_and(|p| &*p.id == id)
    }

    pub(crate) fn served(&self) {
        bump(&self.requests);
    }

    pub(crate) fn info(&self) -> Option<WorkerInfo> {
        let p = self.process.lock().ok()?;
        Some(WorkerInfo {
            id: p.id.to_string(),
            pid: p.pid,
            state: self.state(),
            requests: self.requests.load(Ordering::Relaxed),
            rss_bytes: p.pid.and_then(rss_bytes),
            uptime_ms: u64::try_from(p.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            started_by: p.started_by,
        })
    }
}

/// Resident set size of a process, from `/proc/<pid>/statm` (second field, in pages).
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??;
    Some(pages * u64::try_from(page).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_of_this_process_is_plausible_and_of_a_missing_one_is_none() {
        let rss = rss_bytes(std::process::id()).unwrap();
        assert!(rss > 100 * 1024, "{rss}");
        assert_eq!(rss_bytes(u32::MAX), None);
    }

    #[test]
    fn a_restarting_slot_reports_its_new_worker() {
        let slot = SlotStatus::new("w1".into(), 42, Instant::now(), StartedBy::Fork);
        slot.served();
        assert_eq!(slot.info().unwrap().requests, 1);
        slot.starting("w5".into());
        let info = slot.info().unwrap();
        assert_eq!(
            (info.id.as_str(), info.pid, info.state, info.requests),
            ("w5", None, WorkerState::Starting, 0)
        );
        slot.running(43, Instant::now(), StartedBy::Spawn);
        let info = slot.info().unwrap();
        assert_eq!((info.pid, info.started_by), (Some(43), StartedBy::Spawn));
    }
}
