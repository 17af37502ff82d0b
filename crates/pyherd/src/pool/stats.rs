//! What the pool reports about itself: counters, per-worker status, snapshots.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use super::lifecycle::{Lifecycle, RestartReason};
use crate::policy::BreakerInfo;
use crate::session::SessionStats;
use crate::worker::{StartedBy, WorkerState};

/// Why a busy or idle worker stops when it failed: it died or ran past a call's timeout.
/// Its `worker state` event is a warning, as a degraded worker's end already is (one
/// that stops answering its health checks is degraded first).
const FAILURES: [&str; 2] = [
    RestartReason::Crashed.as_str(),
    RestartReason::Timeout.as_str(),
];

/// A snapshot of the pool, from [`Pool::stats`](crate::Pool::stats).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PoolStats {
    /// Worker slots in service (the pool's size, between `min_workers` and
    /// `max_workers`; a slot being restarted counts).
    pub workers: usize,
    /// Workers idle and ready for a call.
    pub available: usize,
    /// Workers running a call.
    pub busy: usize,
    /// Workers starting (first start or replacement).
    pub starting: usize,
    /// Workers that missed a health check and take no new work until they answer.
    pub degraded: usize,
    /// Workers being retired (recycled, idle past `idle_timeout_s`, shutting down).
    pub draining: usize,
    /// True while new workers keep failing to start (the spawn circuit breaker is open).
    pub spawn_failing: bool,
    /// Calls waiting for a worker.
    pub queued: usize,
    /// Calls submitted since the pool started (answered, failed or refused).
    pub requests: u64,
    /// Calls that ended in an error of any kind.
    pub errors: u64,
    /// Calls that waited in the queue past their queue timeout.
    pub queue_timeouts: u64,
    /// Replacement workers started after a worker died, was killed or was recycled.
    pub restarts: u64,
    /// Session calls run on the worker the session preferred.
    pub affinity_hits: u64,
    /// Session calls that preferred a worker and ran on another (it was busy or gone).
    pub affinity_misses: u64,
    /// The session store's counts.
    pub sessions: SessionStats,
    /// Retries of idempotent calls after a retryable error.
    pub retries: u64,
    /// The circuit breakers of the commands that have one, sorted by command.
    pub breakers: Vec<BreakerInfo>,
}

/// A snapshot of one worker, from [`Pool::workers`](crate::Pool::workers).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    /// The same in MiB (rounded down): what `max_rss_mb` is compared with.
    pub rss_mb: Option<u64>,
    /// CPU time the Python process has used (user plus system), in seconds, from
    /// `/proc/<pid>/stat`.
    pub cpu_seconds: Option<f64>,
    /// Milliseconds since the process was spawned (its age).
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

/// The live status of one worker slot, shared between its task (the only writer of its
/// state) and readers.
pub(crate) struct SlotStatus {
    state: AtomicU8,
    requests: AtomicU64,
    /// When the current state was entered, in microseconds since `born`.
    since_us: AtomicU64,
    born: Instant,
    process: Mutex<Process>,
}

impl SlotStatus {
    /// A slot whose first worker, `id`, has been starting since `spawned`.
    pub(crate) fn new(id: Arc<str>, spawned: Instant) -> Self {
        Self::with_state(WorkerState::Starting, id, spawned)
    }

    /// A slot out of service until the pool grows.
    pub(crate) fn parked() -> Self {
        Self::with_state(WorkerState::Stopped, "".into(), Instant::now())
    }

    fn with_state(state: WorkerState, id: Arc<str>, born: Instant) -> Self {
        Self {
            state: AtomicU8::new(state as u8),
            requests: AtomicU64::new(0),
            since_us: AtomicU64::new(0),
            born,
            process: Mutex::new(Process {
                id,
                pid: None,
                started: born,
                started_by: StartedBy::Spawn,
            }),
        }
    }

    pub(crate) fn state(&self) -> WorkerState {
        WorkerState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Moves the slot's worker to `to`, if the lifecycle allows it: logs the transition
    /// (worker, pid, from, to, reason, ms in the previous state) and counts it. A
    /// transition outside [`WorkerState::allows`] is a bug: it is logged and refused.
    pub(crate) fn transition(&self, to: WorkerState, reason: &str, life: &Lifecycle) {
        let from = self.state();
        if from == to {
            return;
        }
        if !from.allows(to) {
            tracing::error!(worker = %self.worker_id(), from = from.as_str(), to = to.as_str(),
                reason, "bug: refused a worker state transition outside the lifecycle");
            return;
        }
        self.state.store(to as u8, Ordering::Relaxed);
        let now = u64::try_from(self.born.elapsed().as_micros()).unwrap_or(u64::MAX);
        let ms = now.saturating_sub(self.since_us.swap(now, Ordering::Relaxed)) / 1000;
        life.transitioned(from, to);
        macro_rules! event {
            ($level:expr) => {
                tracing::event!($level, worker = %self.worker_id(), pid = self.pid(),
                    from = from.as_str(), to = to.as_str(), reason, ms, "worker state")
            };
        }
        match (from, to) {
            (WorkerState::Ready, WorkerState::Busy) | (WorkerState::Busy, WorkerState::Ready) => {
                event!(tracing::Level::TRACE);
            }
            (_, WorkerState::Degraded)
            | (WorkerState::Degraded | WorkerState::Starting, WorkerState::Stopped) => {
                event!(tracing::Level::WARN);
            }
            (_, WorkerState::Stopped) if FAILURES.contains(&reason) => {
                event!(tracing::Level::WARN);
            }
            _ => event!(tracing::Level::INFO),
        }
    }

    fn worker_id(&self) -> Arc<str> {
        self.process
            .lock()
            .map_or_else(|_| "".into(), |p| p.id.clone())
    }

    fn pid(&self) -> Option<u32> {
        self.process.lock().ok().and_then(|p| p.pid)
    }

    /// A new process, `id`, is being started in this slot.
    pub(crate) fn starting(&self, id: Arc<str>, life: &Lifecycle) {
        self.requests.store(0, Ordering::Relaxed);
        if let Ok(mut p) = self.process.lock() {
            *p = Process {
                id,
                pid: None,
                started: Instant::now(),
                started_by: p.started_by,
            };
        }
        self.transition(WorkerState::Starting, "starting", life);
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

    /// Counts one answered call; returns the calls answered by this process so far.
    pub(crate) fn served(&self) -> u64 {
        self.requests.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The slot's worker, or `None` for a slot that never had one.
    pub(crate) fn info(&self) -> Option<WorkerInfo> {
        let p = self.process.lock().ok()?;
        if p.id.is_empty() {
            return None;
        }
        let rss_bytes = p.pid.and_then(rss_bytes);
        Some(WorkerInfo {
            id: p.id.to_string(),
            pid: p.pid,
            state: self.state(),
            requests: self.requests.load(Ordering::Relaxed),
            rss_bytes,
            rss_mb: rss_bytes.map(|b| b >> 20),
            cpu_seconds: p.pid.and_then(cpu_seconds),
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

/// CPU time (user plus system) of a process in seconds, from `/proc/<pid>/stat` (fields
/// 14 and 15, in clock ticks).
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    Some((user + system) as f64 / ticks as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_of_this_process_grows_and_of_a_missing_one_is_none() {
        let before = cpu_seconds(std::process::id()).unwrap();
        let began = Instant::now();
        let mut x = 0u64;
        while began.elapsed() < std::time::Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = cpu_seconds(std::process::id()).unwrap();
        assert!(after > before, "{before} -> {after}");
        assert_eq!(cpu_seconds(u32::MAX), None);
    }

    #[test]
    fn rss_of_this_process_is_plausible_and_of_a_missing_one_is_none() {
        let rss = rss_bytes(std::process::id()).unwrap();
        assert!(rss > 100 * 1024, "{rss}");
        assert_eq!(rss_bytes(u32::MAX), None);
    }

    #[test]
    fn a_restarting_slot_reports_its_new_worker() {
        let life = Lifecycle::new(1, 1, 1);
        let slot = SlotStatus::new("w1".into(), Instant::now());
        slot.running(42, Instant::now(), StartedBy::Fork);
        slot.transition(WorkerState::Ready, "started", &life);
        assert_eq!(slot.info().unwrap().started_by, StartedBy::Fork);
        assert_eq!(slot.served(), 1);
        assert_eq!(slot.info().unwrap().requests, 1);
        slot.transition(WorkerState::Stopped, "crashed", &life);
        slot.starting("w5".into(), &life);
        let info = slot.info().unwrap();
        assert_eq!(
            (info.id.as_str(), info.pid, info.state, info.requests),
            ("w5", None, WorkerState::Starting, 0)
        );
        assert!(SlotStatus::parked().info().is_none());
    }

    #[test]
    fn a_transition_outside_the_table_is_refused() {
        let life = Lifecycle::new(1, 1, 1);
        let slot = SlotStatus::new("w1".into(), Instant::now());
        slot.transition(WorkerState::Busy, "bug", &life);
        assert_eq!(slot.state(), WorkerState::Starting);
    }
}
