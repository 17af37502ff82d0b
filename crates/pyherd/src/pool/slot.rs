//! One worker slot: a task that owns its Python process, takes calls from the shared
//! queue one at a time, and replaces the process when it dies or must be killed.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::time::Instant;

use super::job::Job;
use super::stats::{SlotStatus, bump};
use super::{Reply, Shared, shutting_down};
use crate::error::{Error, ErrorKind};
use crate::protocol::Call;
use crate::worker::{CallResult, WorkerProcess, WorkerState};

/// First wait before retrying a replacement that failed to start; doubles up to the max.
const RESPAWN_BACKOFF_MIN: Duration = Duration::from_millis(50);
const RESPAWN_BACKOFF_MAX: Duration = Duration::from_secs(5);

pub(crate) struct Slot {
    pub(crate) status: Arc<SlotStatus>,
    pub(crate) shared: Arc<Shared>,
    /// The pool's FIFO queue.
    pub(crate) queue: async_channel::Receiver<Job>,
    /// Calls sent to this slot's worker by session affinity; served before the queue.
    pub(crate) direct: async_channel::Receiver<Job>,
    /// The pool's queue, to hand back affinity calls when this slot's worker is lost.
    pub(crate) requeue: async_channel::Sender<Job>,
}

/// Why `serve` returned.
enum Ending {
    /// The worker is gone; start another.
    Replace,
    /// The pool is shutting down; the slot ends.
    Stop,
}

impl Slot {
    /// Serves until the pool shuts down, replacing the worker whenever it is lost.
    pub(crate) async fn run(self, mut worker: WorkerProcess) {
        loop {
            if let Ending::Stop = self.serve(&mut worker).await {
                break;
            }
            self.hand_back();
            let lost = worker.id().clone();
            match self.respawn().await {
                Some(next) => {
                    bump(&self.shared.counters.restarts);
                    tracing::info!(worker = %next.id(), pid = next.pid(), replaces = %lost, "replacement worker ready");
                    worker = next;
                }
                None => break,
            }
        }
        self.direct.close();
        while let Ok(job) = self.direct.try_recv() {
            self.shared.dequeued();
            job.answer(Err(shutting_down()));
        }
        self.status.set_state(WorkerState::Stopped);
    }

    /// The worker is lost: calls that waited for it go back to the pool's queue, where any
    /// worker can serve them (their session loses nothing, it lives in the host).
    fn hand_back(&self) {
        while let Ok(job) = self.direct.try_recv() {
            if let Err(refused) = self.requeue.try_send(job) {
                self.shared.dequeued();
                refused.into_inner().answer(Err(shutting_down()));
            }
        }
    }

    async fn serve(&self, worker: &mut WorkerProcess) -> Ending {
        let shared = &self.shared;
        loop {
            self.status.set_state(WorkerState::Ready);
            let job = tokio::select! {
                biased;
                () = shared.abort.cancelled() => {
                    worker.kill().await;
                    return Ending::Stop;
                }
                fault = worker.idle_fault() => {
                    tracing::warn!(worker = %worker.id(), error = %fault, "worker lost while idle");
                    return Ending::Replace;
                }
                Ok(job) = self.direct.recv() => job,
                job = self.queue.recv() => match job {
                    Ok(job) => job,
                    // Affinity calls admitted before the shutdown are still served.
                    Err(_) if !self.direct.is_empty() => continue,
                    // Closed and drained: the pool is shutting down.
                    Err(_) => {
                        self.status.set_state(WorkerState::Stopping);
                        let exit = worker.stop(shared.config.kill_timeout).await;
                        tracing::debug!(worker = %worker.id(), exit = exit.as_deref().unwrap_or("unknown"), "worker stopped");
                        return Ending::Stop;
                    }
                },
            };
            shared.dequeued();
            if !job.take() {
                continue;
            }
            if let Some(preferred) = &job.preferred {
                let counter = if preferred == worker.id() {
                    &shared.counters.affinity_hits
                } else {
                    &shared.counters.affinity_misses
                };
                bump(counter);
            }
            self.status.set_state(WorkerState::Busy);
            if let Some(ending) = self.run_job(worker, job).await {
                return ending;
            }
        }
    }

    /// Runs one call; `Some` when the worker cannot go on.
    async fn run_job(&self, worker: &mut WorkerProcess, job: Job) -> Option<Ending> {
        let context = |e: Error, worker: &WorkerProcess| {
            e.with_context(|c| {
                c.worker_id = Some(worker.id().to_string());
                c.pid = Some(worker.pid());
            })
        };
        let deadline_ms = SystemTime::now()
            .checked_add(job.timeout)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(u64::MAX, |d| {
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
            });
        let call = Call::new(
            job.id,
            &job.command,
            &job.args,
            job.session_id.as_deref(),
            deadline_ms,
        );
        let frame = match serde_json::to_vec(&call) {
            Ok(body) => Bytes::from(body),
            Err(e) => {
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
            job.answer(Err(error));
            return None;
        }
        let started = Instant::now();
        let outcome = worker
            .call(frame, job.id, started + job.timeout, &self.shared.abort)
            .await;
        match outcome {
            CallResult::Answered(answer) => {
                // Ready before the caller hears back, so stats read after an answer are current.
                self.status.served();
                self.status.set_state(WorkerState::Ready);
                let answer = match answer {
                    Ok(result) => Ok(Reply {
                        result,
                        worker_id: worker.id().clone(),
                        duration: started.elapsed(),
                    }),
                    Err(e) => Err(context(e, worker)),
                };
                job.answer(answer);
                None
            }
            CallResult::TimedOut => {
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
                job.answer(Err(context(error, worker)));
                worker.kill().await;
                Some(Ending::Replace)
            }
            CallResult::Aborted => {
                let error = Error::new(
                    ErrorKind::ShuttingDown,
                    "the pool's shutdown grace period ended before this call finished",
                );
                job.answer(Err(context(error, worker)));
                worker.kill().await;
                Some(Ending::Stop)
            }
            CallResult::Failed(error) => {
                tracing::warn!(worker = %worker.id(), error = %error, "worker lost during a call");
                job.answer(Err(error));
                Some(Ending::Replace)
            }
        }
    }

    /// Starts a replacement, retrying with backoff; `None` once the pool is going away.
    async fn respawn(&self) -> Option<WorkerProcess> {
        let shared = &self.shared;
        let mut delay = RESPAWN_BACKOFF_MIN;
        loop {
            let drained = self.queue.is_closed() && self.queue.is_empty();
            if shared.abort.is_cancelled() || drained {
                return None;
            }
            let id = shared.next_worker_id();
            self.status.starting(id.clone());
            let started = tokio::select! {
                started = shared.launcher.start(id) => started,
                () = shared.abort.cancelled() => return None,
            };
            match started {
                Ok(worker) => {
                    self.status
                        .running(worker.pid(), worker.started(), worker.started_by());
                    return Some(worker);
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "a replacement worker failed to start");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shared.abort.cancelled() => return None,
            }
            delay = (delay * 2).min(RESPAWN_BACKOFF_MAX);
        }
    }
}
