//! A call on its way through the queue, and the caller's claim on it.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Span;

use crate::error::Error;
use crate::policy::Permit;
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
    pub(crate) session_id: Option<Box<str>>,
    pub(crate) timeout: Duration,
    /// The worker the call's session prefers (its last worker), for affinity accounting.
    pub(crate) preferred: Option<Arc<str>>,
    /// The call's `request` span (see [`crate::telemetry`]).
    pub(crate) span: Span,
    /// When the call was admitted: its queue wait runs from here.
    pub(crate) admitted: Instant,
    place: Arc<Place>,
    reply: oneshot::Sender<Result<Reply, Error>>,
}

/// The caller's side: it may give the job up while it is still queued. Dropped (its
/// caller gone), it gives the job up.
pub(crate) struct Ticket {
    place: Arc<Place>,
}

/// A job's place among the calls waiting, shared by the job and its ticket. The job
/// leaves it once, by whichever comes first: a worker taking it, or its caller giving it
/// up (a cancel, the queue timeout) or going (the ticket dropped: the caller's future
/// dropped, or its wait over because the job was refused or dropped unserved). Leaving
/// takes the job out of the pool's count of calls waiting, so that count is of live
/// calls only; a job given up also drops its arguments then, so that what it leaves in
/// the queue until a worker skips it is small, and its breaker permit, so that a trial
/// slot is not held by a call that will never run.
struct Place {
    state: AtomicU8,
    waiting: Arc<AtomicUsize>,
    /// The call's arguments, until a worker takes them or the job is given up.
    args: Mutex<Option<Box<RawValue>>>,
    /// The command's breaker permit, until the job is answered or given up.
    permit: Mutex<Option<Permit>>,
}

impl Place {
    /// Moves the job from `QUEUED` to `to`; false if it had already left.
    fn leave(&self, to: u8) -> bool {
        let left = self
            .state
            .compare_exchange(QUEUED, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if left {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            if to == ABANDONED {
                self.args().take();
                lock(&self.permit).take();
            }
        }
        left
    }

    fn args(&self) -> std::sync::MutexGuard<'_, Option<Box<RawValue>>> {
        lock(&self.args)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts a new call among the calls `waiting`, unless `max` wait already: true if it
/// was counted. The job then made for it with [`Job::new`] gives the place back when it
/// leaves (see [`Place`]).
pub(crate) fn enter(waiting: &AtomicUsize, max: usize) -> bool {
    if waiting.fetch_add(1, Ordering::Relaxed) >= max {
        waiting.fetch_sub(1, Ordering::Relaxed);
        return false;
    }
    true
}

impl Job {
    /// A job counted in `waiting` (by [`enter`]) until it leaves, in the current span
    /// (the call's `request` span).
    pub(crate) fn new(
        waiting: Arc<AtomicUsize>,
        id: u64,
        flight: Flight,
        command: &str,
        args: Box<RawValue>,
        session_id: Option<&str>,
        timeout: Duration,
    ) -> (Self, Ticket, oneshot::Receiver<Result<Reply, Error>>) {
        let place = Arc::new(Place {
            state: AtomicU8::new(QUEUED),
            waiting,
            args: Mutex::new(Some(args)),
            permit: Mutex::default(),
        });
        let (reply, answer) = oneshot::channel();
        let job = Self {
            id,
            flight,
            chunks: None,
            command: command.into(),
            session_id: session_id.map(Into::into),
            timeout,
            preferred: None,
            span: Span::current(),
            admitted: Instant::now(),
            place: place.clone(),
            reply,
        };
        (job, Ticket { place }, answer)
    }

    /// Makes the command's breaker, through `permit`, hear how the call ends when it is
    /// answered, whether or not its caller still waits.
    pub(crate) fn guard(&self, permit: Option<Permit>) {
        *lock(&self.place.permit) = permit;
    }

    /// A worker claims the job: its arguments, or `None` if its caller has gone or gave
    /// up waiting.
    pub(crate) fn take(&self) -> Option<Box<RawValue>> {
        if self.reply.is_closed() {
            self.place.leave(ABANDONED);
            return None;
        }
        if self.place.leave(TAKEN) {
            self.place.args().take()
        } else {
            None
        }
    }

    /// Tells the command's breaker how the call ended, then hands the outcome to the
    /// caller (ignored if the caller has gone: the breaker still counts it).
    pub(crate) fn answer(self, outcome: Result<Reply, Error>) {
        if let Some(permit) = lock(&self.place.permit).take() {
            permit.record(super::retry::outcome(&outcome));
        }
        let _ = self.reply.send(outcome);
    }
}

impl Ticket {
    /// Gives the job up if no worker has taken it yet; true if it was given up.
    pub(crate) fn abandon(&self) -> bool {
        self.place.leave(ABANDONED)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.place.leave(ABANDONED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job_in(
        waiting: &Arc<AtomicUsize>,
    ) -> (Job, Ticket, oneshot::Receiver<Result<Reply, Error>>) {
        assert!(enter(waiting, usize::MAX));
        let flight = Flight {
            rid: "r1".into(),
            cancel: CancellationToken::new(),
        };
        Job::new(
            waiting.clone(),
            1,
            flight,
            "echo",
            RawValue::NULL.to_owned(),
            None,
            Duration::from_secs(1),
        )
    }

    fn job() -> (Job, Ticket, oneshot::Receiver<Result<Reply, Error>>) {
        job_in(&Arc::new(AtomicUsize::new(0)))
    }

    #[test]
    fn exactly_one_of_worker_and_caller_wins() {
        let (job1, ticket, _answer) = job();
        assert!(job1.take().is_some());
        assert!(!ticket.abandon());
        let (job2, ticket, _answer) = job();
        assert!(ticket.abandon());
        assert!(job2.take().is_none());
    }

    #[test]
    fn a_job_whose_caller_has_gone_is_skipped() {
        let (job, _ticket, answer) = job();
        drop(answer);
        assert!(job.take().is_none());
    }

    #[test]
    fn a_job_leaves_the_count_of_waiting_calls_once_whichever_way_it_goes() {
        let waiting = Arc::new(AtomicUsize::new(0));
        let count = || waiting.load(Ordering::Relaxed);
        // Taken by a worker, then its ticket dropped and the job answered.
        let (taken, ticket, _answer) = job_in(&waiting);
        assert_eq!(taken.take().unwrap().get(), "null");
        assert_eq!(count(), 0);
        drop(ticket);
        taken.answer(Err(Error::new(crate::ErrorKind::Cancelled, "x")));
        assert_eq!(count(), 0);
        // Given up by its caller while queued: out of the count before a worker sees it.
        let (given_up, ticket, _answer) = job_in(&waiting);
        assert!(ticket.abandon());
        assert_eq!(count(), 0);
        // Its arguments are dropped at once, though the job is still queued.
        assert!(given_up.place.args().is_none());
        assert!(given_up.take().is_none());
        drop((given_up, ticket));
        assert_eq!(count(), 0);
        // Its caller gone (the future dropped): out of the count at once.
        let (orphaned, ticket, answer) = job_in(&waiting);
        drop((ticket, answer));
        assert_eq!(count(), 0);
        assert!(orphaned.take().is_none());
        // Dropped unserved, as at a shutdown: out of the count once its caller's wait ends.
        let (refused, ticket, answer) = job_in(&waiting);
        drop(refused);
        assert_eq!(count(), 1);
        drop((ticket, answer));
        assert_eq!(count(), 0);
    }
}
