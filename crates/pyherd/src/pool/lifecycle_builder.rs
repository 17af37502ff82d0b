//! The lifecycle settings of [`PoolBuilder`] (see [`PoolConfig`](crate::PoolConfig)).

use std::time::Duration;

use super::PoolBuilder;

impl PoolBuilder {
    /// Idle time after which a worker is pinged.
    pub fn health_interval(mut self, every: Duration) -> Self {
        self.config.health_interval = every;
        self
    }

    /// Longest a ping may take before it counts as missed.
    pub fn health_timeout(mut self, timeout: Duration) -> Self {
        self.config.health_timeout = timeout;
        self
    }

    /// Calls a worker serves before it is recycled (each worker's limit up to 10 % more).
    pub fn max_requests(mut self, n: u64) -> Self {
        self.config.max_requests = Some(n);
        self
    }

    /// Python RSS in MiB past which a worker is recycled after its call.
    pub fn max_rss_mb(mut self, mb: u64) -> Self {
        self.config.max_rss_mb = Some(mb);
        self
    }

    /// Age (whole seconds) past which a worker is recycled.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.config.max_age = Some(age);
        self
    }

    /// Idle time (whole seconds) after which a worker stops, down to `min_workers`.
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.config.idle_timeout = Some(idle);
        self
    }

    /// Fewest workers in service.
    pub fn min_workers(mut self, n: usize) -> Self {
        self.config.min_workers = Some(n);
        self
    }

    /// Most workers in service.
    pub fn max_workers(mut self, n: usize) -> Self {
        self.config.max_workers = Some(n);
        self
    }
}
