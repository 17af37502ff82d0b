//! One worker slot: a task that owns its Python process, takes calls from the shared
//! queue one at a time, and replaces the process when it dies or must be killed.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tracing::Instrument;

use super::job::Job;
use super::lifecycle::{RestartReason, SPAWN_BACKOFF_MAX, SPAWN_BACKOFF_MIN};
use super::recycle;
use super::reload::Swap;
use super::stats::{SlotStatus, bump};
use super::{Reply, Shared, shutting_down};
use crate::error::{Error, ErrorKind};
use crate::policy;
use crate::protocol::{Call, CallMeta};
use crate::telemetry;
use crate::worker::{CallResult, WorkerProcess, WorkerState};

pub(crate) struct Slot {
    pub(crate) status: Arc<SlotStatus>,
    pub(crate) shared: Arc<Shared>,
    /// The pool's FIFO queue.
    pub(crate) queue: async_channel::Receiver<Job>,
    /// Calls sent to this slot's worker by session affinity; served before the queue.
    pub(crate) direct: async_channel::Receiver<Job>,
    /// The pool's queue, to hand back affinity calls when this slot's worker is lost.
    pub(crate) requeue: async_channel::Sender<Job>,
    /// Replacement workers from a reload, taken between calls.
    pub(crate) swaps: async_channel::Receiver<Swap>,
}

/// Why `serve` returned.
pub(super) enum Ending {
    /// The worker is gone or retired; start another.
    Replace(RestartReason),
    /// The worker was idle past `idle_timeout_s` with more than `min_workers` in service:
    /// the slot leaves service until the pool grows again.
    Park,
    /// The pool is shutting down; the slot ends.
    Stop,
    /// A reload brought a replacement: the worker was drained, the new one takes over.
    Reload(Box<Swap>),
}

impl Slot {
    /// Serves until the pool shuts down, replacing the worker whenever it is lost or
    /// retired. `first` is the slot's worker from the pool's start; `None` parks the
    /// slot until the pool grows.
    pub(crate) async fn run(self, first: Option<WorkerProcess>) {
        let mut next = match first {
            Some(worker) => Some(worker),
            None => self.unpark().await,
        };
        while let Some(mut worker) = next.take() {
            next = match self.serve(&mut worker).await {
                Ending::Stop => None,
                Ending::Replace(reason) => {
                    self.hand_back();
                    // A reload's replacement waiting for the slot takes the place at once.
                    match self.swaps.try_recv() {
                        Ok(swap) => Some(self.install(swap, &worker, reason)),
                        Err(_) => self.respawn(Some(reason)).await,
                    }
                }
                Ending::Park => {
                    self.hand_back();
                    self.unpark().await
                }
                Ending::Reload(swap) => Some(self.install(*swap, &worker, RestartReason::Reload)),
            };
        }
        self.refuse_swaps();
        self.direct.close();
        while let Ok(job) = self.direct.try_recv() {
            job.answer(Err(shutting_down()));
        }
        self.go(WorkerState::Stopped, "shutdown");
    }

    /// Waits out of service, then starts a worker; `None` once the pool is going away.
    async fn unpark(&self) -> Option<WorkerProcess> {
        if self.park().await {
            self.respawn(None).await
        } else {
            None
        }
    }

    /// Moves this slot's worker to `to` (see [`SlotStatus::transition`]).
    pub(super) fn go(&self, to: WorkerState, reason: &str) {
        self.status.transition(to, reason, &self.shared.life);
    }

    /// The worker is lost or takes no new work: calls that waited for it go back to the
    /// pool's queue, where any worker can serve them (their session loses nothing, it
    /// lives in the host).
    pub(super) fn hand_back(&self) {
        while let Ok(job) = self.direct.try_recv() {
            if let Err(refused) = self.requeue.try_send(job) {
                refused.into_inner().answer(Err(shutting_down()));
            }
        }
    }

    /// Drains an idle worker: it takes no new work, is stopped politely and reaped.
    pub(super) async fn retire(&self, worker: &mut WorkerProcess, reason: &str) {
        self.go(WorkerState::Draining, reason);
        self.hand_back();
        let exit = worker.stop(self.shared.config.kill_timeout).await;
        tracing::debug!(worker = %worker.id(), exit = exit.as_deref().unwrap_or("unknown"), reason, "worker stopped");
        self.go(WorkerState::Stopped, reason);
    }

    async fn serve(&self, worker: &mut WorkerProcess) -> Ending {
        let shared = &self.shared;
        let limit = recycle::request_limit(shared.config.max_requests, worker.id());
        let mut idle_since = Instant::now();
        let mut checked = idle_since;
        loop {
            let wake = self.next_check(worker, idle_since, checked);
            let job = tokio::select! {
                biased;
                () = shared.abort.cancelled() => {
                    worker.kill().await;
                    self.go(WorkerState::Stopped, "aborted");
                    return Ending::Stop;
                }
                fault = worker.idle_fault() => {
                    let error = worker.crashed(fault).await;
                    tracing::warn!(worker = %worker.id(), %error, "worker lost while idle");
                    self.go(WorkerState::Stopped, "crashed");
                    return Ending::Replace(RestartReason::Crashed);
                }
                Ok(swap) = self.swaps.recv() => {
                    self.retire(worker, RestartReason::Reload.as_str()).await;
                    return Ending::Reload(Box::new(swap));
                }
                Ok(job) = self.direct.recv() => job,
                job = self.queue.recv() => match job {
                    Ok(job) => job,
                    // Affinity calls admitted before the shutdown are still served.
                    Err(_) if !self.direct.is_empty() => continue,
                    // Closed and drained: the pool is shutting down.
                    Err(_) => {
                        self.retire(worker, "shutdown").await;
                        return Ending::Stop;
                    }
                },
                // An async block: the timer is only made when no job was ready at once.
                () = async { tokio::time::sleep_until(wake).await } => {
                    match self.idle_check(worker, &mut idle_since, &mut checked).await {
                        Some(ending) => return ending,
                        None => continue,
                    }
                }
            };
            let Some(args) = job.take() else {
                continue;
            };
            if let Some(preferred) = &job.preferred {
                let counter = if preferred == worker.id() {
                    &shared.counters.affinity_hits
                } else {
                    &shared.counters.affinity_misses
                };
                bump(counter);
            }
            let waited = job.admitted.elapsed();
            telemetry::taken(&job.span, worker.id(), waited);
            shared.metrics.waited(waited);
            self.go(WorkerState::Busy, "call");
            // Calls admitted while this worker was still idle saw no pressure.
            shared.relieve_pressure();
            let span = job.span.clone();
            if let Some(ending) = self
                .run_job(worker, job, &args, limit)
                .instrument(span)
                .await
            {
                return ending;
            }
            idle_since = Instant::now();
            checked = idle_since;
        }
    }

    /// Runs one call, of arguments `args`; `Some` when the worker cannot go on.
    async fn run_job(
        &self,
        worker: &mut WorkerProcess,
        job: Job,
        args: &RawValue,
        request_limit: Option<u64>,
    ) -> Option<Ending> {
        let deadline_ms = SystemTime::now()
            .checked_add(job.timeout)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(u64::MAX, |d| {
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
            });
        let meta = CallMeta {
            id: job.id,
            rid: &job.flight.rid,
            session_id: job.session_id.as_deref(),
            deadline_ms,
            stream: job.chunks.is_some(),
        };
        let call = Call::new(&job.command, args, meta);
        let frame = match serde_json::to_vec(&call) {
            Ok(body) => Bytes::from(body),
            Err(e) => {
                self.go(WorkerState::Ready, "call_refused");
                job.answer(Err(Error::new(
                    ErrorKind::MalformedRequest,
                    format!("cannot encode the call: {e}"),
                )));
                return None;
            }
        };
        // Admission estimated the size; escaping (of a session id, say) can add to it. A
        // frame the codec would refuse must not reach the pipe, or the worker would be lost.
        let limit = self.shared.config.max_frame_bytes;
        if frame.len() > limit {
            let error = Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "the call is {} bytes once encoded, over the frame limit of {limit} bytes",
                    frame.len()
                ),
            )
            .with_context(|c| c.limit_bytes = u64::try_from(limit).ok());
            self.go(WorkerState::Ready, "call_refused");
            job.answer(Err(error));
            return None;
        }
        if job.chunks.is_some() {
            return self.run_stream(worker, job, frame, request_limit).await;
        }
        let started = Instant::now();
        let outcome = worker
            .call(
                frame,
                job.id,
                super::later(started, job.timeout),
                &self.shared.abort,
                &job.flight.cancel,
            )
            .await;
        self.conclude(worker, job, outcome, started.elapsed(), request_limit)
            .await
    }

    /// `job` ended on `worker` after `ran` (plain call or stream): recorded in its span
    /// and the metrics, then the caller hears back and the worker serves on, is recycled
    /// or is replaced. `Some` when the worker cannot go on.
    pub(super) async fn conclude(
        &self,
        worker: &mut WorkerProcess,
        job: Job,
        outcome: CallResult,
        ran: Duration,
        request_limit: Option<u64>,
    ) -> Option<Ending> {
        let label = match &outcome {
            CallResult::Answered(Ok(_)) => "ok",
            CallResult::Answered(Err(e)) | CallResult::Failed(e) => e.kind().as_str(),
            CallResult::TimedOut => "execution_timeout",
            CallResult::Aborted => "shutting_down",
            CallResult::Cancelled => "cancelled",
        };
        self.executed(&job, ran, label);
        match outcome {
            CallResult::Answered(Ok(result)) => {
                let reply = Reply {
                    result,
                    worker_id: worker.id().clone(),
                    duration: ran,
                    request_id: job.flight.rid.clone(),
                };
                self.answered(worker, job, Ok(reply), request_limit).await
            }
            CallResult::Answered(Err(error)) => {
                let error = self.with_limit(error);
                self.failed(worker, job, error, request_limit).await
            }
            CallResult::TimedOut => self.timed_out(worker, job, request_limit).await,
            CallResult::Aborted => Some(self.aborted(worker, job).await),
            CallResult::Cancelled => {
                let error = super::cancelled();
                self.failed(worker, job, error, request_limit).await
            }
            CallResult::Failed(error) => {
                tracing::warn!(worker = %worker.id(), error = %error, "worker lost during a call");
                self.failed(worker, job, error, request_limit).await
            }
        }
    }

    /// A worker's `result_too_large` with the frame limit it was over, as the host's own
    /// `payload_too_large` has it.
    fn with_limit(&self, error: Error) -> Error {
        if error.kind() != &ErrorKind::ResultTooLarge {
            return error;
        }
        let limit = u64::try_from(self.shared.config.max_frame_bytes).ok();
        error.with_context(|c| c.limit_bytes = limit)
    }

    /// `job`'s time on its worker and how it ended there (`ok` or an error kind), in its
    /// span and the metrics.
    pub(super) fn executed(&self, job: &Job, ran: Duration, outcome: &str) {
        telemetry::executed(&job.span, ran, outcome);
        self.shared.metrics.executed(&job.command, outcome, ran);
    }

    /// `job` failed with `error` on `worker`, and the recovery table
    /// ([`policy::action`]) decides what becomes of the worker: one it replaces for this
    /// kind (the worker died, ran past the timeout, or still runs a cancelled call) is
    /// stopped, killed right after the caller hears back (if it still runs), then
    /// replaced; one it keeps answered the call and serves on, as after a result. `Some`
    /// when the worker cannot go on.
    pub(super) async fn failed(
        &self,
        worker: &mut WorkerProcess,
        job: Job,
        error: Error,
        request_limit: Option<u64>,
    ) -> Option<Ending> {
        if !policy::action(error.kind()).replace_worker {
            return self.answered(worker, job, Err(error), request_limit).await;
        }
        let reason = RestartReason::after(error.kind());
        self.go(WorkerState::Stopped, reason.as_str());
        job.answer(Err(on_worker(error, worker)));
        worker.kill().await;
        Some(Ending::Replace(reason))
    }

    /// A worker answered `job` (a result or a Python-side error) and is fine: the caller
    /// hears back, then the worker is recycled if its time has come; `Some` if it was.
    pub(super) async fn answered(
        &self,
        worker: &mut WorkerProcess,
        job: Job,
        answer: Result<Reply, Error>,
        request_limit: Option<u64>,
    ) -> Option<Ending> {
        // The next state before the caller hears back, so stats read after an answer are
        // current.
        let served = self.status.served();
        let retire = self.recycle_reason(worker, served, request_limit);
        match retire {
            Some(reason) => self.go(WorkerState::Draining, reason.as_str()),
            None => self.go(WorkerState::Ready, "answered"),
        }
        job.answer(answer.map_err(|e| on_worker(e, worker)));
        let reason = retire?;
        self.hand_back();
        telemetry::worker_recycled(worker.id(), worker.pid(), reason.as_str());
        worker.stop(self.shared.config.kill_timeout).await;
        self.go(WorkerState::Stopped, reason.as_str());
        Some(Ending::Replace(reason))
    }

    /// `job` ran past its execution timeout: a failed call (see [`Slot::failed`]).
    pub(super) async fn timed_out(
        &self,
        worker: &mut WorkerProcess,
        job: Job,
        request_limit: Option<u64>,
    ) -> Option<Ending> {
        let timeout_ms = u64::try_from(job.timeout.as_millis()).unwrap_or(u64::MAX);
        let error = Error::new(
            ErrorKind::ExecutionTimeout,
            format!(
                "{:?} ran past its {timeout_ms} ms timeout; worker {} was killed and is being replaced",
                &*job.command,
                worker.id()
            ),
        )
        .with_context(|c| c.timeout_ms = Some(timeout_ms));
        self.failed(worker, job, error, request_limit).await
    }

    /// The shutdown grace ended during `job`: the caller hears so, the worker is killed.
    pub(super) async fn aborted(&self, worker: &mut WorkerProcess, job: Job) -> Ending {
        let error = Error::new(
            ErrorKind::ShuttingDown,
            "the pool's shutdown grace period ended before this call finished",
        );
        job.answer(Err(on_worker(error, worker)));
        worker.kill().await;
        self.go(WorkerState::Stopped, "aborted");
        Ending::Stop
    }

    /// Starts a worker in this slot (a replacement when `reason` says why the last one
    /// ended), retrying with backoff; `None` once the pool is going away. Failures count
    /// towards the spawn breaker; while it is open, retries wait the longest backoff.
    async fn respawn(&self, reason: Option<RestartReason>) -> Option<WorkerProcess> {
        let shared = &self.shared;
        let life = &shared.life;
        let mut delay = SPAWN_BACKOFF_MIN;
        loop {
            let drained = self.queue.is_closed() && self.queue.is_empty();
            if shared.abort.is_cancelled() || drained {
                return None;
            }
            let id = shared.next_worker_id();
            self.status.starting(id.clone(), life);
            let started = tokio::select! {
                started = shared.launcher.start(id) => started,
                () = shared.abort.cancelled() => return None,
            };
            match started {
                Ok(worker) => {
                    self.status
                        .running(worker.pid(), worker.started(), worker.started_by());
                    self.go(WorkerState::Ready, "started");
                    if life.spawn_succeeded() {
                        tracing::info!(worker = %worker.id(), "a worker started again: the spawn breaker is closed");
                    }
                    match reason {
                        Some(reason) => {
                            life.restarted(reason);
                            tracing::info!(worker = %worker.id(), pid = worker.pid(), reason = reason.as_str(), "replacement worker ready");
                        }
                        None => {
                            tracing::info!(worker = %worker.id(), pid = worker.pid(), workers = life.live(), "the pool grew by one worker")
                        }
                    }
                    return Some(worker);
                }
                Err(e) => {
                    self.go(WorkerState::Stopped, "start_failed");
                    if life.spawn_failed(&e) {
                        tracing::error!(error = %e, "workers keep failing to start: spawn breaker open, calls fail at once with initialization/spawn_failing");
                    }
                    if life.spawn_breaker_open() {
                        delay = SPAWN_BACKOFF_MAX;
                        self.fail_waiting();
                    }
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "a worker failed to start");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shared.abort.cancelled() => return None,
            }
            delay = (delay * 2).min(SPAWN_BACKOFF_MAX);
        }
    }

    /// While the spawn breaker is open and no worker can serve, calls waiting in the
    /// queue fail at once with `initialization/spawn_failing` instead of timing out.
    fn fail_waiting(&self) {
        if self.shared.serving() {
            return;
        }
        let Some(error) = self.shared.life.spawn_failing() else {
            return;
        };
        while let Ok(job) = self.queue.try_recv() {
            if job.take().is_some() {
                job.answer(Err(error.clone()));
            }
        }
    }
}

/// `error` with the worker it happened on.
pub(super) fn on_worker(error: Error, worker: &WorkerProcess) -> Error {
    error.with_context(|c| {
        c.worker_id = Some(worker.id().to_string());
        c.pid = Some(worker.pid());
    })
}
