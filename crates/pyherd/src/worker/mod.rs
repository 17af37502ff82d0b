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
pub(crate) use process::{CallResult, Fault, LaunchSpec, WorkerProcess};
pub(crate) use spawner::Spawner;

/// Where a worker is in its life:
/// `starting → ready ⇄ busy → degraded → draining → stopped` (DESIGN §6).
///
/// A pool reports the state of each worker slot: when a slot's worker has stopped, the
/// slot goes `stopped → starting` with its replacement (or stays `stopped` while the
/// pool runs below `max_workers`). [`WorkerState::allows`] is the one table of the
/// transitions that can happen.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WorkerState {
    /// Spawned, not yet said hello.
    Starting,
    /// Idle, waiting for a call.
    Ready,
    /// Running a call.
    Busy,
    /// Missed a health check: takes no new work until it answers (or is replaced).
    Degraded,
    /// Retiring: takes no new work and is being stopped (recycled, idle, shutdown).
    Draining,
    /// No process: ended, waiting for a replacement, or a slot not in use.
    Stopped,
}

impl WorkerState {
    pub(crate) const ALL: [Self; 6] = [
        Self::Starting,
        Self::Ready,
        Self::Busy,
        Self::Degraded,
        Self::Draining,
        Self::Stopped,
    ];

    /// The JSON/metrics name, e.g. `"ready"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Busy => "busy",
            Self::Degraded => "degraded",
            Self::Draining => "draining",
            Self::Stopped => "stopped",
        }
    }

    /// Whether a worker may go from `self` to `to`: the lifecycle's one transition table.
    pub fn allows(self, to: Self) -> bool {
        use WorkerState::{Busy, Degraded, Draining, Ready, Starting, Stopped};
        matches!(
            (self, to),
            (Starting, Ready | Stopped)
                | (Ready, Busy | Degraded | Draining | Stopped)
                | (Busy, Ready | Draining | Stopped)
                | (Degraded, Ready | Draining | Stopped)
                | (Draining, Stopped)
                | (Stopped, Starting)
        )
    }

    pub(crate) fn from_u8(v: u8) -> Self {
        Self::ALL
            .get(usize::from(v))
            .copied()
            .unwrap_or(Self::Stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::WorkerState::{self, Busy, Degraded, Draining, Ready, Starting, Stopped};

    #[test]
    fn the_transition_table_is_exactly_the_lifecycle() {
        let allowed = [
            (Starting, Ready),
            (Starting, Stopped),
            (Ready, Busy),
            (Ready, Degraded),
            (Ready, Draining),
            (Ready, Stopped),
            (Busy, Ready),
            (Busy, Draining),
            (Busy, Stopped),
            (Degraded, Ready),
            (Degraded, Draining),
            (Degraded, Stopped),
            (Draining, Stopped),
            (Stopped, Starting),
        ];
        for from in WorkerState::ALL {
            for to in WorkerState::ALL {
                assert_eq!(
                    from.allows(to),
                    allowed.contains(&(from, to)),
                    "{} → {}",
                    from.as_str(),
                    to.as_str()
                );
            }
        }
    }

    #[test]
    fn states_round_trip_through_their_index() {
        for state in WorkerState::ALL {
            assert_eq!(WorkerState::from_u8(state as u8), state);
        }
        assert_eq!(WorkerState::from_u8(200), Stopped);
    }
}
