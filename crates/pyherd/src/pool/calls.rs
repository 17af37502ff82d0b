//! Request ids and the calls in flight by id, so that a call can be cancelled by its id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio_util::sync::CancellationToken;

use super::job::Flight;
use super::{Pool, Shared};
use crate::error::{Error, ErrorKind};

/// Longest request id.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Checks a caller's request id: 1 to [`MAX_REQUEST_ID_LEN`] characters of
/// `A-Z a-z 0-9 . _ : -`.
///
/// # Errors
/// `invalid_request/invalid_request_id` saying what is wrong.
pub fn check_request_id(id: &str) -> Result<(), Error> {
    let fault = if id.is_empty() {
        Some("is empty".to_owned())
    } else if id.len() > MAX_REQUEST_ID_LEN {
        Some(format!(
            "is {} characters long, over {MAX_REQUEST_ID_LEN}",
            id.len()
        ))
    } else {
        id.chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
            .map(|c| format!("has {c:?}, outside A-Z a-z 0-9 . _ : -"))
    };
    match fault {
        None => Ok(()),
        Some(why) => {
            let shown: String = id.chars().take(40).collect();
            Err(Error::new(
                ErrorKind::InvalidRequestId,
                format!("the request id {shown:?} {why}"),
            ))
        }
    }
}

tokio::task_local! {
    /// The call the task runs: every attempt of it, and every call the host makes for it
    /// (a session's `create_program`), takes its request id and its cancellation from
    /// here, so a cancel reaches them even after it forgot the id (which a new call may
    /// then take).
    static CURRENT: Flight;
}

/// Runs `work` as the call `flight` (see [`Calls::current`]).
pub(crate) async fn running<T>(flight: Flight, work: impl Future<Output = T>) -> T {
    CURRENT.scope(flight, work).await
}

/// The calls in flight, by request id.
#[derive(Default)]
pub(crate) struct Calls {
    next: AtomicU64,
    live: Mutex<HashMap<Arc<str>, CancellationToken>>,
}

impl Calls {
    /// A request id the pool makes: `r` and a counter in hex, unique in this pool.
    fn generate(&self) -> Arc<str> {
        format!("r{:x}", self.next.fetch_add(1, Ordering::Relaxed) + 1).into()
    }

    /// Enters a call under `requested` (checked) or a generated id.
    fn enter(&self, requested: Option<&str>) -> Result<Flight, Error> {
        let cancel = CancellationToken::new();
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let rid: Arc<str> = match requested {
            Some(id) => {
                check_request_id(id)?;
                if live.contains_key(id) {
                    return Err(Error::new(
                        ErrorKind::InvalidRequestId,
                        format!("a call with the request id {id:?} is still in flight"),
                    ));
                }
                id.into()
            }
            // A caller may have chosen an id of the generated shape: skip it.
            None => loop {
                let id = self.generate();
                if !live.contains_key(&id) {
                    break id;
                }
            },
        };
        live.insert(rid.clone(), cancel.clone());
        Ok(Flight { rid, cancel })
    }

    /// The flight of the call this task runs ([`running`]), else a new one that is not
    /// entered, under `rid` or a generated id (a call the host makes on its own, such as
    /// the check of a global program).
    pub(crate) fn current(&self, rid: Option<&str>) -> Flight {
        CURRENT.try_with(Flight::clone).unwrap_or_else(|_| Flight {
            rid: rid.map_or_else(|| self.generate(), Arc::from),
            cancel: CancellationToken::new(),
        })
    }

    /// Cancels and forgets the call in flight as `rid`; false when there is none.
    fn cancel(&self, rid: &str) -> bool {
        let removed = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(rid);
        removed.map(|token| token.cancel()).is_some()
    }

    /// Forgets `flight` (if it is still the call under its id).
    fn leave(&self, flight: &Flight) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        // The key is the flight's own `Arc` unless the id was cancelled and taken again.
        if live
            .get_key_value(&flight.rid)
            .is_some_and(|(key, _)| Arc::ptr_eq(key, &flight.rid))
        {
            live.remove(&flight.rid);
        }
    }
}

/// A call entered in the pool's calls in flight: dropping it (the call's future or
/// stream ending, finished or not) cancels the call and forgets its id.
pub(crate) struct Entered {
    shared: Arc<Shared>,
    pub(crate) flight: Flight,
}

impl Drop for Entered {
    fn drop(&mut self) {
        self.flight.cancel.cancel();
        self.shared.calls.leave(&self.flight);
    }
}

impl Pool {
    /// Enters a call of `command` under the request id `requested` (or a generated one);
    /// a refused id is an error that names the command.
    pub(crate) fn enter(&self, command: &str, requested: Option<&str>) -> Result<Entered, Error> {
        let shared = &self.inner.shared;
        let flight = shared
            .calls
            .enter(requested)
            .map_err(|e| e.with_context(|c| c.command = Some(command.to_owned())))?;
        Ok(Entered {
            flight,
            shared: shared.clone(),
        })
    }

    /// Cancels the call in flight with request id `request_id`. A call still queued is
    /// removed and never reaches a worker; a running stream is asked to stop (its worker
    /// is killed and replaced if it does not within a second); a running plain call's
    /// worker is killed and replaced (`cancelled` in the restarts). The call's caller
    /// gets `invalid_request/cancelled`.
    ///
    /// Returns false when no call in flight has that id.
    pub fn cancel(&self, request_id: &str) -> bool {
        self.inner.shared.calls.cancel(request_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_checked() {
        for good in ["a", "r1f", "2026-11-23T12:00:00.1_x", &"x".repeat(128)] {
            assert!(check_request_id(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a/b", "é", "a\n", &"x".repeat(129)] {
            let e = check_request_id(bad).unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::InvalidRequestId, "{bad:?}");
        }
    }

    #[test]
    fn ids_in_flight_are_unique_and_cancellable_once() {
        let calls = Calls::default();
        let a = calls.enter(None).unwrap();
        let b = calls.enter(None).unwrap();
        assert_ne!(a.rid, b.rid);
        let mine = calls.enter(Some("job-7")).unwrap();
        let again = calls.enter(Some("job-7")).unwrap_err();
        assert!(again.message().contains("in flight"), "{again}");
        assert!(calls.cancel("job-7"));
        assert!(mine.cancel.is_cancelled());
        assert!(!calls.cancel("job-7"));
        assert!(!b.cancel.is_cancelled());
        calls.leave(&b);
        assert!(!calls.cancel(&b.rid));
        // A reused id is not forgotten by the call that had it before.
        let reused = calls.enter(Some("job-7")).unwrap();
        calls.leave(&mine);
        assert!(!reused.cancel.is_cancelled());
        assert!(calls.cancel("job-7") && reused.cancel.is_cancelled());
    }

    #[tokio::test]
    async fn a_task_sees_its_own_call_even_once_its_id_is_forgotten() {
        let calls = Calls::default();
        let outside = calls.current(Some("mine"));
        assert_eq!(&*outside.rid, "mine");
        assert!(calls.enter(Some("mine")).is_ok(), "not entered");
        let entered = calls.enter(Some("job-8")).unwrap();
        running(entered.clone(), async {
            assert!(calls.cancel("job-8"));
            // The id is free again and another call takes it: this task still sees its own.
            let other = calls.enter(Some("job-8")).unwrap();
            let current = calls.current(Some("job-8"));
            assert!(current.cancel.is_cancelled());
            assert!(!other.cancel.is_cancelled());
        })
        .await;
        assert!(!calls.current(None).cancel.is_cancelled());
    }
}
