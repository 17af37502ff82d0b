//! The file of one run: `<state_dir>/runs/<run_id>.json`, replaced atomically.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The format version written in every file.
pub(crate) const FORMAT_VERSION: u32 = 1;

/// A run's file: who the host is and which workers it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RunRecord {
    pub(crate) version: u32,
    pub(crate) run_id: String,
    pub(crate) host: HostRecord,
    pub(crate) workers: Vec<WorkerRecord>,
}

/// The host process of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HostRecord {
    pub(crate) pid: u32,
    /// `/proc/<pid>/stat` field 22.
    pub(crate) start_time: u64,
}

/// One live worker of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WorkerRecord {
    pub(crate) worker_id: String,
    pub(crate) run_id: String,
    pub(crate) pid: u32,
    /// The worker leads its own group: the same number as `pid`.
    pub(crate) pgid: i32,
    /// `/proc/<pid>/stat` field 22.
    pub(crate) start_time: u64,
}

/// The directory holding the run files.
pub(crate) fn runs_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("runs")
}

/// A run file's name: `<run_id>.json`.
pub(crate) fn is_run_file(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "json")
}

/// The temporary file [`write_atomic`] writes before renaming it over the run file `path`:
/// `<run_id>.json.tmp`. One is left behind only when its host dies mid-write.
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    path.with_extension("json.tmp")
}

/// The run file whose temporary file `path` is, if it is one.
pub(crate) fn run_file_of_temp(path: &Path) -> Option<PathBuf> {
    let file = path.with_extension("");
    (path.extension()? == "tmp" && is_run_file(&file)).then_some(file)
}

/// Writes `record` to a temporary file beside `path` ([`temp_path`]) and renames it over
/// `path`, so a reader sees the old or the new contents, never a part.
pub(crate) fn write_atomic(path: &Path, record: &RunRecord) -> io::Result<()> {
    let mut text = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    text.push(b'\n');
    let temp = temp_path(path);
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(&text)?;
    std::fs::rename(&temp, path)
}

/// Reads a run file.
pub(crate) fn read(path: &Path) -> Result<RunRecord, ReadError> {
    let text = std::fs::read(path).map_err(ReadError::Unreadable)?;
    let record: RunRecord = serde_json::from_slice(&text).map_err(ReadError::Corrupt)?;
    if record.version != FORMAT_VERSION {
        return Err(ReadError::Version(record.version));
    }
    Ok(record)
}

/// Why a run file could not be used.
#[derive(Debug)]
pub(crate) enum ReadError {
    Unreadable(io::Error),
    Corrupt(serde_json::Error),
    Version(u32),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreadable(e) => write!(f, "cannot be read: {e}"),
            Self::Corrupt(e) => write!(f, "is not a run record: {e}"),
            Self::Version(v) => write!(
                f,
                "has format version {v}, this pyherd reads {FORMAT_VERSION}"
            ),
        }
    }
}
