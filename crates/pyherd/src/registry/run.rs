//! One host run: its id, its registry file, and its guardian.

use std::ffi::OsStr;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::process::ChildStdin;

use super::procfs;
use super::record::{self, FORMAT_VERSION, HostRecord, RunRecord, WorkerRecord};
use crate::error::{Error, ErrorKind};

/// A pool's run: every worker carries its id; while the host lives its file lists them.
///
/// Dropping it (after the pool's workers are gone) removes the file and closes the
/// guardian's pipe; the guardian then exits.
pub(crate) struct Run {
    id: Arc<str>,
    file: Option<PathBuf>,
    record: Mutex<RunRecord>,
    /// The write end of the guardian's stdin, never written: held only to be closed, by
    /// the drop or by the kernel when the host exits however it exits, which wakes the
    /// guardian up. `None` until the guardian is started.
    lifeline: Mutex<Option<ChildStdin>>,
}

impl Run {
    /// A new run with a fresh id. Its file is `<state_dir>/runs/<id>.json`; when it cannot
    /// be written the run goes on without one (a warning says so): the guardian and the
    /// other layers still work, only a later sweep cannot find this run.
    ///
    pub(crate) fn open(state_dir: &Path) -> Self {
        let id: Arc<str> = new_run_id().into();
        let host = procfs::own_stat().map_or(0, |s| s.start_time);
        let record = RunRecord {
            version: FORMAT_VERSION,
            run_id: id.to_string(),
            host: HostRecord {
                pid: std::process::id(),
                start_time: host,
            },
            workers: Vec::new(),
        };
        let dir = record::runs_dir(state_dir);
        let path = dir.join(format!("{id}.json"));
        let file = match std::fs::create_dir_all(&dir)
            .and_then(|()| record::write_atomic(&path, &record))
            .and_then(|()| std::path::absolute(&path))
        {
            Ok(path) => Some(path),
            Err(e) => {
                tracing::warn!(run_id = %id, path = %path.display(), error = %e,
                    "cannot write the run registry: a later sweep will not find this run's processes");
                None
            }
        };
        Self {
            id,
            file,
            record: Mutex::new(record),
            lifeline: Mutex::new(None),
        }
    }

    /// The run id: 16 hex digits.
    pub(crate) fn id(&self) -> &Arc<str> {
        &self.id
    }

    /// The registry file, when it could be written.
    pub(crate) fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Starts the guardian, `python -m pyherd_worker.guardian`, and waits (up to
    /// `timeout`) until it has detached from the host: it then waits for the host to exit
    /// and kills whatever of the run is left.
    ///
    /// # Errors
    /// `initialization/spawn_failed` when it cannot be started, exits with an error, or
    /// does not detach within `timeout`.
    pub(crate) async fn start_guardian(
        &self,
        python: &Path,
        pythonpath: &OsStr,
        timeout: Duration,
    ) -> Result<(), Error> {
        let failed = |why: String| {
            Error::new(
                ErrorKind::SpawnFailed,
                format!("cannot start the run's guardian: {why}"),
            )
        };
        let mut child = {
            let mut lifeline = self.lifeline.lock().unwrap_or_else(PoisonError::into_inner);
            if lifeline.is_some() {
                return Err(failed("it was started already".into()));
            }
            let mut command = tokio::process::Command::new(python);
            command
                .args(["-m", "pyherd_worker.guardian", "--run-id", &self.id])
                .env("PYTHONPATH", pythonpath)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            if let Some(file) = &self.file {
                command.arg("--registry").arg(file);
            }
            let mut child = command
                .spawn()
                .map_err(|e| failed(format!("{}: {e}", python.display())))?;
            *lifeline = child.stdin.take();
            child
        };
        let Ok(status) = tokio::time::timeout(timeout, child.wait()).await else {
            return Err(failed(format!("it did not detach within {timeout:?}")));
        };
        match status {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(failed(format!(
                "{} -m pyherd_worker.guardian ended with {status} before it detached",
                python.display()
            ))),
            Err(e) => Err(failed(format!("waiting for it failed: {e}"))),
        }
    }

    /// Ends the run once its workers are gone: its guardian sees its lifeline close, finds
    /// nothing left to kill, removes the registry and exits.
    pub(crate) fn end(&self) {
        drop(
            self.lifeline
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
    }

    /// Records a worker that was just spawned; the entry goes when the returned guard is
    /// dropped (after the worker was ended).
    pub(crate) fn enter(self: &Arc<Self>, worker_id: &str, pid: u32) -> RunEntry {
        let stat = procfs::stat(pid);
        let record = WorkerRecord {
            worker_id: worker_id.to_owned(),
            run_id: self.id.to_string(),
            pid,
            pgid: stat.map_or_else(|| i32::try_from(pid).unwrap_or(0), |s| s.pgid),
            start_time: stat.map_or(0, |s| s.start_time),
        };
        self.update(|r| r.workers.push(record));
        RunEntry {
            run: self.clone(),
            pid,
        }
    }

    fn update(&self, change: impl FnOnce(&mut RunRecord)) {
        let mut record = self.record.lock().unwrap_or_else(PoisonError::into_inner);
        change(&mut record);
        if let Some(file) = &self.file {
            if let Err(e) = record::write_atomic(file, &record) {
                tracing::warn!(run_id = %self.id, path = %file.display(), error = %e,
                    "cannot update the run registry");
            }
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(file) = &self.file {
            // Gone already when the guardian ended with the run (see `end`).
            if let Err(e) = std::fs::remove_file(file)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(run_id = %self.id, path = %file.display(), error = %e,
                    "cannot remove the run registry");
            }
        }
    }
}

/// A worker's line in its run's file, removed on drop.
pub(crate) struct RunEntry {
    run: Arc<Run>,
    pid: u32,
}

impl RunEntry {
    /// The id of the run the worker belongs to.
    pub(crate) fn run_id(&self) -> &Arc<str> {
        self.run.id()
    }
}

impl Drop for RunEntry {
    fn drop(&mut self) {
        let pid = self.pid;
        self.run.update(|r| r.workers.retain(|w| w.pid != pid));
    }
}

/// 16 hex digits from the OS-seeded keys of std's hasher, the pid and the time.
fn new_run_id() -> String {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(now);
    format!("{:016x}", hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_16_hex_digits_and_differ() {
        let a = new_run_id();
        let b = new_run_id();
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn a_guardian_that_cannot_start_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let run = Run::open(dir.path());
        let python = crate::python::resolve(Path::new("python3"), Duration::from_secs(30))
            .await
            .unwrap();
        let e = run
            .start_guardian(
                Path::new("/nonexistent/python3"),
                OsStr::new(""),
                Duration::from_secs(5),
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::SpawnFailed);
        assert!(e.message().contains("guardian"), "{}", e.message());
        // Without the package on its path, Python exits with an error at once.
        let e = run
            .start_guardian(&python, OsStr::new(dir.path()), Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(e.message().contains("ended with"), "{}", e.message());
        let again = run
            .start_guardian(&python, OsStr::new(""), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(again.message().contains("already"), "{}", again.message());
        let slow = Run::open(dir.path());
        let e = slow
            .start_guardian(&python, OsStr::new(""), Duration::ZERO)
            .await
            .unwrap_err();
        assert!(e.message().contains("did not detach"), "{}", e.message());
    }

    #[test]
    fn the_file_lists_workers_while_they_live_and_goes_with_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let run = Arc::new(Run::open(dir.path()));
        let file = run.file().unwrap().to_path_buf();
        assert!(file.is_absolute());
        let me = std::process::id();
        let entry = run.enter("w1", me);
        let record = record::read(&file).unwrap();
        assert_eq!(record.run_id, **run.id());
        assert_eq!(record.host.pid, me);
        assert_eq!(record.workers.len(), 1);
        assert_eq!(record.workers[0].worker_id, "w1");
        assert_eq!(
            record.workers[0].start_time,
            procfs::own_stat().unwrap().start_time
        );
        drop(entry);
        assert!(record::read(&file).unwrap().workers.is_empty());
        drop(run);
        assert!(!file.exists());
    }

    #[test]
    fn a_registry_that_vanishes_mid_run_is_a_warning_not_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let run = Arc::new(Run::open(dir.path()));
        let file = run.file().unwrap().to_path_buf();
        std::fs::remove_dir_all(dir.path().join("runs")).unwrap();
        let entry = run.enter("w1", std::process::id());
        drop(entry);
        drop(run);
        assert!(!file.exists());
    }

    #[test]
    fn an_unwritable_state_dir_leaves_the_run_without_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("a-file");
        std::fs::write(&blocker, "").unwrap();
        let run = Arc::new(Run::open(&blocker.join("state")));
        assert!(run.file().is_none());
        drop(run.enter("w1", std::process::id()));
    }
}
