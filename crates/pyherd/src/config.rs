//! Pool configuration: plain data with documented defaults, checked by [`PoolConfig::validate`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind};

/// Smallest accepted frame limit (a call frame needs room for its envelope).
pub const MIN_FRAME_BYTES: usize = 1024;
/// Largest accepted frame limit (the length prefix is 32 bits; we stay well inside it).
pub const MAX_FRAME_BYTES: usize = 1 << 30;
/// Largest accepted worker count.
pub const MAX_WORKERS: usize = 1024;

/// Everything a [`Pool`](crate::Pool) needs. Durations are written in TOML/JSON as
/// milliseconds under the `_ms` names shown on each field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct PoolConfig {
    /// Number of worker processes. Default: the number of CPUs.
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
    /// On shutdown, how long a worker has to exit after SIGTERM before SIGKILL. Default: 5 s.
    #[serde(rename = "kill_timeout_ms", with = "millis")]
    pub kill_timeout: Duration,
    /// Largest frame either side may send, in bytes. Default: 64 MiB.
    pub max_frame_bytes: usize,
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
}

/// How a session's calls prefer the worker that served the session last (its programs
/// and LM are then already built there). Any worker can serve any session: affinity only
/// saves that work.
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
            env: BTreeMap::new(),
            working_dir: None,
            cache_dir: None,
            state_dir: None,
            affinity: Affinity::Hint,
            session_ttl: Duration::from_secs(3600),
            max_sessions: 10_000,
            session_sweep_interval: Duration::from_secs(60),
        }
    }
}

impl PoolConfig {
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
        for (name, value) in [
            ("queue_timeout", self.queue_timeout),
            ("request_timeout", self.request_timeout),
            ("startup_timeout", self.startup_timeout),
            ("kill_timeout", self.kill_timeout),
            ("session_ttl", self.session_ttl),
            ("session_sweep_interval", self.session_sweep_interval),
        ] {
            if value.is_zero() {
                return invalid(format!("{name} must be greater than zero"));
            }
        }
        if self.python.as_os_str().is_empty() {
            return invalid("python must name an interpreter".into());
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
        Ok(())
    }
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
        let e = serde_json::from_str::<PoolConfig>(r#"{"wokers": 3}"#).unwrap_err();
        assert!(e.to_string().contains("wokers"));
    }
}
