//! Sessions through a real pool: created on first use, passed to handlers, affinity in
//! its three modes, a lost worker, the quota and the sweep.

mod common;

use std::time::Duration;

use common::{sigkill, testing_pool, wait_until, worker_pids};
use pyherd::session::SessionSpec;
use pyherd::{Affinity, CallOptions, Category, Error, ErrorKind, Pool, Reply};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(10);

async fn in_session(pool: &Pool, session: &str, command: &str, args: Value) -> Reply {
    pool.execute_in_session(session, command, args, &CallOptions::new())
        .await
        .unwrap()
}

/// The pid of the worker that answered an `info` call.
fn pid_of(info: &Reply) -> u32 {
    u32::try_from(info.value().unwrap()["pid"].as_u64().unwrap()).unwrap()
}

/// Starts a `sleep` call in `session` and returns once a worker is running it.
async fn occupy(pool: &Pool, session: &str, seconds: f64) -> JoinHandle<Result<Reply, Error>> {
    let busy_before = pool.stats().busy;
    let task = {
        let pool = pool.clone();
        let session = session.to_owned();
        tokio::spawn(async move {
            let args = json!({"seconds": seconds});
            pool.execute_in_session(&session, "sleep", args, &CallOptions::new())
                .await
        })
    };
    wait_until(WAIT, "the sleep call to start", || {
        pool.stats().busy > busy_before
    })
    .await;
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_created_on_first_use_and_reaches_the_handler() {
    let pool = testing_pool(2).build().await.unwrap();
    assert!(!pool.sessions().exists("user-1").await.unwrap());
    let reply = in_session(&pool, "user-1", "ctx_info", json!({})).await;
    let ctx = reply.value().unwrap();
    assert_eq!(ctx["session_id"], "user-1");
    let session = pool.sessions().get("user-1").await.unwrap();
    assert_eq!(session.last_worker.as_deref(), Some(reply.worker_id()));
    // A call with a session id in its options is the same thing.
    let opts = CallOptions::new().session_id("user-2");
    let ctx = pool
        .execute_with("ctx_info", json!({}), &opts)
        .await
        .unwrap();
    assert_eq!(ctx.value().unwrap()["session_id"], "user-2");
    assert_eq!(pool.stats().sessions.live, 2);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hint_affinity_keeps_a_session_on_its_worker_while_it_is_free() {
    let pool = testing_pool(4).build().await.unwrap();
    let first = in_session(&pool, "s", "echo", json!(1)).await;
    for i in 0..20 {
        let reply = in_session(&pool, "s", "echo", json!(i)).await;
        assert_eq!(reply.worker_id(), first.worker_id(), "call {i}");
    }
    let stats = pool.stats();
    assert_eq!((stats.affinity_hits, stats.affinity_misses), (20, 0));
    let metrics = pool.render_metrics();
    assert!(
        metrics.contains("pyherd_session_affinity_total{result=\"hit\"} 20"),
        "{metrics}"
    );

    // Its worker is busy: the next call goes elsewhere and the session follows it.
    let sleeping = occupy(&pool, "s", 0.5).await;
    let moved = in_session(&pool, "s", "echo", json!("moved")).await;
    assert_ne!(moved.worker_id(), first.worker_id());
    assert_eq!(pool.stats().affinity_misses, 1);
    let slept = sleeping.await.unwrap().unwrap();
    assert_eq!(slept.worker_id(), first.worker_id());
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_queue_waits_for_the_sessions_worker() {
    let pool = testing_pool(2)
        .affinity(Affinity::StrictQueue)
        .build()
        .await
        .unwrap();
    let bound = in_session(&pool, "s", "echo", json!(0)).await;
    let sleeping = occupy(&pool, "s", 0.3).await;
    let waited = in_session(&pool, "s", "ctx_info", json!({})).await;
    assert_eq!(waited.worker_id(), bound.worker_id());
    // It ran after the sleep, on the same worker, although another one was idle.
    assert!(sleeping.is_finished());
    assert_eq!(pool.stats().affinity_misses, 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_fail_fast_refuses_when_the_sessions_worker_is_busy() {
    let pool = testing_pool(2).build().await.unwrap();
    in_session(&pool, "s", "echo", json!(0)).await;
    let sleeping = occupy(&pool, "s", 0.5).await;
    let opts = CallOptions::new().affinity(Affinity::StrictFailFast);
    let e = pool
        .execute_in_session("s", "echo", json!(1), &opts)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::WorkerBusy);
    assert_eq!(e.category(), Category::Resource);
    assert!(e.is_retryable());
    assert_eq!(e.context().session_id.as_deref(), Some("s"));
    // The refused call holds no place in the queue.
    assert_eq!(pool.stats().queued, 0);
    // Another session is not affected.
    in_session(&pool, "other", "echo", json!(2)).await;
    sleeping.await.unwrap().unwrap();
    pool.execute_in_session("s", "echo", json!(3), &opts)
        .await
        .unwrap();
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_worker_died_moves_with_nothing_lost() {
    for affinity in [
        Affinity::Hint,
        Affinity::StrictQueue,
        Affinity::StrictFailFast,
    ] {
        let pool = testing_pool(2).affinity(affinity).build().await.unwrap();
        let spec = SessionSpec::new().id("s").metadata(json!({"user": 42}));
        pool.sessions().create(spec).await.unwrap();
        let bound = in_session(&pool, "s", "info", json!({})).await;
        let pid = pid_of(&bound);
        sigkill(pid);
        wait_until(WAIT, "the pool to notice the death", || {
            !worker_pids(&pool).contains(&pid)
        })
        .await;
        let after = in_session(&pool, "s", "ctx_info", json!({})).await;
        assert_ne!(after.worker_id(), bound.worker_id(), "{affinity:?}");
        let session = pool.sessions().get("s").await.unwrap();
        assert_eq!(session.metadata, json!({"user": 42}));
        assert_eq!(session.last_worker.as_deref(), Some(after.worker_id()));
        pool.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_for_a_worker_that_dies_is_served_by_another() {
    let pool = testing_pool(2)
        .affinity(Affinity::StrictQueue)
        .build()
        .await
        .unwrap();
    let bound = in_session(&pool, "s", "info", json!({})).await;
    let sleeping = occupy(&pool, "s", 30.0).await;
    let waiting = {
        let pool = pool.clone();
        tokio::spawn(async move { in_session(&pool, "s", "ctx_info", json!({})).await })
    };
    wait_until(WAIT, "the second call to wait for its worker", || {
        pool.stats().queued == 1
    })
    .await;
    sigkill(pid_of(&bound));
    let e = sleeping.await.unwrap().unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::WorkerCrashed, "{e}");
    let served = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the waiting call was answered")
        .unwrap();
    assert_ne!(served.worker_id(), bound.worker_id());
    assert_eq!(served.value().unwrap()["session_id"], "s");
    let session = pool.sessions().get("s").await.unwrap();
    assert_eq!(session.last_worker.as_deref(), Some(served.worker_id()));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ids_and_the_quota_are_checked_before_any_work() {
    let pool = testing_pool(1).max_sessions(2).build().await.unwrap();
    for bad in ["", "a/b", "../../etc/passwd", "sp ace"] {
        let e = pool
            .execute_in_session(bad, "echo", json!({}), &CallOptions::new())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::InvalidId, "{bad:?}");
    }
    in_session(&pool, "a", "echo", json!({})).await;
    in_session(&pool, "b", "echo", json!({})).await;
    let e = pool
        .execute_in_session("c", "echo", json!({}), &CallOptions::new())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::QuotaExceeded);
    assert_eq!(e.category(), Category::Session);
    // Existing sessions still work, and a freed place can be taken.
    in_session(&pool, "a", "echo", json!({})).await;
    pool.sessions().delete("b").await.unwrap();
    in_session(&pool, "c", "echo", json!({})).await;
    let stats = pool.stats().sessions;
    assert_eq!((stats.live, stats.created, stats.deleted), (2, 3, 1));
    assert_eq!(pool.stats().requests, 9);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_sessions_are_swept_on_the_interval() {
    let pool = testing_pool(1)
        .session_ttl(Duration::from_millis(200))
        .session_sweep_interval(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    in_session(&pool, "short", "echo", json!({})).await;
    let long = SessionSpec::new().id("long").ttl(Duration::from_secs(3600));
    pool.sessions().create(long).await.unwrap();
    wait_until(WAIT, "the sweep to remove the expired session", || {
        pool.stats().sessions.expired == 1
    })
    .await;
    assert_eq!(pool.stats().sessions.live, 1);
    let metrics = pool.render_metrics();
    assert!(
        metrics.contains("pyherd_sessions_expired_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("pyherd_sessions 1"), "{metrics}");
    let e = pool.sessions().get("short").await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::SessionNotFound);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_dspy_adapter_programs_are_unknown() {
    let pool = testing_pool(1).build().await.unwrap();
    let e = pool
        .execute_in_session(
            "s",
            "execute_program",
            json!({"program_id": "p"}),
            &CallOptions::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::UnknownCommand);
    let spec = serde_json::Map::from_iter([("signature".to_owned(), json!("q -> a"))]);
    let e = pool.put_program(None, "p", spec).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::UnknownCommand);
    assert!(e.message().contains("--dspy"), "{e}");
    assert!(!pool.handlers().contains(&"list_programs".to_owned()));
    pool.shutdown().await;
}
