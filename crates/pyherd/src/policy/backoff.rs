//! How long to wait before each retry: linear, exponential, fibonacci or decorrelated
//! jitter, from a base wait and up to a cap.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind};

/// How the wait between attempts of an idempotent call grows. With `base` and `cap` from
/// the configuration, the wait before retry `n` (1 for the first retry) is:
///
/// | policy | wait before retry `n` | with base 50 ms |
/// |---|---|---|
/// | `linear` | `base × n` | 50, 100, 150, 200 ms |
/// | `exponential` | `base × 2^(n-1)` | 50, 100, 200, 400 ms |
/// | `fibonacci` | `base × fib(n)`, fib = 1, 1, 2, 3, 5, … | 50, 50, 100, 150 ms |
/// | `decorrelated_jitter` | random in `[base, 3 × previous wait]` (previous starts at `base`) | 50–150 ms, then 50 ms up to 3 × the last |
///
/// Every wait is at most `cap`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Backoff {
    /// `base × n`.
    Linear,
    /// `base × 2^(n-1)`.
    #[default]
    Exponential,
    /// `base × fib(n)`.
    Fibonacci,
    /// A random wait between `base` and three times the previous wait, so retries of
    /// many callers do not arrive together.
    DecorrelatedJitter,
}

impl Backoff {
    /// The configuration name, e.g. `"decorrelated_jitter"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::Exponential => "exponential",
            Self::Fibonacci => "fibonacci",
            Self::DecorrelatedJitter => "decorrelated_jitter",
        }
    }
}

impl std::fmt::Display for Backoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Backoff {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "linear" => Ok(Self::Linear),
            "exponential" => Ok(Self::Exponential),
            "fibonacci" => Ok(Self::Fibonacci),
            "decorrelated_jitter" => Ok(Self::DecorrelatedJitter),
            other => Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "retry_backoff must be linear, exponential, fibonacci or decorrelated_jitter, not {other:?}"
                ),
            )),
        }
    }
}

/// The waits before the retries of one call, in order.
#[derive(Debug, Clone)]
pub(crate) struct Delays {
    backoff: Backoff,
    base: Duration,
    cap: Duration,
    /// Retries so far.
    retry: u32,
    /// fib(retry) and fib(retry + 1).
    fib: (u64, u64),
    previous: Duration,
    random: SplitMix64,
}

impl Delays {
    /// Waits of `backoff` from `base` up to `cap`; `seed` drives the jitter.
    pub(crate) fn new(backoff: Backoff, base: Duration, cap: Duration, seed: u64) -> Self {
        Self {
            backoff,
            base,
            cap,
            retry: 0,
            fib: (0, 1),
            previous: base,
            random: SplitMix64(seed),
        }
    }

    /// As [`new`](Self::new) with a seed that differs from call to call.
    pub(crate) fn seeded(backoff: Backoff, base: Duration, cap: Duration) -> Self {
        Self::new(backoff, base, cap, RandomState::new().hash_one(0u8))
    }

    fn times(&self, factor: u64) -> Duration {
        u32::try_from(factor)
            .ok()
            .and_then(|f| self.base.checked_mul(f))
            .map_or(self.cap, |d| d.min(self.cap))
    }
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.retry = self.retry.saturating_add(1);
        self.fib = (self.fib.1, self.fib.0.saturating_add(self.fib.1));
        let wait = match self.backoff {
            Backoff::Linear => self.times(u64::from(self.retry)),
            Backoff::Exponential => {
                self.times(1u64.checked_shl(self.retry - 1).unwrap_or(u64::MAX))
            }
            Backoff::Fibonacci => self.times(self.fib.0),
            Backoff::DecorrelatedJitter => {
                let low = self.base.as_nanos();
                let high = self.previous.saturating_mul(3).as_nanos().max(low);
                let span = high - low + 1;
                let pick = low + u128::from(self.random.next()) % span;
                let wait = Duration::from_nanos(u64::try_from(pick).unwrap_or(u64::MAX));
                wait.min(self.cap)
            }
        };
        self.previous = wait;
        Some(wait)
    }
}

/// A small, fast generator for jitter (not for anything secret).
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn waits(backoff: Backoff, base_ms: u32, cap_ms: u32, n: usize) -> Vec<u128> {
        Delays::new(backoff, MS * base_ms, MS * cap_ms, 7)
            .take(n)
            .map(|d| d.as_millis())
            .collect()
    }

    #[test]
    fn linear_grows_by_the_base_up_to_the_cap() {
        assert_eq!(
            waits(Backoff::Linear, 50, 180, 6),
            [50, 100, 150, 180, 180, 180]
        );
    }

    #[test]
    fn exponential_doubles_up_to_the_cap_without_overflow() {
        assert_eq!(
            waits(Backoff::Exponential, 50, 1000, 7),
            [50, 100, 200, 400, 800, 1000, 1000]
        );
        let far = Delays::new(Backoff::Exponential, MS * 50, MS * 1000, 0)
            .nth(200)
            .unwrap();
        assert_eq!(far, MS * 1000);
    }

    #[test]
    fn fibonacci_follows_the_sequence_up_to_the_cap() {
        assert_eq!(
            waits(Backoff::Fibonacci, 10, 100, 9),
            [10, 10, 20, 30, 50, 80, 100, 100, 100]
        );
        let far = Delays::new(Backoff::Fibonacci, MS, MS * 5, 0)
            .nth(500)
            .unwrap();
        assert_eq!(far, MS * 5);
    }

    #[test]
    fn decorrelated_jitter_stays_between_the_base_and_three_times_the_last_wait() {
        for seed in 0..200 {
            let mut delays = Delays::new(Backoff::DecorrelatedJitter, MS * 50, MS * 2000, seed);
            let mut previous = MS * 50;
            for _ in 0..20 {
                let wait = delays.next().unwrap();
                assert!(wait >= MS * 50, "{wait:?} under the base");
                assert!(
                    wait <= (previous * 3).min(MS * 2000),
                    "{wait:?} after {previous:?}"
                );
                previous = wait;
            }
        }
    }

    #[test]
    fn decorrelated_jitter_spreads_and_reaches_the_cap() {
        let firsts: std::collections::HashSet<Duration> = (0..50)
            .map(|seed| {
                Delays::new(Backoff::DecorrelatedJitter, MS * 50, MS * 2000, seed)
                    .next()
                    .unwrap()
            })
            .collect();
        assert!(firsts.len() > 40, "{} distinct first waits", firsts.len());
        let capped = (0..50).any(|seed| {
            Delays::new(Backoff::DecorrelatedJitter, MS * 50, MS * 200, seed)
                .take(30)
                .any(|d| d == MS * 200)
        });
        assert!(capped);
        let zero = Delays::new(Backoff::DecorrelatedJitter, Duration::ZERO, MS * 10, 3)
            .take(5)
            .collect::<Vec<_>>();
        assert_eq!(zero, vec![Duration::ZERO; 5]);
    }

    #[test]
    fn seeded_delays_differ_between_calls() {
        let seqs: std::collections::HashSet<Vec<Duration>> = (0..10)
            .map(|_| {
                Delays::seeded(Backoff::DecorrelatedJitter, MS * 50, MS * 5000)
                    .take(4)
                    .collect()
            })
            .collect();
        assert!(seqs.len() > 1);
    }

    #[test]
    fn names_parse_and_unknown_ones_are_refused_by_name() {
        for b in [
            Backoff::Linear,
            Backoff::Exponential,
            Backoff::Fibonacci,
            Backoff::DecorrelatedJitter,
        ] {
            assert_eq!(b.as_str().parse::<Backoff>().unwrap(), b);
        }
        let e = "quadratic".parse::<Backoff>().unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::InvalidConfig);
        assert!(e.message().contains("quadratic") && e.message().contains("retry_backoff"));
        assert_eq!(Backoff::default(), Backoff::Exponential);
    }
}
