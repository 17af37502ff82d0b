//! The sweep: ends the processes of runs whose host died, PID-reuse safe.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde::Serialize;

use super::procfs::{self, Marked};
use super::record::{self, ReadError, RunRecord, WorkerRecord};

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
    /// Run files removed (their host is dead and their processes are dealt with), with the
    /// temporary files such a host left beside them.
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
/// now has another start time), then removes that run's file and the temporary file its
/// host may have left beside it (`<run_id>.json.tmp`, from a write it died in).
///
/// A recorded worker is killed (with its process group) only when `/proc` shows the same
/// start time as recorded *and* the process carries the run id (environment
/// `PYHERD_RUN_ID` or `--run-id` on its command line); any other process carrying a dead
/// run's id in its environment and started after that run's host (a worker's child) is
/// killed too. A temporary file without its run file (the host died writing its first
/// record, or its guardian removed the run file) is read as the run's record. Runs whose
/// host lives (their temporary files included), and files that cannot be read, are left
/// alone and reported; a file gone between the listing and its reading (its run ended, or
/// a write renamed it) is passed over. This never fails: every problem is a [`Skipped`]
/// entry.
pub fn sweep(state_dir: &Path) -> SweepReport {
    let mut report = SweepReport {
        state_dir: state_dir.to_path_buf(),
        ..SweepReport::default()
    };
    let dir = record::runs_dir(state_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return report,
        Err(e) => {
            report.skip(&dir, None, SkipReason::Unreadable, e.to_string());
            return report;
        }
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    let files: Vec<&PathBuf> = paths.iter().filter(|p| record::is_run_file(p)).collect();
    // A temporary file beside its run file goes (or stays) with that file.
    let temps = paths
        .iter()
        .filter(|p| record::run_file_of_temp(p).is_some_and(|file| !files.contains(&&file)));
    let mut marked = None;
    for file in &files {
        if let Some(run) = report.sweep_file(file, &mut marked) {
            report.remove(&record::temp_path(file), &run);
        }
    }
    for temp in temps {
        report.sweep_file(temp, &mut marked);
    }
    report
}

fn host_alive(run: &RunRecord) -> bool {
    procfs::stat(run.host.pid).is_some_and(|s| !s.is_gone() && s.start_time == run.host.start_time)
}

impl SweepReport {
    /// Reads one run's record from `file` and ends the run if its host is dead; the record
    /// when it did.
    fn sweep_file(&mut self, file: &Path, marked: &mut Option<Vec<Marked>>) -> Option<RunRecord> {
        let run = match record::read(file) {
            Ok(run) => run,
            Err(ReadError::Unreadable(e)) if e.kind() == ErrorKind::NotFound => return None,
            Err(e) => {
                self.skip(file, None, SkipReason::Unreadable, e.to_string());
                return None;
            }
        };
        if host_alive(&run) {
            self.skipped.push(Skipped {
                pid: Some(run.host.pid),
                ..skipped(file, Some(&run), SkipReason::HostAlive, String::new())
            });
            return None;
        }
        let marked = marked.get_or_insert_with(procfs::marked_processes);
        self.end_run(file, &run, marked);
        Some(run)
    }

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
        self.remove(file, run);
    }

    /// Removes a file of the dead `run` (gone already: nothing to do).
    fn remove(&mut self, file: &Path, run: &RunRecord) {
        match std::fs::remove_file(file) {
            Ok(()) => self.removed.push(file.to_path_buf()),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
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

/// Kills (SIGKILL) every running process marked as started by worker `worker_id` of run
/// `run_id`: what the worker started outside its process group (in a session of its
/// own) and left behind. Their pids. Reads all of `/proc`: for a worker's end, not a
/// call's.
pub(crate) fn kill_strays(run_id: &str, worker_id: &str) -> Vec<u32> {
    let strays = procfs::marked_processes()
        .into_iter()
        .filter(|m| m.run_id == run_id && m.worker_id.as_deref() == Some(worker_id));
    strays
        .filter(|m| kill(pid(m.pid), Signal::SIGKILL).is_ok())
        .map(|m| m.pid)
        .collect()
}

fn pid(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}
