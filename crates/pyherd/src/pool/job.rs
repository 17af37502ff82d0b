//! A call on its way through the queue, and the caller's claim on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Span;

use crate::error::Error;
use crate::pool::Reply;

const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const ABANDONED: u8 = 2;

/// Who a call is and how it ends early: its request id and its cancellation.
#[derive(Clone, Debug)]
pub(crate) struct Flight {
    pub(crate) rid: Arc<str>,
    /// Cancelled by [`crate::Pool::cancel`] or when the caller drops its future or stream.
    pub(crate) cancel: CancellationToken,
}

/// A call waiting for (or held by) a worker.
pub(crate) struct Job {
    pub(crate) id: u64,
    pub(crate) flight: Flight,
    /// For a streaming call, where its chunks go (bounded: a full buffer stops the reads
    /// from the worker's pipe). The final outcome still goes to `reply`.
    pub(crate) chunks: Option<mpsc::Sender<Box<RawValue>>>,
    pub(crate) command: Box<str>,
    pub(crate) args: Box<RawValue>,
    pub(crate) session_id: Option<Box<str>>,
    pub(crate) timeout: Duration,
    /// The worker the call's session prefers (its last worker), for affinity accounting.
    pub(crate) preferred: Option<Arc<str>>,
    /// The call's `request` span (see [`crate::telemetry`]).
    pub(crate) span: Span,
    /// When the call was admitted: its queue wait runs from here.
    pub(crate) admitted: Instant,
    state: Arc<AtomicU8>,
    reply: oneshot::Sender<Result<Reply, Error>>,
}

/// The caller's side: it may give the job up while it is still queued.
pub(crate) struct Ticket {
    state: Arc<AtomicU8>,
}

impl Job {
    pub(crate) fn new(
        id: u64,
        flight: Flight,
        command: &str,
        args: Box<RawValue>,
        session_id: Option<&str>,
        timeout: Duration,
        span: Span,
    ) -> (Self, Ticket, oneshot::Receiver<Result<Reply, Error>>) {
        let state = Arc::new(AtomicU8::new(QUEUED));
        let (reply, answer) = oneshot::channel();
        let job = Self {
            id,
            flight,
            chunks: None,
            command: command.into(),
            args,
            session_id: session_id.map(Into::into),
            timeout,
            preferred: None,
            span,
            admitted: Instant::now(),
            state: state.clone(),
            reply,
        };
        (job, Ticket { state }, answer)
    }

    /// A worker claims the job; false if its caller has gone or gave up waiting.
    pub(crate) fn take(&self) -> bool {
        !self.reply.is_closed()
            && self
                .state
                .compare_exchange(QUEUED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Hands the outcome to the caller (ignored if the caller has gone).
    pub(crate) fn answer(self, outcome: Result<Reply, Error>) {
        let _ = self.reply.send(outcome);
    }
}

impl Ticket {
    /// Gives the job up if no worker has taken it yet; true if it was given up.
    pub(crate) fn abandon(&self) -> bool {
        self.state
            .compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> (Job, Ticket, oneshot::Receiver<Result<Reply, Error>>) {
        let flight = Flight {
            rid: "r1".into(),
            cancel: CancellationToken::new(),
        };
        Job::new(
            1,
            flight,
            "echo",
            RawValue::NULL.to_owned(),
            None,
            Duration::from_secs(1),
            Span::none(),
        )
    }

    #[test]
    fn exactly_one_of_worker_and_caller_wins() {
        let (job1, ticket, _answer) = job();
        assert!(job1.take());
        assert!(!ticket.abandon());
        let (job2, ticket, _answer) = job();
        assert!(ticket.abandon());
        assert!(!job2.take());
    }

    #[test]
    fn a_job_whose_caller_has_gone_is_skipped() {
        let (job, _ticket, answer) = job();
        drop(answer);
        assert!(!job.take());
    }
}
