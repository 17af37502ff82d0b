//! Resilience policies (DESIGN §7): retry backoff, circuit breakers per command, and the
//! table from error kinds to recovery actions.

mod backoff;
mod breaker;
pub mod recovery;

use std::time::Duration;

pub use self::backoff::Backoff;
pub(crate) use self::backoff::Delays;
pub(crate) use self::breaker::{
    Breaker, BreakerSettings, Breakers, Outcome, Permit, Refusal, millis,
};
pub use self::breaker::{BreakerInfo, BreakerState};
pub use self::recovery::{Recovery, action};
use crate::config::PoolConfig;
use crate::error::{Error, ErrorKind};

/// Most attempts of one idempotent call.
pub const MAX_RETRY_ATTEMPTS: u32 = 100;
/// Longest wait between attempts, and longest open time of a breaker.
pub const MAX_POLICY_WAIT: Duration = Duration::from_secs(3600);

/// Checks the retry and breaker settings of `config`.
///
/// # Errors
/// `initialization/invalid_config` naming the first value out of range.
pub(crate) fn check(config: &PoolConfig) -> Result<(), Error> {
    let invalid = |msg: String| Err(Error::new(ErrorKind::InvalidConfig, msg));
    let max_s = MAX_POLICY_WAIT.as_secs();
    if !(1..=MAX_RETRY_ATTEMPTS).contains(&config.retry_attempts) {
        return invalid(format!(
            "retry_attempts must be 1..={MAX_RETRY_ATTEMPTS} (1 means no retry), not {}",
            config.retry_attempts
        ));
    }
    if config.retry_cap < config.retry_base {
        return invalid(format!(
            "retry_cap ({} ms) must not be under retry_base ({} ms)",
            config.retry_cap.as_millis(),
            config.retry_base.as_millis()
        ));
    }
    if config.retry_cap > MAX_POLICY_WAIT {
        return invalid(format!("retry_cap must be at most {max_s} s"));
    }
    if config.breaker_failures == 0 {
        return invalid("breaker_failures must be at least 1".into());
    }
    if config.breaker_successes == 0 {
        return invalid("breaker_successes must be at least 1".into());
    }
    if config.breaker_open.is_zero() || config.breaker_open > MAX_POLICY_WAIT {
        return invalid(format!(
            "breaker_open must be greater than zero and at most {max_s} s"
        ));
    }
    for (name, list) in [
        ("idempotent_commands", &config.idempotent_commands),
        ("breaker_commands", &config.breaker_commands),
    ] {
        if let Some(c) = list.iter().find(|c| c.trim().is_empty()) {
            return invalid(format!("{name} must not hold an empty name ({c:?})"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(config: PoolConfig) -> String {
        check(&config).unwrap_err().message().to_owned()
    }

    #[test]
    fn defaults_pass_and_each_bad_value_is_named() {
        let ok = PoolConfig::default();
        check(&ok).unwrap();
        assert_eq!(
            (ok.retry_attempts, ok.retry_backoff),
            (3, Backoff::Exponential)
        );
        let ms = Duration::from_millis;
        let cases: [(PoolConfig, &str); 8] = [
            (
                PoolConfig {
                    retry_attempts: 0,
                    ..ok.clone()
                },
                "retry_attempts",
            ),
            (
                PoolConfig {
                    retry_attempts: 101,
                    ..ok.clone()
                },
                "retry_attempts",
            ),
            (
                PoolConfig {
                    retry_base: ms(500),
                    retry_cap: ms(100),
                    ..ok.clone()
                },
                "retry_cap",
            ),
            (
                PoolConfig {
                    retry_cap: MAX_POLICY_WAIT * 2,
                    ..ok.clone()
                },
                "retry_cap",
            ),
            (
                PoolConfig {
                    breaker_failures: 0,
                    ..ok.clone()
                },
                "breaker_failures",
            ),
            (
                PoolConfig {
                    breaker_successes: 0,
                    ..ok.clone()
                },
                "breaker_successes",
            ),
            (
                PoolConfig {
                    breaker_open: Duration::ZERO,
                    ..ok.clone()
                },
                "breaker_open",
            ),
            (
                PoolConfig {
                    breaker_commands: vec![" ".into()],
                    ..ok.clone()
                },
                "breaker_commands",
            ),
        ];
        for (config, name) in cases {
            let message = refusal(config);
            assert!(message.contains(name), "{message} should name {name}");
        }
        let e = PoolConfig {
            idempotent_commands: vec![String::new()],
            ..ok
        };
        assert!(refusal(e).contains("idempotent_commands"));
    }
}
