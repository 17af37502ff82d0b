//! The worker lifecycle against real workers: health checks on stopped (SIGSTOP)
//! processes, recycling by calls, memory and age, scaling, and the spawn breaker.

mod common;

use std::time::{Duration, Instant};

use common::{exists, sigkill, spawn_call, testing_pool, wait_until, worker_pids};
use futures::StreamExt;
use nix::sys::signal::Signal;
use pyherd::{CallOptions, ErrorKind, Pool, WorkerInfo, WorkerState};
use serde_json::json;

fn signal(pid: u32, signal: Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits i32"));
    nix::sys::signal::kill(pid, signal).expect("signal");
}

fn worker(pool: &Pool, pid: u32) -> Option<WorkerInfo> {
    pool.workers().into_iter().find(|w| w.pid == Some(pid))
}

fn state_of(pool: &Pool, pid: u32) -> Option<WorkerState> {
    worker(pool, pid).map(|w| w.state)
}

/// The value of one line of the Prometheus text, e.g. `pyherd_spawn_breaker_open`.
fn metric(pool: &Pool, series: &str) -> u64 {
    let text = pool.render_metrics();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .expect("a number")
}

fn transitions(pool: &Pool, from: &str, to: &str) -> u64 {
    metric(
        pool,
        &format!("pyherd_worker_transitions_total{{from=\"{from}\",to=\"{to}\"}}"),
    )
}

fn restarts(pool: &Pool, reason: &str) -> u64 {
    metric(
        pool,
        &format!("pyherd_worker_restarts_total{{reason=\"{reason}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_misses_a_ping_is_degraded_takes_no_work_and_comes_back() {
    // A generous ping timeout: the worker that is not stopped must never miss one.
    let pool = testing_pool(2)
        .health_interval(Duration::from_secs(2))
        .health_timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let stopped = worker_pids(&pool)[0];
    signal(stopped, Signal::SIGSTOP);
    wait_until(
        Duration::from_secs(15),
        "the stopped worker to be degraded",
        || state_of(&pool, stopped) == Some(WorkerState::Degraded),
    )
    .await;
    assert_eq!(pool.stats().degraded, 1);
    assert!(pool.is_ready());
    for i in 0..5 {
        let reply = pool
            .execute_with("echo", json!(i), &pyherd::CallOptions::new())
            .await
            .unwrap();
        assert_ne!(worker(&pool, stopped).unwrap().id, reply.worker_id());
    }
    signal(stopped, Signal::SIGCONT);
    wait_until(
        Duration::from_secs(5),
        "the worker to answer its ping",
        || state_of(&pool, stopped) == Some(WorkerState::Ready),
    )
    .await;
    assert_eq!(transitions(&pool, "ready", "degraded"), 1);
    assert_eq!(transitions(&pool, "degraded", "ready"), 1);
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
    assert!(!exists(stopped));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_worker_that_dies_is_replaced_as_crashed() {
    let pool = testing_pool(1)
        .health_interval(Duration::from_secs(2))
        .health_timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let stopped = worker_pids(&pool)[0];
    signal(stopped, Signal::SIGSTOP);
    wait_until(Duration::from_secs(15), "the worker to be degraded", || {
        state_of(&pool, stopped) == Some(WorkerState::Degraded)
    })
    .await;
    assert!(!pool.is_ready());
    sigkill(stopped);
    wait_until(Duration::from_secs(10), "the replacement worker", || {
        let s = pool.stats();
        s.restarts == 1 && s.available == 1
    })
    .await;
    assert_eq!(restarts(&pool, "crashed"), 1);
    assert_eq!(restarts(&pool, "health_check"), 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_degraded_worker() {
    let pool = testing_pool(2)
        .health_interval(Duration::from_secs(3))
        .health_timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let stopped = worker_pids(&pool)[0];
    signal(stopped, Signal::SIGSTOP);
    wait_until(Duration::from_secs(15), "the worker to be degraded", || {
        state_of(&pool, stopped) == Some(WorkerState::Degraded)
    })
    .await;
    // Its third miss is 6 s away: shutdown kills it instead of waiting.
    let t = Instant::now();
    pool.shutdown().await;
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(!exists(stopped));
    assert_eq!(transitions(&pool, "degraded", "draining"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_still_unanswered_when_the_shutdown_grace_ends_is_cut_short() {
    let pool = testing_pool(1)
        .health_interval(Duration::from_millis(100))
        .health_timeout(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let stopped = worker_pids(&pool)[0];
    signal(stopped, Signal::SIGSTOP);
    // Once pinged, the slot waits up to 60 s for the answer.
    wait_until(Duration::from_secs(10), "the ping", || {
        metric(&pool, "pyherd_health_pings_total") == 1
    })
    .await;
    let t = Instant::now();
    pool.shutdown_with(Duration::from_millis(300)).await;
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(!exists(stopped));
    assert_eq!(transitions(&pool, "ready", "stopped"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_misses_three_pings_is_killed_and_replaced() {
    let pool = testing_pool(1)
        .health_interval(Duration::from_millis(300))
        .health_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let stopped = worker_pids(&pool)[0];
    signal(stopped, Signal::SIGSTOP);
    wait_until(Duration::from_secs(15), "the replacement worker", || {
        let s = pool.stats();
        s.restarts == 1 && s.available == 1
    })
    .await;
    wait_until(
        Duration::from_secs(5),
        "the stopped worker to be gone",
        || !exists(stopped),
    )
    .await;
    assert_ne!(worker_pids(&pool), [stopped]);
    assert_eq!(restarts(&pool, "health_check"), 1);
    assert_eq!(transitions(&pool, "degraded", "stopped"), 1);
    assert_eq!(transitions(&pool, "stopped", "starting"), 1);
    assert!(metric(&pool, "pyherd_health_misses_total") >= 3);
    assert_eq!(pool.execute("echo", json!("alive")).await.unwrap(), "alive");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_recycles_workers_without_failing_a_call_under_load() {
    let pool = testing_pool(2).max_requests(20).build().await.unwrap();
    let mut callers = Vec::new();
    for c in 0..8 {
        let pool = pool.clone();
        callers.push(tokio::spawn(async move {
            for i in 0..50 {
                let n = c * 100 + i;
                assert_eq!(pool.execute("echo", json!(n)).await.unwrap(), json!(n));
                for w in pool.workers() {
                    assert!(w.requests <= 22, "{w:?} served past its limit");
                }
            }
        }));
    }
    for caller in callers {
        caller.await.unwrap();
    }
    // The last recycled workers may still be draining or their replacements starting.
    wait_until(Duration::from_secs(10), "both workers ready", || {
        pool.stats().available == 2
    })
    .await;
    let stats = pool.stats();
    assert_eq!((stats.requests, stats.errors), (400, 0));
    // 400 calls at 20–22 calls per worker: at least 400 / 22 − 2 workers were retired.
    assert!(stats.restarts >= 16, "{stats:?}");
    assert_eq!(restarts(&pool, "max_requests"), stats.restarts);
    assert_eq!(
        transitions(&pool, "busy", "draining"),
        transitions(&pool, "draining", "stopped")
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaking_worker_is_recycled_by_its_python_rss_after_its_call() {
    let pool = testing_pool(1).max_rss_mb(100).build().await.unwrap();
    let leaking = worker_pids(&pool)[0];
    let first = pool.execute("leak", json!({"mb": 50})).await.unwrap();
    assert_eq!(first["held_mb"], 50);
    assert!(worker(&pool, leaking).unwrap().rss_mb.unwrap() >= 50);
    // Over 100 MiB now: the call is answered, then the worker is drained and replaced.
    let second = pool.execute("leak", json!({"mb": 50})).await.unwrap();
    assert_eq!(second["held_mb"], 100);
    wait_until(Duration::from_secs(10), "the replacement worker", || {
        let s = pool.stats();
        s.restarts == 1 && s.available == 1
    })
    .await;
    assert!(!exists(leaking));
    assert_eq!(restarts(&pool, "max_rss"), 1);
    let fresh = &pool.workers()[0];
    assert!(fresh.rss_mb.unwrap() < 100, "{fresh:?}");
    assert_eq!(pool.stats().errors, 0);
    assert_eq!(
        pool.execute("leak", json!({"mb": 1})).await.unwrap()["held_mb"],
        1
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_recycled_at_their_max_age() {
    let pool = testing_pool(1)
        .max_age(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let old = worker_pids(&pool)[0];
    wait_until(Duration::from_secs(10), "the worker's replacement", || {
        pool.stats().restarts >= 1
    })
    .await;
    assert!(restarts(&pool, "max_age") >= 1);
    assert_eq!(restarts(&pool, "crashed"), 0);
    assert!(transitions(&pool, "ready", "draining") >= 1);
    wait_until(Duration::from_secs(5), "the old worker to be gone", || {
        !exists(old)
    })
    .await;
    assert_eq!(pool.execute("echo", json!(1)).await.unwrap(), 1);
    pool.shutdown().await;
}

/// A duration as long as `Duration::MAX` means "never": with every timer of the pool set
/// to it, and a call's own timeout too, the workers serve on (they used to panic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_too_long_to_be_reached_mean_never() {
    let pool = testing_pool(1)
        .min_workers(1)
        .request_timeout(Duration::MAX)
        .health_interval(Duration::MAX)
        .idle_timeout(Duration::MAX)
        .max_age(Duration::MAX)
        .session_sweep_interval(Duration::MAX)
        .build()
        .await
        .unwrap();
    let long = CallOptions::new().timeout(Duration::MAX);
    for i in 0..3 {
        assert_eq!(pool.execute("echo", json!(i)).await.unwrap(), i);
        let reply = pool.execute_with("echo", json!(i), &long).await.unwrap();
        assert_eq!(reply.value().unwrap(), i);
        let mut stream = pool
            .stream_with("count", json!({"to": 2}), &long)
            .await
            .unwrap();
        let mut chunks = 0;
        while let Some(chunk) = stream.next().await {
            chunk.unwrap();
            chunks += 1;
        }
        assert_eq!(chunks, 2);
    }
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_workers_stop_down_to_min_and_queue_pressure_starts_them_up_to_max() {
    let pool = testing_pool(2)
        .min_workers(1)
        .max_workers(3)
        .idle_timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    assert_eq!(pool.stats().workers, 2);
    let stopped = |pool: &Pool| {
        pool.workers()
            .iter()
            .filter(|w| w.state == WorkerState::Stopped)
            .count()
    };
    wait_until(Duration::from_secs(10), "the pool to shrink to 1", || {
        pool.stats().workers == 1 && stopped(&pool) == 1
    })
    .await;
    assert!(transitions(&pool, "ready", "draining") >= 1);
    let calls: Vec<_> = (0..6)
        .map(|_| spawn_call(&pool, "sleep", json!({"seconds": 0.6})))
        .collect();
    let mut most = 0;
    let t = Instant::now();
    while most < 3 && t.elapsed() < Duration::from_secs(10) {
        most = most.max(pool.stats().available + pool.stats().busy);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(most, 3, "the pool grew to max_workers");
    assert!(pool.stats().workers <= 3);
    for call in calls {
        call.await.unwrap().unwrap();
    }
    wait_until(
        Duration::from_secs(10),
        "the pool to shrink to 1 again",
        || pool.stats().workers == 1 && pool.stats().available == 1,
    )
    .await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_crashes_is_replaced_through_stopped_and_starting() {
    let pool = testing_pool(1).build().await.unwrap();
    let pid = worker_pids(&pool)[0];
    sigkill(pid);
    wait_until(Duration::from_secs(10), "the replacement", || {
        let s = pool.stats();
        s.restarts == 1 && s.available == 1
    })
    .await;
    assert_eq!(restarts(&pool, "crashed"), 1);
    assert_eq!(transitions(&pool, "ready", "stopped"), 1);
    assert_eq!(transitions(&pool, "starting", "ready"), 2);
    pool.shutdown().await;
    assert!(
        pool.workers()
            .iter()
            .all(|w| w.state == WorkerState::Stopped)
    );
    assert_eq!(transitions(&pool, "ready", "draining"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spawn_breaker_fails_calls_at_once_with_the_stderr_tail_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("broken");
    let pool = testing_pool(1)
        .handlers(common::fixture("breakable.py"))
        .env("PYHERD_TEST_BREAK_FILE", marker.to_string_lossy())
        .queue_timeout(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    std::fs::write(&marker, "").unwrap();
    let crashed = pool.execute("crash", json!({})).await.unwrap_err();
    assert_eq!(crashed.kind(), &ErrorKind::WorkerCrashed);
    // Admitted before the breaker opens: it waits, then fails when it opens.
    let waiting = Instant::now();
    let early = pool.execute("alive", json!({})).await.unwrap_err();
    assert_eq!(early.kind(), &ErrorKind::SpawnFailing, "{early}");
    assert!(
        waiting.elapsed() < Duration::from_secs(30),
        "{:?}",
        waiting.elapsed()
    );
    assert!(pool.stats().spawn_failing);
    assert!(!pool.is_ready());
    assert_eq!(metric(&pool, "pyherd_spawn_breaker_open"), 1);
    let t = Instant::now();
    let e = pool.execute("alive", json!({})).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(e.kind(), &ErrorKind::SpawnFailing);
    assert_eq!(e.category(), pyherd::Category::Initialization);
    assert!(e.message().contains("handler_import_failed"), "{e}");
    let tail = e.context().stderr_tail.clone().unwrap_or_default();
    assert!(tail.contains("broken on purpose"), "{tail}");
    assert_eq!(
        pool.spawn_failure().map(|f| f.kind().clone()),
        Some(ErrorKind::SpawnFailing)
    );
    std::fs::remove_file(&marker).unwrap();
    wait_until(Duration::from_secs(20), "a worker to start again", || {
        pool.is_ready()
    })
    .await;
    assert!(!pool.stats().spawn_failing);
    assert!(pool.spawn_failure().is_none());
    assert!(pool.execute("alive", json!({})).await.is_ok());
    assert_eq!(metric(&pool, "pyherd_spawn_breaker_open"), 0);
    assert!(transitions(&pool, "starting", "stopped") >= 5);
    pool.shutdown().await;
}
