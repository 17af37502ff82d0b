//! Retries and circuit breakers around each call that goes to a worker: the command's
//! breaker is asked first, and an idempotent call that fails with a retryable error is
//! tried again after a backoff, on another worker when one is available.

use std::collections::HashSet;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::value::RawValue;

use super::stats::bump;
use super::{CallOptions, HOST_WORKER_ID, Pool, PoolBuilder, Reply, Shared, SlotHandle, Target};
use crate::config::PoolConfig;
use crate::error::{Error, ErrorKind};
use crate::metrics;
use crate::policy::{
    self, Backoff, Breaker, BreakerInfo, BreakerSettings, BreakerState, Breakers, Delays, Outcome,
    Permit, Refusal,
};
use crate::worker::WorkerState;

/// The pool's retry policy, breakers and retry count.
pub(crate) struct Resilience {
    attempts: u32,
    backoff: Backoff,
    base: Duration,
    cap: Duration,
    idempotent: HashSet<String>,
    breakers: Breakers,
    retries: AtomicU64,
}

impl Resilience {
    pub(crate) fn new(config: &PoolConfig) -> Self {
        let settings = BreakerSettings {
            failures: config.breaker_failures,
            successes: config.breaker_successes,
            open_for: config.breaker_open,
        };
        Self {
            attempts: config.retry_attempts,
            backoff: config.retry_backoff,
            base: config.retry_base,
            cap: config.retry_cap,
            idempotent: config.idempotent_commands.iter().cloned().collect(),
            breakers: Breakers::new(&config.breaker_commands, settings),
            retries: AtomicU64::new(0),
        }
    }

    /// Retries made since the pool started.
    pub(crate) fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Every breaker, sorted by command.
    pub(crate) fn breakers(&self) -> Vec<BreakerInfo> {
        self.breakers.infos()
    }

    /// Lets a call of `command` through its breaker, if it has one.
    ///
    /// # Errors
    /// `resource/circuit_open` when the breaker refuses it.
    pub(super) fn permit(&self, command: &str) -> Result<Option<Permit>, Error> {
        admit(self.breakers.get(command), command)
    }

    /// The call's own choice, else whether its command is listed as idempotent.
    fn idempotent(&self, command: &str, options: &CallOptions) -> bool {
        options
            .idempotent
            .unwrap_or_else(|| self.idempotent.contains(command))
    }

    /// `pyherd_retries_total` and the breakers' state and opens.
    pub(crate) fn render_metrics(&self, out: &mut String) {
        metrics::header(
            out,
            "pyherd_retries_total",
            "counter",
            "Retries of idempotent calls after a retryable error.",
        );
        let _ = writeln!(out, "pyherd_retries_total {}", self.retries());
        let breakers = self.breakers();
        if breakers.is_empty() {
            return;
        }
        metrics::header(
            out,
            "pyherd_circuit_breaker_state",
            "gauge",
            "1 for the state each command's circuit breaker is in, 0 for the others.",
        );
        for b in &breakers {
            for state in BreakerState::ALL {
                let _ = writeln!(
                    out,
                    "pyherd_circuit_breaker_state{{command=\"{}\",state=\"{}\"}} {}",
                    metrics::escape(&b.command),
                    state.as_str(),
                    u8::from(b.state == state)
                );
            }
        }
        metrics::header(
            out,
            "pyherd_circuit_breaker_opens_total",
            "counter",
            "Times each command's circuit breaker opened.",
        );
        for b in &breakers {
            let _ = writeln!(
                out,
                "pyherd_circuit_breaker_opens_total{{command=\"{}\"}} {}",
                metrics::escape(&b.command),
                b.opens
            );
        }
    }
}

/// What a finished attempt tells the command's breaker: harm from the recovery table,
/// success when a worker answered (even with an error) and lives on. A cancelled call
/// says nothing: its worker was stopped by its caller, whatever it was doing. Nor do the
/// answers the host gives in a worker's name: the pool shutting down under a call, or no
/// worker able to start (the context is then the last failed start's).
pub(super) fn outcome(result: &Result<Reply, Error>) -> Outcome {
    match result {
        Ok(_) => Outcome::Success,
        Err(e) if policy::action(e.kind()).trips_breaker => Outcome::Failure,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::Cancelled | ErrorKind::ShuttingDown | ErrorKind::SpawnFailing
            ) =>
        {
            Outcome::Neutral
        }
        Err(e)
            if e.context()
                .worker_id
                .as_deref()
                .is_some_and(|w| w != HOST_WORKER_ID) =>
        {
            Outcome::Success
        }
        Err(_) => Outcome::Neutral,
    }
}

/// Lets a call of `command` through `breaker`, its breaker if it has one.
fn admit(breaker: Option<&Arc<Breaker>>, command: &str) -> Result<Option<Permit>, Error> {
    breaker
        .map(Breaker::admit)
        .transpose()
        .map_err(|refusal| circuit_open(command, refusal))
}

fn circuit_open(command: &str, refusal: Refusal) -> Error {
    match refusal {
        Refusal::Open(left) => {
            let ms = policy::millis(left);
            Error::new(
                ErrorKind::CircuitOpen,
                format!(
                    "{command:?} harmed its workers too often: its circuit breaker is open and half-opens in {ms} ms"
                ),
            )
            .with_context(|c| c.retry_after_ms = Some(ms))
        }
        Refusal::Trying => Error::new(
            ErrorKind::CircuitOpen,
            format!(
                "{command:?} is being tried again after its circuit breaker opened: calls fail at once until a trial call succeeds"
            ),
        ),
    }
}

impl Pool {
    /// Runs a call through its command's breaker and, when it is idempotent, retries it
    /// while the recovery table and the error allow. `preferred` is the session's worker.
    ///
    /// # Cancel safety
    /// As [`submit_once`](Self::submit_once); a breaker's trial slot is freed on drop.
    pub(super) async fn submit(
        &self,
        command: &str,
        known: bool,
        mut args: Box<RawValue>,
        options: &CallOptions,
        preferred: Option<Arc<str>>,
    ) -> Result<Reply, Error> {
        let shared = &self.inner.shared;
        let policy = &shared.resilience;
        let idempotent = policy.idempotent(command, options);
        let attempts = if idempotent { policy.attempts } else { 1 };
        let breaker = policy.breakers.get(command);
        let flight = shared.calls.current(options.request_id.as_deref());
        let mut delays = None;
        let mut avoid: Option<Arc<str>> = None;
        // Attempts that reached admission; the last is the one whose error is returned.
        let mut made = 0;
        // The error of the attempt before and the wait since, while a retry comes.
        let mut last: Option<(Error, Duration)> = None;
        let error = loop {
            let permit = match admit(breaker, command) {
                Ok(permit) => permit,
                // A retry the breaker refuses: the attempt that was made tells what failed.
                Err(open) => break last.map_or(open, |(error, _)| error),
            };
            if let Some((error, waited)) = &last {
                bump(&policy.retries);
                tracing::info!(
                    command,
                    attempt = made + 1,
                    error = %error.kind(),
                    worker = error.context().worker_id.as_deref().unwrap_or("-"),
                    waited_ms = waited.as_millis() as u64,
                    "retrying an idempotent call"
                );
            }
            made += 1;
            let this = if made < attempts {
                args.clone()
            } else {
                std::mem::replace(&mut args, RawValue::NULL.to_owned())
            };
            let result = self
                .submit_once(
                    command,
                    known,
                    this,
                    options,
                    flight.clone(),
                    Target {
                        preferred: preferred.clone(),
                        avoid: avoid.as_deref(),
                        chunks: None,
                        permit,
                    },
                )
                .await;
            let error = match result {
                Ok(reply) => return Ok(reply),
                Err(e) => e,
            };
            if made >= attempts
                || !policy::action(error.kind()).retry
                || !error.is_retryable()
                || breaker.is_some_and(|b| b.refuses())
            {
                break error;
            }
            let wait = delays
                .get_or_insert_with(|| Delays::seeded(policy.backoff, policy.base, policy.cap))
                .next()
                .unwrap_or(policy.cap);
            avoid = error.context().worker_id.as_deref().map(Arc::from);
            tokio::select! {
                biased;
                () = flight.cancel.cancelled() => break super::cancelled(),
                () = shared.closing.cancelled() => break super::shutting_down(),
                () = tokio::time::sleep(wait) => {}
            }
            last = Some((error, wait));
        };
        Err(if idempotent && made > 0 {
            error.with_context(|c| c.attempts = Some(made))
        } else {
            error
        })
    }
}

impl Shared {
    /// Where a retry goes when the worker `avoid` failed it but still runs: another worker
    /// that is idle now. `None` when `avoid` is gone or every other worker is busy: the
    /// retry then goes the usual way, to the first worker free (a retry held for a busy
    /// worker could wait out its queue timeout while `avoid` sits idle).
    pub(super) fn elsewhere(&self, avoid: &str) -> Option<&SlotHandle> {
        self.slot_running(avoid)?;
        self.slots.iter().find(|s| {
            s.status.state() == WorkerState::Ready && s.direct.is_empty() && !s.status.runs(avoid)
        })
    }
}

impl PoolBuilder {
    /// Most attempts of an idempotent call (1 = no retry).
    pub fn retry_attempts(mut self, n: u32) -> Self {
        self.config.retry_attempts = n;
        self
    }

    /// How the wait between attempts grows.
    pub fn retry_backoff(mut self, backoff: Backoff) -> Self {
        self.config.retry_backoff = backoff;
        self
    }

    /// The first wait between attempts.
    pub fn retry_base(mut self, base: Duration) -> Self {
        self.config.retry_base = base;
        self
    }

    /// The longest wait between attempts.
    pub fn retry_cap(mut self, cap: Duration) -> Self {
        self.config.retry_cap = cap;
        self
    }

    /// Marks `command`'s calls idempotent unless a call says otherwise.
    pub fn idempotent_command(mut self, command: impl Into<String>) -> Self {
        self.config.idempotent_commands.push(command.into());
        self
    }

    /// Guards `command` with a circuit breaker.
    pub fn breaker_command(mut self, command: impl Into<String>) -> Self {
        self.config.breaker_commands.push(command.into());
        self
    }

    /// Consecutive harmful calls that open a breaker.
    pub fn breaker_failures(mut self, n: u32) -> Self {
        self.config.breaker_failures = n;
        self
    }

    /// Consecutive successful trial calls that close a half-open breaker.
    pub fn breaker_successes(mut self, n: u32) -> Self {
        self.config.breaker_successes = n;
        self
    }

    /// How long an open breaker refuses calls.
    pub fn breaker_open(mut self, open_for: Duration) -> Self {
        self.config.breaker_open = open_for;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_call_says_why_and_when_to_come_back() {
        let e = circuit_open("crashy", Refusal::Open(Duration::from_micros(1_499_001)));
        assert_eq!(e.kind(), &ErrorKind::CircuitOpen);
        assert_eq!(e.category(), crate::Category::Resource);
        assert!(!e.is_retryable());
        assert_eq!(e.context().retry_after_ms, Some(1500));
        assert!(e.message().contains("\"crashy\"") && e.message().contains("1500 ms"));
        let e = circuit_open("crashy", Refusal::Trying);
        assert_eq!(e.context().retry_after_ms, None);
        assert!(e.message().contains("trial call"), "{e}");
    }

    #[test]
    fn only_a_worker_that_answered_counts_as_a_success() {
        let host = Reply::from_host(RawValue::NULL.to_owned(), Duration::ZERO);
        assert_eq!(outcome(&Ok(host)), Outcome::Success);
        let on = |kind: ErrorKind, worker: Option<&str>| {
            Err(Error::new(kind, "x").with_context(|c| c.worker_id = worker.map(Into::into)))
        };
        let cases = [
            (on(ErrorKind::WorkerCrashed, Some("w1")), Outcome::Failure),
            (
                on(ErrorKind::ExecutionTimeout, Some("w1")),
                Outcome::Failure,
            ),
            (on(ErrorKind::PythonException, Some("w1")), Outcome::Success),
            (on(ErrorKind::Cancelled, Some("w1")), Outcome::Neutral),
            (on(ErrorKind::ShuttingDown, Some("w1")), Outcome::Neutral),
            (on(ErrorKind::SpawnFailing, Some("w3")), Outcome::Neutral),
            (on(ErrorKind::QueueTimeout, None), Outcome::Neutral),
            (
                on(ErrorKind::ProgramNotFound, Some(HOST_WORKER_ID)),
                Outcome::Neutral,
            ),
        ];
        for (result, expected) in cases {
            assert_eq!(outcome(&result), expected, "{result:?}");
        }
    }
}
