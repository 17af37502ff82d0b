//! The lifecycle's bookkeeping shared by every slot: transition and restart counters,
//! the spawn circuit breaker, and the count of slots in service (for scaling).

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::error::{Error, ErrorKind};
use crate::metrics;
use crate::worker::WorkerState;

/// Start-up failures in a row (across the pool) that open the spawn breaker; at the
/// pool's first start, the failed starts of one worker that fail the build.
pub(crate) const SPAWN_BREAKER_THRESHOLD: u32 = 5;
/// First wait before starting again a worker that failed to start; doubles up to the max.
pub(crate) const SPAWN_BACKOFF_MIN: Duration = Duration::from_millis(50);
pub(crate) const SPAWN_BACKOFF_MAX: Duration = Duration::from_secs(5);

const STATES: usize = WorkerState::ALL.len();

/// Why a slot replaced its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RestartReason {
    /// It died or broke the protocol (idle or during a call).
    Crashed,
    /// A call ran past its execution timeout and the worker was killed.
    Timeout,
    /// It missed three health checks in a row.
    HealthCheck,
    /// It served its share of `max_requests`.
    MaxRequests,
    /// Its Python process grew past `max_rss_mb`.
    MaxRss,
    /// It lived `max_age_s`.
    MaxAge,
    /// A reload replaced it with a worker running the handler code anew.
    Reload,
    /// Its call was cancelled while running and it could not be stopped otherwise.
    Cancelled,
}

impl RestartReason {
    const ALL: [Self; 8] = [
        Self::Crashed,
        Self::Timeout,
        Self::HealthCheck,
        Self::MaxRequests,
        Self::MaxRss,
        Self::MaxAge,
        Self::Reload,
        Self::Cancelled,
    ];

    /// Why a worker is replaced after a call that failed with `kind`, one the recovery
    /// table replaces the worker for: the call ran past its timeout, it was cancelled
    /// while running, or (any other kind) the worker was lost.
    pub(crate) fn after(kind: &ErrorKind) -> Self {
        match kind {
            ErrorKind::ExecutionTimeout => Self::Timeout,
            ErrorKind::Cancelled => Self::Cancelled,
            _ => Self::Crashed,
        }
    }

    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Crashed => "crashed",
            Self::Timeout => "execution_timeout",
            Self::HealthCheck => "health_check",
            Self::MaxRequests => "max_requests",
            Self::MaxRss => "max_rss",
            Self::MaxAge => "max_age",
            Self::Reload => "reload",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Pool-wide lifecycle state, shared by the slots and read by stats and metrics.
pub(crate) struct Lifecycle {
    transitions: [[AtomicU64; STATES]; STATES],
    restarts: [AtomicU64; RestartReason::ALL.len()],
    /// Health pings sent, and those that missed their timeout (or a later check).
    pings: AtomicU64,
    ping_misses: AtomicU64,
    /// Slots in service (with a worker or starting one); the others are parked.
    live: AtomicUsize,
    min: usize,
    max: usize,
    /// Wakes a parked slot when calls wait and no worker is idle.
    pub(crate) wake: Notify,
    failures: AtomicU32,
    open: AtomicBool,
    last_failure: Mutex<Option<Error>>,
}

impl Lifecycle {
    pub(crate) fn new(live: usize, min: usize, max: usize) -> Self {
        Self {
            transitions: Default::default(),
            restarts: Default::default(),
            pings: AtomicU64::new(0),
            ping_misses: AtomicU64::new(0),
            live: AtomicUsize::new(live),
            min,
            max,
            wake: Notify::new(),
            failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
            last_failure: Mutex::new(None),
        }
    }

    /// Counts one state transition.
    pub(crate) fn transitioned(&self, from: WorkerState, to: WorkerState) {
        self.transitions[from as usize][to as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one replacement.
    pub(crate) fn restarted(&self, reason: RestartReason) {
        self.restarts[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one health ping sent.
    pub(crate) fn pinged(&self) {
        self.pings.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one missed health check.
    pub(crate) fn ping_missed(&self) {
        self.ping_misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Replacements of every reason.
    pub(crate) fn restarts(&self) -> u64 {
        self.restarts
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .sum()
    }

    /// Slots in service.
    pub(crate) fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Whether the pool may grow (`max_workers` above the slots in service).
    pub(crate) fn can_grow(&self) -> bool {
        self.max > self.live()
    }

    /// Takes a slot out of service unless that would leave fewer than `min_workers`.
    pub(crate) fn try_park(&self) -> bool {
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > self.min).then(|| n - 1)
            })
            .is_ok()
    }

    /// Puts a parked slot back into service unless `max_workers` are in service.
    pub(crate) fn try_unpark(&self) -> bool {
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    /// A worker failed to start; returns true when this failure opened the breaker.
    pub(crate) fn spawn_failed(&self, error: &Error) -> bool {
        if let Ok(mut last) = self.last_failure.lock() {
            *last = Some(error.clone());
        }
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        failures >= SPAWN_BREAKER_THRESHOLD && !self.open.swap(true, Ordering::AcqRel)
    }

    /// A worker started: the breaker closes; returns true when it was open.
    pub(crate) fn spawn_succeeded(&self) -> bool {
        self.failures.store(0, Ordering::Release);
        self.open.swap(false, Ordering::AcqRel)
    }

    /// Whether the spawn breaker is open (the last starts all failed).
    pub(crate) fn spawn_breaker_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// The `initialization/spawn_failing` error while the breaker is open: the last
    /// start-up failure's message and context (its Python stderr tail).
    pub(crate) fn spawn_failing(&self) -> Option<Error> {
        if !self.spawn_breaker_open() {
            return None;
        }
        let last = self.last_failure.lock().ok()?.clone()?;
        let failures = self.failures.load(Ordering::Acquire);
        let error = Error::new(
            ErrorKind::SpawnFailing,
            format!(
                "no worker can take the call and new workers keep failing to start \
                 ({failures} failures in a row); the last one: {}/{}: {}",
                last.category(),
                last.kind(),
                last.message()
            ),
        );
        Some(error.with_context(|c| c.clone_from(last.context())))
    }

    /// Appends the lifecycle's metric families.
    pub(crate) fn render(&self, out: &mut String) {
        metrics::header(
            out,
            "pyherd_worker_transitions_total",
            "counter",
            "Worker state transitions, by state left and state entered.",
        );
        for from in WorkerState::ALL {
            for to in WorkerState::ALL {
                if from.allows(to) {
                    let n = self.transitions[from as usize][to as usize].load(Ordering::Relaxed);
                    let _ = writeln!(
                        out,
                        "pyherd_worker_transitions_total{{from=\"{}\",to=\"{}\"}} {n}",
                        from.as_str(),
                        to.as_str()
                    );
                }
            }
        }
        metrics::header(
            out,
            "pyherd_worker_restarts_total",
            "counter",
            "Replacement workers started, by why the previous one ended.",
        );
        for reason in RestartReason::ALL {
            let n = self.restarts[reason as usize].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "pyherd_worker_restarts_total{{reason=\"{}\"}} {n}",
                reason.as_str()
            );
        }
        for (name, help, counter) in [
            (
                "pyherd_health_pings_total",
                "Health pings sent to idle workers.",
                &self.pings,
            ),
            (
                "pyherd_health_misses_total",
                "Health checks missed (a ping unanswered within its timeout, or still unanswered a health interval later).",
                &self.ping_misses,
            ),
        ] {
            metrics::header(out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", counter.load(Ordering::Relaxed));
        }
        metrics::header(
            out,
            "pyherd_spawn_breaker_open",
            "gauge",
            "1 while new workers keep failing to start (the spawn circuit breaker is open).",
        );
        let _ = writeln!(
            out,
            "pyherd_spawn_breaker_open {}",
            u8::from(self.spawn_breaker_open())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_the_threshold_and_closes_on_a_start() {
        let life = Lifecycle::new(1, 1, 1);
        let failure = Error::new(ErrorKind::HandlerImportFailed, "boom")
            .with_context(|c| c.stderr_tail = Some("Traceback: boom".into()));
        for _ in 1..SPAWN_BREAKER_THRESHOLD {
            assert!(!life.spawn_failed(&failure));
        }
        assert!(life.spawn_failing().is_none());
        assert!(life.spawn_failed(&failure));
        assert!(!life.spawn_failed(&failure), "opens once");
        let e = life.spawn_failing().unwrap();
        assert_eq!(e.kind(), &ErrorKind::SpawnFailing);
        assert!(e.message().contains("handler_import_failed: boom"), "{e}");
        assert_eq!(e.context().stderr_tail.as_deref(), Some("Traceback: boom"));
        assert!(life.spawn_succeeded());
        assert!(!life.spawn_succeeded());
        assert!(life.spawn_failing().is_none());
    }

    #[test]
    fn parking_keeps_between_min_and_max() {
        let life = Lifecycle::new(2, 1, 3);
        assert!(life.try_unpark());
        assert!(!life.try_unpark());
        assert!(life.try_park() && life.try_park());
        assert!(!life.try_park());
        assert_eq!(life.live(), 1);
        assert!(life.can_grow());
    }

    #[test]
    fn metrics_list_every_allowed_transition_and_reason() {
        let life = Lifecycle::new(1, 1, 1);
        life.transitioned(WorkerState::Ready, WorkerState::Degraded);
        life.restarted(RestartReason::MaxRss);
        life.pinged();
        life.ping_missed();
        let mut out = String::new();
        life.render(&mut out);
        assert!(out.contains("pyherd_worker_transitions_total{from=\"ready\",to=\"degraded\"} 1"));
        assert!(out.contains("pyherd_worker_transitions_total{from=\"busy\",to=\"ready\"} 0"));
        assert!(!out.contains("from=\"stopped\",to=\"busy\""));
        assert!(out.contains("pyherd_worker_restarts_total{reason=\"max_rss\"} 1"));
        assert!(out.contains("pyherd_spawn_breaker_open 0"));
        assert!(out.contains("pyherd_health_pings_total 1"));
        assert!(out.contains("pyherd_health_misses_total 1"));
        assert_eq!(life.restarts(), 1);
    }
}
