//! How the host learns that a worker process ended, whoever its parent is.
//!
//! A spawned worker is the host's child: tokio reaps it. A forked worker is the zygote's
//! child: the host cannot wait for it, so the zygote reaps it and reports its wait status.
//! When the zygote dies first, the worker dies with it (its parent-death signal) and is
//! reaped by init; its status is then unknown and the host only waits for it to be gone.
//! A spawned worker that something else reaped (a host that ignores `SIGCHLD`, or that
//! waits for any child) is gone too, its status unknown: waiting for it fails. So is a
//! forked worker whose zygote stopped (frozen, stuck) and reports nothing: the host also
//! looks for the process itself, every 100 ms, while it waits for the report, and takes
//! a process its zygote leaves a zombie for a second as ended.

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::process::Child;
use tokio::sync::oneshot;

/// How often a forked worker whose zygote died is checked for being gone.
const GONE_POLL: Duration = Duration::from_millis(5);
/// How often a forked worker is checked for being gone while its zygote's report is
/// awaited: a zygote that stops (frozen, stuck) reaps and reports nothing.
const UNREPORTED_POLL: Duration = Duration::from_millis(100);
/// How long the report of a worker found gone (a zombie its zygote has not reaped yet)
/// is still awaited: it carries the status, and a busy zygote may take a while.
const REPORT_GRACE: Duration = Duration::from_secs(1);

/// How a worker is started: `spawn` (a fresh interpreter) or `fork` (from the zygote).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StartedBy {
    /// A fresh Python process, spawned by the host.
    Spawn,
    /// Forked from the zygote that preloaded the `preload` modules.
    Fork,
}

impl StartedBy {
    /// The JSON name, `"spawn"` or `"fork"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Spawn => "spawn",
            Self::Fork => "fork",
        }
    }
}

/// How a worker process ended.
pub(crate) enum Ended {
    /// Its wait status (from tokio or from the zygote's report).
    Status(ExitStatus),
    /// It is gone, its status unknown, for the reason given: its zygote died first or
    /// did not report it, or waiting for it failed (something else reaped it, or the
    /// task watching it ended with the runtime).
    Unknown(&'static str),
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(status) => status.fmt(f),
            Self::Unknown(why) => write!(f, "unknown ({why})"),
        }
    }
}

/// What to wait on for a worker's end.
pub(crate) enum ExitWatch {
    /// A child of the host.
    Spawned(Child),
    /// A child of the zygote; `report` is the zygote's report of its wait status.
    Forked {
        pid: u32,
        report: Option<oneshot::Receiver<i32>>,
    },
}

impl ExitWatch {
    /// Waits until the process has ended and been reaped (or, its zygote silent, has
    /// ended: [`Ended::Unknown`]).
    ///
    /// # Cancel safety
    /// Cancel safe: calling it again after a timeout goes on waiting.
    pub(crate) async fn wait(&mut self) -> Ended {
        match self {
            // Waiting for a child fails once it is not one to wait for: reaped by another.
            Self::Spawned(child) => child.wait().await.map_or(
                Ended::Unknown("waiting for it failed: something else reaped it"),
                Ended::Status,
            ),
            Self::Forked { pid, report } => {
                if let Some(receiver) = report {
                    let answer = tokio::select! {
                        answer = &mut *receiver => answer,
                        () = gone(*pid, UNREPORTED_POLL) => {
                            let late = tokio::time::timeout(REPORT_GRACE, &mut *receiver).await;
                            let Ok(answer) = late else {
                                *report = None;
                                return Ended::Unknown(
                                    "waiting for it failed: its zygote did not report its end",
                                );
                            };
                            answer
                        }
                    };
                    *report = None;
                    if let Ok(raw) = answer {
                        return Ended::Status(ExitStatus::from_raw(raw));
                    }
                }
                gone(*pid, GONE_POLL).await;
                Ended::Unknown("the zygote that forked it died first")
            }
        }
    }

    /// Hands the watch to a task of its own and returns the report of its end. The host
    /// then learns a worker's end by polling a channel, with no system call, however
    /// often it looks (at every call and between calls).
    pub(crate) fn report(mut self) -> EndReport {
        let (send, receive) = oneshot::channel();
        tokio::spawn(async move {
            let _ = send.send(self.wait().await);
        });
        EndReport(Some(receive))
    }
}

/// The end of a worker's process, as the task watching it reports it.
pub(crate) struct EndReport(Option<oneshot::Receiver<Ended>>);

impl EndReport {
    /// Waits for the process to end and be reaped. It answers once: after that it waits
    /// forever.
    ///
    /// # Cancel safety
    /// Cancel safe: calling it again goes on waiting for the same report.
    pub(crate) async fn next(&mut self) -> Ended {
        let Some(receive) = self.0.as_mut() else {
            return std::future::pending().await;
        };
        let ended = receive
            .await
            .unwrap_or(Ended::Unknown("the task watching it ended"));
        self.0 = None;
        ended
    }
}

/// Returns once process `pid` is gone or a zombie, looking every `every`.
async fn gone(pid: u32, every: Duration) {
    while alive(pid) {
        tokio::time::sleep(every).await;
    }
}

/// The process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reported_status_reads_like_a_reaped_child() {
        let (send, report) = oneshot::channel();
        let mut watch = ExitWatch::Forked {
            pid: u32::MAX,
            report: Some(report),
        };
        // A wait status: exit code 3 is 3 << 8; SIGKILL is 9.
        send.send(3 << 8).unwrap();
        let ended = watch.wait().await;
        assert_eq!(ended.to_string(), "exit status: 3");
        let (send, report) = oneshot::channel();
        let mut watch = ExitWatch::Forked {
            pid: u32::MAX,
            report: Some(report),
        };
        send.send(9).unwrap();
        assert!(watch.wait().await.to_string().contains("SIGKILL"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_report_answers_once_then_waits_forever() {
        let (send, report) = oneshot::channel();
        let mut report = ExitWatch::Forked {
            pid: u32::MAX,
            report: Some(report),
        }
        .report();
        send.send(3 << 8).unwrap();
        assert_eq!(report.next().await.to_string(), "exit status: 3");
        let again = tokio::time::timeout(Duration::from_secs(3600), report.next()).await;
        assert!(again.is_err(), "a second answer");
    }

    #[tokio::test]
    async fn without_a_report_the_end_is_unknown_once_the_process_is_gone() {
        let (send, report) = oneshot::channel::<i32>();
        drop(send);
        let mut watch = ExitWatch::Forked {
            pid: u32::MAX,
            report: Some(report),
        };
        let ended = watch.wait().await;
        assert!(matches!(ended, Ended::Unknown(_)));
        assert!(ended.to_string().contains("zygote"));
        assert_eq!(StartedBy::Fork.as_str(), "fork");
    }
}
