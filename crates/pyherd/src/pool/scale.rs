//! Scaling between `min_workers` and `max_workers`: the pool allocates `max_workers`
//! slots; those out of service are parked (`stopped`) until calls wait with no idle
//! worker, and a worker idle past `idle_timeout_s` parks its slot (see `recycle`).

use std::sync::atomic::Ordering;

use super::Shared;
use super::slot::Slot;
use crate::worker::WorkerState;

impl Shared {
    /// Whether some worker can serve calls now or soon (ready, busy or degraded).
    pub(super) fn serving(&self) -> bool {
        self.slots.iter().any(|s| {
            matches!(
                s.status.state(),
                WorkerState::Ready | WorkerState::Busy | WorkerState::Degraded
            )
        })
    }

    /// Calls wait, no worker is idle, more calls wait than workers are starting, and the
    /// pool may grow.
    fn under_pressure(&self) -> bool {
        if !self.life.can_grow() {
            return false;
        }
        let mut starting = 0;
        for slot in &self.slots {
            match slot.status.state() {
                WorkerState::Ready => return false,
                WorkerState::Starting => starting += 1,
                _ => {}
            }
        }
        self.queued.load(Ordering::Relaxed) > starting
    }

    /// After admitting a call, and when a worker takes one: wakes a parked slot if the
    /// pool is under pressure.
    pub(super) fn relieve_pressure(&self) {
        if self.under_pressure() {
            self.life.wake.notify_one();
        }
    }
}

impl Slot {
    /// Waits out of service until the pool is under pressure; false when the pool
    /// shuts down first.
    pub(super) async fn park(&self) -> bool {
        let shared = &self.shared;
        loop {
            tokio::select! {
                biased;
                () = shared.closing.cancelled() => return false,
                () = shared.life.wake.notified() => {}
                // A parked slot has no worker to reload: a later one starts with new code.
                Ok(swap) = self.swaps.recv() => {
                    swap.refuse();
                    continue;
                }
            }
            if shared.under_pressure() && shared.life.try_unpark() {
                tracing::info!(
                    queued = shared.queued.load(Ordering::Relaxed),
                    reason = "queue_pressure",
                    "starting another worker"
                );
                return true;
            }
        }
    }
}
