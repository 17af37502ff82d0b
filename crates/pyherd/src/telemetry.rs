//! pyherd's `tracing` vocabulary in one place: the span of a call and the events of a
//! worker's life (spawn, exit, recycle) and of sessions (create, expire), so every
//! subscriber sees the same names and fields. State changes are logged by the slot status
//! (`worker state`: worker, pid, from, to, reason, ms).
//!
//! A call's span is `request` (DEBUG) with `request_id`, `command`, `session_id` (when
//! the call has one), `worker` (once a worker takes it), `queue_wait_us`, `execution_us`
//! and `outcome` (`ok` or the error kind). Worker events carry `worker` and `pid`.

use std::fmt::Display;
use std::time::Duration;

use tracing::Span;
use tracing::field::{Empty, display};

use crate::error::Error;
use crate::worker::StartedBy;

/// The span of one call admitted (or refused) by the pool; `request_id` identifies the
/// call in every event and in the Python handler's log lines.
pub(crate) fn request_span(
    request_id: impl Display,
    command: &str,
    session_id: Option<&str>,
) -> Span {
    tracing::debug_span!(
        "request",
        request_id = %request_id,
        command = %command,
        session_id = session_id.map(display),
        worker = Empty,
        queue_wait_us = Empty,
        execution_us = Empty,
        outcome = Empty,
    )
}

/// A worker took the call after it waited `waited` in the queue.
pub(crate) fn taken(span: &Span, worker: &str, waited: Duration) {
    span.record("worker", display(worker));
    span.record("queue_wait_us", micros(waited));
}

/// The worker answered (or failed) after `ran`.
pub(crate) fn executed(span: &Span, ran: Duration, outcome: &str) {
    span.record("execution_us", micros(ran));
    tracing::debug!(parent: span, execution_us = micros(ran), outcome = %outcome, "call executed");
}

/// The call's final outcome, as its caller sees it: `ok`, or the error's kind.
pub(crate) fn finished(span: &Span, error: Option<&Error>) {
    span.record(
        "outcome",
        display(error.map_or("ok", |e| e.kind().as_str())),
    );
}

/// A worker said hello: started `how` (spawn or fork) in `ms` milliseconds.
pub(crate) fn worker_spawned(worker: &str, pid: u32, how: StartedBy, ms: u64) {
    tracing::info!(worker = %worker, pid, how = %how.as_str(), ms, "worker spawned");
}

/// A worker process ended; `status` is its exit code or signal.
pub(crate) fn worker_exited(worker: &str, pid: u32, status: &str) {
    tracing::info!(worker = %worker, pid, status = %status, "worker exited");
}

/// A worker is retired to be replaced (`max_requests`, `max_rss`, `max_age`).
pub(crate) fn worker_recycled(worker: &str, pid: u32, reason: &str) {
    tracing::info!(worker = %worker, pid, reason = %reason, "worker recycled");
}

/// A session was created (explicitly or by its first call).
pub(crate) fn session_created(session_id: &str, ttl: Duration) {
    tracing::info!(session_id = %session_id, ttl_s = ttl.as_secs(), "session created");
}

/// The session sweep removed `expired` sessions whose TTL passed.
pub(crate) fn sessions_expired(expired: usize) {
    tracing::info!(expired, "expired sessions removed");
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
