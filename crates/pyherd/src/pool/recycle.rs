//! Recycling, always drained (never mid-call): by calls served (with jitter), by the
//! Python process's own RSS and by age after each call; by age and idleness while idle.

use std::hash::BuildHasher;

use tokio::time::Instant;

use super::later;
use super::lifecycle::RestartReason;
use super::slot::{Ending, Slot};
use super::stats::rss_bytes;
use crate::telemetry;
use crate::worker::WorkerProcess;

/// A worker's own call limit: `max_requests` plus up to 10 % more, drawn at random per
/// worker so that workers started together do not all recycle together.
pub(super) fn request_limit(max_requests: Option<u64>, worker_id: &str) -> Option<u64> {
    let max = max_requests?;
    let random = std::collections::hash_map::RandomState::new().hash_one(worker_id);
    Some(max.saturating_add(random % (max / 10 + 1)))
}

impl Slot {
    /// Why the worker, which just answered its `served`-th call, must be recycled, if it must.
    pub(super) fn recycle_reason(
        &self,
        worker: &WorkerProcess,
        served: u64,
        limit: Option<u64>,
    ) -> Option<RestartReason> {
        let config = &self.shared.config;
        if limit.is_some_and(|limit| served >= limit) {
            return Some(RestartReason::MaxRequests);
        }
        if let Some(max_mb) = config.max_rss_mb {
            let rss = rss_bytes(worker.pid()).unwrap_or(0);
            if rss >= max_mb.saturating_mul(1 << 20) {
                tracing::info!(worker = %worker.id(), rss_mb = rss >> 20, max_rss_mb = max_mb, "worker over its memory limit");
                return Some(RestartReason::MaxRss);
            }
        }
        if config
            .max_age
            .is_some_and(|age| worker.started().elapsed() >= age)
        {
            return Some(RestartReason::MaxAge);
        }
        None
    }

    /// When an idle worker next needs looking at: its health check, its idle timeout,
    /// its maximum age, whichever comes first.
    pub(super) fn next_check(
        &self,
        worker: &WorkerProcess,
        idle_since: Instant,
        checked: Instant,
    ) -> Instant {
        let config = &self.shared.config;
        let mut next = later(checked, config.health_interval);
        if let Some(idle) = config.idle_timeout {
            next = next.min(later(idle_since, idle));
        }
        if let Some(age) = config.max_age {
            next = next.min(later(Instant::from_std(worker.started()), age));
        }
        next
    }

    /// Acts on what is due for an idle worker; `Some` when the worker is gone.
    pub(super) async fn idle_check(
        &self,
        worker: &mut WorkerProcess,
        idle_since: &mut Instant,
        checked: &mut Instant,
    ) -> Option<Ending> {
        let config = &self.shared.config;
        let now = Instant::now();
        if config
            .max_age
            .is_some_and(|age| worker.started().elapsed() >= age)
        {
            let reason = RestartReason::MaxAge.as_str();
            telemetry::worker_recycled(worker.id(), worker.pid(), reason);
            self.retire(worker, reason).await;
            return Some(Ending::Replace(RestartReason::MaxAge));
        }
        if config
            .idle_timeout
            .is_some_and(|idle| now >= later(*idle_since, idle))
        {
            if self.shared.life.try_park() {
                self.retire(worker, "idle_timeout").await;
                tracing::info!(worker = %worker.id(), workers = self.shared.life.live(), "the pool shrank by one idle worker");
                return Some(Ending::Park);
            }
            *idle_since = now;
        }
        if now >= later(*checked, config.health_interval) {
            let ending = self.health_check(worker).await;
            *checked = Instant::now();
            return ending;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_jittered_within_ten_percent() {
        assert_eq!(request_limit(None, "w1"), None);
        assert_eq!(request_limit(Some(5), "w1"), Some(5));
        let limits: Vec<u64> = (0..200)
            .map(|i| request_limit(Some(1000), &format!("w{i}")).unwrap())
            .collect();
        assert!(limits.iter().all(|l| (1000..=1100).contains(l)));
        let distinct: std::collections::HashSet<_> = limits.iter().collect();
        assert!(distinct.len() > 50, "{} distinct limits", distinct.len());
    }
}
