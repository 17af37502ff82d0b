//! Starting a worker: forked from the zygote when `preload` is set and the zygote is up,
//! spawned as a fresh interpreter otherwise.
//!
//! The zygote is kept by one task: started when the pool is built, restarted with
//! backoff when it dies (its forked workers die with it and are replaced). While it is
//! down, or when it cannot fork, workers are spawned. When a preload module fails to
//! import, or the modules leave a thread running (a fork would copy only one thread, so
//! it is unsafe), the zygote is not retried (a new one would fail the same way): the
//! failure is logged as a warning with the Python error, and every worker is spawned.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::exit::{ExitWatch, StartedBy};
use super::process::{HostPipes, LaunchSpec, Launched, WorkerProcess, spawn_error, worker_args};
use super::spawner::Spawner;
use super::stderr::{self, StderrTail};
use super::zygote::{ForkError, StartError, Zygote, ZygoteLink};
use crate::error::Error;

/// First wait before restarting a zygote that died or could not start; doubles up to the max.
const RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A zygote that lived this long restarts after the shortest wait again.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Starts the pool's workers; fixed when the pool is built, but for the zygote, which a
/// reload replaces (see [`Launcher::renew_zygote`]).
pub(crate) struct Launcher {
    spec: Arc<LaunchSpec>,
    spawner: Spawner,
    preload: Vec<String>,
    /// The zygote workers are forked from (`None` without `preload`).
    zygote: Mutex<Option<Arc<Keeper>>>,
    /// Zygotes a reload replaced, kept while workers forked from them still run: each
    /// ends with the last of them.
    retired: Mutex<Vec<Arc<Keeper>>>,
}

/// A keeper's part in the pool: the zygote workers are forked from...
const IN_USE: u8 = 0;
/// ...one a reload replaced, kept while workers forked from it live...
const RETIRED: u8 = 1;
/// ...or one being ended. Retired to ending, or back in use (a reload undone), is decided
/// by one compare-and-swap, so only one of the two happens.
const ENDING: u8 = 2;

/// The task keeping the zygote, and the zygote it currently has.
struct Keeper {
    current: Arc<Mutex<Option<Arc<ZygoteLink>>>>,
    /// Workers forked from it, or being forked: ending the zygote would end them too
    /// (each holds a [`ForkHold`]: counted up before a fork, down when the fork fails or
    /// the worker has ended).
    forks: AtomicUsize,
    /// `IN_USE`, `RETIRED` or `ENDING`.
    role: AtomicU8,
    /// Cancelled to end the task: it kills and reaps the zygote.
    stop: CancellationToken,
    /// Taken by the first [`stop`](Keeper::stop), which holds the lock until the task
    /// has ended: a later one waits for it.
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Keeper {
    fn drop(&mut self) {
        // Without `stop` (the pool was dropped): dropping the task drops the zygote, which
        // kills it.
        if let Some(task) = self.task.get_mut().take() {
            task.abort();
        }
    }
}

impl Keeper {
    /// Starts the task keeping a zygote; returns once its first attempt is over, with
    /// that attempt's failure if it failed.
    ///
    /// # Cancel safety
    /// Cancel safe: the task and its zygote end with the keeper.
    async fn start(zygotes: Zygotes) -> (Self, Option<Error>) {
        let current = Arc::default();
        let stop = CancellationToken::new();
        let (first, first_over) = oneshot::channel();
        let task = tokio::spawn(keep(zygotes, Arc::clone(&current), stop.clone(), first));
        let keeper = Self {
            current,
            forks: AtomicUsize::new(0),
            role: AtomicU8::new(IN_USE),
            stop,
            task: tokio::sync::Mutex::new(Some(task)),
        };
        let failure = first_over.await.ok().flatten();
        (keeper, failure)
    }

    /// The zygote, while it is up.
    fn link(&self) -> Option<Arc<ZygoteLink>> {
        let current = self.current.lock().ok()?;
        current.as_ref().filter(|link| link.is_up()).cloned()
    }

    /// One worker forked from it, or being forked, is gone (its hold released): a
    /// retired zygote with none left ends. One retired while this runs is ended by the
    /// reload's [`Launcher::end_retired_zygotes`] instead.
    fn release(self: &Arc<Self>) {
        if self.forks.fetch_sub(1, Ordering::SeqCst) == 1 && self.to(RETIRED, ENDING) {
            self.stop_soon();
        }
    }

    /// Whether a retired zygote ends now: no worker forked from it is left (it is then
    /// moved to ending), or it is ending already.
    fn ends(&self) -> bool {
        let unused = self.forks.load(Ordering::SeqCst) == 0;
        (unused && self.to(RETIRED, ENDING)) || self.role.load(Ordering::SeqCst) == ENDING
    }

    /// Moves it from role `from` to `to`; false if it was not in `from`.
    fn to(&self, from: u8, to: u8) -> bool {
        self.role
            .compare_exchange(from, to, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Ends the task in the background (from a drop, which cannot wait). Without a
    /// runtime, the zygote ends with the keeper.
    fn stop_soon(self: &Arc<Self>) {
        self.stop.cancel();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let keeper = self.clone();
            runtime.spawn(async move { keeper.stop().await });
        }
    }

    /// Ends the task: the zygote is killed and reaped (and with it any worker it forked).
    /// Returns once it has, whoever asked first.
    async fn stop(&self) {
        self.stop.cancel();
        let mut task = self.task.lock().await;
        if let Some(running) = task.as_mut() {
            let _ = running.await;
            *task = None;
        }
    }
}

impl Launcher {
    /// A launcher; with `preload`, it starts the zygote and returns once that first
    /// attempt is over (the zygote is ready, or workers will be spawned for now).
    pub(crate) async fn new(spec: LaunchSpec, spawner: Spawner, preload: Vec<String>) -> Self {
        let mut launcher = Self {
            spec: Arc::new(spec),
            spawner,
            preload,
            zygote: Mutex::default(),
            retired: Mutex::default(),
        };
        if !launcher.preload.is_empty() {
            // A failed first attempt was logged; the keeper retries unless preload failed.
            let (keeper, _) = Keeper::start(launcher.zygotes()).await;
            launcher.zygote = Mutex::new(Some(Arc::new(keeper)));
        }
        launcher
    }

    fn zygotes(&self) -> Zygotes {
        Zygotes {
            spec: self.spec.clone(),
            spawner: self.spawner.clone(),
            preload: self.preload.clone(),
        }
    }

    fn keeper(&self) -> Option<Arc<Keeper>> {
        self.zygote.lock().ok()?.clone()
    }

    /// With `preload`, starts a new zygote (which imports the preload modules anew) and
    /// forks later workers from it; the old one is retired, kept until the last worker
    /// forked from it is gone (see [`end_retired_zygotes`](Self::end_retired_zygotes)).
    /// Returns whether a zygote was renewed.
    ///
    /// # Errors
    /// When the new zygote does not get ready (a preload module raised at import, it
    /// timed out, it died): it is stopped and the old one stays.
    ///
    /// # Cancel safety
    /// Cancel safe: a new zygote not yet in use is killed.
    pub(crate) async fn renew_zygote(&self) -> Result<bool, Error> {
        if self.preload.is_empty() {
            return Ok(false);
        }
        let (keeper, failure) = Keeper::start(self.zygotes()).await;
        if let Some(error) = failure {
            keeper.stop().await;
            return Err(error);
        }
        let old = self
            .zygote
            .lock()
            .ok()
            .and_then(|mut current| current.replace(Arc::new(keeper)));
        if let (Some(old), Ok(mut retired)) = (old, self.retired.lock()) {
            old.role.store(RETIRED, Ordering::SeqCst);
            retired.push(old);
        }
        Ok(true)
    }

    /// Undoes the last [`renew_zygote`](Self::renew_zygote), for a reload that failed
    /// before it replaced a worker: the new zygote is ended and the one it replaced forks
    /// workers again, so failed reloads do not pile zygotes up. Nothing is undone while a
    /// worker forked from the new zygote lives or is being forked (ending it would end
    /// that worker), or once the old one is ending (its last worker gone meanwhile).
    pub(crate) async fn restore_zygote(&self) {
        let renewed = {
            let (Ok(mut current), Ok(mut retired)) = (self.zygote.lock(), self.retired.lock())
            else {
                return;
            };
            if current
                .as_ref()
                .is_none_or(|keeper| keeper.forks.load(Ordering::SeqCst) > 0)
            {
                return;
            }
            if !retired.last().is_some_and(|old| old.to(RETIRED, IN_USE)) {
                return;
            }
            retired.pop().and_then(|old| current.replace(old))
        };
        if let Some(renewed) = renewed {
            renewed.stop().await;
        }
    }

    /// Ends the zygotes a reload replaced that no worker forked from them uses any more;
    /// the others end with their last worker.
    pub(crate) async fn end_retired_zygotes(&self) {
        let ending = self.retired.lock().map_or_else(
            |_| Vec::new(),
            |mut retired| {
                let (ending, kept) = std::mem::take(&mut *retired)
                    .into_iter()
                    .partition(|keeper: &Arc<Keeper>| keeper.ends());
                *retired = kept;
                ending
            },
        );
        for keeper in ending {
            keeper.stop().await;
        }
    }

    /// Ends the zygote and those a reload replaced (killed and reaped) for good; workers
    /// started later are spawned.
    pub(crate) async fn stop(&self) {
        let retired = self
            .retired
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default();
        for keeper in retired.iter().chain(self.keeper().as_ref()) {
            keeper.stop().await;
        }
    }

    /// What every worker is started with.
    pub(crate) fn spec(&self) -> &LaunchSpec {
        &self.spec
    }

    /// The zygote's pid while one is up.
    pub(crate) fn zygote_pid(&self) -> Option<u32> {
        self.keeper()?.link().map(|link| link.pid())
    }

    /// Starts worker `id` and waits for its `hello`: a fork from the zygote when it is up
    /// and forks, a spawn otherwise.
    ///
    /// # Errors
    /// As [`WorkerProcess::start`].
    ///
    /// # Cancel safety
    /// Cancel safe: a process started for a dropped call is killed.
    pub(crate) async fn start(&self, id: Arc<str>) -> Result<WorkerProcess, Error> {
        let keeper = self.keeper();
        if let Some((keeper, link)) = keeper.and_then(|k| k.link().map(|link| (k, link))) {
            // Dropped with the fork that failed (or the call), it releases the zygote.
            let hold = ForkHold::new(keeper);
            match fork(&self.spec, &link, id.clone()).await {
                Ok(Ok(mut worker)) => {
                    worker.forked_from(hold);
                    return Ok(worker);
                }
                Ok(Err(e)) => return Err(e),
                Err(ForkError::Lost(why)) => {
                    tracing::warn!(worker = %id, why, "the zygote is lost: this worker is spawned");
                }
                Err(ForkError::Refused(why)) => {
                    tracing::warn!(worker = %id, why, "the zygote could not fork: this worker is spawned");
                }
            }
        }
        WorkerProcess::start(&self.spec, &self.spawner, id).await
    }
}

/// A worker forked from a zygote, or being forked, holds it until it has ended and been
/// reaped (by that zygote): a retired zygote ends once no hold on it is left.
pub(crate) struct ForkHold(Arc<Keeper>);

impl ForkHold {
    fn new(keeper: Arc<Keeper>) -> Self {
        keeper.forks.fetch_add(1, Ordering::SeqCst);
        Self(keeper)
    }
}

impl Drop for ForkHold {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Forks worker `id` from the zygote; `Err` when it should be spawned instead.
async fn fork(
    spec: &LaunchSpec,
    link: &ZygoteLink,
    id: Arc<str>,
) -> Result<Result<WorkerProcess, Error>, ForkError> {
    let began = Instant::now();
    let refused = |e: Error| ForkError::Refused(e.message().to_owned());
    let (host, [requests, replies]) = HostPipes::new().map_err(refused)?;
    let (err_read, err_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| refused(spawn_error(format!("cannot create a pipe: {e}"))))?;
    let err_read = pipe::Receiver::from_owned_fd(err_read)
        .map_err(|e| refused(spawn_error(format!("cannot register a pipe: {e}"))))?;
    let forked = link
        .fork(&id, &worker_args(spec, &id), [requests, replies, err_write])
        .await?;
    let tail = Arc::new(StderrTail::default());
    let stderr_task = stderr::drain(err_read, id.clone(), forked.pid, tail.clone());
    let launched = Launched {
        pid: forked.pid,
        exit: ExitWatch::Forked {
            pid: forked.pid,
            report: Some(forked.exit),
        },
        tail,
        stderr_task,
        started_by: StartedBy::Fork,
        began,
    };
    Ok(WorkerProcess::handshake(spec, id, host, launched).await)
}

/// What a zygote is started from.
struct Zygotes {
    spec: Arc<LaunchSpec>,
    spawner: Spawner,
    preload: Vec<String>,
}

/// Keeps a zygote up until `stop`: starts it, waits for it to be lost, restarts it with
/// backoff. Says when the first attempt is over on `first`, with its failure if it failed.
async fn keep(
    zygotes: Zygotes,
    current: Arc<Mutex<Option<Arc<ZygoteLink>>>>,
    stop: CancellationToken,
    first: oneshot::Sender<Option<Error>>,
) {
    let set = |link: Option<Arc<ZygoteLink>>| {
        if let Ok(mut current) = current.lock() {
            *current = link;
        }
    };
    let mut first = Some(first);
    let mut delay = RESTART_BACKOFF_MIN;
    loop {
        let outcome = tokio::select! {
            outcome = Zygote::start(&zygotes.spec, &zygotes.spawner, &zygotes.preload) => outcome,
            () = stop.cancelled() => return,
        };
        let up = Instant::now();
        let error = match outcome {
            Ok(zygote) => {
                set(Some(zygote.link()));
                if let Some(first) = first.take() {
                    let _ = first.send(None);
                }
                let lost = zygote.lost(&stop).await;
                set(None);
                let Some(error) = lost else { return };
                if up.elapsed() >= STABLE_AFTER {
                    delay = RESTART_BACKOFF_MIN;
                }
                error
            }
            Err(StartError::Preload(error)) => {
                if let Some(first) = first.take() {
                    let _ = first.send(Some(error.clone()));
                }
                tracing::warn!(error = %error, traceback = error.context().traceback.as_deref().unwrap_or(""),
                    "preload failed: no zygote, every worker is spawned");
                return;
            }
            Err(StartError::Failed(error)) => error,
        };
        if let Some(first) = first.take() {
            let _ = first.send(Some(error.clone()));
        }
        tracing::warn!(error = %error, exit = error.context().exit_status.as_deref().unwrap_or("unknown"),
            retry_in_ms = delay.as_millis() as u64,
            "no zygote: workers are spawned until it is restarted");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => return,
        }
        delay = (delay * 2).min(RESTART_BACKOFF_MAX);
    }
}
