//! Workers that hang, crash, kill themselves, write garbage or are killed from outside:
//! only the call in flight fails, the worker is replaced, and the pool keeps serving. A
//! failed call's worker is replaced exactly when the recovery table says so for its error.

mod common;

use std::time::{Duration, Instant};

use common::{
    child_holding_the_pipes, crash_with_a_child_holding_the_pipes, exists, running, sigkill,
    spawn_call, testing_pool, wait_until, worker_pids,
};
use futures::StreamExt;
use pyherd::{CallOptions, Category, ErrorKind, Pool, WorkerState};
use serde_json::json;

async fn replaced(pool: &Pool, restarts: u64) {
    wait_until(Duration::from_secs(10), "the replacement worker", || {
        let s = pool.stats();
        s.restarts == restarts && s.available + s.busy == s.workers
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_call_times_out_on_time_and_its_worker_is_killed_and_replaced() {
    let pool = testing_pool(1).build().await.unwrap();
    let old_pid = worker_pids(&pool)[0];
    let t = Instant::now();
    let e = pool
        .execute_with(
            "sleep",
            json!({"seconds": 600}),
            &CallOptions::new().timeout(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    let took = t.elapsed();
    assert_eq!(e.kind(), &ErrorKind::ExecutionTimeout);
    assert_eq!(e.category(), Category::Timeout);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(900),
        "{took:?}"
    );
    assert_eq!(e.context().timeout_ms, Some(300));
    assert_eq!(e.context().pid, Some(old_pid));
    wait_until(Duration::from_secs(5), "the hung worker to be gone", || {
        !exists(old_pid)
    })
    .await;
    replaced(&pool, 1).await;
    let new_pid = worker_pids(&pool)[0];
    assert_ne!(new_pid, old_pid);
    assert_eq!(
        pool.execute("echo", json!("alive")).await.unwrap(),
        json!("alive")
    );
    assert_eq!(pool.workers()[0].id, "w2");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_execution_timeout_applies_without_options() {
    let pool = testing_pool(1)
        .request_timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let e = pool
        .execute("sleep", json!({"seconds": 60}))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::ExecutionTimeout);
    replaced(&pool, 1).await;
    pool.shutdown().await;
}

/// One call that fails in the way `case` names; its error.
async fn fail_a_call(pool: &Pool, case: &str) -> pyherd::Error {
    match case {
        "raises" => pool.execute("raise_error", json!({})).await.unwrap_err(),
        "answers what JSON cannot hold" => pool.execute("not_json", json!({})).await.unwrap_err(),
        "streams, then raises" => {
            let chunks: Vec<_> = pool
                .stream("count_then_fail", json!({"n": 2}))
                .await
                .unwrap()
                .collect()
                .await;
            chunks.into_iter().find_map(Result::err).unwrap()
        }
        "exits" => pool.execute("crash", json!({})).await.unwrap_err(),
        "runs past its timeout" => {
            let short = CallOptions::new().timeout(Duration::from_millis(300));
            let call = pool.execute_with("sleep", json!({"seconds": 600}), &short);
            call.await.unwrap_err()
        }
        "is cancelled while running" => {
            let caller = pool.clone();
            let call = tokio::spawn(async move {
                let options = CallOptions::new().request_id("to-cancel");
                let call = caller.execute_with("sleep", json!({"seconds": 600}), &options);
                call.await
            });
            wait_until(Duration::from_secs(5), "the call to run", || {
                pool.stats().busy == 1
            })
            .await;
            assert!(pool.cancel("to-cancel"));
            call.await.unwrap().unwrap_err()
        }
        other => panic!("no case {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_calls_worker_is_replaced_exactly_when_the_recovery_table_says_so() {
    let pool = testing_pool(1).build().await.unwrap();
    let mut kinds = Vec::new();
    for case in [
        "raises",
        "answers what JSON cannot hold",
        "streams, then raises",
        "exits",
        "runs past its timeout",
        "is cancelled while running",
    ] {
        let before = worker_pids(&pool);
        let restarts = pool.stats().restarts;
        let error = fail_a_call(&pool, case).await;
        if pyherd::policy::action(error.kind()).replace_worker {
            replaced(&pool, restarts + 1).await;
            assert_ne!(worker_pids(&pool), before, "{case}: {error}");
        } else {
            assert_eq!(worker_pids(&pool), before, "{case}: {error}");
            assert_eq!(pool.workers()[0].state, WorkerState::Ready, "{case}");
            assert_eq!(pool.stats().restarts, restarts, "{case}: {error}");
        }
        kinds.push(error.kind().clone());
    }
    assert_eq!(
        kinds,
        [
            ErrorKind::PythonException,
            ErrorKind::ResultNotSerializable,
            ErrorKind::PythonException,
            ErrorKind::WorkerCrashed,
            ErrorKind::ExecutionTimeout,
            ErrorKind::Cancelled,
        ]
    );
    assert_eq!(pool.stats().restarts, 3);
    pool.shutdown().await;
}

async fn crash_case(command: &str, args: serde_json::Value, exit: &str, stderr: Option<&str>) {
    let pool = testing_pool(2).build().await.unwrap();
    let e = pool.execute(command, args).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::WorkerCrashed, "{e}");
    assert_eq!(e.category(), Category::Communication);
    assert!(e.is_retryable());
    let ctx = e.context();
    let dead = ctx.pid.unwrap();
    assert!(!exists(dead), "the dead worker {dead} was reaped");
    assert_eq!(ctx.exit_status.as_deref(), Some(exit), "{e}");
    if let Some(words) = stderr {
        assert!(
            ctx.stderr_tail.as_deref().unwrap_or("").contains(words),
            "{e}"
        );
    }
    replaced(&pool, 1).await;
    for i in 0..10 {
        assert_eq!(pool.execute("echo", json!(i)).await.unwrap(), json!(i));
    }
    let stats = pool.stats();
    assert_eq!((stats.errors, stats.restarts), (1, 1));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_exits_mid_call_fails_only_that_call() {
    crash_case(
        "crash",
        json!({"code": 7}),
        "exit status: 7",
        Some("exiting on purpose"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_sigkills_itself_mid_call_fails_only_that_call() {
    crash_case("kill_self", json!({}), "signal: 9 (SIGKILL)", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_writes_a_garbage_frame_is_killed_and_replaced() {
    crash_case("garbage_frame", json!({}), "signal: 9 (SIGKILL)", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_does_not_touch_calls_on_other_workers() {
    let pool = testing_pool(2).build().await.unwrap();
    let slow = spawn_call(&pool, "sleep", json!({"seconds": 0.5}));
    wait_until(Duration::from_secs(5), "the slow call to run", || {
        pool.stats().busy == 1
    })
    .await;
    let e = pool.execute("crash", json!({})).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::WorkerCrashed);
    assert_eq!(slow.await.unwrap().unwrap(), json!({"slept": 0.5}));
    replaced(&pool, 1).await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_from_outside_while_idle_is_replaced() {
    let pool = testing_pool(2).build().await.unwrap();
    let victim = worker_pids(&pool)[0];
    sigkill(victim);
    replaced(&pool, 1).await;
    assert!(!exists(victim));
    assert!(!worker_pids(&pool).contains(&victim));
    let answers = futures::future::join_all((0..20).map(|i| pool.execute("echo", json!(i)))).await;
    assert!(answers.iter().all(Result::is_ok));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dying_mid_call_is_found_at_once_though_its_child_holds_the_pipes() {
    let pool = testing_pool(1).build().await.unwrap();
    crash_with_a_child_holding_the_pipes(&pool).await;
    replaced(&pool, 1).await;
    assert_eq!(pool.execute("echo", json!(1)).await.unwrap(), json!(1));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_idle_is_replaced_though_its_child_holds_the_pipes() {
    let pool = testing_pool(1).build().await.unwrap();
    let child = child_holding_the_pipes(&pool).await;
    let victim = worker_pids(&pool)[0];
    sigkill(victim);
    replaced(&pool, 1).await;
    assert!(!worker_pids(&pool).contains(&victim));
    wait_until(Duration::from_secs(5), "the child to die", || {
        !running(child)
    })
    .await;
    let t = Instant::now();
    assert_eq!(pool.execute("echo", json!(2)).await.unwrap(), json!(2));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    pool.shutdown().await;
}

/// A child started in a session of its own leaves the worker's process group: it still
/// ends with the worker (its environment names the worker), crashed or recycled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_in_a_session_of_its_own_ends_with_its_worker() {
    let pool = testing_pool(1).max_requests(2).build().await.unwrap();
    let away = || async {
        let answer = pool
            .execute("spawn_child", json!({"new_session": true}))
            .await
            .unwrap();
        u32::try_from(answer["pid"].as_u64().unwrap()).unwrap()
    };
    // Crashed.
    let first = away().await;
    let e = pool.execute("crash", json!({})).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::WorkerCrashed, "{e}");
    wait_until(Duration::from_secs(5), "the first child to end", || {
        !running(first)
    })
    .await;
    // Recycled after its second call.
    replaced(&pool, 1).await;
    let second = away().await;
    assert_eq!(pool.execute("echo", json!(1)).await.unwrap(), json!(1));
    wait_until(Duration::from_secs(10), "the second child to end", || {
        !running(second)
    })
    .await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_spam_goes_to_the_log_and_never_corrupts_frames() {
    let pool = testing_pool(1).build().await.unwrap();
    let v = pool
        .execute("spam_stdout", json!({"lines": 5000}))
        .await
        .unwrap();
    assert_eq!(v, json!({"printed": 5000}));
    for i in 0..20 {
        assert_eq!(
            pool.execute("echo", json!({"i": i})).await.unwrap(),
            json!({"i": i})
        );
    }
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_takes_its_own_children_with_it() {
    let pool = testing_pool(1).build().await.unwrap();
    let child = pool.execute("spawn_child", json!({})).await.unwrap()["pid"]
        .as_u64()
        .unwrap() as u32;
    assert!(running(child));
    let e = pool
        .execute_with(
            "sleep",
            json!({"seconds": 60}),
            &CallOptions::new().timeout(Duration::from_millis(100)),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::ExecutionTimeout);
    wait_until(Duration::from_secs(5), "the grandchild to die", || {
        !running(child)
    })
    .await;
    replaced(&pool, 1).await;
    assert_eq!(pool.workers()[0].state, WorkerState::Ready);
    pool.shutdown().await;
}
