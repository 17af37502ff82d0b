//! Shutdown: admitted calls finish within the grace period, later ones are refused,
//! every process (and its children) ends and is reaped; dropping a pool ends it too.

mod common;

use std::time::{Duration, Instant};

use common::{exists, running, spawn_call, testing_pool, wait_until, worker_pids};
use pyherd::{ErrorKind, WorkerState};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_finish_and_every_worker_is_reaped() {
    let pool = testing_pool(3).build().await.unwrap();
    let pids = worker_pids(&pool);
    let child = pool.execute("spawn_child", json!({})).await.unwrap()["pid"]
        .as_u64()
        .unwrap() as u32;
    let in_flight = spawn_call(&pool, "sleep", json!({"seconds": 0.4}));
    wait_until(Duration::from_secs(5), "the call to run", || {
        pool.stats().busy == 1
    })
    .await;
    let t = Instant::now();
    pool.shutdown().await;
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(in_flight.await.unwrap().unwrap(), json!({"slept": 0.4}));
    for pid in pids {
        assert!(!exists(pid), "worker {pid} left behind (running or zombie)");
    }
    assert!(
        !running(child),
        "a worker's child {child} outlived the pool"
    );
    assert!(
        pool.workers()
            .iter()
            .all(|w| w.state == WorkerState::Stopped)
    );
    assert!(!pool.is_ready());
    let e = pool.execute("echo", json!(1)).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::ShuttingDown);
    // A second shutdown returns at once.
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_still_running_or_queued_when_the_grace_ends_fail_and_their_workers_are_killed() {
    let pool = testing_pool(1)
        .queue_timeout(Duration::from_secs(600))
        .build()
        .await
        .unwrap();
    let pid = worker_pids(&pool)[0];
    let stuck = spawn_call(&pool, "sleep", json!({"seconds": 600}));
    wait_until(Duration::from_secs(5), "the call to run", || {
        pool.stats().busy == 1
    })
    .await;
    let queued = spawn_call(&pool, "echo", json!("never served"));
    wait_until(Duration::from_secs(5), "a queued call", || {
        pool.stats().queued == 1
    })
    .await;
    let t = Instant::now();
    pool.shutdown_with(Duration::from_millis(300)).await;
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let e = stuck.await.unwrap().unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::ShuttingDown);
    // Answered by the shutdown, not by its queue timeout 10 minutes on.
    let e = tokio::time::timeout(Duration::from_secs(5), queued)
        .await
        .expect("the queued call is answered when the shutdown ends")
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::ShuttingDown);
    assert!(!exists(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_calls_are_still_served_during_the_drain() {
    let pool = testing_pool(1).build().await.unwrap();
    let first = spawn_call(&pool, "sleep", json!({"seconds": 0.3}));
    wait_until(Duration::from_secs(5), "the call to run", || {
        pool.stats().busy == 1
    })
    .await;
    let queued = spawn_call(&pool, "echo", json!("admitted"));
    wait_until(Duration::from_secs(5), "a queued call", || {
        pool.stats().queued == 1
    })
    .await;
    pool.shutdown().await;
    assert!(first.await.unwrap().is_ok());
    assert_eq!(queued.await.unwrap().unwrap(), json!("admitted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_stops_every_worker() {
    let pool = testing_pool(2).build().await.unwrap();
    let pids = worker_pids(&pool);
    drop(pool);
    wait_until(Duration::from_secs(5), "the workers to end", || {
        pids.iter().all(|&p| !exists(p))
    })
    .await;
}

/// The processes whose command line holds all of `words`.
fn processes_with(words: &[&str]) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if words.iter().all(|w| cmdline.contains(w)) {
            found.push(pid);
        }
    }
    found
}

/// A pool that shut down leaves no process of its own, its guardian included, even while
/// a handle to it is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guardian_exits_with_the_shutdown_while_a_handle_is_kept() {
    let pool = testing_pool(1).build().await.unwrap();
    let guardian = ["pyherd_worker.guardian", pool.run_id()];
    assert_eq!(processes_with(&guardian).len(), 1, "one guardian runs");
    pool.shutdown().await;
    wait_until(Duration::from_secs(10), "the guardian to exit", || {
        processes_with(&guardian).is_empty()
    })
    .await;
    let e = pool.execute("echo", json!(1)).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::ShuttingDown);
}
