//! The pool's first start: every worker starts concurrently, and one whose start fails
//! for a reason that may pass is started again with the backoff replacements use.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio_util::sync::CancellationToken;

use super::lifecycle::{SPAWN_BACKOFF_MAX, SPAWN_BACKOFF_MIN, SPAWN_BREAKER_THRESHOLD};
use crate::error::{Error, ErrorKind};
use crate::worker::{Launcher, WorkerProcess};

/// Whether another start may succeed after `error`: the process could not be started,
/// died or hung before its hello, or garbled it. A handler module that fails to import
/// fails the same way every time.
fn may_pass(error: &Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::SpawnFailed
            | ErrorKind::StartupFailed
            | ErrorKind::StartupTimeout
            | ErrorKind::HandshakeFailed
    )
}

/// Starts workers `w1` to `w<count>` concurrently. A start that fails for a reason that
/// may pass is tried again after a backoff (doubling from 50 ms), under the next id
/// taken from `next_id`, up to [`SPAWN_BREAKER_THRESHOLD`] starts of that worker.
///
/// Returns the workers started and, when the build must fail, why: the first failure
/// that cannot pass, or the last failure of a worker that failed
/// [`SPAWN_BREAKER_THRESHOLD`] times. Once a worker fails for good (or `give_up` is
/// cancelled) no worker is started again, but starts under way are let finish, so that
/// each process they began is reaped.
pub(super) async fn start_workers(
    launcher: &Launcher,
    count: usize,
    next_id: &AtomicU64,
    give_up: &CancellationToken,
) -> (Vec<WorkerProcess>, Option<Error>) {
    let attempts =
        (1..=count).map(|i| start_one(launcher, format!("w{i}").into(), next_id, give_up));
    let mut workers = Vec::with_capacity(count);
    let mut failure = None;
    for outcome in futures::future::join_all(attempts).await {
        match outcome {
            Ok(worker) => workers.push(worker),
            Err(error) => failure = failure.or(error),
        }
    }
    (workers, failure)
}

/// Starts one worker, first as `id`; `Err(None)` when it stopped trying because the
/// build gave up for another reason.
async fn start_one(
    launcher: &Launcher,
    mut id: Arc<str>,
    next_id: &AtomicU64,
    give_up: &CancellationToken,
) -> Result<WorkerProcess, Option<Error>> {
    let mut delay = SPAWN_BACKOFF_MIN;
    let mut failed = 0;
    loop {
        let error = match launcher.start(id.clone()).await {
            Ok(worker) => return Ok(worker),
            Err(error) => error,
        };
        failed += 1;
        if !may_pass(&error) || failed >= SPAWN_BREAKER_THRESHOLD {
            give_up.cancel();
            return Err(Some(error));
        }
        tracing::warn!(worker = %id, error = %error, failed, retry_in_ms = delay.as_millis() as u64,
            "a worker failed to start at the pool's start");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = give_up.cancelled() => return Err(None),
        }
        delay = (delay * 2).min(SPAWN_BACKOFF_MAX);
        id = super::take_worker_id(next_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_that_may_pass_are_tried_again() {
        for kind in [
            ErrorKind::SpawnFailed,
            ErrorKind::StartupFailed,
            ErrorKind::StartupTimeout,
            ErrorKind::HandshakeFailed,
        ] {
            assert!(may_pass(&Error::new(kind.clone(), "x")), "{kind}");
        }
        for kind in [ErrorKind::HandlerImportFailed, ErrorKind::InvalidConfig] {
            assert!(!may_pass(&Error::new(kind.clone(), "x")), "{kind}");
        }
    }
}
