//! Reload: every worker is replaced, one slot at a time, by one that loads the handler
//! code anew, with no failed call.
//!
//! For each slot in service the replacement is started first, while the old worker
//! keeps serving; the slot takes it between two calls (never mid-call), drains and stops
//! the old worker and serves on with the new one. With `preload`, a new zygote imports
//! the preload modules anew before any replacement is forked from it; the old zygote
//! ends once the workers forked from it are all replaced. When a replacement cannot
//! start (a handler module raises at import, say), the reload stops there: the workers
//! not yet replaced keep serving, and the error says why; the old zygote then ends with
//! the last worker forked from it.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::oneshot;

use super::lifecycle::RestartReason;
use super::slot::Slot;
use super::{Pool, shutting_down};
use crate::error::Error;
use crate::worker::{WorkerProcess, WorkerState};

/// A replacement worker on its way to a slot.
pub(crate) struct Swap {
    worker: WorkerProcess,
    /// `Ok` with the id and pid of the worker it took the place of; `Err` gives the
    /// worker back: the slot left service and has nothing to replace.
    done: oneshot::Sender<Result<(String, u32), WorkerProcess>>,
}

impl Swap {
    /// The slot has no worker to replace: the replacement goes back to the reload.
    pub(super) fn refuse(self) {
        let _ = self.done.send(Err(self.worker));
    }
}

/// What a reload did, from [`Pool::reload`].
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ReloadReport {
    /// Each worker replaced, in slot order.
    pub workers: Vec<ReloadedWorker>,
    /// The new zygote's pid, when `preload` made the reload start one.
    pub zygote_pid: Option<u32>,
    /// How long the whole reload took, in milliseconds.
    pub duration_ms: u64,
}

/// One worker a reload replaced.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ReloadedWorker {
    /// The replaced worker's id.
    pub old_id: String,
    /// The replaced worker's pid.
    pub old_pid: u32,
    /// The new worker's id.
    pub id: String,
    /// The new worker's pid.
    pub pid: u32,
}

impl Slot {
    /// Puts a reload's replacement into service in place of `old` (stopped already),
    /// which was replaced for `reason`: the reload, or what ended it while the
    /// replacement waited for the slot (then no other worker is started for it).
    pub(super) fn install(
        &self,
        swap: Swap,
        old: &WorkerProcess,
        reason: RestartReason,
    ) -> WorkerProcess {
        let Swap { worker, done } = swap;
        let life = &self.shared.life;
        self.status.starting(worker.id().clone(), life);
        self.status
            .running(worker.pid(), worker.started(), worker.started_by());
        self.go(WorkerState::Ready, "started");
        life.restarted(reason);
        let _ = done.send(Ok((old.id().to_string(), old.pid())));
        worker
    }

    /// The slot ends: replacements still on their way go back to the reload.
    pub(super) fn refuse_swaps(&self) {
        self.swaps.close();
        while let Ok(swap) = self.swaps.try_recv() {
            swap.refuse();
        }
    }
}

impl Pool {
    /// Replaces every worker, one slot at a time, by one that loads the handler code anew
    /// from disk, with no failed call: the replacement starts while the old worker serves,
    /// then the old one is drained (never mid-call) and stopped. With
    /// [`PoolConfig::preload`](crate::PoolConfig::preload) a new zygote imports the preload
    /// modules first. Replacements count as restarts with reason `reload` (a worker lost
    /// while its replacement waits for the slot is replaced by it alone, and counts
    /// under what ended it). A reload
    /// started while another runs waits for it, then runs in full (files may have changed
    /// since the first one read them). Sessions live in the host and are not touched; the
    /// set of command names is the one the pool started with.
    ///
    /// # Errors
    /// The failure of the new zygote or of a replacement (`initialization`:
    /// `handler_import_failed` with its traceback and stderr tail, `startup_failed`,
    /// `startup_timeout`, …), its message saying how many workers were replaced: the
    /// reload stops there and the others keep serving with the code they had (their zygote
    /// ends once the last of them does). A reload that replaced no worker also keeps the
    /// zygote it had (the new one is ended).
    /// `system/shutting_down` when the pool shuts down meanwhile.
    ///
    /// # Cancel safety
    /// Dropping the future stops the reload between two steps: a replacement being
    /// started is killed, workers already replaced stay.
    pub async fn reload(&self) -> Result<ReloadReport, Error> {
        let shared = &self.inner.shared;
        let _turn = shared.reloading.lock().await;
        if shared.closing.is_cancelled() {
            return Err(shutting_down());
        }
        let began = Instant::now();
        let in_service = |s: &&super::SlotHandle| s.status.state() != WorkerState::Stopped;
        let total = shared.slots.iter().filter(in_service).count();
        tracing::info!(workers = total, "reload started");
        let failed = |error: Error, replaced: usize| {
            let message = format!(
                "reload stopped after {replaced} of {total} workers (the others keep their code): {}",
                error.message()
            );
            tracing::error!(error = %message, kind = error.kind().as_str(),
                stderr = error.context().stderr_tail.as_deref().unwrap_or(""), "reload failed");
            Error::new(error.kind().clone(), message)
                .with_context(|c| c.clone_from(error.context()))
        };
        let renewed = tokio::select! {
            renewed = shared.launcher.renew_zygote() => renewed.map_err(|e| failed(e, 0))?,
            () = shared.closing.cancelled() => return Err(shutting_down()),
        };
        let zygote_pid = renewed.then(|| self.zygote_pid()).flatten();
        let mut workers = Vec::with_capacity(total);
        for slot in &shared.slots {
            if !in_service(&slot) {
                continue;
            }
            let started = tokio::select! {
                started = shared.launcher.start(shared.next_worker_id()) => started,
                () = shared.closing.cancelled() => return Err(shutting_down()),
            };
            let worker = match started {
                Ok(worker) => worker,
                Err(e) => {
                    if renewed && workers.is_empty() {
                        shared.launcher.restore_zygote().await;
                    }
                    // What the undone or partial reload left retired, that no worker uses.
                    shared.launcher.end_retired_zygotes().await;
                    return Err(failed(e, workers.len()));
                }
            };
            let (id, pid) = (worker.id().to_string(), worker.pid());
            let (done, swapped) = oneshot::channel();
            if slot.swap.send(Swap { worker, done }).await.is_err() {
                return Err(shutting_down());
            }
            let outcome = tokio::select! {
                outcome = swapped => outcome,
                () = shared.closing.cancelled() => return Err(shutting_down()),
            };
            match outcome {
                Ok(Ok((old_id, old_pid))) => {
                    tracing::info!(old = %old_id, old_pid, worker = %id, pid, "reload: worker replaced");
                    workers.push(ReloadedWorker {
                        old_id,
                        old_pid,
                        id,
                        pid,
                    });
                }
                // The slot left service meanwhile: its next worker starts with the new code.
                Ok(Err(mut worker)) => {
                    worker.stop(shared.config.kill_timeout).await;
                }
                Err(_) => return Err(shutting_down()),
            }
        }
        shared.launcher.end_retired_zygotes().await;
        let duration_ms = millis(began.elapsed());
        tracing::info!(
            replaced = workers.len(),
            ms = duration_ms,
            zygote_pid,
            "reload done"
        );
        Ok(ReloadReport {
            workers,
            zygote_pid,
            duration_ms,
        })
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
