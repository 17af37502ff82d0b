//! The pool: admission, the FIFO queue, worker slots, stats and shutdown (DESIGN §2).

mod calls;
mod health;
mod job;
mod lifecycle;
mod lifecycle_builder;
mod recycle;
mod reload;
mod retry;
mod scale;
mod sessions;
mod slot;
mod start;
mod stats;
mod stream;
mod timeline;

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fmt::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use self::calls::Calls;
pub use self::calls::{MAX_REQUEST_ID_LEN, check_request_id};
use self::job::{Flight, Job};
use self::lifecycle::Lifecycle;
pub use self::reload::{ReloadReport, ReloadedWorker};
use self::retry::Resilience;
use self::slot::Slot;
use self::stats::{Counters, SlotStatus, bump};
pub use self::stats::{PoolStats, WorkerInfo};
pub use self::stream::{CallStream, STREAM_BUFFER, StreamEnd};
pub use self::timeline::{RecentError, Timeline, TimelineSample};
use crate::config::{Affinity, PoolConfig};
use crate::error::{Error, ErrorKind};
use crate::metrics::{self, Metrics, UNKNOWN_COMMAND};
use crate::policy::Permit;
use crate::protocol::{self, CALL_ENVELOPE_BYTES};
use crate::registry::Run;
use crate::session::{MemoryStore, SessionStore};
use crate::telemetry;
use crate::worker::{LaunchSpec, Launcher, Spawner, WorkerState};

/// Options of one call; every field defaults to the pool's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CallOptions {
    /// Execution timeout (default: [`PoolConfig::request_timeout`]).
    pub timeout: Option<Duration>,
    /// Queue timeout (default: [`PoolConfig::queue_timeout`]).
    pub queue_timeout: Option<Duration>,
    /// The session the call belongs to: created on first use (except by the DSPy
    /// adapter's `cleanup_session`, which ends it), passed to the handler as
    /// `ctx.session_id`, and served preferably by the session's last worker.
    pub session_id: Option<String>,
    /// Session affinity for this call (default: [`PoolConfig::affinity`]).
    pub affinity: Option<Affinity>,
    /// Whether the call may run more than once, so a retryable failure is retried
    /// (default: whether its command is in [`PoolConfig::idempotent_commands`]).
    pub idempotent: Option<bool>,
    /// The call's request id, the handler's `ctx.request_id` and the id
    /// [`Pool::cancel`] takes: 1 to 128 characters of `A-Z a-z 0-9 . _ : -`, unique
    /// among the calls in flight (default: one the pool makes, `r` and a hex counter).
    pub request_id: Option<String>,
}

impl CallOptions {
    /// Options that take every value from the pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the execution timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the queue timeout.
    #[must_use]
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.queue_timeout = Some(timeout);
        self
    }

    /// Sets the session id.
    #[must_use]
    pub fn session_id(mut self, id: impl Into<String>) -> Self {
        self.session_id = Some(id.into());
        self
    }

    /// Sets the session affinity.
    #[must_use]
    pub fn affinity(mut self, affinity: Affinity) -> Self {
        self.affinity = Some(affinity);
        self
    }

    /// Marks the call idempotent (or not, overriding [`PoolConfig::idempotent_commands`]).
    #[must_use]
    pub fn idempotent(mut self, idempotent: bool) -> Self {
        self.idempotent = Some(idempotent);
        self
    }

    /// Sets the request id (checked when the call is made).
    #[must_use]
    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(id.into());
        self
    }
}

/// The `worker_id` of answers the host gives itself (session and program bookkeeping).
pub const HOST_WORKER_ID: &str = "host";

/// A successful answer, with the worker that gave it.
#[derive(Debug, Clone)]
pub struct Reply {
    result: Box<RawValue>,
    worker_id: Arc<str>,
    duration: Duration,
    request_id: Arc<str>,
}

impl Reply {
    /// The result as the worker wrote it (valid JSON).
    pub fn raw(&self) -> &RawValue {
        &self.result
    }

    /// The result parsed into a [`Value`].
    ///
    /// # Errors
    /// Never for results from a worker (they are valid JSON); typed for completeness.
    pub fn value(&self) -> Result<Value, Error> {
        self.decode()
    }

    /// The result decoded into `T`.
    ///
    /// # Errors
    /// `invalid_request/result_type_mismatch` when the result does not fit `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_str(self.result.get()).map_err(|e| {
            Error::new(
                ErrorKind::ResultTypeMismatch,
                format!(
                    "the result does not fit {}: {e}",
                    std::any::type_name::<T>()
                ),
            )
        })
    }

    /// The id of the worker that answered.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Time from sending the call to the worker until its answer arrived.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// The call's request id (given in [`CallOptions::request_id`] or made by the pool).
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// An answer the host gives without a worker.
    pub(crate) fn from_host(result: Box<RawValue>, duration: Duration) -> Self {
        Self {
            result,
            worker_id: HOST_WORKER_ID.into(),
            duration,
            request_id: "".into(),
        }
    }

    /// The same answer with another result.
    pub(crate) fn with_result(self, result: Box<RawValue>) -> Self {
        Self { result, ..self }
    }
}

/// A worker slot as the pool sees it: its status and the channel for affinity calls.
pub(crate) struct SlotHandle {
    status: Arc<SlotStatus>,
    direct: async_channel::Sender<Job>,
    /// Replacement workers from a reload.
    swap: async_channel::Sender<reload::Swap>,
}

/// State shared by the pool handle and its slot tasks.
pub(crate) struct Shared {
    config: PoolConfig,
    launcher: Launcher,
    handlers: HashSet<String>,
    /// The workers loaded the DSPy adapter: its session commands are served here.
    dspy: bool,
    /// The workers decode with orjson, which cannot read some valid JSON as it was
    /// meant (see [`protocol::unreadable`]): such arguments are refused before admission.
    orjson: bool,
    slots: Vec<SlotHandle>,
    /// Calls admitted and not yet taken by a worker (in the queue or an affinity
    /// channel), nor given up by their callers.
    queued: Arc<AtomicUsize>,
    store: Arc<dyn SessionStore>,
    counters: Counters,
    /// Transition and restart counts, the spawn breaker, the slots in service.
    life: Lifecycle,
    metrics: Metrics,
    /// The last ten minutes second by second, and the last errors.
    timeline: timeline::Recorder,
    /// Retry policy, idempotent commands and circuit breakers.
    resilience: Resilience,
    next_request: AtomicU64,
    /// The calls in flight by request id.
    calls: Calls,
    next_worker: AtomicU64,
    /// Cancelled when shutdown's grace period is over (or the pool is dropped):
    /// workers are killed, calls still running fail.
    abort: CancellationToken,
    /// Cancelled when shutdown begins: background upkeep (the session sweep) stops.
    closing: CancellationToken,
    /// Held by the reload in progress: reloads run one after the other.
    reloading: tokio::sync::Mutex<()>,
}

/// The next worker id (`w<n>`) from the counter `next`.
fn take_worker_id(next: &AtomicU64) -> Arc<str> {
    format!("w{}", next.fetch_add(1, Ordering::Relaxed)).into()
}

impl Shared {
    /// Counts one call in the stats and metrics: `label` is its command's metric label.
    pub(crate) fn count(&self, label: &str, error: Option<&Error>, started: Instant) {
        let elapsed = started.elapsed();
        bump(&self.counters.requests);
        self.timeline.record(label, elapsed, error);
        match error {
            None => self.metrics.observe(label, "ok", elapsed),
            Some(e) => {
                bump(&self.counters.errors);
                if e.kind() == &ErrorKind::QueueTimeout {
                    bump(&self.counters.queue_timeouts);
                }
                self.metrics.observe(label, e.kind().as_str(), elapsed);
            }
        }
    }

    fn next_worker_id(&self) -> Arc<str> {
        take_worker_id(&self.next_worker)
    }

    /// Refuses arguments the workers could not read as they were meant (see
    /// [`protocol::unreadable`]; only orjson cannot), unless they are known to be
    /// readable.
    ///
    /// # Errors
    /// `invalid_request/malformed_request` naming what cannot be read.
    pub(crate) fn check_args(&self, args: &RawValue, readable: Readable) -> Result<(), Error> {
        let check = self.orjson && readable == Readable::Check;
        match check.then(|| protocol::unreadable(args.get())).flatten() {
            Some(why) => Err(Error::new(
                ErrorKind::MalformedRequest,
                format!("args: {why}"),
            )),
            None => Ok(()),
        }
    }

    /// The slot running worker `id`, if that worker is still in service.
    fn slot_running(&self, id: &str) -> Option<&SlotHandle> {
        self.slots.iter().find(|s| s.status.runs(id))
    }
}

struct Inner {
    shared: Arc<Shared>,
    queue: async_channel::Sender<Job>,
    /// The queue's other end, for the calls no worker took before the last one stopped.
    unserved: async_channel::Receiver<Job>,
    tracker: TaskTracker,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone without `shutdown`: stop every worker now.
        self.queue.close();
        self.shared.closing.cancel();
        self.shared.abort.cancel();
    }
}

/// A supervised pool of Python workers. Cheap to clone; the workers stop when
/// [`shutdown`](Pool::shutdown) is called or the last clone is dropped.
///
/// ```no_run
/// # async fn demo() -> Result<(), pyherd::Error> {
/// let pool = pyherd::Pool::builder().workers(2).build().await?;
/// let answer = pool.execute("echo", serde_json::json!({"hello": "world"})).await?;
/// assert_eq!(answer["hello"], "world");
/// pool.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// Builds a [`Pool`]; every setting defaults to [`PoolConfig::default`].
#[derive(Clone, Default)]
#[must_use]
pub struct PoolBuilder {
    config: PoolConfig,
    store: Option<Arc<dyn SessionStore>>,
}

impl std::fmt::Debug for PoolBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("config", &self.config)
            .field("custom_store", &self.store.is_some())
            .finish()
    }
}

impl PoolBuilder {
    /// A builder starting from `config`.
    pub fn from_config(config: PoolConfig) -> Self {
        Self {
            config,
            store: None,
        }
    }

    /// Session affinity for calls that do not set their own.
    pub fn affinity(mut self, affinity: Affinity) -> Self {
        self.config.affinity = affinity;
        self
    }

    /// Default time to live of a session after its last access.
    pub fn session_ttl(mut self, ttl: Duration) -> Self {
        self.config.session_ttl = ttl;
        self
    }

    /// Most live sessions (of the embedded store).
    pub fn max_sessions(mut self, n: usize) -> Self {
        self.config.max_sessions = n;
        self
    }

    /// How often expired sessions are swept.
    pub fn session_sweep_interval(mut self, every: Duration) -> Self {
        self.config.session_sweep_interval = every;
        self
    }

    /// Keeps sessions in `store` instead of the embedded [`MemoryStore`] (then
    /// `session_ttl` and `max_sessions` are the store's business).
    pub fn session_store(mut self, store: Arc<dyn SessionStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Number of worker processes started with the pool.
    pub fn workers(mut self, n: usize) -> Self {
        self.config.workers = n;
        self
    }

    /// The Python interpreter (a name on `PATH` or a path).
    pub fn python(mut self, python: impl Into<PathBuf>) -> Self {
        self.config.python = python.into();
        self
    }

    /// Adds a handler module (`pkg.module` or `path/to/file.py`).
    pub fn handlers(mut self, module: impl Into<String>) -> Self {
        self.config.handlers.push(module.into());
        self
    }

    /// Most calls waiting for a worker.
    pub fn max_queue(mut self, n: usize) -> Self {
        self.config.max_queue = n;
        self
    }

    /// Longest wait in the queue.
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.config.queue_timeout = timeout;
        self
    }

    /// Longest execution of a call.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// Longest start of a worker.
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.config.startup_timeout = timeout;
        self
    }

    /// Grace period for calls in flight at shutdown.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.config.shutdown_grace = grace;
        self
    }

    /// How long a worker stopped politely has to exit after its request pipe closes, and
    /// again after SIGTERM, before SIGKILL (more than zero; checked by
    /// [`build`](Self::build), see [`PoolConfig::kill_timeout`]).
    pub fn kill_timeout(mut self, timeout: Duration) -> Self {
        self.config.kill_timeout = timeout;
        self
    }

    /// Largest frame in either direction.
    pub fn max_frame_bytes(mut self, n: usize) -> Self {
        self.config.max_frame_bytes = n;
        self
    }

    /// How long a worker that has just answered polls for its next call before it sleeps
    /// (see [`PoolConfig::idle_spin_us`](crate::PoolConfig::idle_spin_us)), µs; 0 = off.
    pub fn idle_spin_us(mut self, us: u64) -> Self {
        self.config.idle_spin_us = us;
        self
    }

    /// Sets an environment variable for the workers.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.env.insert(key.into(), value.into());
        self
    }

    /// Working directory of the workers.
    pub fn working_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.working_dir = Some(dir.into());
        self
    }

    /// Adds a module for the zygote to import once; workers are then forked from it
    /// (see [`PoolConfig::preload`]).
    pub fn preload(mut self, module: impl Into<String>) -> Self {
        self.config.preload.push(module.into());
        self
    }

    /// Where the embedded worker package is written.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.cache_dir = Some(dir.into());
        self
    }

    /// Where the run registry is kept (see [`PoolConfig::state_dir`]).
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.state_dir = Some(dir.into());
        self
    }

    /// Starts every worker concurrently and returns once all are ready.
    ///
    /// A worker whose start fails for a reason that may pass (the process could not be
    /// started, died or timed out before its hello, or garbled it) is started again, as
    /// a replacement would be: after a backoff doubling from 50 ms, up to five starts of
    /// that worker (the spawn breaker's threshold).
    ///
    /// # Errors
    /// At once, without a retry: `initialization/invalid_config` for a bad setting;
    /// `spawn_failed` when the interpreter is not found, or the worker package or the
    /// run's guardian cannot be set up; `handler_import_failed` when a worker reports
    /// that a handler module failed to import. Otherwise the fifth start-up failure of a
    /// worker (`spawn_failed`, `startup_failed`, `startup_timeout`, `handshake_failed`).
    /// A worker's failure carries its stderr tail. No process is left running when this
    /// fails.
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    pub async fn build(self) -> Result<Pool, Error> {
        let config = self.config;
        config.validate()?;
        let store = match self.store {
            Some(store) => store,
            None => Arc::new(MemoryStore::new(config.session_ttl, config.max_sessions)?),
        };
        let began = Instant::now();
        let python = crate::python::resolve(&config.python, config.startup_timeout).await?;
        let package = crate::python::install(config.cache_dir.as_deref())?;
        let state_dir = config
            .state_dir
            .clone()
            .unwrap_or_else(crate::registry::default_state_dir);
        // Absolute: the workers run in `working_dir`.
        let state_dir = std::path::absolute(&state_dir).unwrap_or(state_dir);
        crate::registry::sweep_at_start(state_dir.clone()).await;
        let run = Arc::new(Run::open(&state_dir));
        let launch = LaunchSpec {
            python,
            env: worker_env(&config, &package),
            pythonpath: python_path(package, &config),
            handlers: config.handlers.clone(),
            max_frame_bytes: config.max_frame_bytes,
            idle_spin_us: config.idle_spin_us,
            working_dir: config.working_dir.clone(),
            startup_timeout: config.startup_timeout,
            run: run.clone(),
        };
        let spawner = Spawner::start(tokio::runtime::Handle::current()).map_err(|e| {
            Error::new(
                ErrorKind::SpawnFailed,
                format!("cannot start the spawner thread: {e}"),
            )
        })?;
        let launcher = Launcher::new(launch, spawner, zygote_modules(&config)).await;
        // Ids `w1`… go to the first starts; a retried start takes the next.
        let next_worker = AtomicU64::new(config.workers as u64 + 1);
        let give_up = CancellationToken::new();
        let guardian = async {
            let started = run
                .start_guardian(
                    &launcher.spec().python,
                    &launcher.spec().pythonpath,
                    config.startup_timeout,
                )
                .await;
            if started.is_err() {
                give_up.cancel();
            }
            started
        };
        let (guardian, (mut workers, failure)) = futures::join!(
            guardian,
            start::start_workers(&launcher, config.workers, &next_worker, &give_up)
        );
        if let Some(error) = guardian.err().or(failure) {
            for worker in &mut workers {
                worker.kill().await;
            }
            launcher.stop().await;
            return Err(error);
        }
        let Some(first) = workers.first() else {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "a pool needs at least one worker",
            ));
        };
        let hello = first.hello().clone();
        tracing::info!(
            workers = workers.len(),
            ms = began.elapsed().as_millis() as u64,
            python = %hello.python,
            json = %hello.json,
            handlers = ?hello.handlers,
            run_id = %run.id(),
            registry = %run.file().map_or_else(|| "none".into(), |f| f.display().to_string()),
            "pool ready"
        );
        for (setting, commands) in [
            ("idempotent_commands", &config.idempotent_commands),
            ("breaker_commands", &config.breaker_commands),
        ] {
            for command in commands.iter().filter(|c| !hello.handlers.contains(c)) {
                tracing::warn!(setting, command = %command,
                    "no handler has this name: the setting does nothing for it");
            }
        }
        // Admission bounds the calls waiting (`queued`), so the channels need no bound.
        let (queue, incoming) = async_channel::unbounded();
        // `max_workers` slots: those past the first `workers` are parked until needed.
        let (min_workers, max_workers) = config.worker_bounds();
        let mut slots = Vec::with_capacity(max_workers);
        let mut directs = Vec::with_capacity(max_workers);
        for i in 0..max_workers {
            let (direct, receiver) = async_channel::unbounded();
            let (swap, swaps) = async_channel::bounded(1);
            let status = match workers.get(i) {
                Some(w) => {
                    let status = SlotStatus::new(w.id().clone(), w.started());
                    status.running(w.pid(), w.started(), w.started_by());
                    status
                }
                None => SlotStatus::parked(),
            };
            slots.push(SlotHandle {
                status: Arc::new(status),
                direct,
                swap,
            });
            directs.push((receiver, swaps));
        }
        let sweep_every = config.session_sweep_interval;
        let resilience = Resilience::new(&config);
        let shared = Arc::new(Shared {
            config,
            launcher,
            dspy: hello.adapters.iter().any(|a| a == sessions::DSPY_ADAPTER),
            orjson: hello.json == "orjson",
            handlers: hello.handlers.into_iter().collect(),
            slots,
            queued: Arc::new(AtomicUsize::new(0)),
            store,
            counters: Counters::default(),
            life: Lifecycle::new(workers.len(), min_workers, max_workers),
            metrics: Metrics::default(),
            timeline: timeline::Recorder::new(),
            resilience,
            next_request: AtomicU64::new(1),
            calls: Calls::default(),
            next_worker,
            abort: CancellationToken::new(),
            closing: CancellationToken::new(),
            reloading: tokio::sync::Mutex::new(()),
        });
        let tracker = TaskTracker::new();
        let mut workers = workers.into_iter();
        for (handle, (direct, swaps)) in shared.slots.iter().zip(directs) {
            let worker = workers.next();
            if worker.is_some() {
                handle
                    .status
                    .transition(WorkerState::Ready, "started", &shared.life);
            }
            let slot = Slot {
                status: handle.status.clone(),
                shared: shared.clone(),
                queue: incoming.clone(),
                direct,
                requeue: queue.clone(),
                swaps,
            };
            tracker.spawn(slot.run(worker));
        }
        tracker.close();
        tokio::spawn(sweep(
            shared.store.clone(),
            sweep_every,
            shared.closing.clone(),
        ));
        tokio::spawn(timeline::sample_every_second(
            Arc::downgrade(&shared),
            shared.closing.clone(),
        ));
        Ok(Pool {
            inner: Arc::new(Inner {
                shared,
                queue,
                unserved: incoming,
                tracker,
            }),
        })
    }
}

/// The modules a zygote imports: `preload`, and with it the DSPy adapter when the workers
/// load it (it is fork-safe, and importing it in each forked worker would cost that worker
/// the adapter's import: ~6 ms of a replacement's start, more without bytecode files).
fn zygote_modules(config: &PoolConfig) -> Vec<String> {
    let mut modules = config.preload.clone();
    let adapter = sessions::DSPY_MODULE;
    if !modules.is_empty()
        && config.handlers.iter().any(|h| h == adapter)
        && !modules.iter().any(|m| m == adapter)
    {
        modules.push(adapter.to_owned());
    }
    modules
}

/// The longest wait the pool arms a timer for: a timeout or an interval longer than this
/// (up to `Duration::MAX`) is never reached.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `at + by`, with `by` cut to [`NEVER`] so that a duration too long to be reached means
/// "never" instead of overflowing the clock.
pub(crate) fn later(at: tokio::time::Instant, by: Duration) -> tokio::time::Instant {
    at + by.min(NEVER)
}

/// Removes expired sessions every `every` until the pool closes.
async fn sweep(store: Arc<dyn SessionStore>, every: Duration, closing: CancellationToken) {
    let every = every.min(NEVER);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = closing.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match store.sweep().await {
            Ok(0) => {}
            Ok(n) => telemetry::sessions_expired(n),
            Err(e) => tracing::warn!(error = %e, "the session sweep failed"),
        }
    }
}

/// The workers' extra environment: the configured variables, and DSPy's cache beside the
/// worker package unless `DSPY_CACHEDIR` is set (it would default to `~/.dspy_cache`).
fn worker_env(config: &PoolConfig, package: &std::path::Path) -> BTreeMap<String, String> {
    let mut env = config.env.clone();
    let cache_set = env.contains_key(DSPY_CACHE_VAR) || std::env::var_os(DSPY_CACHE_VAR).is_some();
    if let (false, Some(root)) = (cache_set, package.parent()) {
        let dir = root.join("dspy").to_string_lossy().into_owned();
        env.insert(DSPY_CACHE_VAR.to_owned(), dir);
    }
    env
}

const DSPY_CACHE_VAR: &str = "DSPY_CACHEDIR";

/// Whether a call's arguments must be checked for what the workers could not read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Readable {
    /// JSON from outside (an HTTP body, a caller's raw JSON or serde types): checked.
    Check,
    /// Written from a [`Value`], which holds only 64-bit integers, finite numbers and
    /// valid text: nothing to check.
    Known,
}

/// The most calls a queue may hold, as a multiple of `max_queue`: its live calls (at
/// most `max_queue`) and the calls given up (cancelled, timed out, their callers gone)
/// that no worker has reached yet to skip. Those hold no arguments, but are bounded too.
const QUEUE_ROOM: usize = 16;

/// The workers' `PYTHONPATH`: the embedded package first, then what the caller had.
fn python_path(package: PathBuf, config: &PoolConfig) -> OsString {
    let inherited = config
        .env
        .get("PYTHONPATH")
        .map(OsString::from)
        .or_else(|| std::env::var_os("PYTHONPATH"));
    let mut paths = vec![package];
    if let Some(inherited) = inherited {
        paths.extend(std::env::split_paths(&inherited));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

impl Pool {
    /// A builder with every setting at its default.
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

    /// Calls `command` with `args` and returns its result.
    ///
    /// # Errors
    /// See [`execute_with`](Self::execute_with).
    ///
    /// # Cancel safety
    /// Dropping the future cancels the call: before a worker takes it, it is removed from
    /// the queue; after, its worker is killed (a running call cannot be interrupted) and
    /// replaced, `cancelled` in the restarts.
    pub async fn execute(&self, command: &str, args: Value) -> Result<Value, Error> {
        self.execute_with(command, args, &CallOptions::default())
            .await?
            .value()
    }

    /// Calls `command` with `args` and `options`; the [`Reply`] says which worker answered.
    ///
    /// # Errors
    /// - `invalid_request`: `unknown_command`, `payload_too_large` (over the frame limit),
    ///   `malformed_request` (args cannot be serialised);
    /// - `resource/pool_saturated` (queue full), `timeout/queue_timeout`,
    ///   `timeout/execution_timeout` (the worker was killed and is being replaced);
    /// - `communication/worker_crashed` (with exit status and stderr tail);
    /// - `initialization/spawn_failing` at once, when no worker can serve and new ones
    ///   keep failing to start (with the last failure's stderr tail);
    /// - `resource/circuit_open` (the command's circuit breaker is open);
    /// - `invalid_request/invalid_request_id` (a bad or in-flight
    ///   [`CallOptions::request_id`]), `invalid_request/cancelled` ([`cancel`](Self::cancel));
    /// - `python/python_exception` (with `python_type` and `traceback`),
    ///   `python/result_not_serializable`, `resource/result_too_large`;
    /// - `system/shutting_down`.
    ///
    /// # Cancel safety
    /// As for [`execute`](Self::execute).
    pub async fn execute_with(
        &self,
        command: &str,
        args: Value,
        options: &CallOptions,
    ) -> Result<Reply, Error> {
        let args = serde_json::value::to_raw_value(&args)
            .map_err(|e| Error::new(ErrorKind::MalformedRequest, format!("args: {e}")))?;
        self.run_raw(command, args, options, Readable::Known).await
    }

    /// Calls `command` with any serialisable `args` and decodes the result into `R`.
    ///
    /// # Errors
    /// As [`execute_with`](Self::execute_with), plus `invalid_request/malformed_request`
    /// when `args` cannot be serialised and `invalid_request/result_type_mismatch` when
    /// the result does not fit `R`.
    pub async fn call<A, R>(&self, command: &str, args: &A) -> Result<R, Error>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.call_with(command, args, &CallOptions::default()).await
    }

    /// [`call`](Self::call) with options.
    ///
    /// # Errors
    /// As [`call`](Self::call).
    pub async fn call_with<A, R>(
        &self,
        command: &str,
        args: &A,
        options: &CallOptions,
    ) -> Result<R, Error>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let args = serde_json::value::to_raw_value(args)
            .map_err(|e| Error::new(ErrorKind::MalformedRequest, format!("args: {e}")))?;
        self.execute_raw(command, args, options).await?.decode()
    }

    /// Calls `command` with arguments that are already JSON (as an HTTP body carries them).
    ///
    /// # Errors
    /// As [`execute_with`](Self::execute_with).
    pub async fn execute_raw(
        &self,
        command: &str,
        args: Box<RawValue>,
        options: &CallOptions,
    ) -> Result<Reply, Error> {
        self.run_raw(command, args, options, Readable::Check).await
    }

    /// [`execute_raw`](Self::execute_raw), checking `args` as `readable` says.
    async fn run_raw(
        &self,
        command: &str,
        args: Box<RawValue>,
        options: &CallOptions,
        readable: Readable,
    ) -> Result<Reply, Error> {
        let started = Instant::now();
        let entered = self.enter(command, options.request_id.as_deref())?;
        let rid = entered.flight.rid.clone();
        let options = &CallOptions {
            request_id: Some(rid.to_string()),
            ..options.clone()
        };
        let known = self.knows(command);
        let label = if known { command } else { UNKNOWN_COMMAND };
        let tally = Tally {
            shared: &self.inner.shared,
            label,
            started,
            counted: false,
        };
        let outcome = match self.inner.shared.check_args(&args, readable) {
            Err(e) => Err(e),
            Ok(()) => {
                let work = async {
                    match options.session_id.as_deref() {
                        Some(session) if known => {
                            self.in_session(session, command, args, options).await
                        }
                        None if known && self.needs_session(command) => Err(Error::new(
                            ErrorKind::SessionRequired,
                            format!(
                                "{command:?} keeps its state in a session: call it with a session id"
                            ),
                        )),
                        _ => self.submit(command, known, args, options, None).await,
                    }
                };
                calls::running(entered.flight.clone(), work).await
            }
        };
        let outcome = outcome.map_err(|e| {
            e.with_context(|c| {
                c.command.get_or_insert_with(|| command.to_owned());
                c.request_id = Some(rid.to_string());
                if c.session_id.is_none() {
                    c.session_id.clone_from(&options.session_id);
                }
            })
        });
        tally.count(outcome.as_ref().err());
        drop(entered);
        outcome.map(|reply| Reply {
            request_id: rid,
            ..reply
        })
    }

    /// Calls `command` in the session `session_id` (created on first use, except by
    /// `cleanup_session`); see [`CallOptions::session_id`]. With the DSPy adapter
    /// loaded, its commands (`configure_lm`, `create_program`, `execute_program`,
    /// `list_programs`, `get_program_info`, `delete_program`, `cleanup_session`) keep
    /// their state here.
    ///
    /// # Errors
    /// As [`execute_with`](Self::execute_with), plus `invalid_request/invalid_id`,
    /// `session/quota_exceeded`, `session/program_not_found`,
    /// `session/session_not_found` (`cleanup_session` of a session that does not exist,
    /// or a session deleted while its `configure_lm` or `create_program` ran),
    /// `invalid_request/invalid_signature`, `python/lm_error` and, with
    /// [`Affinity::StrictFailFast`], `resource/worker_busy`.
    pub async fn execute_in_session(
        &self,
        session_id: &str,
        command: &str,
        args: Value,
        options: &CallOptions,
    ) -> Result<Reply, Error> {
        let options = options.clone().session_id(session_id);
        self.execute_with(command, args, &options).await
    }

    /// Admits one attempt of call `flight` into the queue (or, for a session, its
    /// worker's channel) and waits for its answer.
    async fn submit_once(
        &self,
        command: &str,
        known: bool,
        args: Box<RawValue>,
        options: &CallOptions,
        flight: Flight,
        target: Target<'_>,
    ) -> Result<Reply, Error> {
        let span = telemetry::request_span(&flight.rid, command, options.session_id.as_deref());
        let result = async {
            self.admit(command, known, args, options, flight, target)?
                .wait()
                .await
        }
        .instrument(span.clone())
        .await;
        telemetry::finished(&span, result.as_ref().err());
        result
    }

    /// Admits a call into the queue (or, for a session, its worker's channel); the
    /// returned [`Admitted`] waits for its answer.
    fn admit(
        &self,
        command: &str,
        known: bool,
        args: Box<RawValue>,
        options: &CallOptions,
        flight: Flight,
        target: Target<'_>,
    ) -> Result<Admitted, Error> {
        let Target {
            preferred,
            avoid,
            chunks,
            permit,
        } = target;
        let shared = &self.inner.shared;
        let queue = &self.inner.queue;
        if queue.is_closed() {
            return Err(shutting_down());
        }
        if !known {
            let mut names: Vec<&str> = self.command_names();
            names.sort_unstable();
            return Err(Error::new(
                ErrorKind::UnknownCommand,
                format!("no handler named {command:?} (known: {})", names.join(", ")),
            ));
        }
        let session_id = options.session_id.as_deref();
        let size = args.get().len()
            + command.len()
            + session_id.map_or(0, str::len)
            + flight.rid.len()
            + CALL_ENVELOPE_BYTES;
        let limit = shared.config.max_frame_bytes;
        if size > limit {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!("the call is {size} bytes, over the frame limit of {limit} bytes"),
            )
            .with_context(|c| c.limit_bytes = u64::try_from(limit).ok()));
        }
        if let Some(error) = shared.life.spawn_failing().filter(|_| !shared.serving()) {
            return Err(error);
        }
        let timeout = options.timeout.unwrap_or(shared.config.request_timeout);
        let queue_timeout = options.queue_timeout.unwrap_or(shared.config.queue_timeout);
        if !job::enter(&shared.queued, shared.config.max_queue) {
            return Err(Error::new(
                ErrorKind::PoolSaturated,
                format!(
                    "all workers are busy and the queue is full ({} calls waiting)",
                    shared.config.max_queue
                ),
            ));
        }
        let id = shared.next_request.fetch_add(1, Ordering::Relaxed);
        let cancel = flight.cancel.clone();
        // From here the job holds its place in `queued`, and gives it back however it ends.
        let (mut job, ticket, answer) = Job::new(
            shared.queued.clone(),
            id,
            flight,
            command,
            args,
            session_id,
            timeout,
        );
        job.chunks = chunks;
        job.guard(permit);
        let affinity = options.affinity.unwrap_or(shared.config.affinity);
        // A retry leaves the worker that failed it, whatever the session's affinity.
        let elsewhere = avoid.and_then(|w| shared.elsewhere(w));
        let session_slot = preferred
            .as_deref()
            .filter(|w| elsewhere.is_none() && avoid != Some(*w));
        let target = match session_slot.and_then(|w| shared.slot_running(w)) {
            Some(slot) => {
                let idle = slot.status.state() == WorkerState::Ready && slot.direct.is_empty();
                match affinity {
                    Affinity::StrictQueue => Some(slot),
                    _ if idle => Some(slot),
                    Affinity::StrictFailFast => {
                        return Err(Error::new(
                            ErrorKind::WorkerBusy,
                            format!(
                                "the session's worker {} is busy (affinity strict_fail_fast)",
                                preferred.as_deref().unwrap_or_default()
                            ),
                        ));
                    }
                    _ => None,
                }
            }
            None => None,
        };
        let target = elsewhere.or(target);
        job.preferred = preferred;
        let channel = target.map_or(queue.len(), |slot| slot.direct.len());
        if channel >= shared.config.max_queue.saturating_mul(QUEUE_ROOM) {
            return Err(Error::new(
                ErrorKind::PoolSaturated,
                format!(
                    "all workers are busy and the queue holds {channel} calls, most of them \
                     given up but not yet reached by a worker"
                ),
            ));
        }
        let sent = match target {
            Some(slot) => slot.direct.try_send(job).is_ok(),
            None => queue.try_send(job).is_ok(),
        };
        if !sent {
            return Err(shutting_down());
        }
        shared.relieve_pressure();
        Ok(Admitted {
            ticket,
            answer,
            queue_timeout,
            cancel,
        })
    }

    /// Counters and worker counts right now.
    pub fn stats(&self) -> PoolStats {
        let shared = &self.inner.shared;
        let counters = &shared.counters;
        let mut stats = PoolStats {
            queued: shared.queued.load(Ordering::Relaxed),
            requests: counters.requests.load(Ordering::Relaxed),
            errors: counters.errors.load(Ordering::Relaxed),
            queue_timeouts: counters.queue_timeouts.load(Ordering::Relaxed),
            restarts: shared.life.restarts(),
            spawn_failing: shared.life.spawn_breaker_open(),
            affinity_hits: counters.affinity_hits.load(Ordering::Relaxed),
            affinity_misses: counters.affinity_misses.load(Ordering::Relaxed),
            sessions: shared.store.stats(),
            retries: shared.resilience.retries(),
            breakers: shared.resilience.breakers(),
            ..PoolStats::default()
        };
        let mut in_service = 0;
        for slot in &shared.slots {
            match slot.status.state() {
                WorkerState::Ready => stats.available += 1,
                WorkerState::Busy => stats.busy += 1,
                WorkerState::Starting => stats.starting += 1,
                WorkerState::Degraded => stats.degraded += 1,
                WorkerState::Draining => stats.draining += 1,
                WorkerState::Stopped => continue,
            }
            in_service += 1;
        }
        // Once shut down, no slot is in service any more.
        stats.workers = if shared.closing.is_cancelled() {
            in_service
        } else {
            shared.life.live()
        };
        stats
    }

    /// The last ten minutes, one sample per second: calls finished ok and failed, their
    /// latency percentiles (queue wait + execution), queue depth and busy workers.
    pub fn timeline(&self) -> Timeline {
        self.inner.shared.timeline.timeline()
    }

    /// The last 50 errors calls ended with, oldest first: time, command, category, kind,
    /// message (cut to 300 characters) and the worker that failed the call.
    pub fn recent_errors(&self) -> Vec<RecentError> {
        self.inner.shared.timeline.recent_errors()
    }

    /// Every worker's id, pid, state, calls answered, RSS, age and how it was started. A
    /// slot out of service shows its last worker as `stopped`; one that never had a worker
    /// is left out.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.inner
            .shared
            .slots
            .iter()
            .filter_map(|s| s.status.info())
            .collect()
    }

    /// The pid of the zygote workers are forked from, while one is up (only with
    /// [`PoolConfig::preload`]).
    pub fn zygote_pid(&self) -> Option<u32> {
        self.inner.shared.launcher.zygote_pid()
    }

    /// The commands this pool answers, sorted: the handlers the workers announced and,
    /// with the DSPy adapter, the session commands the host serves itself.
    pub fn handlers(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .command_names()
            .into_iter()
            .map(str::to_owned)
            .collect();
        names.sort_unstable();
        names
    }

    fn command_names(&self) -> Vec<&str> {
        let shared = &self.inner.shared;
        let host = if shared.dspy {
            &sessions::HOST_COMMANDS[..]
        } else {
            &[]
        };
        shared
            .handlers
            .iter()
            .map(String::as_str)
            .chain(host.iter().copied())
            .collect()
    }

    fn knows(&self, command: &str) -> bool {
        let shared = &self.inner.shared;
        shared.handlers.contains(command)
            || (shared.dspy && sessions::HOST_COMMANDS.contains(&command))
    }

    /// The session store (sessions, their programs, global programs).
    pub fn sessions(&self) -> &Arc<dyn SessionStore> {
        &self.inner.shared.store
    }

    /// While new workers keep failing to start (the spawn breaker is open), the error
    /// that calls get when no worker can serve them: `initialization/spawn_failing`, with
    /// the last failure's message and stderr tail. `None` while workers start fine.
    pub fn spawn_failure(&self) -> Option<Error> {
        self.inner.shared.life.spawn_failing()
    }

    /// True while at least one worker can take calls (ready or busy).
    pub fn is_ready(&self) -> bool {
        self.inner
            .shared
            .slots
            .iter()
            .any(|s| matches!(s.status.state(), WorkerState::Ready | WorkerState::Busy))
    }

    /// The configuration the pool runs with.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.shared.config
    }

    /// Metrics in the Prometheus text format: requests, latency and execution time by
    /// command and outcome, queue wait and depth, workers by state, each worker's RSS, CPU
    /// time and calls, state transitions, restarts by reason, health checks, the spawn
    /// breaker, retries and circuit breakers, sessions and affinity.
    pub fn render_metrics(&self) -> String {
        let stats = self.stats();
        let mut out = String::with_capacity(4096);
        self.inner.shared.metrics.render(&mut out);
        metrics::header(
            &mut out,
            "pyherd_queue_depth",
            "gauge",
            "Calls waiting for a worker.",
        );
        let _ = writeln!(out, "pyherd_queue_depth {}", stats.queued);
        metrics::header(
            &mut out,
            "pyherd_queue_capacity",
            "gauge",
            "Most calls that may wait (max_queue).",
        );
        let _ = writeln!(out, "pyherd_queue_capacity {}", self.config().max_queue);
        metrics::header(
            &mut out,
            "pyherd_workers",
            "gauge",
            "Worker slots by state.",
        );
        for state in WorkerState::ALL {
            let n = self
                .inner
                .shared
                .slots
                .iter()
                .filter(|s| s.status.state() == state)
                .count();
            let _ = writeln!(out, "pyherd_workers{{state=\"{}\"}} {n}", state.as_str());
        }
        metrics::render_workers(&mut out, &self.workers());
        self.inner.shared.life.render(&mut out);
        self.inner.shared.resilience.render_metrics(&mut out);
        render_session_metrics(&mut out, &stats);
        out
    }

    /// This pool's run id (16 hex digits): every worker carries it as `--run-id` and in
    /// `PYHERD_RUN_ID` (see [`crate::registry`]).
    pub fn run_id(&self) -> &str {
        self.inner.shared.launcher.spec().run.id()
    }

    /// The run's registry file, `<state_dir>/runs/<run_id>.json`; `None` when it could
    /// not be written (a warning was logged and the pool runs without it).
    pub fn registry_file(&self) -> Option<&std::path::Path> {
        self.inner.shared.launcher.spec().run.file()
    }

    /// Shuts down with the configured grace period; see [`shutdown_with`](Self::shutdown_with).
    pub async fn shutdown(&self) {
        self.shutdown_with(self.inner.shared.config.shutdown_grace)
            .await;
    }

    /// Stops admitting calls (new ones fail with `system/shutting_down`), lets admitted
    /// calls finish for up to `grace`, then stops every worker: EOF on its request pipe,
    /// SIGTERM to its process group after `kill_timeout`, SIGKILL after another. Calls
    /// still waiting for a worker then get `system/shutting_down`. Every worker process
    /// is reaped before this returns, and the run's guardian (see [`crate::registry`]) is
    /// told to exit. Calling it again waits for the same end.
    pub async fn shutdown_with(&self, grace: Duration) {
        let inner = &self.inner;
        inner.queue.close();
        inner.shared.closing.cancel();
        if tokio::time::timeout(grace, inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "shutdown grace period over: killing workers"
            );
            inner.shared.abort.cancel();
            inner.tracker.wait().await;
        }
        while let Ok(job) = inner.unserved.try_recv() {
            job.answer(Err(shutting_down()));
        }
        inner.shared.launcher.stop().await;
        inner.shared.launcher.spec().run.end();
    }
}

fn render_session_metrics(out: &mut String, stats: &PoolStats) {
    let sessions = &stats.sessions;
    metrics::header(out, "pyherd_sessions", "gauge", "Live sessions.");
    let _ = writeln!(out, "pyherd_sessions {}", sessions.live);
    for (name, help, value) in [
        (
            "pyherd_sessions_created_total",
            "Sessions created.",
            sessions.created,
        ),
        (
            "pyherd_sessions_expired_total",
            "Sessions removed because their TTL passed.",
            sessions.expired,
        ),
        (
            "pyherd_sessions_deleted_total",
            "Sessions deleted by a caller.",
            sessions.deleted,
        ),
    ] {
        metrics::header(out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
    }
    metrics::header(
        out,
        "pyherd_global_programs",
        "gauge",
        "Global programs stored.",
    );
    let _ = writeln!(out, "pyherd_global_programs {}", sessions.global_programs);
    metrics::header(
        out,
        "pyherd_session_affinity_total",
        "counter",
        "Session calls that ran on the worker the session preferred (hit) or on another (miss).",
    );
    let _ = writeln!(
        out,
        "pyherd_session_affinity_total{{result=\"hit\"}} {}",
        stats.affinity_hits
    );
    let _ = writeln!(
        out,
        "pyherd_session_affinity_total{{result=\"miss\"}} {}",
        stats.affinity_misses
    );
}

/// Where an admitted call goes: `preferred` is the worker its session served on last,
/// `avoid` the worker that failed its previous attempt; `chunks` takes a stream's chunks.
struct Target<'a> {
    preferred: Option<Arc<str>>,
    avoid: Option<&'a str>,
    chunks: Option<tokio::sync::mpsc::Sender<Box<RawValue>>>,
    /// The command's breaker permit: the job records its outcome (see [`Job::answer`]).
    permit: Option<Permit>,
}

/// A call in a queue, waiting for its answer.
struct Admitted {
    ticket: job::Ticket,
    answer: tokio::sync::oneshot::Receiver<Result<Reply, Error>>,
    queue_timeout: Duration,
    cancel: CancellationToken,
}

impl Admitted {
    /// Waits for the answer, giving the call up when the queue timeout passes or the call
    /// is cancelled before a worker takes it (a worker that took it answers the cancel).
    ///
    /// # Cancel safety
    /// Dropping it before a worker takes the call leaves the job to be skipped.
    async fn wait(self) -> Result<Reply, Error> {
        let Self {
            ticket,
            mut answer,
            queue_timeout,
            cancel,
        } = self;
        let answer = tokio::select! {
            biased;
            answer = &mut answer => answer,
            () = cancel.cancelled() => {
                if ticket.abandon() {
                    return Err(cancelled());
                }
                answer.await
            }
            () = tokio::time::sleep(queue_timeout) => {
                if ticket.abandon() {
                    let ms = u64::try_from(queue_timeout.as_millis()).unwrap_or(u64::MAX);
                    return Err(Error::new(
                        ErrorKind::QueueTimeout,
                        format!("no worker became free within {ms} ms"),
                    )
                    .with_context(|c| c.timeout_ms = Some(ms)));
                }
                // A worker took the call at the last moment: it enforces the execution
                // timeout and answers a cancel.
                answer.await
            }
        };
        answer.unwrap_or_else(|_| Err(shutting_down()))
    }
}

/// A plain call's place in the stats, metrics and timeline: counted once, when it ends,
/// or as `cancelled` when its future is dropped before (its caller gone), as a stream is.
struct Tally<'a> {
    shared: &'a Shared,
    label: &'a str,
    started: Instant,
    counted: bool,
}

impl Tally<'_> {
    fn count(mut self, error: Option<&Error>) {
        self.shared.count(self.label, error, self.started);
        self.counted = true;
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        if !self.counted {
            self.shared
                .count(self.label, Some(&cancelled()), self.started);
        }
    }
}

/// What the caller of a cancelled call gets.
pub(crate) fn cancelled() -> Error {
    Error::new(ErrorKind::Cancelled, "the call was cancelled")
}

pub(crate) fn shutting_down() -> Error {
    Error::new(ErrorKind::ShuttingDown, "the pool is shutting down")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::SessionSpec;

    #[tokio::test]
    async fn the_kill_timeout_is_a_builder_setting_checked_at_build() {
        let builder = Pool::builder().kill_timeout(Duration::from_millis(250));
        assert_eq!(builder.config.kill_timeout, Duration::from_millis(250));
        let Err(e) = builder.kill_timeout(Duration::ZERO).build().await else {
            panic!("a zero kill_timeout was accepted");
        };
        assert_eq!(e.kind(), &ErrorKind::InvalidConfig);
        assert!(e.message().contains("kill_timeout"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweep_runs_on_its_interval_until_the_pool_closes() {
        let store: Arc<dyn SessionStore> =
            Arc::new(MemoryStore::new(Duration::from_secs(10), 100).unwrap());
        store.create(SessionSpec::new().id("a")).await.unwrap();
        let closing = CancellationToken::new();
        let sweeping = tokio::spawn(sweep(
            store.clone(),
            Duration::from_secs(60),
            closing.clone(),
        ));
        // Expired at 10 s, invisible from then on, and removed by the first sweep at 60 s.
        tokio::time::sleep(Duration::from_secs(59)).await;
        let stats = store.stats();
        assert_eq!((stats.live, stats.expired), (0, 0));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(store.stats().expired, 1);
        store.create(SessionSpec::new().id("b")).await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(store.stats().expired, 2);
        closing.cancel();
        tokio::time::timeout(Duration::from_secs(1), sweeping)
            .await
            .expect("the sweep ends when the pool closes")
            .unwrap();
    }
}
