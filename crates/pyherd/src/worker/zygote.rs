//! The zygote, host side: a Python process that imported the `preload` modules once
//! and forks every worker from itself (`python/pyherd_worker/zygote.py`).
//!
//! It is spawned like a worker (from the spawner thread, so it dies with the host; in
//! its own process group). Fork requests go out on a `SOCK_SEQPACKET` socket (its fd 3),
//! each carrying the new worker's request pipe, reply pipe and stderr by `SCM_RIGHTS`;
//! reports come back on a pipe (its fd 4) in the workers' framing: `ready` or
//! `preload_failed` first, then `forked`/`fork_failed` per request and `exit` (the raw
//! wait status) for every child it reaps. The host cannot wait for a process that is
//! not its child: a forked worker's end is the zygote's `exit` report.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair,
};
use nix::unistd::Pid;
use serde::Deserialize;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;
use tokio::process::Child;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use super::process::{LaunchSpec, spawn_error};
use super::spawner::Spawner;
use super::stderr::{self, StderrTail};
use crate::error::{Error, ErrorKind};
use crate::protocol;

/// Largest report frame (reports are small JSON objects; a traceback is cut to 16 KiB).
const MAX_REPORT_BYTES: usize = 1 << 20;
/// How long the zygote may take to answer a fork request before it is deemed stuck.
const FORK_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the last stderr lines of a zygote that ended.
const STDERR_FLUSH: Duration = Duration::from_millis(500);
/// The name the zygote's stderr lines are logged under.
const LOG_NAME: &str = "zygote";

/// A report from the zygote.
#[derive(Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Report {
    Ready {
        pid: u32,
        ms: f64,
    },
    PreloadFailed {
        message: String,
        python_type: Option<String>,
        traceback: Option<String>,
    },
    Forked {
        seq: u64,
        pid: u32,
    },
    ForkFailed {
        seq: u64,
        message: String,
    },
    Exit {
        pid: u32,
        status: i32,
    },
}

/// Who waits for what the zygote reports.
#[derive(Default)]
struct Book {
    /// Cleared (and closed) once the zygote is gone: waiters then see their sender dropped.
    closed: bool,
    forks: HashMap<u64, oneshot::Sender<Result<Forked, String>>>,
    exits: HashMap<u32, oneshot::Sender<i32>>,
}

/// A worker the zygote forked.
pub(crate) struct Forked {
    pub(crate) pid: u32,
    /// The zygote's report of its raw wait status; dropped if the zygote dies first.
    pub(crate) exit: oneshot::Receiver<i32>,
}

/// Why the zygote could not start.
pub(crate) enum StartError {
    /// A preload module raised at import: a new zygote would fail the same way.
    Preload(Error),
    /// The process could not be started, did not get ready in time or died first.
    Failed(Error),
}

/// Why a fork request did not give a worker.
pub(crate) enum ForkError {
    /// The zygote is gone or stuck: it is being replaced.
    Lost(String),
    /// The zygote is fine but could not fork this one (it said why).
    Refused(String),
}

/// What workers use to ask the zygote for a fork (shared behind an `Arc`).
pub(crate) struct ZygoteLink {
    pid: u32,
    control: AsyncFd<OwnedFd>,
    next_seq: AtomicU64,
    book: Arc<Mutex<Book>>,
    /// Cancelled when the zygote is found gone or stuck: its keeper kills and replaces it.
    lost: CancellationToken,
}

/// The running zygote process, owned by the task that keeps it.
pub(crate) struct Zygote {
    link: Arc<ZygoteLink>,
    child: Child,
    tail: Arc<StderrTail>,
    stderr_task: JoinHandle<()>,
    reaped: bool,
}

impl Zygote {
    /// Spawns the zygote and waits until it has imported `preload` (`startup_timeout`).
    ///
    /// # Errors
    /// [`StartError::Preload`] when a module raised at import (an `initialization` error
    /// with the Python traceback and stderr tail); [`StartError::Failed`] otherwise.
    pub(crate) async fn start(
        spec: &LaunchSpec,
        spawner: &Spawner,
        preload: &[String],
    ) -> Result<Self, StartError> {
        let failed = |e: String| StartError::Failed(spawn_error(e));
        let (host_control, child_control) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .map_err(|e| failed(format!("cannot create the zygote's socket: {e}")))?;
        let (host_reports, child_reports) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| failed(format!("cannot create the zygote's pipe: {e}")))?;
        let control = register(host_control)
            .map_err(|e| failed(format!("cannot register the zygote's socket: {e}")))?;
        let reports = pipe::Receiver::from_owned_fd(host_reports)
            .map_err(|e| failed(format!("cannot register the zygote's pipe: {e}")))?;
        let mut reports = FramedRead::new(reports, protocol::codec(MAX_REPORT_BYTES));

        let mut command = spec.python_command("pyherd_worker.zygote");
        command
            .arg("--parent-pid")
            .arg(std::process::id().to_string())
            .args(["--run-id", spec.run.id()]);
        for module in preload {
            command.arg("--preload").arg(module);
        }
        let began = Instant::now();
        let mut child = spawner
            .spawn(command, child_control, child_reports)
            .await
            .map_err(|e| failed(format!("cannot start {}: {e}", spec.python.display())))?;
        let tail = Arc::new(StderrTail::default());
        let stderr_task = match child.stderr.take() {
            Some(err) => stderr::drain(err, LOG_NAME.into(), child.id().unwrap_or(0), tail.clone()),
            None => tokio::spawn(async {}),
        };
        let mut zygote = Self {
            link: Arc::new(ZygoteLink {
                pid: child.id().unwrap_or(0),
                control,
                next_seq: AtomicU64::new(1),
                book: Arc::default(),
                lost: CancellationToken::new(),
            }),
            child,
            tail,
            stderr_task,
            reaped: false,
        };
        let first = tokio::time::timeout(spec.startup_timeout, reports.next()).await;
        let timed_out = first.is_err();
        let report = match first {
            Ok(Some(Ok(frame))) => serde_json::from_slice::<Report>(&frame)
                .map_err(|e| format!("its first report is not one: {e}")),
            Ok(Some(Err(e))) => Err(format!("its first report is unreadable: {e}")),
            Ok(None) => Err("python exited before it was ready".to_owned()),
            Err(_) => Err(format!(
                "not ready within {:?} (raise startup_timeout for slow preloads)",
                spec.startup_timeout
            )),
        };
        match report {
            Ok(Report::Ready { pid, ms }) if pid == zygote.link.pid => {
                tracing::info!(pid, preload = ?preload, import_ms = ms,
                    ms = began.elapsed().as_millis() as u64, "zygote ready: workers are forked from it");
                tokio::spawn(read_reports(
                    reports,
                    zygote.link.book.clone(),
                    zygote.link.lost.clone(),
                ));
                Ok(zygote)
            }
            Ok(Report::PreloadFailed {
                message,
                python_type,
                traceback,
            }) => {
                let error = zygote
                    .fail(Error::new(ErrorKind::StartupFailed, message))
                    .await
                    .with_context(|c| {
                        c.python_type = python_type;
                        c.traceback = traceback;
                    });
                Err(StartError::Preload(error))
            }
            Ok(_) => {
                let error = Error::new(
                    ErrorKind::HandshakeFailed,
                    "the zygote's first report is not `ready`",
                );
                Err(StartError::Failed(zygote.fail(error).await))
            }
            Err(why) => {
                let kind = if timed_out {
                    ErrorKind::StartupTimeout
                } else {
                    ErrorKind::StartupFailed
                };
                let error = Error::new(kind, format!("the zygote did not start: {why}"));
                Err(StartError::Failed(zygote.fail(error).await))
            }
        }
    }

    /// Kills and reaps a zygote that failed to start; `error` with its exit and stderr.
    async fn fail(&mut self, error: Error) -> Error {
        let exit = self.end().await;
        error.with_context(|c| {
            c.worker_id = Some(LOG_NAME.to_owned());
            c.pid = Some(self.link.pid);
            c.exit_status = exit;
            c.stderr_tail = self.tail.text();
        })
    }

    /// The handle workers fork through.
    pub(crate) fn link(&self) -> Arc<ZygoteLink> {
        self.link.clone()
    }

    /// Waits until the zygote exits, or is found gone or stuck (then kills it); reaps it
    /// and says how it ended. When `stop` is cancelled first, kills and reaps it and
    /// returns `None`.
    pub(crate) async fn lost(mut self, stop: &CancellationToken) -> Option<Error> {
        let exit = tokio::select! {
            status = self.child.wait() => {
                self.reaped = true;
                status.ok().map(|s| s.to_string())
            }
            () = self.link.lost.cancelled() => self.end().await,
            () = stop.cancelled() => {
                self.link.lost.cancel();
                self.end().await;
                return None;
            }
        };
        self.link.lost.cancel();
        stderr::finish(&mut self.stderr_task, STDERR_FLUSH).await;
        let error = Error::new(ErrorKind::WorkerCrashed, "the zygote is gone");
        Some(error.with_context(|c| {
            c.worker_id = Some(LOG_NAME.to_owned());
            c.pid = Some(self.link.pid);
            c.exit_status = exit;
            c.stderr_tail = self.tail.text();
        }))
    }

    /// Kills the zygote's group and reaps it; its exit status.
    async fn end(&mut self) -> Option<String> {
        self.link.kill();
        let status = self.child.wait().await.ok().map(|s| s.to_string());
        self.reaped = true;
        stderr::finish(&mut self.stderr_task, STDERR_FLUSH).await;
        status
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        if !self.reaped {
            // The pool is gone: the zygote's workers die with it (their parent-death
            // signal); tokio's orphan reaper collects the zygote.
            self.link.kill();
        }
    }
}

impl ZygoteLink {
    /// The zygote's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the zygote is still deemed up (not found gone or stuck).
    pub(crate) fn is_up(&self) -> bool {
        !self.lost.is_cancelled()
    }

    /// Marks the zygote as gone or stuck: its keeper kills and replaces it.
    pub(crate) fn give_up(&self) {
        self.lost.cancel();
    }

    fn kill(&self) {
        if let Ok(pgid @ 2..) = i32::try_from(self.pid) {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }

    /// Asks the zygote to fork worker `worker_id` running `pyherd_worker` with `argv`,
    /// on `fds` (its request pipe, reply pipe and stderr, closed here once sent).
    ///
    /// # Errors
    /// [`ForkError::Lost`] when the zygote is gone or does not answer in time (it is then
    /// marked for replacement), [`ForkError::Refused`] when it could not fork.
    ///
    /// # Cancel safety
    /// Cancel safe: a child forked for a request whose caller has gone is killed.
    pub(crate) async fn fork(
        &self,
        worker_id: &str,
        argv: &[String],
        fds: [OwnedFd; 3],
    ) -> Result<Forked, ForkError> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        {
            let Ok(mut book) = self.book.lock() else {
                return Err(ForkError::Lost("the zygote's book is poisoned".into()));
            };
            if book.closed {
                return Err(ForkError::Lost("the zygote is gone".into()));
            }
            book.forks.insert(seq, reply);
        }
        let request = serde_json::json!({
            "t": "fork", "seq": seq, "worker_id": worker_id, "argv": argv,
        });
        let body = request.to_string();
        let raw = fds.each_ref().map(AsRawFd::as_raw_fd);
        let sent = self
            .control
            .async_io(Interest::WRITABLE, |socket| {
                let iov = [IoSlice::new(body.as_bytes())];
                let rights = [ControlMessage::ScmRights(&raw)];
                sendmsg::<()>(
                    socket.as_raw_fd(),
                    &iov,
                    &rights,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            })
            .await;
        drop(fds);
        if let Err(e) = sent {
            if let Ok(mut book) = self.book.lock() {
                book.forks.remove(&seq);
            }
            self.give_up();
            return Err(ForkError::Lost(format!(
                "cannot send the fork request: {e}"
            )));
        }
        match tokio::time::timeout(FORK_REPLY_TIMEOUT, answer).await {
            Ok(Ok(Ok(forked))) => Ok(forked),
            Ok(Ok(Err(why))) => Err(ForkError::Refused(why)),
            Ok(Err(_)) => Err(ForkError::Lost("the zygote died before it answered".into())),
            Err(_) => {
                self.give_up();
                Err(ForkError::Lost(format!(
                    "the zygote did not answer within {FORK_REPLY_TIMEOUT:?}"
                )))
            }
        }
    }
}

/// Registers the host's end of the control socket with tokio, for writing.
#[allow(unsafe_code)]
fn register(socket: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `AsyncFd` takes ownership of `socket`, so the fd stays open and names the
    // same socket until the `AsyncFd` is dropped (it is never taken out of it).
    unsafe { AsyncFd::register_with_interest(socket, Interest::WRITABLE) }.map_err(io::Error::from)
}

/// Dispatches the zygote's reports until its pipe closes or carries garbage; then
/// every waiter sees its sender dropped and the zygote is marked lost.
async fn read_reports(
    mut reports: FramedRead<pipe::Receiver, LengthDelimitedCodec>,
    book: Arc<Mutex<Book>>,
    lost: CancellationToken,
) {
    while let Some(Ok(frame)) = reports.next().await {
        let report = match serde_json::from_slice::<Report>(&frame) {
            Ok(report) => report,
            Err(e) => {
                tracing::warn!(error = %e, "the zygote sent a report that is not one");
                break;
            }
        };
        let Ok(mut book) = book.lock() else { break };
        match report {
            Report::Forked { seq, pid } => {
                let (sender, exit) = oneshot::channel();
                book.exits.insert(pid, sender);
                let delivered = book
                    .forks
                    .remove(&seq)
                    .is_some_and(|waiter| waiter.send(Ok(Forked { pid, exit })).is_ok());
                if !delivered {
                    // Nobody waits for this worker: it must not live on.
                    if let Ok(pid) = i32::try_from(pid) {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
            }
            Report::ForkFailed { seq, message } => {
                if let Some(waiter) = book.forks.remove(&seq) {
                    let _ = waiter.send(Err(message));
                }
            }
            Report::Exit { pid, status } => {
                if let Some(waiter) = book.exits.remove(&pid) {
                    let _ = waiter.send(status);
                }
            }
            Report::Ready { .. } | Report::PreloadFailed { .. } => {
                tracing::warn!("the zygote reported its start twice");
            }
        }
    }
    if let Ok(mut book) = book.lock() {
        book.closed = true;
        book.forks.clear();
        book.exits.clear();
    }
    lost.cancel();
}
