//! Streaming calls: a generator handler's chunks, forwarded through a bounded buffer,
//! and their cancellation.
//!
//! The slot reads one chunk frame from the worker's pipe at a time and waits while the
//! buffer of [`STREAM_BUFFER`] chunks is full, so a slow reader stops the reads, the pipe
//! fills and the worker blocks writing: memory never grows without bound. A cancelled
//! stream (dropped, or [`Pool::cancel`]) gets a `cancel` frame; the worker closes the
//! generator between chunks and answers; one that does not within [`CANCEL_GRACE`] is
//! killed and replaced.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Span;

use super::calls::Entered;
use super::job::Job;
use super::sessions::remember_worker;
use super::slot::{Ending, Slot, on_worker};
use super::{CallOptions, Pool, Readable, Reply, Shared, Target, cancelled};
use crate::error::{Error, ErrorKind};
use crate::metrics::UNKNOWN_COMMAND;
use crate::protocol::{self, Message};
use crate::session::check_id;
use crate::telemetry;
use crate::worker::{CallResult, Fault, WorkerProcess, WorkerState};

/// Chunks the host holds for a stream's reader before it stops reading the worker's pipe.
pub const STREAM_BUFFER: usize = 16;

/// How long a worker has to stop a cancelled stream before it is killed and replaced.
pub(crate) const CANCEL_GRACE: Duration = Duration::from_secs(1);

/// How a stream that ran to its end ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamEnd {
    /// The worker that streamed.
    pub worker_id: String,
    /// Time from sending the call to the worker until its `end`.
    pub duration: Duration,
    /// Chunks streamed.
    pub chunks: u64,
}

type Outcome = Pin<Box<dyn Future<Output = Result<Reply, Error>> + Send>>;

/// The chunks of a streaming call ([`Pool::stream`]), each a `Result<Value, Error>`: the
/// chunks in order, then the end of the stream, or one error (after the chunks sent
/// before it) and the end. Dropping it cancels the call.
#[must_use = "a stream does nothing unless polled, and dropping it cancels the call"]
pub struct CallStream {
    request_id: Arc<str>,
    chunks: mpsc::Receiver<Box<RawValue>>,
    /// No more chunks will come.
    drained: bool,
    outcome: Option<Outcome>,
    end: Option<StreamEnd>,
    /// Counts the stream once it has ended (or, dropped before, as cancelled).
    tally: Option<Tally>,
    /// The call in flight: its id stays taken, and its cancel is seen, until the end.
    entered: Entered,
}

/// A stream's place in the stats, metrics, timeline and its `request` span, like a plain
/// call's: counted once, when it ends.
struct Tally {
    shared: Arc<Shared>,
    label: Box<str>,
    started: std::time::Instant,
    span: Span,
}

impl Tally {
    fn record(&self, error: Option<&Error>) {
        self.shared.count(&self.label, error, self.started);
        telemetry::finished(&self.span, error);
    }
}

impl Drop for CallStream {
    fn drop(&mut self) {
        if let Some(tally) = self.tally.take() {
            tally.record(Some(&cancelled()));
        }
    }
}

impl std::fmt::Debug for CallStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallStream")
            .field("request_id", &self.request_id)
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

impl CallStream {
    /// The call's request id (for [`Pool::cancel`] and the handler's `ctx.request_id`).
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// How the stream ended, once it has ended without an error.
    pub fn end(&self) -> Option<&StreamEnd> {
        self.end.as_ref()
    }

    fn finish(&mut self, outcome: Result<Reply, Error>) -> Option<Result<Value, Error>> {
        self.outcome = None;
        let tally = self.tally.take();
        if let Some(tally) = &tally {
            tally.record(outcome.as_ref().err());
        }
        match outcome {
            Ok(reply) => {
                self.end = Some(StreamEnd {
                    worker_id: reply.worker_id().to_owned(),
                    duration: reply.duration(),
                    chunks: reply.decode().unwrap_or_default(),
                });
                None
            }
            Err(e) => {
                let rid = self.request_id.to_string();
                // The tally's label is the command: an unknown one never starts a stream.
                let command = tally.map(|t| t.label.into_string());
                Some(Err(e.with_context(|c| {
                    c.request_id = Some(rid);
                    if c.command.is_none() {
                        c.command = command;
                    }
                })))
            }
        }
    }
}

impl Stream for CallStream {
    type Item = Result<Value, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.entered.flight.cancel.is_cancelled() {
            // A cancel drops the chunks not yet read: the reader gets `cancelled` once the
            // worker has stopped, even for a stream the worker had already finished.
            let Some(outcome) = this.outcome.as_mut() else {
                return Poll::Ready(None);
            };
            let Poll::Ready(outcome) = outcome.as_mut().poll(cx) else {
                return Poll::Pending;
            };
            this.drained = true;
            return Poll::Ready(this.finish(outcome.and(Err(cancelled()))));
        }
        if !this.drained {
            match this.chunks.poll_recv(cx) {
                Poll::Ready(Some(chunk)) => return Poll::Ready(Some(parse(&chunk))),
                Poll::Ready(None) => this.drained = true,
                Poll::Pending => {}
            }
        }
        let Some(outcome) = this.outcome.as_mut() else {
            return Poll::Ready(None);
        };
        match outcome.as_mut().poll(cx) {
            Poll::Ready(outcome) => {
                // Chunks are sent before the outcome: any left are in the buffer.
                if let Ok(chunk) = this.chunks.try_recv() {
                    this.outcome = Some(Box::pin(std::future::ready(outcome)));
                    return Poll::Ready(Some(parse(&chunk)));
                }
                this.drained = true;
                Poll::Ready(this.finish(outcome))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

fn parse(chunk: &RawValue) -> Result<Value, Error> {
    serde_json::from_str(chunk.get()).map_err(|e| {
        Error::new(
            ErrorKind::ResultTypeMismatch,
            format!("a chunk is not JSON: {e}"),
        )
    })
}

impl Pool {
    /// Calls `command` as a stream: a generator handler (sync or async) streams what it
    /// yields, one chunk each; any other handler's result is the one chunk. See
    /// [`stream_with`](Self::stream_with).
    ///
    /// # Errors
    /// As [`stream_with`](Self::stream_with).
    pub async fn stream(&self, command: &str, args: Value) -> Result<CallStream, Error> {
        self.stream_with(command, args, &CallOptions::default())
            .await
    }

    /// Calls `command` as a stream with `options` (its session, timeouts, request id).
    /// The call is admitted here; it waits in the queue while the stream is polled. The
    /// execution timeout covers the whole stream, from sending the call to its end.
    /// Streams are not retried (their chunks are already out).
    ///
    /// ```no_run
    /// # async fn demo(pool: pyherd::Pool) -> Result<(), pyherd::Error> {
    /// use futures::StreamExt;
    /// let mut chunks = pool.stream("count", serde_json::json!({"to": 3})).await?;
    /// while let Some(chunk) = chunks.next().await {
    ///     println!("{}", chunk?);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Before the stream starts: `invalid_request/unknown_command`,
    /// `invalid_request/malformed_request` (args that cannot be serialised, or a DSPy
    /// session command, which cannot be streamed), `invalid_request/payload_too_large`,
    /// `invalid_request/invalid_request_id`, `invalid_request/invalid_id` (session),
    /// `resource/pool_saturated`, `resource/circuit_open` (the command's breaker is open),
    /// `initialization/spawn_failing`, `system/shutting_down`.
    /// In the stream: what [`execute_with`](Self::execute_with) can fail with once
    /// admitted, and `invalid_request/cancelled`.
    ///
    /// # Cancel safety
    /// Dropping the stream cancels the call: see [`cancel`](Self::cancel).
    pub async fn stream_with(
        &self,
        command: &str,
        args: Value,
        options: &CallOptions,
    ) -> Result<CallStream, Error> {
        let args = serde_json::value::to_raw_value(&args)
            .map_err(|e| Error::new(ErrorKind::MalformedRequest, format!("args: {e}")))?;
        self.open_raw(command, args, options, Readable::Known).await
    }

    /// [`stream_with`](Self::stream_with) with arguments that are already JSON.
    ///
    /// # Errors
    /// As [`stream_with`](Self::stream_with).
    pub async fn stream_raw(
        &self,
        command: &str,
        args: Box<RawValue>,
        options: &CallOptions,
    ) -> Result<CallStream, Error> {
        self.open_raw(command, args, options, Readable::Check).await
    }

    /// [`stream_raw`](Self::stream_raw), checking `args` as `readable` says.
    async fn open_raw(
        &self,
        command: &str,
        args: Box<RawValue>,
        options: &CallOptions,
        readable: Readable,
    ) -> Result<CallStream, Error> {
        let started = std::time::Instant::now();
        let entered = self.enter(command, options.request_id.as_deref())?;
        let rid = entered.flight.rid.clone();
        let known = self.inner.shared.handlers.contains(command);
        let tally = Tally {
            shared: self.inner.shared.clone(),
            label: if known { command } else { UNKNOWN_COMMAND }.into(),
            started,
            span: telemetry::request_span(&rid, command, options.session_id.as_deref()),
        };
        let context = |e: Error| {
            let e = e.with_context(|c| {
                c.command = Some(command.to_owned());
                c.request_id = Some(rid.to_string());
                c.session_id.clone_from(&options.session_id);
            });
            tally.record(Some(&e));
            e
        };
        if let Err(e) = self.inner.shared.check_args(&args, readable) {
            return Err(context(e));
        }
        if self.needs_session(command) {
            return Err(context(Error::new(
                ErrorKind::MalformedRequest,
                format!(
                    "{command:?} is a session command of the DSPy adapter: it cannot be streamed"
                ),
            )));
        }
        let preferred = match options.session_id.as_deref() {
            Some(id) => {
                check_id("session", id).map_err(context)?;
                let session = self.sessions().get_or_create(id).await.map_err(context)?;
                session.last_worker.as_deref().map(Arc::from)
            }
            None => None,
        };
        // The command's breaker hears how the stream ended, as for a plain call: its job
        // records it, whether or not the reader is still there.
        let permit = self
            .inner
            .shared
            .resilience
            .permit(command)
            .map_err(context)?;
        // A session's stream, once it ends well, makes its worker the session's last.
        let session = options
            .session_id
            .as_ref()
            .map(|id| (self.sessions().clone(), id.clone(), preferred.clone()));
        let (sender, chunks) = mpsc::channel(STREAM_BUFFER);
        let target = Target {
            preferred,
            avoid: None,
            chunks: Some(sender),
            permit,
        };
        // Admitted inside its span: the job carries it to the worker that takes it.
        let admitted = tally
            .span
            .in_scope(|| {
                self.admit(
                    command,
                    known,
                    args,
                    options,
                    entered.flight.clone(),
                    target,
                )
            })
            .map_err(context)?;
        let outcome = async move {
            let result = admitted.wait().await;
            if let (Ok(reply), Some((store, id, last))) = (&result, session) {
                remember_worker(&*store, &id, last.as_deref(), reply.worker_id()).await;
            }
            result
        };
        Ok(CallStream {
            request_id: entered.flight.rid.clone(),
            chunks,
            drained: false,
            outcome: Some(Box::pin(outcome)),
            end: None,
            tally: Some(tally),
            entered,
        })
    }
}

/// What ended a wait during a stream.
enum Turn {
    Frame(Result<Message, Fault>),
    Sent(bool),
    Cancel,
    TimedOut,
    Aborted,
}

impl Slot {
    /// Runs one streaming call (its frame already encoded); `Some` when the worker cannot
    /// go on.
    pub(super) async fn run_stream(
        &self,
        worker: &mut WorkerProcess,
        mut job: Job,
        frame: Bytes,
        request_limit: Option<u64>,
    ) -> Option<Ending> {
        let chunks = job.chunks.take()?;
        let started = Instant::now();
        let deadline = super::later(started, job.timeout);
        let abort = self.shared.abort.clone();
        let cancel = job.flight.cancel.clone();
        // The call frame is written whole (a cancel may only follow a whole frame).
        let refused = tokio::select! {
            biased;
            () = abort.cancelled() => Some(CallResult::Aborted),
            () = tokio::time::sleep_until(deadline) => Some(CallResult::TimedOut),
            written = worker.send_frame(frame) => match written {
                Ok(()) => None,
                Err(fault) => Some(CallResult::Failed(worker.crashed(fault).await)),
            },
        };
        if let Some(outcome) = refused {
            return self
                .conclude(worker, job, outcome, started.elapsed(), request_limit)
                .await;
        }
        let mut sent: u64 = 0;
        let mut pending: Option<Box<RawValue>> = None;
        let outcome = loop {
            let turn = tokio::select! {
                biased;
                () = abort.cancelled() => Turn::Aborted,
                () = cancel.cancelled() => Turn::Cancel,
                () = tokio::time::sleep_until(deadline) => Turn::TimedOut,
                turn = async {
                    match pending.take() {
                        Some(chunk) => Turn::Sent(chunks.send(chunk).await.is_ok()),
                        None => Turn::Frame(worker.stream_frame(job.id).await),
                    }
                } => turn,
            };
            match turn {
                Turn::Frame(Ok(Message::Chunk { data, .. })) => pending = Some(data),
                Turn::Sent(true) => sent += 1,
                Turn::Sent(false) | Turn::Cancel => {
                    drop(chunks);
                    self.executed(&job, started.elapsed(), "cancelled");
                    return self.cancel_stream(worker, job, request_limit).await;
                }
                Turn::Frame(Ok(Message::End { .. })) => {
                    break CallResult::Answered(Ok(protocol_count(sent)));
                }
                Turn::Frame(Ok(Message::Err { error, .. })) => {
                    break CallResult::Answered(Err(error));
                }
                Turn::Frame(Ok(other)) => {
                    let fault = Fault::Protocol(format!(
                        "expected a frame of stream {}, got {other:?}",
                        job.id
                    ));
                    break CallResult::Failed(worker.crashed(fault).await);
                }
                Turn::Frame(Err(fault)) => break CallResult::Failed(worker.crashed(fault).await),
                Turn::TimedOut => break CallResult::TimedOut,
                Turn::Aborted => break CallResult::Aborted,
            }
        };
        drop(chunks);
        self.conclude(worker, job, outcome, started.elapsed(), request_limit)
            .await
    }

    /// Asks the worker to stop a cancelled stream, dropping what it still sends. One that
    /// stops within [`CANCEL_GRACE`] serves on; one that does not still runs a cancelled
    /// call (see [`Slot::failed`]).
    async fn cancel_stream(
        &self,
        worker: &mut WorkerProcess,
        job: Job,
        request_limit: Option<u64>,
    ) -> Option<Ending> {
        let id = job.id;
        let stopped = tokio::time::timeout(CANCEL_GRACE, async {
            worker
                .send_frame(Bytes::from(protocol::cancel_frame(id)))
                .await?;
            loop {
                match worker.stream_frame(id).await? {
                    Message::Chunk { .. } => {}
                    _ => return Ok::<(), Fault>(()),
                }
            }
        })
        .await;
        if matches!(stopped, Ok(Ok(()))) {
            job.answer(Err(on_worker(cancelled(), worker)));
            self.go(WorkerState::Ready, "cancelled");
            return None;
        }
        tracing::info!(worker = %worker.id(), "a cancelled stream did not stop in time: worker killed");
        self.failed(worker, job, cancelled(), request_limit).await
    }
}

/// A chunk count as the result of a stream's final reply.
fn protocol_count(n: u64) -> Box<RawValue> {
    serde_json::value::to_raw_value(&n).unwrap_or_else(|_| protocol::null())
}
