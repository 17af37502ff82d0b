//! A circuit breaker per command: closed → open after consecutive failures that harm
//! workers, open → half-open after the open time, half-open → closed after consecutive
//! successful trial calls (one at a time), or back to open at the first harmful one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// Where a command's circuit breaker is.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls go through; harmful failures are counted.
    Closed,
    /// Calls fail at once with `resource/circuit_open`.
    Open,
    /// The open time is over: one trial call at a time goes through.
    HalfOpen,
}

impl BreakerState {
    /// Every state, in the order of the metrics.
    pub const ALL: [Self; 3] = [Self::Closed, Self::Open, Self::HalfOpen];

    /// The name used in stats and metrics, e.g. `"half_open"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// A snapshot of one command's breaker, in [`PoolStats::breakers`](crate::PoolStats::breakers).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct BreakerInfo {
    /// The command the breaker guards.
    pub command: String,
    /// Its state now (an open breaker whose open time is over shows `half_open`).
    pub state: BreakerState,
    /// Consecutive harmful failures counted while closed.
    pub failures: u32,
    /// Times the breaker opened (from closed or half-open).
    pub opens: u64,
    /// While open: milliseconds until it half-opens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub half_open_in_ms: Option<u64>,
}

/// The thresholds of every breaker of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BreakerSettings {
    /// Consecutive harmful failures that open a closed breaker.
    pub(crate) failures: u32,
    /// Consecutive successful trial calls that close a half-open breaker.
    pub(crate) successes: u32,
    /// How long a breaker stays open.
    pub(crate) open_for: Duration,
}

/// What a call did, as far as its command's breaker is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A worker answered and lives on.
    Success,
    /// The call harmed its worker (see the recovery table).
    Failure,
    /// The call said nothing about the command (it never reached a worker).
    Neutral,
}

/// Why a call was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Open: it half-opens after this long.
    Open(Duration),
    /// Half-open and its trial call is still running.
    Trying,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { successes: u32, trying: bool },
}

#[derive(Debug)]
struct Core {
    state: State,
    opens: u64,
}

/// One command's breaker.
#[derive(Debug)]
pub(crate) struct Breaker {
    settings: BreakerSettings,
    core: Mutex<Core>,
}

/// A call the breaker let through; say how it went with [`record`](Permit::record).
/// Dropped without a record (the call never reached a worker, or was given up in the
/// queue), it frees the trial slot. It owns its breaker, so the call's job can hold it
/// until the call ends.
#[must_use]
#[derive(Debug)]
pub(crate) struct Permit {
    breaker: Arc<Breaker>,
    trial: bool,
}

impl Breaker {
    pub(crate) fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            core: Mutex::new(Core {
                state: State::Closed { failures: 0 },
                opens: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        // The state stays consistent at every step, so a poisoned lock is still usable.
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets a call through, or says why not.
    pub(crate) fn admit(self: &Arc<Self>) -> Result<Permit, Refusal> {
        let mut core = self.lock();
        if let Some(refusal) = refusal(core.state) {
            return Err(refusal);
        }
        let trial = match core.state {
            State::Closed { .. } => false,
            // Open with its time over, or half-open with no trial running: a trial.
            State::Open { .. } => {
                core.state = State::HalfOpen {
                    successes: 0,
                    trying: true,
                };
                true
            }
            State::HalfOpen { successes, .. } => {
                core.state = State::HalfOpen {
                    successes,
                    trying: true,
                };
                true
            }
        };
        Ok(Permit {
            breaker: self.clone(),
            trial,
        })
    }

    /// Whether a call would be refused now: open, or half-open with its trial running.
    pub(crate) fn refuses(&self) -> bool {
        refusal(self.lock().state).is_some()
    }

    fn open(&self, core: &mut Core) {
        core.state = State::Open {
            until: Instant::now() + self.settings.open_for,
        };
        core.opens += 1;
    }

    fn record(&self, trial: bool, outcome: Outcome) {
        let mut core = self.lock();
        match (core.state, trial, outcome) {
            (State::Closed { .. }, false, Outcome::Success) => {
                core.state = State::Closed { failures: 0 };
            }
            (State::Closed { failures }, false, Outcome::Failure) => {
                let failures = failures.saturating_add(1);
                if failures >= self.settings.failures {
                    self.open(&mut core);
                } else {
                    core.state = State::Closed { failures };
                }
            }
            (State::HalfOpen { successes, .. }, true, Outcome::Success) => {
                let successes = successes.saturating_add(1);
                core.state = if successes >= self.settings.successes {
                    State::Closed { failures: 0 }
                } else {
                    State::HalfOpen {
                        successes,
                        trying: false,
                    }
                };
            }
            (State::HalfOpen { .. }, true, Outcome::Failure) => self.open(&mut core),
            (State::HalfOpen { successes, .. }, true, Outcome::Neutral) => {
                core.state = State::HalfOpen {
                    successes,
                    trying: false,
                };
            }
            // A call let through before the state changed says nothing about the new state.
            _ => {}
        }
    }

    /// The breaker as the stats show it.
    pub(crate) fn info(&self, command: &str) -> BreakerInfo {
        let core = self.lock();
        let now = Instant::now();
        let (state, failures, half_open_in) = match core.state {
            State::Closed { failures } => (BreakerState::Closed, failures, None),
            State::Open { until } if now < until => (BreakerState::Open, 0, Some(until - now)),
            State::Open { .. } | State::HalfOpen { .. } => (BreakerState::HalfOpen, 0, None),
        };
        BreakerInfo {
            command: command.to_owned(),
            state,
            failures,
            opens: core.opens,
            half_open_in_ms: half_open_in.map(millis),
        }
    }
}

impl Permit {
    /// Counts the call's outcome.
    pub(crate) fn record(mut self, outcome: Outcome) {
        self.breaker.record(self.trial, outcome);
        self.trial = false;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.trial {
            self.breaker.record(true, Outcome::Neutral);
        }
    }
}

/// Why a breaker in `state` refuses a call now, if it does.
fn refusal(state: State) -> Option<Refusal> {
    match state {
        State::Open { until } => {
            let now = Instant::now();
            (now < until).then(|| Refusal::Open(until - now))
        }
        State::HalfOpen { trying: true, .. } => Some(Refusal::Trying),
        State::Closed { .. } | State::HalfOpen { trying: false, .. } => None,
    }
}

/// Whole milliseconds, rounded up (so "0 ms left" means the time is over).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_micros().div_ceil(1000)).unwrap_or(u64::MAX)
}

/// The breakers of a pool, one per configured command.
#[derive(Debug, Default)]
pub(crate) struct Breakers {
    by_command: HashMap<Box<str>, Arc<Breaker>>,
}

impl Breakers {
    pub(crate) fn new<'a>(
        commands: impl IntoIterator<Item = &'a String>,
        settings: BreakerSettings,
    ) -> Self {
        let by_command = commands
            .into_iter()
            .map(|c| (c.as_str().into(), Arc::new(Breaker::new(settings))))
            .collect();
        Self { by_command }
    }

    /// The breaker of `command`, if it has one.
    pub(crate) fn get(&self, command: &str) -> Option<&Arc<Breaker>> {
        self.by_command.get(command)
    }

    /// Every breaker, sorted by command.
    pub(crate) fn infos(&self) -> Vec<BreakerInfo> {
        let mut infos: Vec<BreakerInfo> = self
            .by_command
            .iter()
            .map(|(command, b)| b.info(command))
            .collect();
        infos.sort_unstable_by(|a, b| a.command.cmp(&b.command));
        infos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_FOR: Duration = Duration::from_secs(60);

    fn breaker() -> Arc<Breaker> {
        Arc::new(Breaker::new(BreakerSettings {
            failures: 5,
            successes: 3,
            open_for: OPEN_FOR,
        }))
    }

    fn state(b: &Breaker) -> BreakerState {
        b.info("c").state
    }

    fn call(b: &Arc<Breaker>, outcome: Outcome) {
        b.admit().unwrap().record(outcome);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_only() {
        let b = breaker();
        for _ in 0..4 {
            call(&b, Outcome::Failure);
        }
        call(&b, Outcome::Success);
        assert_eq!(b.info("c").failures, 0);
        for _ in 0..4 {
            call(&b, Outcome::Failure);
            call(&b, Outcome::Neutral);
        }
        assert_eq!((state(&b), b.info("c").failures), (BreakerState::Closed, 4));
        assert!(!b.refuses());
        call(&b, Outcome::Failure);
        assert!(b.refuses());
        let info = b.info("c");
        assert_eq!((info.state, info.opens), (BreakerState::Open, 1));
        assert_eq!(info.half_open_in_ms, Some(60_000));
        assert_eq!(b.admit().unwrap_err(), Refusal::Open(OPEN_FOR));
    }

    #[tokio::test(start_paused = true)]
    async fn half_opens_after_the_open_time_and_closes_after_successful_trials() {
        let b = breaker();
        for _ in 0..5 {
            call(&b, Outcome::Failure);
        }
        tokio::time::advance(OPEN_FOR - Duration::from_millis(1)).await;
        assert_eq!(
            b.admit().unwrap_err(),
            Refusal::Open(Duration::from_millis(1))
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(state(&b), BreakerState::HalfOpen);
        assert!(!b.refuses());
        for _ in 0..2 {
            let trial = b.admit().unwrap();
            assert!(b.refuses());
            assert_eq!(b.admit().unwrap_err(), Refusal::Trying);
            trial.record(Outcome::Success);
            assert_eq!(state(&b), BreakerState::HalfOpen);
        }
        call(&b, Outcome::Success);
        assert_eq!(state(&b), BreakerState::Closed);
        assert_eq!(b.info("c").opens, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_harmful_trial_reopens_and_a_neutral_one_frees_the_trial() {
        let b = breaker();
        for _ in 0..5 {
            call(&b, Outcome::Failure);
        }
        tokio::time::advance(OPEN_FOR).await;
        call(&b, Outcome::Success);
        call(&b, Outcome::Neutral);
        drop(b.admit().unwrap());
        call(&b, Outcome::Failure);
        let info = b.info("c");
        assert_eq!((info.state, info.opens), (BreakerState::Open, 2));
        assert_eq!(b.admit().unwrap_err(), Refusal::Open(OPEN_FOR));
    }

    #[tokio::test(start_paused = true)]
    async fn late_results_of_calls_let_through_earlier_change_nothing() {
        let b = breaker();
        let (early, late) = (b.admit().unwrap(), b.admit().unwrap());
        for _ in 0..5 {
            call(&b, Outcome::Failure);
        }
        early.record(Outcome::Success);
        assert_eq!(state(&b), BreakerState::Open);
        tokio::time::advance(OPEN_FOR).await;
        let trial = b.admit().unwrap();
        late.record(Outcome::Failure);
        assert_eq!((state(&b), b.info("c").opens), (BreakerState::HalfOpen, 1));
        trial.record(Outcome::Success);
        assert_eq!(state(&b), BreakerState::HalfOpen);
        assert!(b.admit().is_ok());
    }

    #[test]
    fn breakers_exist_only_for_configured_commands_and_list_sorted() {
        let commands = vec!["zeta".to_owned(), "alpha".to_owned()];
        let breakers = Breakers::new(
            &commands,
            BreakerSettings {
                failures: 1,
                successes: 1,
                open_for: OPEN_FOR,
            },
        );
        assert!(breakers.get("echo").is_none());
        let names: Vec<String> = breakers.infos().into_iter().map(|i| i.command).collect();
        assert_eq!(names, ["alpha", "zeta"]);
        assert_eq!(millis(Duration::from_micros(1)), 1);
        assert_eq!(millis(Duration::ZERO), 0);
    }
}
