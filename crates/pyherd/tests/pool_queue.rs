//! The queue: bounded (saturation), timed (queue timeout), first in first out, and
//! many concurrent callers all answered correctly.

mod common;

use std::time::{Duration, Instant};

use common::{spawn_call, testing_pool, wait_until};
use pyherd::{CallOptions, Category, ErrorKind, Pool};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// Runs `sleep` for `seconds` on the pool's one worker, and waits until it is busy with it.
async fn occupy(pool: &Pool, seconds: f64) -> JoinHandle<Result<Value, pyherd::Error>> {
    let call = spawn_call(pool, "sleep", json!({ "seconds": seconds }));
    wait_until(Duration::from_secs(5), "the worker to be busy", || {
        pool.stats().busy == 1
    })
    .await;
    call
}

/// Waits until `n` calls are counted as waiting.
async fn queued(pool: &Pool, n: usize, what: &str) {
    wait_until(Duration::from_secs(5), what, || pool.stats().queued == n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once_with_pool_saturated() {
    let pool = testing_pool(1).max_queue(1).build().await.unwrap();
    let busy = occupy(&pool, 0.6).await;
    let waiting = spawn_call(&pool, "echo", json!("queued"));
    queued(&pool, 1, "one queued call").await;
    let t = Instant::now();
    let e = pool.execute("echo", json!("refused")).await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "refusal must not wait"
    );
    assert_eq!(e.kind(), &ErrorKind::PoolSaturated);
    assert_eq!(e.category(), Category::Resource);
    assert!(e.is_retryable());
    // Nothing admitted was lost.
    assert!(busy.await.unwrap().is_ok());
    assert_eq!(waiting.await.unwrap().unwrap(), json!("queued"));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_past_the_queue_timeout_gets_queue_timeout_and_never_runs() {
    let pool = testing_pool(1)
        .queue_timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let busy = occupy(&pool, 1.0).await;
    let t = Instant::now();
    let e = pool.execute("ctx_info", json!({})).await.unwrap_err();
    let waited = t.elapsed();
    assert_eq!(e.kind(), &ErrorKind::QueueTimeout);
    assert_eq!(e.category(), Category::Timeout);
    assert_eq!(e.context().timeout_ms, Some(200));
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_millis(800),
        "{waited:?}"
    );
    assert!(busy.await.unwrap().is_ok());
    // The abandoned call was skipped: the worker served the sleep and nothing else.
    assert_eq!(pool.workers()[0].requests, 1);
    let stats = pool.stats();
    assert_eq!(stats.queue_timeouts, 1);
    // A per-call queue timeout overrides the pool's.
    let opts = CallOptions::new().queue_timeout(Duration::from_secs(5));
    assert!(pool.execute_with("echo", json!(1), &opts).await.is_ok());
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_given_up_while_queued_frees_its_place_in_the_queue_at_once() {
    let pool = testing_pool(1).max_queue(1).build().await.unwrap();
    let busy = occupy(&pool, 3.0).await;
    // Past its queue timeout.
    let opts = CallOptions::new().queue_timeout(Duration::from_millis(50));
    let e = pool
        .execute_with("echo", json!(1), &opts)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::QueueTimeout);
    assert_eq!(pool.stats().queued, 0);
    // Cancelled by its request id.
    let opts = CallOptions::new().request_id("waiting-1");
    let cancelled = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.execute_with("echo", json!(2), &opts).await })
    };
    queued(&pool, 1, "the call to be queued").await;
    assert!(pool.cancel("waiting-1"));
    assert_eq!(
        cancelled.await.unwrap().unwrap_err().kind(),
        &ErrorKind::Cancelled
    );
    queued(&pool, 0, "the cancelled call out of the queue").await;
    // Its caller gone (the future dropped, as when an HTTP client disconnects).
    let dropped = spawn_call(&pool, "echo", json!(3));
    queued(&pool, 1, "the call to be queued").await;
    dropped.abort();
    queued(&pool, 0, "the dropped call out of the queue").await;
    // The queue of one has room again while the worker is still busy.
    assert_eq!(pool.stats().busy, 1);
    let admitted = spawn_call(&pool, "echo", json!("admitted"));
    queued(&pool, 1, "the new call to be queued").await;
    assert!(busy.await.unwrap().is_ok());
    assert_eq!(admitted.await.unwrap().unwrap(), json!("admitted"));
    // The worker served the sleep and the admitted call, none of the calls given up.
    assert_eq!(pool.workers()[0].requests, 2);
    assert_eq!(pool.stats().queued, 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_given_up_but_not_yet_skipped_are_bounded_too() {
    let pool = testing_pool(1).max_queue(1).build().await.unwrap();
    let busy = occupy(&pool, 1.5).await;
    // Sixteen calls given up while the worker is busy: each leaves the count at once,
    // but stays in the queue until the worker reaches it.
    let opts = CallOptions::new().queue_timeout(Duration::from_millis(10));
    for i in 0..16 {
        let e = pool
            .execute_with("echo", json!(i), &opts)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::QueueTimeout);
    }
    assert_eq!(pool.stats().queued, 0);
    let e = pool.execute("echo", json!("refused")).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::PoolSaturated);
    assert!(e.message().contains("given up"), "{e}");
    // Once the worker is free it skips them, and the queue takes calls again.
    assert!(busy.await.unwrap().is_ok());
    assert_eq!(
        pool.execute("echo", json!("served")).await.unwrap(),
        json!("served")
    );
    assert_eq!(pool.workers()[0].requests, 2);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_served_in_the_order_they_arrived() {
    let pool = testing_pool(1).build().await.unwrap();
    let blocker = occupy(&pool, 0.3).await;
    let mut calls = Vec::new();
    for i in 0..20 {
        let caller = pool.clone();
        calls.push(tokio::spawn(async move {
            caller.execute("ctx_info", json!({})).await.map(|v| {
                // Generated request ids are `r` and a counter in hex.
                let rid = v["request_id"].as_str().unwrap_or_default().to_owned();
                (
                    i,
                    rid.strip_prefix('r')
                        .and_then(|hex| u64::from_str_radix(hex, 16).ok()),
                )
            })
        }));
        let expected = i + 1;
        wait_until(Duration::from_secs(5), "the call to be queued", || {
            pool.stats().queued == expected
        })
        .await;
    }
    blocker.await.unwrap().unwrap();
    let mut served: Vec<(usize, Option<u64>)> = Vec::new();
    for c in calls {
        served.push(c.await.unwrap().unwrap());
    }
    // Request ids are handed out at submission; served in arrival order means ids ascend.
    let ids: Vec<u64> = served.iter().map(|(_, id)| id.unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(ids, sorted);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_calls_on_four_workers_are_all_answered_correctly() {
    let pool = testing_pool(4).build().await.unwrap();
    let calls = (0..200).map(|i| {
        let pool = pool.clone();
        tokio::spawn(async move {
            let reply = pool
                .execute_with(
                    "echo",
                    json!({"i": i, "pad": "x".repeat(i * 10)}),
                    &CallOptions::new(),
                )
                .await?;
            Ok::<_, pyherd::Error>((i, reply.value()?, reply.worker_id().to_owned()))
        })
    });
    let mut by_worker = std::collections::HashMap::new();
    for call in futures::future::join_all(calls).await {
        let (i, value, worker) = call.unwrap().unwrap();
        assert_eq!(value["i"], i);
        assert_eq!(value["pad"].as_str().unwrap().len(), i * 10);
        *by_worker.entry(worker).or_insert(0) += 1;
    }
    assert_eq!(by_worker.values().sum::<i32>(), 200);
    assert!(
        by_worker.len() >= 2,
        "calls spread over workers: {by_worker:?}"
    );
    let stats = pool.stats();
    assert_eq!((stats.requests, stats.errors, stats.queued), (200, 0, 0));
    let served: u64 = pool.workers().iter().map(|w| w.requests).sum();
    assert_eq!(served, 200);
    pool.shutdown().await;
}
