//! The one table from error kinds to recovery actions. The pool reads it to decide
//! whether to retry an idempotent call, whether the worker a call failed on is replaced,
//! and what a failure means to the command's circuit breaker; the README's table is
//! generated from it (a test checks they agree).

use crate::error::ErrorKind;

/// What pyherd does about a failed call of one [`ErrorKind`]; see [`action`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Recovery {
    /// An idempotent call is tried again (after a backoff, on another worker when one is
    /// available) while it has attempts left. Otherwise the pool gives up and the caller
    /// gets the error. For the kinds the host makes this is the error's `retryable`; a
    /// kind sent by a worker is retried only when the worker marked it retryable.
    pub retry: bool,
    /// The worker the call failed on is killed (if it still runs) and a replacement
    /// started. A worker that answered the call itself (its Python code raised, say)
    /// sends only kinds this is `false` for, and serves on; so does the worker of a
    /// cancelled stream that stops within a second of the cancel.
    pub replace_worker: bool,
    /// The failure counts toward opening the command's circuit breaker (when the command
    /// has one): the call harmed its worker.
    pub trips_breaker: bool,
}

impl Recovery {
    /// Neither retried nor anything else: the caller gets the error.
    pub const GIVE_UP: Self = Self {
        retry: false,
        replace_worker: false,
        trips_breaker: false,
    };
    /// Tried again; nothing is wrong with the worker (it was never reached or is busy).
    pub const RETRY: Self = Self {
        retry: true,
        ..Self::GIVE_UP
    };
    /// The worker died during the call: replaced, counted by the breaker, and retried.
    pub const REPLACE_AND_RETRY: Self = Self {
        retry: true,
        replace_worker: true,
        trips_breaker: true,
    };
    /// The call hung its worker: replaced and counted by the breaker, but not retried (a
    /// second attempt would most likely hang a second worker).
    pub const REPLACE: Self = Self {
        retry: false,
        replace_worker: true,
        trips_breaker: true,
    };

    /// True when the caller gets the error without another attempt.
    pub fn gives_up(self) -> bool {
        !self.retry
    }
}

/// The recovery of a failed call of `kind`.
pub fn action(kind: &ErrorKind) -> Recovery {
    match kind {
        ErrorKind::WorkerCrashed => Recovery::REPLACE_AND_RETRY,
        ErrorKind::ExecutionTimeout => Recovery::REPLACE,
        // A running call cannot be interrupted: its worker is killed. The caller ended
        // the call, which did not harm the worker: not counted by the breaker.
        ErrorKind::Cancelled => Recovery {
            replace_worker: true,
            ..Recovery::GIVE_UP
        },
        ErrorKind::QueueTimeout | ErrorKind::PoolSaturated | ErrorKind::WorkerBusy => {
            Recovery::RETRY
        }
        ErrorKind::Other(_) => Recovery::RETRY,
        ErrorKind::InvalidConfig
        | ErrorKind::SpawnFailed
        | ErrorKind::StartupFailed
        | ErrorKind::StartupTimeout
        | ErrorKind::HandlerImportFailed
        | ErrorKind::HandshakeFailed
        | ErrorKind::SpawnFailing
        | ErrorKind::UnknownCommand
        | ErrorKind::PythonException
        | ErrorKind::ResultNotSerializable
        | ErrorKind::ResultTooLarge
        | ErrorKind::PayloadTooLarge
        | ErrorKind::MalformedRequest
        | ErrorKind::ResultTypeMismatch
        | ErrorKind::ShuttingDown
        | ErrorKind::SessionNotFound
        | ErrorKind::SessionExists
        | ErrorKind::QuotaExceeded
        | ErrorKind::ProgramNotFound
        | ErrorKind::InvalidId
        | ErrorKind::SessionRequired
        | ErrorKind::InvalidSignature
        | ErrorKind::LmError
        | ErrorKind::CircuitOpen
        | ErrorKind::InvalidRequestId
        | ErrorKind::CallNotFound
        | ErrorKind::TooManyStreams => Recovery::GIVE_UP,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind the host knows, in the README's order within each row.
    const KINDS: [ErrorKind; 33] = [
        ErrorKind::WorkerCrashed,
        ErrorKind::ExecutionTimeout,
        ErrorKind::Cancelled,
        ErrorKind::QueueTimeout,
        ErrorKind::PoolSaturated,
        ErrorKind::WorkerBusy,
        ErrorKind::PythonException,
        ErrorKind::ResultNotSerializable,
        ErrorKind::LmError,
        ErrorKind::ResultTooLarge,
        ErrorKind::CircuitOpen,
        ErrorKind::TooManyStreams,
        ErrorKind::UnknownCommand,
        ErrorKind::PayloadTooLarge,
        ErrorKind::MalformedRequest,
        ErrorKind::ResultTypeMismatch,
        ErrorKind::InvalidId,
        ErrorKind::SessionRequired,
        ErrorKind::InvalidSignature,
        ErrorKind::InvalidRequestId,
        ErrorKind::CallNotFound,
        ErrorKind::SessionNotFound,
        ErrorKind::SessionExists,
        ErrorKind::QuotaExceeded,
        ErrorKind::ProgramNotFound,
        ErrorKind::ShuttingDown,
        ErrorKind::InvalidConfig,
        ErrorKind::SpawnFailed,
        ErrorKind::StartupFailed,
        ErrorKind::StartupTimeout,
        ErrorKind::HandlerImportFailed,
        ErrorKind::HandshakeFailed,
        ErrorKind::SpawnFailing,
    ];

    fn yes_no(b: bool) -> &'static str {
        if b { "yes" } else { "no" }
    }

    /// The README's table: kinds with the same recovery share a row, in `KINDS` order.
    fn markdown() -> String {
        let mut rows: Vec<(Recovery, Vec<String>)> = Vec::new();
        for kind in &KINDS {
            let name = format!("`{}/{}`", kind.category(), kind);
            match rows.iter_mut().find(|(r, _)| *r == action(kind)) {
                Some((_, names)) => names.push(name),
                None => rows.push((action(kind), vec![name])),
            }
        }
        let mut out = String::from(
            "| error | retry (idempotent calls) | replace the worker | counts toward the breaker |\n\
             |---|---|---|---|\n",
        );
        for (r, names) in &rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                names.join(", "),
                if r.gives_up() { "no: give up" } else { "yes" },
                yes_no(r.replace_worker),
                yes_no(r.trips_breaker),
            ));
        }
        let other = action(&ErrorKind::Other("x".into()));
        out.push_str(&format!(
            "| any other kind a worker sends | {} | {} | {} |\n",
            if other.retry {
                "when the worker marks it retryable"
            } else {
                "no: give up"
            },
            yes_no(other.replace_worker),
            yes_no(other.trips_breaker),
        ));
        out
    }

    #[test]
    fn retry_in_the_table_is_what_the_errors_say_is_retryable() {
        for kind in &KINDS {
            assert_eq!(action(kind).retry, kind.default_retryable(), "{kind}");
        }
    }

    #[test]
    fn failures_that_cost_a_worker_replace_it_and_only_harm_trips_the_breaker() {
        for kind in &KINDS {
            let r = action(kind);
            let harms = matches!(kind, ErrorKind::WorkerCrashed | ErrorKind::ExecutionTimeout);
            let costs_the_worker = harms || *kind == ErrorKind::Cancelled;
            assert_eq!(
                (r.replace_worker, r.trips_breaker),
                (costs_the_worker, harms),
                "{kind}"
            );
        }
        assert!(action(&ErrorKind::PythonException).gives_up());
        assert!(!action(&ErrorKind::Other("rate_limited".into())).gives_up());
    }

    #[test]
    fn the_readme_shows_this_table() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
        let readme = std::fs::read_to_string(path).unwrap();
        let table = markdown();
        assert!(
            readme.contains(&table),
            "README.md's recovery table differs from the code; it should be:\n{table}"
        );
    }
}
