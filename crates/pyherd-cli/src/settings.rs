//! Settings of the pool and server. Precedence, highest first: command-line flag,
//! `PYHERD_*` environment variable, `pyherd.toml`, built-in default. A file key has the flag's name with underscores
//! (`--max-queue` is `max_queue`); an unknown key is an error that names it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use pyherd::{Affinity, Backoff, PoolConfig};

use crate::server_settings::ServerFile;

/// The default address of `serve`.
pub(crate) const DEFAULT_BIND: &str = "127.0.0.1:7878";
/// The file read when `--config` is not given (if it exists).
pub(crate) const DEFAULT_FILE: &str = "pyherd.toml";
/// The state directory when none is given (relative to the working directory).
pub(crate) const DEFAULT_STATE_DIR: &str = ".pyherd";
/// What `pyherd setup` installs when the file names no `requirements`.
pub(crate) const DEFAULT_REQUIREMENTS: [&str; 1] = ["dspy==3.4.1"];
/// The handlers module of the DSPy adapter (`--dspy`).
pub(crate) const DSPY_MODULE: &str = "pyherd_worker.dspy_adapter";

/// Pool flags shared by `serve`, `exec` and `bench`.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct PoolArgs {
    /// Configuration file [default: ./pyherd.toml when it exists]
    #[arg(long, env = "PYHERD_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Number of worker processes [default: number of CPUs]
    #[arg(long, env = "PYHERD_WORKERS")]
    pub(crate) workers: Option<usize>,
    /// Handler module to load, `pkg.module` or `path/to/file.py` (repeatable; env: comma-separated)
    #[arg(
        long = "handlers",
        env = "PYHERD_HANDLERS",
        value_delimiter = ',',
        value_parser = list_item
    )]
    pub(crate) handlers: Vec<String>,
    /// Python interpreter, a name on PATH or a path [default: python3]
    #[arg(long, env = "PYHERD_PYTHON")]
    pub(crate) python: Option<PathBuf>,
    /// Most calls waiting for a worker [default: 1000]
    #[arg(long, env = "PYHERD_MAX_QUEUE")]
    pub(crate) max_queue: Option<usize>,
    /// Longest wait in the queue, ms [default: 5000]
    #[arg(long, env = "PYHERD_QUEUE_TIMEOUT_MS")]
    pub(crate) queue_timeout_ms: Option<u64>,
    /// Longest execution of a call, ms; the worker is then killed and replaced [default: 30000]
    #[arg(long, env = "PYHERD_REQUEST_TIMEOUT_MS")]
    pub(crate) request_timeout_ms: Option<u64>,
    /// Longest start of a worker, ms [default: 30000]
    #[arg(long, env = "PYHERD_STARTUP_TIMEOUT_MS")]
    pub(crate) startup_timeout_ms: Option<u64>,
    /// Grace period for calls in flight at shutdown, ms [default: 30000]
    #[arg(long, env = "PYHERD_SHUTDOWN_GRACE_MS")]
    pub(crate) shutdown_grace_ms: Option<u64>,
    /// Largest frame either side may send, bytes [default: 67108864]
    #[arg(long, env = "PYHERD_MAX_FRAME_BYTES")]
    pub(crate) max_frame_bytes: Option<usize>,
    /// How long a worker that has just answered polls for its next call before it
    /// sleeps, µs; 0 = off [default: 100]
    #[arg(long, env = "PYHERD_IDLE_SPIN_US")]
    pub(crate) idle_spin_us: Option<u64>,
    /// Load the DSPy adapter (the handlers module pyherd_worker.dspy_adapter);
    /// `--dspy=false` (or PYHERD_DSPY=false) turns off `dspy = true` in the file
    #[arg(
        long,
        env = "PYHERD_DSPY",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub(crate) dspy: Option<bool>,
    /// Session affinity: hint, strict_queue or strict_fail_fast [default: hint]
    #[arg(long, env = "PYHERD_AFFINITY")]
    pub(crate) affinity: Option<Affinity>,
    /// Most live sessions [default: 10000]
    #[arg(long, env = "PYHERD_MAX_SESSIONS")]
    pub(crate) max_sessions: Option<usize>,
    /// A session's time to live after its last access, ms [default: 3600000]
    #[arg(long, env = "PYHERD_SESSION_TTL_MS")]
    pub(crate) session_ttl_ms: Option<u64>,
    /// Fewest workers in service; idle ones stop down to this [default: --workers]
    #[arg(long, env = "PYHERD_MIN_WORKERS")]
    pub(crate) min_workers: Option<usize>,
    /// Most workers in service; more start while calls wait [default: --workers]
    #[arg(long, env = "PYHERD_MAX_WORKERS")]
    pub(crate) max_workers: Option<usize>,
    /// Idle time after which a worker is pinged, ms [default: 30000]
    #[arg(long, env = "PYHERD_HEALTH_INTERVAL_MS")]
    pub(crate) health_interval_ms: Option<u64>,
    /// Longest a ping may take before it counts as missed, ms [default: 5000]
    #[arg(long, env = "PYHERD_HEALTH_TIMEOUT_MS")]
    pub(crate) health_timeout_ms: Option<u64>,
    /// Calls a worker serves before it is recycled (+0–10 % jitter) [default: no limit]
    #[arg(long, env = "PYHERD_MAX_REQUESTS")]
    pub(crate) max_requests: Option<u64>,
    /// Python RSS in MiB past which a worker is recycled after its call [default: no limit]
    #[arg(long, env = "PYHERD_MAX_RSS_MB")]
    pub(crate) max_rss_mb: Option<u64>,
    /// Age in seconds past which a worker is recycled [default: no limit]
    #[arg(long, env = "PYHERD_MAX_AGE_S")]
    pub(crate) max_age_s: Option<u64>,
    /// Idle seconds after which a worker stops, down to --min-workers [default: never]
    #[arg(long, env = "PYHERD_IDLE_TIMEOUT_S")]
    pub(crate) idle_timeout_s: Option<u64>,
    /// Most attempts of an idempotent call, the first included (1 = no retry) [default: 3]
    #[arg(long, env = "PYHERD_RETRY_ATTEMPTS")]
    pub(crate) retry_attempts: Option<u32>,
    /// Wait between attempts: linear, exponential, fibonacci or decorrelated_jitter
    /// [default: exponential]
    #[arg(long, env = "PYHERD_RETRY_BACKOFF")]
    pub(crate) retry_backoff: Option<Backoff>,
    /// First wait between attempts, ms [default: 50]
    #[arg(long, env = "PYHERD_RETRY_BASE_MS")]
    pub(crate) retry_base_ms: Option<u64>,
    /// Longest wait between attempts, ms [default: 2000]
    #[arg(long, env = "PYHERD_RETRY_CAP_MS")]
    pub(crate) retry_cap_ms: Option<u64>,
    /// Command whose calls are idempotent unless a call says otherwise (repeatable;
    /// env: comma-separated)
    #[arg(
        long = "idempotent-commands",
        env = "PYHERD_IDEMPOTENT_COMMANDS",
        value_delimiter = ',',
        value_parser = list_item
    )]
    pub(crate) idempotent_commands: Vec<String>,
    /// Command guarded by a circuit breaker (repeatable; env: comma-separated)
    #[arg(
        long = "breaker-commands",
        env = "PYHERD_BREAKER_COMMANDS",
        value_delimiter = ',',
        value_parser = list_item
    )]
    pub(crate) breaker_commands: Vec<String>,
    /// Consecutive calls that crash or time out their worker before a breaker opens
    /// [default: 5]
    #[arg(long, env = "PYHERD_BREAKER_FAILURES")]
    pub(crate) breaker_failures: Option<u32>,
    /// Consecutive successful trial calls that close a half-open breaker [default: 3]
    #[arg(long, env = "PYHERD_BREAKER_SUCCESSES")]
    pub(crate) breaker_successes: Option<u32>,
    /// How long an open breaker refuses calls, ms [default: 60000]
    #[arg(long, env = "PYHERD_BREAKER_OPEN_MS")]
    pub(crate) breaker_open_ms: Option<u64>,
    /// Module for a zygote to import once; workers are then forked from it, e.g. `dspy`
    /// (repeatable; env: comma-separated) [default: none, every worker is spawned]
    #[arg(
        long = "preload",
        value_name = "MODULE",
        env = "PYHERD_PRELOAD",
        value_delimiter = ',',
        value_parser = list_item
    )]
    pub(crate) preload: Vec<String>,
    /// Where pyherd keeps its state: the Python environment of `pyherd setup` and the run
    /// registry (runs/) [default: .pyherd]
    #[arg(long, env = "PYHERD_STATE_DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// Where the embedded worker package is written [default:
    /// `$XDG_CACHE_HOME/pyherd` or `~/.cache/pyherd`]
    #[arg(long, env = "PYHERD_CACHE_DIR")]
    pub(crate) cache_dir: Option<PathBuf>,
}

/// The configuration file's keys: the pool's, plus `bind`, `dspy`, `state_dir`,
/// `requirements` and the server's (`token`, limits: see `server_settings`).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct FileSettings {
    pub(crate) pool: PoolConfig,
    pub(crate) bind: Option<String>,
    pub(crate) dspy: bool,
    pub(crate) state_dir: Option<PathBuf>,
    pub(crate) requirements: Option<Vec<String>>,
    /// The server's token and limits.
    pub(crate) server: ServerFile,
    /// The file names the interpreter (then the state directory's environment is not used).
    python_set: bool,
    /// The file sets `workers`.
    workers_set: bool,
}

/// Everything resolved: file, environment and flags applied.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) pool: PoolConfig,
    pub(crate) bind: Option<String>,
    pub(crate) state_dir: PathBuf,
    pub(crate) requirements: Vec<String>,
    /// The server's token and limits, as the file gives them.
    pub(crate) server: ServerFile,
    /// The interpreter of the state directory's environment, when the pool uses it.
    pub(crate) venv_python: Option<PathBuf>,
    /// The file names the interpreter, so the state directory's environment is not used.
    pub(crate) python_in_file: bool,
}

/// Written into the environment by `pyherd setup` before it changes anything there and
/// removed once everything is installed: an environment that has it (its setup failed or
/// was cut short) is not used.
const VENV_INCOMPLETE: &str = "pyherd-setup-incomplete";

/// The mark of an unfinished `pyherd setup` in `state_dir`'s environment.
pub(crate) fn venv_incomplete(state_dir: &Path) -> PathBuf {
    state_dir.join("venv").join(VENV_INCOMPLETE)
}

/// One item of a list setting (`--handlers a.py,b.py`, `PYHERD_PRELOAD="os, json"`): the
/// spaces around it are not part of it, and it may not be empty.
fn list_item(item: &str) -> Result<String, String> {
    let item = item.trim();
    if item.is_empty() {
        return Err("an empty item in a comma-separated list".into());
    }
    Ok(item.to_owned())
}

/// The interpreter of the environment `pyherd setup` makes in `state_dir`.
pub(crate) fn venv_python(state_dir: &Path) -> PathBuf {
    state_dir.join("venv").join("bin").join("python")
}

impl PoolArgs {
    /// The file's settings with flags and environment applied. The pool runs on the state
    /// directory's environment when it exists and no interpreter is named; one whose
    /// `pyherd setup` did not finish is an error.
    pub(crate) fn resolve(&self) -> anyhow::Result<Settings> {
        self.resolve_with(None, true)
    }

    /// [`resolve`](Self::resolve) for a command whose own default number of workers,
    /// `workers`, replaces the pool's when neither the file, the environment nor a flag
    /// sets one.
    pub(crate) fn resolve_with_workers(&self, workers: usize) -> anyhow::Result<Settings> {
        self.resolve_with(Some(workers), true)
    }

    /// [`resolve`](Self::resolve) for `pyherd setup`, which makes the environment: the
    /// interpreter is the one named, or the default, whatever the environment holds.
    pub(crate) fn resolve_for_setup(&self) -> anyhow::Result<Settings> {
        self.resolve_with(None, false)
    }

    fn resolve_with(&self, workers: Option<usize>, use_venv: bool) -> anyhow::Result<Settings> {
        let mut file = match self.config_file() {
            Some(path) => read_file(&path)?,
            None => FileSettings::default(),
        };
        self.apply(&mut file.pool);
        if let Some(workers) = workers.filter(|_| !file.workers_set && self.workers.is_none()) {
            // As many as `min_workers` asks for, if more.
            file.pool.workers = workers.max(file.pool.min_workers.unwrap_or(workers));
        }
        if self.dspy.unwrap_or(file.dspy) && !file.pool.handlers.iter().any(|h| h == DSPY_MODULE) {
            file.pool.handlers.push(DSPY_MODULE.to_owned());
        }
        let state_dir = self
            .state_dir
            .clone()
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        file.pool.state_dir = Some(state_dir.clone());
        let mut venv = None;
        if use_venv && self.python.is_none() && !file.python_set {
            if venv_incomplete(&state_dir).exists() {
                bail!(
                    "the environment {} is not ready: its `pyherd setup` failed or was cut \
                     short; run `pyherd setup` again, remove the directory, or name an \
                     interpreter with --python",
                    state_dir.join("venv").display()
                );
            }
            let python = venv_python(&state_dir);
            if python.is_file() {
                file.pool.python.clone_from(&python);
                venv = Some(python);
            }
        }
        file.pool.validate().context("invalid pool settings")?;
        let requirements = file
            .requirements
            .unwrap_or_else(|| DEFAULT_REQUIREMENTS.map(str::to_owned).to_vec());
        Ok(Settings {
            pool: file.pool,
            bind: file.bind,
            state_dir,
            requirements,
            server: file.server,
            venv_python: venv,
            python_in_file: file.python_set,
        })
    }

    /// The file read: `--config`, else `./pyherd.toml` when it exists.
    pub(crate) fn config_file(&self) -> Option<PathBuf> {
        self.config.clone().or_else(|| {
            let default = Path::new(DEFAULT_FILE);
            default.is_file().then(|| default.to_owned())
        })
    }

    fn apply(&self, pool: &mut PoolConfig) {
        let ms = Duration::from_millis;
        if let Some(v) = self.workers {
            pool.workers = v;
        }
        if !self.handlers.is_empty() {
            pool.handlers.clone_from(&self.handlers);
        }
        if let Some(v) = &self.python {
            pool.python.clone_from(v);
        }
        if let Some(v) = self.max_queue {
            pool.max_queue = v;
        }
        if let Some(v) = self.queue_timeout_ms {
            pool.queue_timeout = ms(v);
        }
        if let Some(v) = self.request_timeout_ms {
            pool.request_timeout = ms(v);
        }
        if let Some(v) = self.startup_timeout_ms {
            pool.startup_timeout = ms(v);
        }
        if let Some(v) = self.shutdown_grace_ms {
            pool.shutdown_grace = ms(v);
        }
        if let Some(v) = self.max_frame_bytes {
            pool.max_frame_bytes = v;
        }
        if let Some(v) = self.idle_spin_us {
            pool.idle_spin_us = v;
        }
        if let Some(v) = self.affinity {
            pool.affinity = v;
        }
        if let Some(v) = self.max_sessions {
            pool.max_sessions = v;
        }
        if let Some(v) = self.session_ttl_ms {
            pool.session_ttl = ms(v);
        }
        if !self.preload.is_empty() {
            pool.preload.clone_from(&self.preload);
        }
        if self.cache_dir.is_some() {
            pool.cache_dir.clone_from(&self.cache_dir);
        }
        self.apply_lifecycle(pool);
        self.apply_resilience(pool);
    }

    fn apply_lifecycle(&self, pool: &mut PoolConfig) {
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        if self.min_workers.is_some() {
            pool.min_workers = self.min_workers;
        }
        if self.max_workers.is_some() {
            pool.max_workers = self.max_workers;
        }
        if let Some(v) = self.health_interval_ms {
            pool.health_interval = ms(v);
        }
        if let Some(v) = self.health_timeout_ms {
            pool.health_timeout = ms(v);
        }
        if self.max_requests.is_some() {
            pool.max_requests = self.max_requests;
        }
        if self.max_rss_mb.is_some() {
            pool.max_rss_mb = self.max_rss_mb;
        }
        if let Some(v) = self.max_age_s {
            pool.max_age = Some(secs(v));
        }
        if let Some(v) = self.idle_timeout_s {
            pool.idle_timeout = Some(secs(v));
        }
    }

    fn apply_resilience(&self, pool: &mut PoolConfig) {
        let ms = Duration::from_millis;
        if let Some(v) = self.retry_attempts {
            pool.retry_attempts = v;
        }
        if let Some(v) = self.retry_backoff {
            pool.retry_backoff = v;
        }
        if let Some(v) = self.retry_base_ms {
            pool.retry_base = ms(v);
        }
        if let Some(v) = self.retry_cap_ms {
            pool.retry_cap = ms(v);
        }
        if !self.idempotent_commands.is_empty() {
            pool.idempotent_commands
                .clone_from(&self.idempotent_commands);
        }
        if !self.breaker_commands.is_empty() {
            pool.breaker_commands.clone_from(&self.breaker_commands);
        }
        if let Some(v) = self.breaker_failures {
            pool.breaker_failures = v;
        }
        if let Some(v) = self.breaker_successes {
            pool.breaker_successes = v;
        }
        if let Some(v) = self.breaker_open_ms {
            pool.breaker_open = ms(v);
        }
    }
}

/// Reads a `pyherd.toml`: the pool's keys plus `bind`, `dspy`, `state_dir`, `requirements`.
pub(crate) fn read_file(path: &Path) -> anyhow::Result<FileSettings> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
    parse_file(&text).with_context(|| format!("in the configuration file {}", path.display()))
}

/// The keys of the file besides the pool's and the server's.
const OWN_KEYS: [&str; 4] = ["bind", "dspy", "state_dir", "requirements"];

fn parse_file(text: &str) -> anyhow::Result<FileSettings> {
    let mut table: toml::Table = toml::from_str(text)?;
    let keys = file_keys();
    if let Some(key) = table.keys().find(|k| !keys.contains(&k.as_str())) {
        bail!(
            "unknown key `{key}`, expected one of {}",
            keys.iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let bind = match table.remove("bind") {
        None => None,
        Some(toml::Value::String(s)) => Some(s),
        Some(other) => bail!("`bind` must be a string like \"{DEFAULT_BIND}\", not {other}"),
    };
    let dspy = match table.remove("dspy") {
        None => false,
        Some(toml::Value::Boolean(b)) => b,
        Some(other) => bail!("`dspy` must be true or false, not {other}"),
    };
    let state_dir = match table.remove("state_dir") {
        None => None,
        Some(toml::Value::String(s)) => Some(PathBuf::from(s)),
        Some(other) => bail!("`state_dir` must be a path, not {other}"),
    };
    let requirements = match table.remove("requirements") {
        None => None,
        Some(value) => Some(
            value
                .try_into::<Vec<String>>()
                .context("`requirements` must be a list of pip requirement strings")?,
        ),
    };
    let server = ServerFile::take(&mut table)?;
    let python_set = table.contains_key("python");
    let workers_set = table.contains_key("workers");
    let pool: PoolConfig = toml::Value::Table(table).try_into()?;
    Ok(FileSettings {
        pool,
        bind,
        dspy,
        state_dir,
        requirements,
        server,
        python_set,
        workers_set,
    })
}

/// Every key a `pyherd.toml` may hold: [`OWN_KEYS`], the server's, then the pool's.
fn file_keys() -> Vec<&'static str> {
    let mut keys: Vec<&str> = OWN_KEYS.to_vec();
    keys.extend(crate::server_settings::KEYS);
    keys.extend(pool_keys().iter().filter(|k| !OWN_KEYS.contains(k)));
    keys
}

/// The keys of [`PoolConfig`], as its `Deserialize` implementation names them.
fn pool_keys() -> &'static [&'static str] {
    /// A deserializer that only records the field names a struct asks for.
    struct FieldNames(&'static [&'static str]);

    impl<'de> serde::Deserializer<'de> for &mut FieldNames {
        type Error = serde::de::value::Error;

        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _: V,
        ) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("only the field names are read"))
        }

        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = fields;
            self.deserialize_any(visitor)
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    let mut names = FieldNames(&[]);
    // Fails by design once the names are recorded.
    let _ = <PoolConfig as serde::Deserialize>::deserialize(&mut names);
    names.0
}

/// Picks the address: flag/env, then the file, then the default.
pub(crate) fn bind_address(flag: Option<&str>, file: Option<&str>) -> anyhow::Result<SocketAddr> {
    let text = flag.or(file).unwrap_or(DEFAULT_BIND);
    text.parse()
        .with_context(|| format!("`{text}` is not an address like {DEFAULT_BIND}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys_flags_and_defaults_combine_in_order() {
        let mut file = parse_file(
            "bind = \"0.0.0.0:9000\"\nworkers = 3\nqueue_timeout_ms = 250\nhandlers = [\"a.py\"]\n",
        )
        .unwrap();
        assert_eq!(file.bind.as_deref(), Some("0.0.0.0:9000"));
        assert_eq!(file.pool.workers, 3);
        let args = PoolArgs {
            workers: Some(5),
            handlers: vec!["b.py".into()],
            ..PoolArgs::default()
        };
        args.apply(&mut file.pool);
        assert_eq!(file.pool.workers, 5);
        assert_eq!(file.pool.handlers, vec!["b.py".to_owned()]);
        assert_eq!(file.pool.queue_timeout, Duration::from_millis(250));
        assert_eq!(file.pool.max_queue, 1000);
    }

    #[test]
    fn preload_is_a_file_key_and_a_repeatable_flag() {
        let mut file = parse_file("preload = [\"json\"]\n").unwrap();
        assert_eq!(file.pool.preload, ["json"]);
        PoolArgs::default().apply(&mut file.pool);
        assert_eq!(file.pool.preload, ["json"]);
        let args = PoolArgs {
            preload: vec!["dspy".into(), "numpy".into()],
            ..PoolArgs::default()
        };
        args.apply(&mut file.pool);
        assert_eq!(file.pool.preload, ["dspy", "numpy"]);
        let e = parse_file("preload = \"dspy\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("preload"), "{e:#}");
        file.pool.preload = vec!["not/a/module.py".into()];
        let e = file.pool.validate().unwrap_err();
        assert!(e.message().contains("preload"), "{e}");
    }

    #[test]
    fn session_and_environment_keys_are_read() {
        let file = parse_file(
            "dspy = true\nstate_dir = \"/srv/pyherd\"\nrequirements = [\"dspy==3.4.1\", \"numpy\"]\n\
             affinity = \"strict_queue\"\nmax_sessions = 5\npython = \"/usr/bin/python3\"\n",
        )
        .unwrap();
        assert!(file.dspy && file.python_set);
        assert_eq!(file.state_dir, Some(PathBuf::from("/srv/pyherd")));
        assert_eq!(file.requirements.as_ref().map(Vec::len), Some(2));
        assert_eq!(file.pool.affinity, Affinity::StrictQueue);
        assert_eq!(file.pool.max_sessions, 5);
        let e = parse_file("affinity = \"sticky\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("sticky"), "{e:#}");
        let e = parse_file("requirements = \"dspy\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("requirements"), "{e:#}");
        let e = parse_file("dspy = \"yes\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("dspy"), "{e:#}");
    }

    #[test]
    fn lifecycle_keys_and_flags_share_their_names() {
        let mut file = parse_file(
            "workers = 2\nmin_workers = 1\nmax_workers = 4\nhealth_interval_ms = 500\n\
             health_timeout_ms = 100\nmax_requests = 1000\nmax_rss_mb = 512\nmax_age_s = 3600\n\
             idle_timeout_s = 60\nidle_spin_us = 0\n",
        )
        .unwrap();
        assert_eq!(file.pool.worker_bounds(), (1, 4));
        assert_eq!(file.pool.idle_spin_us, 0);
        assert_eq!(file.pool.health_interval, Duration::from_millis(500));
        assert_eq!(file.pool.idle_timeout, Some(Duration::from_secs(60)));
        let args = PoolArgs {
            max_workers: Some(6),
            health_timeout_ms: Some(250),
            max_requests: Some(10),
            max_rss_mb: Some(100),
            max_age_s: Some(5),
            idle_timeout_s: Some(2),
            idle_spin_us: Some(400),
            ..PoolArgs::default()
        };
        args.apply(&mut file.pool);
        let pool = &file.pool;
        assert_eq!(pool.idle_spin_us, 400);
        assert_eq!(pool.worker_bounds(), (1, 6));
        assert_eq!(pool.health_timeout, Duration::from_millis(250));
        assert_eq!((pool.max_requests, pool.max_rss_mb), (Some(10), Some(100)));
        assert_eq!(pool.max_age, Some(Duration::from_secs(5)));
        assert_eq!(pool.idle_timeout, Some(Duration::from_secs(2)));
        pool.validate().unwrap();
        let args = PoolArgs {
            min_workers: Some(3),
            ..PoolArgs::default()
        };
        args.apply(&mut file.pool);
        let e = file.pool.validate().unwrap_err();
        assert!(e.message().contains("min_workers"), "{e}");
    }

    #[test]
    fn retry_and_breaker_settings_come_from_file_and_flags() {
        let mut file = parse_file(
            "retry_attempts = 5\nretry_backoff = \"fibonacci\"\nretry_base_ms = 20\n\
             idempotent_commands = [\"ping\", \"lookup\"]\nbreaker_commands = [\"crashy\"]\n\
             breaker_open_ms = 1500\n",
        )
        .unwrap();
        assert_eq!(file.pool.retry_attempts, 5);
        assert_eq!(file.pool.retry_backoff, Backoff::Fibonacci);
        assert_eq!(file.pool.idempotent_commands, ["ping", "lookup"]);
        assert_eq!(file.pool.breaker_open, Duration::from_millis(1500));
        let args = PoolArgs {
            retry_backoff: Some(Backoff::DecorrelatedJitter),
            retry_cap_ms: Some(900),
            breaker_commands: vec!["other".into()],
            breaker_failures: Some(2),
            breaker_successes: Some(1),
            ..PoolArgs::default()
        };
        args.apply(&mut file.pool);
        let pool = &file.pool;
        assert_eq!(pool.retry_backoff, Backoff::DecorrelatedJitter);
        assert_eq!(pool.retry_base, Duration::from_millis(20));
        assert_eq!(pool.retry_cap, Duration::from_millis(900));
        assert_eq!(pool.breaker_commands, ["other"]);
        assert_eq!((pool.breaker_failures, pool.breaker_successes), (2, 1));
        pool.validate().unwrap();
    }

    #[test]
    fn bad_retry_settings_are_refused_by_name() {
        let e = parse_file("retry_backoff = \"quadratic\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("quadratic"), "{e:#}");
        let e = "quadratic".parse::<Backoff>().unwrap_err();
        assert!(e.to_string().contains("retry_backoff"), "{e}");
        let mut file = parse_file("retry_attempts = 0\n").unwrap();
        let e = file.pool.validate().unwrap_err();
        assert!(e.message().contains("retry_attempts"), "{e}");
        PoolArgs {
            retry_attempts: Some(2),
            retry_base_ms: Some(5000),
            ..PoolArgs::default()
        }
        .apply(&mut file.pool);
        let e = file.pool.validate().unwrap_err();
        assert!(e.message().contains("retry_cap"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = format!("{:#}", parse_file("wrokers = 2\n").unwrap_err());
        assert!(e.contains("unknown key `wrokers`"), "{e}");
        // The hint names every key the file takes, the pool's and the others.
        for key in [
            "`workers`",
            "`kill_timeout_ms`",
            "`bind`",
            "`token_file`",
            "`insecure`",
        ] {
            assert!(e.contains(key), "{key}: {e}");
        }
        for key in [
            "`max_streams`",
            "`body_timeout_ms`",
            "`dspy`",
            "`requirements`",
        ] {
            assert!(e.contains(key), "{key}: {e}");
        }
        assert_eq!(e.matches("`state_dir`").count(), 1, "{e}");
        let keys = file_keys();
        assert!(
            keys.contains(&"max_age_s") && keys.contains(&"preload"),
            "{keys:?}"
        );
        let e = parse_file("bind = 7\n").unwrap_err();
        assert!(e.to_string().contains("bind"));
        assert!(bind_address(Some("nonsense"), None).is_err());
        assert_eq!(bind_address(None, None).unwrap().port(), 7878);
    }

    #[test]
    fn the_state_dir_reaches_the_pool_and_an_empty_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pyherd.toml");
        std::fs::write(&file, "state_dir = \"/srv/pyherd\"\nworkers = 1\n").unwrap();
        let mut args = PoolArgs {
            config: Some(file),
            python: Some("python3".into()),
            ..PoolArgs::default()
        };
        let settings = args.resolve().unwrap();
        assert_eq!(settings.pool.state_dir, Some(PathBuf::from("/srv/pyherd")));
        args.state_dir = Some(dir.path().join("state"));
        let settings = args.resolve().unwrap();
        assert_eq!(settings.pool.state_dir, Some(dir.path().join("state")));
        args.state_dir = Some(PathBuf::new());
        let e = args.resolve().unwrap_err();
        assert!(format!("{e:#}").contains("state_dir"), "{e:#}");
    }

    #[test]
    fn list_items_lose_their_spaces_and_may_not_be_empty() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            pool: PoolArgs,
        }
        let cli = Cli::try_parse_from([
            "x",
            "--idempotent-commands",
            "ping, crash ",
            "--preload",
            " os",
        ])
        .unwrap();
        assert_eq!(cli.pool.idempotent_commands, ["ping", "crash"]);
        assert_eq!(cli.pool.preload, ["os"]);
        let Err(e) = Cli::try_parse_from(["x", "--handlers", "a.py, ,b.py"]) else {
            panic!("an empty item was taken");
        };
        assert!(e.to_string().contains("empty item"), "{e}");
    }

    /// A command's own default number of workers (`exec`: 1) gives way to the file's, and
    /// the file's to a flag.
    #[test]
    fn a_commands_default_workers_give_way_to_the_file_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pyherd.toml");
        let mut args = PoolArgs {
            config: Some(file.clone()),
            python: Some("python3".into()),
            ..PoolArgs::default()
        };
        std::fs::write(&file, "max_queue = 5\n").unwrap();
        assert_eq!(args.resolve_with_workers(1).unwrap().pool.workers, 1);
        std::fs::write(&file, "min_workers = 2\n").unwrap();
        assert_eq!(args.resolve_with_workers(1).unwrap().pool.workers, 2);
        std::fs::write(&file, "workers = 4\nmin_workers = 2\n").unwrap();
        let settings = args.resolve_with_workers(1).unwrap();
        assert_eq!(
            (settings.pool.workers, settings.pool.min_workers),
            (4, Some(2))
        );
        args.workers = Some(3);
        assert_eq!(args.resolve_with_workers(1).unwrap().pool.workers, 3);
    }
}
