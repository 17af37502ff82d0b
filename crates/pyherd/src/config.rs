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
        ] {
            if value.is_zero() {
                return invalid(format!("{name} must be greater than zero"));
            }
        }
        if self.python.as_os_str().is_empty() {
            return invalid("python must name an interpreter".into());
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
    }

    #[test]
    fn durations_read_as_milliseconds_and_unknown_keys_are_refused() {
        let c: PoolConfig =
            serde_json::from_str(r#"{"workers": 3, "queue_timeout_ms": 250}"#).unwrap();
        assert_eq!(c.workers, 3);
        assert_eq!(c.queue_timeout, Duration::from_millis(250));
        let e = serde_json::from_str::<PoolConfig>(r#"{"wokers": 3}"#).unwrap_err();
        assert!(e.to_string().contains("wokers"));
    }
}
