//! The sweep: ends the processes of runs whose host died, PID-reuse safe.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde::Serialize;

use super::procfs::{self, Marked};
use super::record::{self, RunRecord, WorkerRecord};

/// What a [`sweep`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SweepReport {
    /// The state directory swept.
    pub state_dir: PathBuf,
    /// Processes of dead runs that were killed.
    pub killed: Vec<Killed>,
    /// Runs, files and processes left alone, each with the reason.
    pub skipped: Vec<Skipped>,
    /// Run files removed (their host is dead and their processes are dealt with).
    pub removed: Vec<PathBuf>,
}

/// A process the sweep killed: checked to belong to a dead run, then sent SIGKILL (which
/// only fails if it ended in between).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Killed {
    /// Its pid.
    pub pid: u32,
    /// The worker it is, or (for a worker's child) the worker that started it.
    pub worker_id: Option<String>,
    /// The run it belonged to.
    pub run_id: String,
    /// `true` for a recorded worker: its whole process group was killed. `false` for a
    /// process found by the run id in its environment (a worker's child, say).
    pub group: bool,
}

/// Something the sweep did not kill, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Skipped {
    /// The run file concerned.
    pub file: PathBuf,
    /// The run, when the file could be read.
    pub run_id: Option<String>,
    /// The process concerned (the host for `host_alive`).
    pub pid: Option<u32>,
    /// The worker concerned.
    pub worker_id: Option<String>,
    /// Why it was skipped.
    pub reason: SkipReason,
    /// Details for a person (an OS error, the start times compared).
    pub detail: String,
}

/// Why a [`sweep`] left something alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SkipReason {
    /// The run's host is still running: the run is not stale.
    HostAlive,
    /// The file (or the runs directory) cannot be read or is not a run record; it is
    /// kept for a person to look at.
    Unreadable,
    /// The recorded worker is no longer running.
    NotRunning,
    /// The pid now belongs to a process started at another time (the pid was reused).
    StartTimeDiffers,
    /// The process does not carry the run id (in its environment or command line), or
    /// its `/proc` files cannot be read by this user.
    NoMarker,
    /// The run file could not be removed.
    RemoveFailed,
}

impl SkipReason {
    /// The JSON name, e.g. `"start_time_differs"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HostAlive => "host_alive",
            Self::Unreadable => "unreadable",
            Self::NotRunning => "not_running",
            Self::StartTimeDiffers => "start_time_differs",
            Self::NoMarker => "no_marker",
            Self::RemoveFailed => "remove_failed",
        }
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Ends the processes of every run in `state_dir` whose host is dead (its pid is gone or
/// now has another start time), then removes that run's file.
///
/// A recorded worker is killed (with its process group) only when `/proc` shows the same
/// start time as recorded *and* the process carries the run id (environment
/// `PYHERD_RUN_ID` or `--run-id` on its command line); any other process carrying a dead
/// run's id in its environment and started after that run's host (a worker's child) is
/// killed too. Runs whose host lives, and files that cannot be read, are left alone and
/// reported. This never fails: every problem is a [`Skipped`] entry.
pub fn sweep(state_dir: &Path) -> SweepReport {
    let mut report = SweepReport {
        state_dir: state_dir.to_path_buf(),
        ..SweepReport::default()
    };
    let dir = record::runs_dir(state_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return report,
        Err(e) => {
            report.skip(&dir, None, SkipReason::Unreadable, e.to_string());
            return report;
        }
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut marked: Option<Vec<Marked>> = None;
    for file in files {
        let run = match record::read(&file) {
            Ok(run) => run,
            Err(e) => {
                report.skip(&file, None, SkipReason::Unreadable, e.to_string());
                continue;
            }
        };
        if host_alive(&run) {
            report.skipped.push(Skipped {
                pid: Some(run.host.pid),
                ..skipped(&file, Some(&run), SkipReason::HostAlive, String::new())
            });
            continue;
        }
        let marked = marked.get_or_insert_with(procfs::marked_processes);
        report.end_run(&file, &run, marked);
    }
    report
}

fn host_alive(run: &RunRecord) -> bool {
    procfs::stat(run.host.pid).is_some_and(|s| !s.is_gone() && s.start_time == run.host.start_time)
}

impl SweepReport {
    fn end_run(&mut self, file: &Path, run: &RunRecord, marked: &[Marked]) {
        let mut done = HashSet::new();
        for worker in &run.workers {
            if let Some(pid) = self.end_worker(file, run, worker) {
                done.insert(pid);
            }
        }
        for process in marked {
            let ours = process.run_id == run.run_id
                && process.stat.start_time >= run.host.start_time
                && !done.contains(&process.pid);
            if !ours {
                continue;
            }
            let _ = kill(pid(process.pid), Signal::SIGKILL);
            self.killed.push(Killed {
                pid: process.pid,
                worker_id: process.worker_id.clone(),
                run_id: run.run_id.clone(),
                group: false,
            });
        }
        match std::fs::remove_file(file) {
            Ok(()) => self.removed.push(file.to_path_buf()),
            Err(e) => self.skip(file, Some(run), SkipReason::RemoveFailed, e.to_string()),
        }
    }

    /// Kills one recorded worker's group after checking it is still that worker; its pid
    /// when it was killed.
    fn end_worker(&mut self, file: &Path, run: &RunRecord, worker: &WorkerRecord) -> Option<u32> {
        let skip = |this: &mut Self, reason, detail: String| {
            this.skipped.push(Skipped {
                pid: Some(worker.pid),
                worker_id: Some(worker.worker_id.clone()),
                ..skipped(file, Some(run), reason, detail)
            });
            None
        };
        let Some(stat) = procfs::stat(worker.pid).filter(|s| !s.is_gone()) else {
            return skip(self, SkipReason::NotRunning, String::new());
        };
        if stat.start_time != worker.start_time {
            let detail = format!(
                "started at tick {}, the worker at {}",
                stat.start_time, worker.start_time
            );
            return skip(self, SkipReason::StartTimeDiffers, detail);
        }
        if !procfs::carries(worker.pid, &run.run_id) {
            return skip(self, SkipReason::NoMarker, String::new());
        }
        // A group is signalled only when the worker still leads it (never group 0 or 1).
        let group = stat.pgid > 1
            && stat.pgid == worker.pgid
            && i64::from(stat.pgid) == i64::from(worker.pid);
        let _ = if group {
            killpg(Pid::from_raw(stat.pgid), Signal::SIGKILL)
        } else {
            kill(pid(worker.pid), Signal::SIGKILL)
        };
        self.killed.push(Killed {
            pid: worker.pid,
            worker_id: Some(worker.worker_id.clone()),
            run_id: run.run_id.clone(),
            group,
        });
        Some(worker.pid)
    }

    fn skip(&mut self, file: &Path, run: Option<&RunRecord>, reason: SkipReason, detail: String) {
        self.skipped.push(skipped(file, run, reason, detail));
    }
}

fn skipped(file: &Path, run: Option<&RunRecord>, reason: SkipReason, detail: String) -> Skipped {
    Skipped {
        file: file.to_path_buf(),
        run_id: run.map(|r| r.run_id.clone()),
        pid: None,
        worker_id: None,
        reason,
        detail,
    }
}

fn pid(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}
