//! One Python worker process: spawn (or a fork from the zygote), handshake, one call at
//! a time, and its end.
//!
//! Ending a worker always signals its whole process group (so its own children die
//! too) and always waits until it is reaped (by the host, or by the zygote that forked
//! it): no zombies, no orphans.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::value::RawValue;
use tokio::net::unix::pipe;
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use super::exit::{EndReport, Ended, ExitWatch, StartedBy};
use super::launcher::ForkHold;
use super::spawner::Spawner;
use super::stderr::{self, StderrTail};
use crate::error::{Error, ErrorKind};
use crate::protocol::{self, Hello, Message};
use crate::registry::{self, Run, RunEntry};
use crate::telemetry;

/// How long a worker whose pipe closed gets to finish exiting before SIGKILL.
const DYING_PATIENCE: Duration = Duration::from_secs(1);
/// How long a killed worker gets to be reaped by the task watching it before it is left alone.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the last stderr lines of a worker that ended.
const STDERR_FLUSH: Duration = Duration::from_millis(500);
/// How long the reply pipe of a worker that exited is still read: what it wrote before
/// its end is already there, and a process it started may hold the pipe open for good.
const EXITED_READ: Duration = Duration::from_millis(20);

/// Everything needed to start a worker, fixed when the pool is built.
pub(crate) struct LaunchSpec {
    pub(crate) python: PathBuf,
    pub(crate) pythonpath: OsString,
    pub(crate) handlers: Vec<String>,
    pub(crate) max_frame_bytes: usize,
    pub(crate) idle_spin_us: u64,
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) working_dir: Option<PathBuf>,
    pub(crate) startup_timeout: Duration,
    /// The pool's run: every worker carries its id and is recorded in its registry.
    pub(crate) run: Arc<Run>,
}

impl LaunchSpec {
    /// `python -m <module>` with the workers' environment (the caller's variables,
    /// `PYTHONPATH` with the package first, the run id), stdin and stdout closed, stderr
    /// piped, in the working directory, killed if dropped.
    pub(crate) fn python_command(&self, module: &str) -> Command {
        let mut command = Command::new(&self.python);
        // The caller's variables first: PYTHONPATH already has theirs after the package's.
        command
            .args(["-m", module])
            .envs(&self.env)
            .env("PYTHONPATH", &self.pythonpath)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYHERD_RUN_ID", &**self.run.id())
            // A worker's id is given to each worker alone (or set by the zygote in each
            // fork): none is inherited, or a zygote and its forks would pass for that
            // worker's leftovers when it ends.
            .env_remove("PYHERD_WORKER_ID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(dir) = &self.working_dir {
            command.current_dir(dir);
        }
        command
    }
}

/// How a call on this worker ended.
pub(crate) enum CallResult {
    /// The worker answered (a result or a Python-side error); it is fine.
    Answered(Result<Box<RawValue>, Error>),
    /// The deadline passed: the worker must be killed.
    TimedOut,
    /// The pool is being torn down: the worker must be killed.
    Aborted,
    /// The call was cancelled while it ran: the worker must be killed (a running call
    /// cannot be interrupted).
    Cancelled,
    /// The worker died or broke the protocol; the error is for the caller.
    Failed(Error),
}

/// The host's ends of a new worker's pipes.
pub(crate) struct HostPipes {
    requests: pipe::Sender,
    replies: pipe::Receiver,
}

impl HostPipes {
    /// New pipes: the host's ends, and the child's (its request and reply fds, which are
    /// close-on-exec until they are put on fds 3 and 4).
    ///
    /// # Errors
    /// `initialization/spawn_failed` when the pipes cannot be made.
    pub(crate) fn new() -> Result<(Self, [OwnedFd; 2]), Error> {
        use nix::fcntl::OFlag;
        let pipe_pair = || {
            nix::unistd::pipe2(OFlag::O_CLOEXEC)
                .map_err(|e| spawn_error(format!("cannot create a pipe: {e}")))
        };
        let (child_requests, host_requests) = pipe_pair()?;
        let (host_replies, child_replies) = pipe_pair()?;
        let wrap = |e: std::io::Error| spawn_error(format!("cannot register a pipe: {e}"));
        let host = Self {
            requests: pipe::Sender::from_owned_fd(host_requests).map_err(wrap)?,
            replies: pipe::Receiver::from_owned_fd(host_replies).map_err(wrap)?,
        };
        Ok((host, [child_requests, child_replies]))
    }
}

/// A process just started, that has not said hello yet.
pub(crate) struct Launched {
    pub(crate) pid: u32,
    pub(crate) exit: ExitWatch,
    pub(crate) tail: Arc<StderrTail>,
    pub(crate) stderr_task: JoinHandle<()>,
    pub(crate) started_by: StartedBy,
    /// When its start began.
    pub(crate) began: Instant,
}

/// The `pyherd_worker` arguments of worker `id` (the parent's pid comes last, from
/// whoever starts it).
pub(crate) fn worker_args(spec: &LaunchSpec, id: &str) -> Vec<String> {
    let mut args = vec![
        "--worker-id".to_owned(),
        id.to_owned(),
        "--max-frame-bytes".to_owned(),
        spec.max_frame_bytes.to_string(),
        "--idle-spin-us".to_owned(),
        spec.idle_spin_us.to_string(),
        "--run-id".to_owned(),
        spec.run.id().to_string(),
    ];
    for module in &spec.handlers {
        args.extend(["--handlers".to_owned(), module.clone()]);
    }
    args
}

/// A running Python worker.
pub(crate) struct WorkerProcess {
    id: Arc<str>,
    pid: u32,
    /// Its process's end, reported by the task that watches it.
    process: EndReport,
    exit: Option<Ended>,
    requests: Option<FramedWrite<pipe::Sender, LengthDelimitedCodec>>,
    replies: FramedRead<pipe::Receiver, LengthDelimitedCodec>,
    tail: Arc<StderrTail>,
    stderr_task: JoinHandle<()>,
    hello: Hello,
    started: Instant,
    started_by: StartedBy,
    /// Whether its group was signalled at its end (only the first end does it).
    signalled: bool,
    /// Whether its exit was logged (a worker is ended once, `end` may run again).
    exit_told: bool,
    /// Its line in the run registry, removed when the worker is dropped (after its end).
    registered: RunEntry,
    /// The zygote it was forked from, held until the worker has ended and been reaped.
    zygote: Option<ForkHold>,
}

pub(crate) fn spawn_error(message: String) -> Error {
    Error::new(ErrorKind::SpawnFailed, message)
}

impl WorkerProcess {
    /// Spawns a worker (a fresh interpreter) and waits for its `hello`.
    ///
    /// # Errors
    /// An `initialization` error (`spawn_failed`, `startup_failed`, `startup_timeout`,
    /// `handler_import_failed`, `handshake_failed`) with the worker's stderr tail; the
    /// process is killed and reaped before this returns.
    pub(crate) async fn start(
        spec: &LaunchSpec,
        spawner: &Spawner,
        id: Arc<str>,
    ) -> Result<Self, Error> {
        let (host, [child_requests, child_replies]) = HostPipes::new()?;
        let mut command = spec.python_command("pyherd_worker");
        command
            .args(worker_args(spec, &id))
            .arg("--parent-pid")
            .arg(std::process::id().to_string())
            .env("PYHERD_WORKER_ID", &*id);
        let mut child = spawner
            .spawn(command, child_requests, child_replies)
            .await
            .map_err(|e| spawn_error(format!("cannot start {}: {e}", spec.python.display())))?;
        let pid = child.id().unwrap_or(0);
        let began = Instant::now();
        let tail = Arc::new(StderrTail::default());
        let stderr_task = match child.stderr.take() {
            Some(err) => stderr::drain(err, id.clone(), pid, tail.clone()),
            None => tokio::spawn(async {}),
        };
        let launched = Launched {
            pid,
            exit: ExitWatch::Spawned(child),
            tail,
            stderr_task,
            started_by: StartedBy::Spawn,
            began,
        };
        Self::handshake(spec, id, host, launched).await
    }

    /// Waits for the `hello` of a process just started on `host`'s pipes.
    ///
    /// # Errors
    /// As [`start`](Self::start), except `spawn_failed`.
    pub(crate) async fn handshake(
        spec: &LaunchSpec,
        id: Arc<str>,
        host: HostPipes,
        launched: Launched,
    ) -> Result<Self, Error> {
        let Launched {
            pid,
            exit,
            tail,
            stderr_task,
            started_by,
            began,
        } = launched;
        let registered = spec.run.enter(&id, pid);
        let codec = protocol::codec(spec.max_frame_bytes);
        let mut worker = Self {
            id,
            pid,
            process: exit.report(),
            exit: None,
            requests: Some(FramedWrite::new(host.requests, codec.clone())),
            replies: FramedRead::new(host.replies, codec),
            tail,
            stderr_task,
            hello: Hello {
                pid,
                handlers: Vec::new(),
                python: String::new(),
                json: String::new(),
                adapters: Vec::new(),
            },
            started: began,
            started_by,
            signalled: false,
            exit_told: false,
            registered,
            zygote: None,
        };
        match tokio::time::timeout(spec.startup_timeout, worker.next_reply()).await {
            Ok(Ok(frame)) => match protocol::decode(&frame) {
                Ok(Message::Hello(hello)) => {
                    worker.hello = hello;
                    let ms =
                        u64::try_from(worker.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                    telemetry::worker_spawned(&worker.id, pid, started_by, ms);
                    Ok(worker)
                }
                // A handler module raised at import: Python says why.
                Ok(Message::Err { error, .. }) => Err(worker.fail_start(error).await),
                Ok(Message::Ok { .. } | Message::Chunk { .. } | Message::End { .. }) => Err(worker
                    .fail_start(Error::new(
                        ErrorKind::HandshakeFailed,
                        "worker answered before saying hello",
                    ))
                    .await),
                Err(why) => Err(worker
                    .fail_start(Error::new(ErrorKind::HandshakeFailed, why))
                    .await),
            },
            Ok(Err(Fault::Protocol(why))) => Err(worker
                .fail_start(Error::new(
                    ErrorKind::HandshakeFailed,
                    format!("before its hello: {why}"),
                ))
                .await),
            Ok(Err(Fault::Gone(_))) => Err(worker
                .fail_start(Error::new(
                    ErrorKind::StartupFailed,
                    "python exited before it was ready",
                ))
                .await),
            Err(_) => Err(worker
                .fail_start(Error::new(
                    ErrorKind::StartupTimeout,
                    format!("no hello within {:?}", spec.startup_timeout),
                ))
                .await),
        }
    }

    async fn fail_start(mut self, error: Error) -> Error {
        let exit = self.end(DYING_PATIENCE, None).await;
        self.with_context(error, exit)
    }

    fn with_context(&self, error: Error, exit: Option<String>) -> Error {
        error.with_context(|c| {
            c.worker_id = Some(self.id.to_string());
            c.pid = Some(self.pid);
            c.exit_status = exit;
            c.stderr_tail = self.tail.text();
        })
    }

    /// The worker's id, e.g. `w3`.
    pub(crate) fn id(&self) -> &Arc<str> {
        &self.id
    }

    /// The Python process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// What the worker said in its `hello`.
    pub(crate) fn hello(&self) -> &Hello {
        &self.hello
    }

    /// When its start began (the spawn, or the fork request).
    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    /// Keeps the zygote it was forked from while it lives.
    pub(crate) fn forked_from(&mut self, zygote: ForkHold) {
        self.zygote = Some(zygote);
    }

    /// Whether it was spawned or forked from the zygote.
    pub(crate) fn started_by(&self) -> StartedBy {
        self.started_by
    }

    /// Sends one call frame and waits for its answer until `deadline`.
    ///
    /// # Cancel safety
    /// Not cancel safe: a call abandoned half-way leaves the pipe mid-frame; end the
    /// worker instead (the pool does, through `deadline` and `abort`).
    pub(crate) async fn call(
        &mut self,
        frame: Bytes,
        id: u64,
        deadline: tokio::time::Instant,
        abort: &CancellationToken,
        cancel: &CancellationToken,
    ) -> CallResult {
        let exchange = async {
            self.send_frame(frame).await?;
            self.answer(id).await
        };
        let outcome = tokio::select! {
            outcome = exchange => outcome,
            () = tokio::time::sleep_until(deadline) => return CallResult::TimedOut,
            () = abort.cancelled() => return CallResult::Aborted,
            () = cancel.cancelled() => return CallResult::Cancelled,
        };
        match outcome {
            Ok(answer) => CallResult::Answered(answer),
            Err(fault) => CallResult::Failed(self.crashed(fault).await),
        }
    }

    /// Writes one frame on the request pipe.
    ///
    /// # Cancel safety
    /// Not cancel safe: a write abandoned half-way leaves the pipe mid-frame.
    pub(crate) async fn send_frame(&mut self, frame: Bytes) -> Result<(), Fault> {
        let Some(requests) = self.requests.as_mut() else {
            return Err(Fault::Gone("the request pipe is closed".into()));
        };
        if self.exit.is_some() {
            return Err(exited());
        }
        // A process the worker started may hold the pipe's other end: a write that
        // fills the pipe would then wait for a reader that never comes.
        tokio::select! {
            biased;
            sent = requests.send(frame) => {
                sent.map_err(|e| Fault::Gone(format!("writing the call failed: {e}")))
            }
            ended = self.process.next() => {
                self.exit = Some(ended);
                Err(exited())
            }
        }
    }

    /// Waits for the answer to call `id` (a result or a Python-side error).
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is consumed unless a whole frame arrived, so a caller may
    /// stop waiting and wait again later for the same answer.
    pub(crate) async fn answer(&mut self, id: u64) -> Result<Result<Box<RawValue>, Error>, Fault> {
        match protocol::decode(&self.next_reply().await?) {
            Ok(Message::Ok { id: got, result }) if got == id => Ok(Ok(result)),
            Ok(Message::Err { id: got, error }) if got == id => Ok(Err(error)),
            Ok(other) => Err(Fault::Protocol(format!(
                "expected the answer to call {id}, got {other:?}"
            ))),
            Err(why) => Err(Fault::Protocol(why)),
        }
    }

    /// Waits for the next frame of streaming call `id`: a chunk, its end, or its error
    /// (an `ok` is not part of a stream).
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is consumed unless a whole frame arrived.
    pub(crate) async fn stream_frame(&mut self, id: u64) -> Result<Message, Fault> {
        match protocol::decode(&self.next_reply().await?) {
            Ok(
                message @ (Message::Chunk { id: got, .. }
                | Message::End { id: got }
                | Message::Err { id: got, .. }),
            ) if got == id => Ok(message),
            Ok(other) => Err(Fault::Protocol(format!(
                "expected a frame of stream {id}, got {other:?}"
            ))),
            Err(why) => Err(Fault::Protocol(why)),
        }
    }

    /// Waits while idle until the worker goes wrong: it exits, or sends something
    /// unasked. [`crashed`](Self::crashed) then ends it.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is read unless a whole frame arrived, and an end learned is
    /// kept. It returns at once for a worker whose end is known, so a caller that
    /// selects on it with incoming calls gives no call to a worker known to be dead.
    pub(crate) async fn idle_fault(&mut self) -> Fault {
        match self.frame_or_end().await {
            Some(Ok(_)) => Fault::Protocol("sent a frame while idle".into()),
            Some(Err(Fault::Gone(why))) => Fault::Gone(format!("{why} while idle")),
            Some(Err(Fault::Protocol(why))) => Fault::Protocol(format!("{why} while idle")),
            None => Fault::Gone("its process exited while idle".into()),
        }
    }

    /// Reads the next frame on the reply pipe, or learns that the worker is gone: its
    /// pipe closed, or its process ended. What it wrote before its end is still read.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is read unless a whole frame arrived, and an end learned is
    /// kept.
    async fn next_reply(&mut self) -> Result<BytesMut, Fault> {
        if let Some(frame) = self.frame_or_end().await {
            return frame;
        }
        match tokio::time::timeout(EXITED_READ, self.replies.next()).await {
            Ok(Some(Ok(body))) => Ok(body),
            // Cut off mid-frame by its end: it died, it broke nothing.
            Ok(Some(Err(_)) | None) | Err(_) => Err(exited()),
        }
    }

    /// The next frame on the reply pipe, or `None` once the worker's process has ended.
    /// The end is watched as well as the pipe because a process the worker started (a
    /// fork, a subprocess given its fds) keeps the pipe open after the worker's death,
    /// and the pipe alone would then never close.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is read unless a whole frame arrived, and an end learned is
    /// kept.
    async fn frame_or_end(&mut self) -> Option<Result<BytesMut, Fault>> {
        if self.exit.is_some() {
            return None;
        }
        let ended = tokio::select! {
            biased;
            frame = self.replies.next() => return Some(frame_or_fault(frame)),
            ended = self.process.next() => ended,
        };
        self.exit = Some(ended);
        None
    }

    /// Ends a worker that died or broke the protocol and describes it for the caller.
    pub(crate) async fn crashed(&mut self, fault: Fault) -> Error {
        let (message, patience) = match fault {
            Fault::Gone(why) => (format!("worker {} died ({why})", self.id), DYING_PATIENCE),
            Fault::Protocol(why) => (
                format!(
                    "worker {} broke the protocol and was killed: {why}",
                    self.id
                ),
                Duration::ZERO,
            ),
        };
        let exit = self.end(patience, None).await;
        self.with_context(Error::new(ErrorKind::WorkerCrashed, message), exit)
    }

    /// Kills the worker's process group now and reaps it.
    pub(crate) async fn kill(&mut self) -> Option<String> {
        self.end(Duration::ZERO, None).await
    }

    /// Stops an idle worker politely: closes its request pipe (it exits on EOF), then
    /// SIGTERM to its group after `kill_timeout`, then SIGKILL after another.
    pub(crate) async fn stop(&mut self, kill_timeout: Duration) -> Option<String> {
        self.requests = None;
        self.end(kill_timeout, Some(kill_timeout)).await
    }

    /// Waits `patience` for the process to exit by itself, then (optionally) SIGTERM and
    /// `term_timeout`, then SIGKILL; reaps it; signals what is left of its group; flushes
    /// its stderr. Returns how it exited.
    async fn end(&mut self, patience: Duration, term_timeout: Option<Duration>) -> Option<String> {
        if !self.signalled {
            if self.exit.is_none() && !self.wait_exit(patience).await {
                let mut exited = false;
                if let Some(term_timeout) = term_timeout {
                    self.signal(Signal::SIGTERM);
                    exited = self.wait_exit(term_timeout).await;
                }
                if !exited {
                    self.signal(Signal::SIGKILL);
                    self.wait_exit(REAP_TIMEOUT).await;
                }
            }
            // Children the worker started share its process group: they end with it. PIDs
            // are handed out in sequence, so the group id cannot have been reused in the
            // instants since the leader was reaped (and only this first end signals it).
            self.signal(Signal::SIGKILL);
            self.signalled = true;
            self.kill_strays().await;
        }
        // Reaped: its zygote has nothing more to do for it (a retired one may end now).
        if self.exit.is_some() {
            self.zygote = None;
        }
        stderr::finish(&mut self.stderr_task, STDERR_FLUSH).await;
        let status = self.exit.as_ref().map(ToString::to_string);
        if !std::mem::replace(&mut self.exit_told, true) {
            telemetry::worker_exited(&self.id, self.pid, status.as_deref().unwrap_or("unknown"));
        }
        status
    }

    /// Kills what the worker started outside its process group (a session of its own):
    /// such a process still carries the worker's id in its environment.
    async fn kill_strays(&self) {
        let (run, worker) = (self.registered.run_id().clone(), self.id.clone());
        let killed = tokio::task::spawn_blocking(move || registry::kill_strays(&run, &worker))
            .await
            .unwrap_or_default();
        if !killed.is_empty() {
            tracing::info!(worker = %self.id, pids = ?killed, "killed what the worker left outside its process group");
        }
    }

    async fn wait_exit(&mut self, within: Duration) -> bool {
        match tokio::time::timeout(within, self.process.next()).await {
            Ok(ended) => {
                self.exit = Some(ended);
                true
            }
            Err(_) => false,
        }
    }

    fn signal(&self, signal: Signal) {
        // killpg(0) would signal the host's own group: never without a real pid.
        if let Ok(pgid @ 2..) = i32::try_from(self.pid) {
            let _ = killpg(Pid::from_raw(pgid), signal);
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if !self.signalled {
            // Dropped without being ended (pool dropped, task aborted): take the group
            // down; the task watching the leader (or the zygote) reaps it.
            self.signal(Signal::SIGKILL);
        }
    }
}

/// The fault of a worker whose process ended.
fn exited() -> Fault {
    Fault::Gone("its process exited".into())
}

/// A frame read on the reply pipe, or the fault its absence means.
fn frame_or_fault(frame: Option<std::io::Result<BytesMut>>) -> Result<BytesMut, Fault> {
    match frame {
        Some(Ok(body)) => Ok(body),
        Some(Err(e)) => Err(Fault::Protocol(format!("unreadable frame: {e}"))),
        None => Err(Fault::Gone("reply pipe closed".into())),
    }
}

/// How a worker broke down during an exchange; [`WorkerProcess::crashed`] ends it.
pub(crate) enum Fault {
    /// The process is gone (pipe closed, write failed).
    Gone(String),
    /// The process sent something that is not the protocol.
    Protocol(String),
}
