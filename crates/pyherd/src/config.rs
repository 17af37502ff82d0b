//! Pool configuration: plain data with documented defaults, checked by [`PoolConfig::validate`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind};
use crate::policy::Backoff;

/// Smallest accepted frame limit (a call frame needs room for its envelope).
pub const MIN_FRAME_BYTES: usize = 1024;
/// Largest accepted frame limit (the length prefix is 32 bits; we stay well inside it).
pub const MAX_FRAME_BYTES: usize = 1 << 30;
/// Largest accepted worker count.
pub const MAX_WORKERS: usize = 1024;
/// Largest accepted idle spin, µs.
pub const MAX_IDLE_SPIN_US: u64 = 10_000;

/// Everything a [`Pool`](crate::Pool) needs. Durations are written in TOML/JSON as
/// milliseconds under the `_ms` names shown on each field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct PoolConfig {
    /// Number of worker processes started with the pool (it may then shrink to
    /// `min_workers` and grow to `max_workers`). Default: the number of CPUs.
    pub workers: usize,
    /// The Python interpreter: a name looked up on `PATH` or a path. Default: `python3`.
    /// A launcher script (such as a pyenv shim) is resolved once to the real interpreter.
    pub python: PathBuf,
    /// Handler modules to load in every worker, as `pkg.module` or `path/to/file.py`.
    /// Default: none (the built-ins `ping`, `echo` and `info` are always there).
    pub handlers: Vec<String>,
    /// Most calls waiting for a worker; one more is refused with `resource/pool_saturated`.
    /// Default: 1000.
    pub max_queue: usize,
    /// Longest a call waits for a worker before `timeout/queue_timeout`. Default: 5 s.
    #[serde(rename = "queue_timeout_ms", with = "millis")]
    pub queue_timeout: Duration,
    /// Longest a call may run on its worker before `timeout/execution_timeout`, after which
    /// the worker is killed and replaced. Overridable per call. Default: 30 s.
    #[serde(rename = "request_timeout_ms", with = "millis")]
    pub request_timeout: Duration,
    /// Longest a worker may take from spawn to its `hello`. Default: 30 s.
    #[serde(rename = "startup_timeout_ms", with = "millis")]
    pub startup_timeout: Duration,
    /// On shutdown, how long admitted calls may still run before workers are stopped. Default: 30 s.
    #[serde(rename = "shutdown_grace_ms", with = "millis")]
    pub shutdown_grace: Duration,
    /// How long a worker stopped politely (recycled, scaled down, replaced at a reload, at
    /// shutdown) has to exit after its request pipe closes, and again after SIGTERM,
    /// before SIGKILL. Default: 5 s.
    #[serde(rename = "kill_timeout_ms", with = "millis")]
    pub kill_timeout: Duration,
    /// Largest frame either side may send, in bytes. Default: 64 MiB.
    pub max_frame_bytes: usize,
    /// How long a worker that has just answered keeps polling for its next call before
    /// it sleeps, in µs (it yields the CPU between polls); 0 turns the spin off. A call
    /// that comes within the spin finds the worker awake, and its CPU warm. At most
    /// [`MAX_IDLE_SPIN_US`]. Default: 100.
    pub idle_spin_us: u64,
    /// Extra environment variables for the workers. Default: none.
    pub env: BTreeMap<String, String>,
    /// Working directory of the workers (where `pkg.module` handlers are found).
    /// Default: the host's working directory.
    pub working_dir: Option<PathBuf>,
    /// Where the embedded `pyherd_worker` package is written. Default: `$PYHERD_CACHE_DIR`,
    /// else `$XDG_CACHE_HOME/pyherd`, else `~/.cache/pyherd`, else the temp directory.
    pub cache_dir: Option<PathBuf>,
    /// Where the run registry is kept (`runs/<run_id>.json`, see [`crate::registry`]).
    /// Default: `$XDG_STATE_HOME/pyherd`, else `~/.local/state/pyherd`, else the temp
    /// directory ([`registry::default_state_dir`](crate::registry::default_state_dir)).
    pub state_dir: Option<PathBuf>,
    /// How a session's calls prefer the worker that served it last. Default: `hint`.
    pub affinity: Affinity,
    /// A session's time to live after its last access, unless created with its own.
    /// Default: 3600 s.
    #[serde(rename = "session_ttl_ms", with = "millis")]
    pub session_ttl: Duration,
    /// Most live sessions; one more is refused with `session/quota_exceeded`. Default: 10 000.
    pub max_sessions: usize,
    /// How often expired sessions are removed (they are invisible from the moment they
    /// expire). Default: 60 s.
    #[serde(rename = "session_sweep_interval_ms", with = "millis")]
    pub session_sweep_interval: Duration,
    /// How long a worker stays idle before it is pinged (the built-in `ping`, through the
    /// protocol). Workers running calls are not pinged. Default: 30 s.
    #[serde(rename = "health_interval_ms", with = "millis")]
    pub health_interval: Duration,
    /// How long a ping may take: one miss makes the worker `degraded` (no new work),
    /// three in a row (the later ones `health_interval` apart) replace it. Default: 5 s.
    #[serde(rename = "health_timeout_ms", with = "millis")]
    pub health_timeout: Duration,
    /// Calls a worker serves before it is recycled (drained, then replaced); each
    /// worker's limit is drawn in `[n, n × 1.1]` so workers do not recycle together.
    /// Default: none (no limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u64>,
    /// Resident memory (MiB) of a worker's Python process, checked after each call,
    /// past which it is recycled (drained, then replaced). Default: none (no limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rss_mb: Option<u64>,
    /// Age past which a worker is recycled once idle, in whole seconds. Default: none.
    #[serde(
        rename = "max_age_s",
        with = "opt_secs",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_age: Option<Duration>,
    /// How long a worker may stay idle before it is stopped, while more than
    /// `min_workers` are in service, in whole seconds. Default: none.
    #[serde(
        rename = "idle_timeout_s",
        with = "opt_secs",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_timeout: Option<Duration>,
    /// Fewest workers in service (idle ones are stopped down to this). Default: `workers`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_workers: Option<usize>,
    /// Most workers in service: while calls wait and no worker is idle, another is
    /// started up to this. Default: `workers`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_workers: Option<usize>,
    /// Most attempts of an idempotent call (the first one and its retries), 1..=100;
    /// only retryable errors are retried. Default: 3.
    pub retry_attempts: u32,
    /// How the wait between attempts grows. Default: `exponential`.
    pub retry_backoff: Backoff,
    /// The first wait between attempts (the unit of every backoff). Default: 50 ms.
    #[serde(rename = "retry_base_ms", with = "millis")]
    pub retry_base: Duration,
    /// The longest wait between attempts. Default: 2 s.
    #[serde(rename = "retry_cap_ms", with = "millis")]
    pub retry_cap: Duration,
    /// Commands whose calls are idempotent unless a call says otherwise
    /// ([`CallOptions::idempotent`](crate::CallOptions::idempotent)). Default: none.
    pub idempotent_commands: Vec<String>,
    /// Commands guarded by a circuit breaker. Default: none (breakers are opt-in).
    pub breaker_commands: Vec<String>,
    /// Consecutive calls that harm their worker (crash it or time out) after which a
    /// command's breaker opens. Default: 5.
    pub breaker_failures: u32,
    /// Consecutive successful trial calls that close a half-open breaker. Default: 3.
    pub breaker_successes: u32,
    /// How long an open breaker refuses calls before it half-opens. Default: 60 s.
    #[serde(rename = "breaker_open_ms", with = "millis")]
    pub breaker_open: Duration,
    /// Modules (`pkg.module`) a zygote process imports once; every worker is then forked
    /// from it, so a worker starts in milliseconds with these already imported. When a
    /// module fails to import, or the modules leave a thread running (forking is then
    /// unsafe), a warning is logged and workers are spawned. Default: none (every worker
    /// is a fresh interpreter).
    pub preload: Vec<String>,
}

/// How a session's calls prefer the worker that served the session last (its programs
/// and LM are then already built there). Any worker can serve any session: affinity only
/// saves that work.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Affinity {
    /// Use the session's last worker if it is idle, else any worker.
    #[default]
    Hint,
    /// Wait for the session's last worker (within the queue timeout).
    StrictQueue,
    /// Fail with `resource/worker_busy` when the session's last worker is busy.
    StrictFailFast,
}

impl Affinity {
    /// The configuration name, e.g. `"strict_queue"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hint => "hint",
            Self::StrictQueue => "strict_queue",
            Self::StrictFailFast => "strict_fail_fast",
        }
    }
}

impl std::str::FromStr for Affinity {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "hint" => Ok(Self::Hint),
            "strict_queue" => Ok(Self::StrictQueue),
            "strict_fail_fast" => Ok(Self::StrictFailFast),
            other => Err(Error::new(
                ErrorKind::InvalidConfig,
                format!("affinity must be hint, strict_queue or strict_fail_fast, not {other:?}"),
            )),
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            python: PathBuf::from("python3"),
            handlers: Vec::new(),
            max_queue: 1000,
            queue_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            startup_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            kill_timeout: Duration::from_secs(5),
            max_frame_bytes: 64 * 1024 * 1024,
            idle_spin_us: 100,
            env: BTreeMap::new(),
            working_dir: None,
            cache_dir: None,
            state_dir: None,
            affinity: Affinity::Hint,
            session_ttl: Duration::from_secs(3600),
            max_sessions: 10_000,
            session_sweep_interval: Duration::from_secs(60),
            health_interval: Duration::from_secs(30),
            health_timeout: Duration::from_secs(5),
            max_requests: None,
            max_rss_mb: None,
            max_age: None,
            idle_timeout: None,
            min_workers: None,
            max_workers: None,
            retry_attempts: 3,
            retry_backoff: Backoff::Exponential,
            retry_base: Duration::from_millis(50),
            retry_cap: Duration::from_secs(2),
            idempotent_commands: Vec::new(),
            breaker_commands: Vec::new(),
            breaker_failures: 5,
            breaker_successes: 3,
            breaker_open: Duration::from_secs(60),
            preload: Vec::new(),
        }
    }
}

impl PoolConfig {
    /// The fewest and the most workers in service: `min_workers` and `max_workers`,
    /// each `workers` when unset.
    pub fn worker_bounds(&self) -> (usize, usize) {
        (
            self.min_workers.unwrap_or(self.workers),
            self.max_workers.unwrap_or(self.workers),
        )
    }

    /// Checks every value.
    ///
    /// # Errors
    /// `initialization/invalid_config` naming the first value out of range.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |msg: String| Err(Error::new(ErrorKind::InvalidConfig, msg));
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return invalid(format!(
                "workers must be 1..={MAX_WORKERS}, not {}",
                self.workers
            ));
        }
        let (min, max) = self.worker_bounds();
        if !(1..=self.workers).contains(&min) {
            return invalid(format!(
                "min_workers must be 1..=workers ({}), not {min}",
                self.workers
            ));
        }
        if !(self.workers..=MAX_WORKERS).contains(&max) {
            return invalid(format!(
                "max_workers must be workers ({})..={MAX_WORKERS}, not {max}",
                self.workers
            ));
        }
        for (name, value) in [
            ("max_requests", self.max_requests),
            ("max_rss_mb", self.max_rss_mb),
            ("max_age_s", self.max_age.map(|d| d.as_secs())),
            ("idle_timeout_s", self.idle_timeout.map(|d| d.as_secs())),
        ] {
            if value == Some(0) {
                return invalid(format!("{name} must be at least 1 when set"));
            }
        }
        if self.max_queue == 0 {
            return invalid("max_queue must be at least 1".into());
        }
        if self.max_sessions == 0 {
            return invalid("max_sessions must be at least 1".into());
        }
        if self.session_ttl > crate::session::MAX_TTL {
            return invalid(format!(
                "session_ttl must be at most {} s",
                crate::session::MAX_TTL.as_secs()
            ));
        }
        if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&self.max_frame_bytes) {
            return invalid(format!(
                "max_frame_bytes must be {MIN_FRAME_BYTES}..={MAX_FRAME_BYTES}, not {}",
                self.max_frame_bytes
            ));
        }
        if self.idle_spin_us > MAX_IDLE_SPIN_US {
            return invalid(format!(
                "idle_spin_us must be 0..={MAX_IDLE_SPIN_US}, not {}",
                self.idle_spin_us
            ));
        }
        for (name, value) in [
            ("queue_timeout", self.queue_timeout),
            ("request_timeout", self.request_timeout),
            ("startup_timeout", self.startup_timeout),
            ("kill_timeout", self.kill_timeout),
            ("session_ttl", self.session_ttl),
            ("session_sweep_interval", self.session_sweep_interval),
            ("health_interval", self.health_interval),
            ("health_timeout", self.health_timeout),
        ] {
            if value.is_zero() {
                return invalid(format!("{name} must be greater than zero"));
            }
        }
        if self.python.as_os_str().is_empty() {
            return invalid("python must name an interpreter".into());
        }
        if let Some(dir) = &self.working_dir
            && !dir.is_dir()
        {
            return invalid(format!(
                "working_dir must name an existing directory, not {:?}",
                dir.display().to_string()
            ));
        }
        if self
            .cache_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return invalid("cache_dir must name a directory".into());
        }
        if self
            .state_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return invalid("state_dir must name a directory".into());
        }
        if let Some(h) = self.handlers.iter().find(|h| h.trim().is_empty()) {
            return invalid(format!("handler module names must not be empty ({h:?})"));
        }
        if let Some(m) = self.preload.iter().find(|m| !is_module_name(m)) {
            return invalid(format!(
                "preload entries must be module names like `pkg.module`, not {m:?}"
            ));
        }
        crate::policy::check(self)
    }
}

/// A dotted Python module name: identifiers (letters, digits, `_`; not starting with a
/// digit) joined by dots.
fn is_module_name(name: &str) -> bool {
    name.split('.').all(|part| {
        let mut chars = part.chars();
        chars.next().is_some_and(|c| c == '_' || c.is_alphabetic())
            && chars.all(|c| c == '_' || c.is_alphanumeric())
    })
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

mod opt_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    #[allow(clippy::ref_option)]
    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<u64>::deserialize(d).map(|s| s.map(Duration::from_secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = PoolConfig::default();
        c.validate().unwrap();
        assert_eq!(c.max_queue, 1000);
        assert_eq!(c.queue_timeout, Duration::from_secs(5));
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        assert_eq!(c.max_frame_bytes, 64 << 20);
        assert_eq!(c.idle_spin_us, 100);
        assert_eq!(c.session_ttl, Duration::from_secs(3600));
        assert_eq!(c.session_sweep_interval, Duration::from_secs(60));
        assert_eq!(c.max_sessions, 10_000);
        assert_eq!(c.affinity, Affinity::Hint);
    }

    #[test]
    fn out_of_range_values_are_named() {
        let mut c = PoolConfig {
            workers: 0,
            ..PoolConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::InvalidConfig);
        assert!(e.message().contains("workers"));
        c.workers = 1;
        c.max_frame_bytes = 10;
        assert!(
            c.validate()
                .unwrap_err()
                .message()
                .contains("max_frame_bytes")
        );
        c.max_frame_bytes = MIN_FRAME_BYTES;
        c.idle_spin_us = MAX_IDLE_SPIN_US + 1;
        assert!(c.validate().unwrap_err().message().contains("idle_spin_us"));
        c.idle_spin_us = 0;
        c.validate().unwrap();
        c.queue_timeout = Duration::ZERO;
        assert!(
            c.validate()
                .unwrap_err()
                .message()
                .contains("queue_timeout")
        );
        c.queue_timeout = Duration::from_millis(1);
        c.max_queue = 0;
        assert!(c.validate().unwrap_err().message().contains("max_queue"));
        c.max_queue = 1;
        c.handlers = vec![" ".into()];
        assert!(c.validate().unwrap_err().message().contains("handler"));
        c.handlers.clear();
        c.max_sessions = 0;
        assert!(c.validate().unwrap_err().message().contains("max_sessions"));
        c.max_sessions = 1;
        c.session_ttl = Duration::ZERO;
        assert!(c.validate().unwrap_err().message().contains("session_ttl"));
        c.session_ttl = crate::session::MAX_TTL * 2;
        assert!(c.validate().unwrap_err().message().contains("session_ttl"));
        c.session_ttl = Duration::from_secs(1);
        c.state_dir = Some(PathBuf::new());
        assert!(c.validate().unwrap_err().message().contains("state_dir"));
        c.state_dir = None;
        c.preload = vec!["dspy".into(), "pkg._mod.sub2".into()];
        c.validate().unwrap();
        for bad in ["", "a..b", "path/to/file.py", "1abc", "dspy ", ".dspy"] {
            c.preload = vec![bad.into()];
            let e = c.validate().unwrap_err();
            assert!(e.message().contains("preload"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn lifecycle_settings_are_read_and_their_bad_values_refused() {
        let c: PoolConfig = serde_json::from_str(
            r#"{"workers": 2, "min_workers": 1, "max_workers": 4, "health_interval_ms": 100,
                "health_timeout_ms": 50, "max_requests": 10, "max_rss_mb": 300,
                "max_age_s": 60, "idle_timeout_s": 5}"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.worker_bounds(), (1, 4));
        assert_eq!(c.health_interval, Duration::from_millis(100));
        assert_eq!(c.max_age, Some(Duration::from_secs(60)));
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(5)));
        assert_eq!((c.max_requests, c.max_rss_mb), (Some(10), Some(300)));
        let defaults = PoolConfig::default();
        assert_eq!(
            defaults.worker_bounds(),
            (defaults.workers, defaults.workers)
        );
        assert_eq!(defaults.health_interval, Duration::from_secs(30));
        assert_eq!(defaults.health_timeout, Duration::from_secs(5));
        let refused = |c: PoolConfig, name: &str| {
            let e = c.validate().unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::InvalidConfig);
            assert!(e.message().contains(name), "{name}: {e}");
        };
        refused(
            PoolConfig {
                min_workers: Some(3),
                ..c.clone()
            },
            "min_workers",
        );
        refused(
            PoolConfig {
                min_workers: Some(0),
                ..c.clone()
            },
            "min_workers",
        );
        refused(
            PoolConfig {
                max_workers: Some(1),
                ..c.clone()
            },
            "max_workers",
        );
        refused(
            PoolConfig {
                max_workers: Some(MAX_WORKERS + 1),
                ..c.clone()
            },
            "max_workers",
        );
        refused(
            PoolConfig {
                max_requests: Some(0),
                ..c.clone()
            },
            "max_requests",
        );
        refused(
            PoolConfig {
                max_rss_mb: Some(0),
                ..c.clone()
            },
            "max_rss_mb",
        );
        refused(
            PoolConfig {
                max_age: Some(Duration::ZERO),
                ..c.clone()
            },
            "max_age_s",
        );
        refused(
            PoolConfig {
                idle_timeout: Some(Duration::from_millis(10)),
                ..c.clone()
            },
            "idle_timeout_s",
        );
        refused(
            PoolConfig {
                health_interval: Duration::ZERO,
                ..c.clone()
            },
            "health_interval",
        );
        refused(
            PoolConfig {
                health_timeout: Duration::ZERO,
                ..c
            },
            "health_timeout",
        );
    }

    #[test]
    fn durations_read_as_milliseconds_and_unknown_keys_are_refused() {
        let c: PoolConfig =
            serde_json::from_str(r#"{"workers": 3, "queue_timeout_ms": 250}"#).unwrap();
        assert_eq!(c.workers, 3);
        assert_eq!(c.queue_timeout, Duration::from_millis(250));
        let c: PoolConfig =
            serde_json::from_str(r#"{"affinity": "strict_queue", "session_ttl_ms": 1000}"#)
                .unwrap();
        assert_eq!(c.affinity, Affinity::StrictQueue);
        assert_eq!(c.session_ttl, Duration::from_secs(1));
        assert_eq!(
            "strict_fail_fast".parse::<Affinity>().unwrap(),
            Affinity::StrictFailFast
        );
        assert!(
            "sticky"
                .parse::<Affinity>()
                .unwrap_err()
                .message()
                .contains("sticky")
        );
        let c: PoolConfig = serde_json::from_str(
            r#"{"retry_backoff": "decorrelated_jitter", "retry_base_ms": 10, "breaker_open_ms": 500}"#,
        )
        .unwrap();
        assert_eq!(c.retry_backoff, Backoff::DecorrelatedJitter);
        assert_eq!(c.retry_base, Duration::from_millis(10));
        assert_eq!(c.breaker_open, Duration::from_millis(500));
        let e =
            serde_json::from_str::<PoolConfig>(r#"{"retry_backoff": "quadratic"}"#).unwrap_err();
        assert!(e.to_string().contains("quadratic"), "{e}");
        let c: PoolConfig = serde_json::from_str(r#"{"preload": ["dspy", "numpy"]}"#).unwrap();
        assert_eq!(c.preload, ["dspy", "numpy"]);
        let e = serde_json::from_str::<PoolConfig>(r#"{"wokers": 3}"#).unwrap_err();
        assert!(e.to_string().contains("wokers"));
    }
}
