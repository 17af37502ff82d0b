//! Health checks: an idle worker is pinged (the built-in `ping`, through the protocol)
//! after `health_interval` without an exchange.
//!
//! A ping that times out leaves its request on the pipe: the worker (stopped, or stuck
//! in something that is not a call) may still answer it. So a missed ping is not given
//! up: the worker becomes `degraded` (no new work; its affinity calls go back to the
//! queue) and the slot keeps waiting for that same answer. Each further
//! `health_interval` without it is another miss; the third miss in a row kills and
//! replaces the worker. The answer arriving in time brings the worker back to `ready`.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::lifecycle::RestartReason;
use super::slot::{Ending, Slot};
use crate::worker::{WorkerProcess, WorkerState};

/// Missed health checks in a row after which a worker is replaced.
const HEALTH_MISSES_TO_REPLACE: u32 = 3;

/// The call frame of the built-in `ping` (the same bytes a `Call` serialises to).
fn ping_frame(id: u64, deadline_ms: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"t":"call","id":{id},"rid":"health","cmd":"ping","args":null,"deadline_ms":{deadline_ms}}}"#
    ))
}

fn epoch_ms_after(delay: Duration) -> u64 {
    SystemTime::now()
        .checked_add(delay)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(u64::MAX, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
        })
}

impl Slot {
    /// Pings an idle worker and waits for the answer as described in the module
    /// documentation; `Some` when the worker is gone.
    pub(super) async fn health_check(&self, worker: &mut WorkerProcess) -> Option<Ending> {
        let shared = &self.shared;
        let config = &shared.config;
        let id = shared.next_request.fetch_add(1, Ordering::Relaxed);
        let frame = ping_frame(id, epoch_ms_after(config.health_timeout));
        shared.life.pinged();
        if let Err(fault) = worker.send_frame(frame).await {
            let error = worker.crashed(fault).await;
            tracing::warn!(worker = %worker.id(), error = %error, "worker lost at its health check");
            self.go(WorkerState::Stopped, "crashed");
            return Some(Ending::Replace(RestartReason::Crashed));
        }
        let mut misses = 0;
        let mut window = config.health_timeout;
        loop {
            let answer = tokio::select! {
                biased;
                () = shared.abort.cancelled() => {
                    worker.kill().await;
                    self.go(WorkerState::Stopped, "aborted");
                    return Some(Ending::Stop);
                }
                // A degraded worker takes no calls: at shutdown it is not waited for.
                () = shared.closing.cancelled(), if misses > 0 => {
                    self.go(WorkerState::Draining, "shutdown");
                    worker.kill().await;
                    self.go(WorkerState::Stopped, "shutdown");
                    return Some(Ending::Stop);
                }
                answer = tokio::time::timeout(window, worker.answer(id)) => answer,
            };
            match answer {
                Ok(Ok(_)) => {
                    if misses > 0 {
                        self.go(WorkerState::Ready, "health_check_passed");
                    }
                    return None;
                }
                Ok(Err(fault)) => {
                    let error = worker.crashed(fault).await;
                    tracing::warn!(worker = %worker.id(), error = %error, "worker lost at its health check");
                    self.go(WorkerState::Stopped, "crashed");
                    return Some(Ending::Replace(RestartReason::Crashed));
                }
                Err(_) => {
                    misses += 1;
                    shared.life.ping_missed();
                    if misses >= HEALTH_MISSES_TO_REPLACE {
                        worker.kill().await;
                        self.go(WorkerState::Stopped, "health_check_failed");
                        return Some(Ending::Replace(RestartReason::HealthCheck));
                    }
                    if misses == 1 {
                        self.go(WorkerState::Degraded, "health_check_missed");
                        self.hand_back();
                    } else {
                        tracing::warn!(worker = %worker.id(), misses, "worker still has not answered its ping");
                    }
                    window = config.health_interval;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::*;
    use crate::protocol::{Call, CallMeta};

    #[test]
    fn the_ping_frame_is_a_protocol_call() {
        let args = RawValue::NULL.to_owned();
        let meta = CallMeta {
            id: 7,
            rid: "health",
            session_id: None,
            deadline_ms: 1_700_000_000_000,
            stream: false,
        };
        let call = Call::new("ping", &args, meta);
        assert_eq!(
            ping_frame(7, 1_700_000_000_000),
            serde_json::to_vec(&call).unwrap()
        );
    }
}
