//! One Python process: spawning it from the pool's spawner thread (or forking it from
//! the zygote), its handshake, calls, stderr capture and its end.

mod exit;
mod launcher;
mod process;
mod spawner;
mod stderr;
mod zygote;

use serde::Serialize;

pub use exit::StartedBy;
pub(crate) use launcher::Launcher;
pub(crate) use process::{CallResult, LaunchSpec, WorkerProcess};
pub(crate) use spawner::Spawner;

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WorkerState {
    /// Spawned, not yet said hello (or waiting to be respawned).
    Starting,
    /// Idle, waiting for a call.
    Ready,
    /// Running a call.
    Busy,
    /// Being shut down.
    Stopping,
    /// Gone for good (the pool shut down).
    Stopped,
}

impl WorkerState {
    pub(crate) const ALL: [Self; 5] = [
        Self::Starting,
        Self::Ready,
        Self::Busy,
        Self::Stopping,
        Self::Stopped,
    ];

    /// The JSON/metrics name, e.g. `"ready"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Busy => "busy",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
        }
    }

    pub(crate) fn from_u8(v: u8) -> Self {
        Self::ALL
            .get(usize::from(v))
            .copied()
            .unwrap_or(Self::Stopped)
    }
}
