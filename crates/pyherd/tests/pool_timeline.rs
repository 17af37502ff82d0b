//! The pool's timeline and recent errors, from real calls to real workers.

mod common;

use std::time::Duration;

use common::{testing_pool, wait_until};
use serde_json::json;

#[tokio::test]
async fn finished_calls_fill_the_timeline_and_failures_the_recent_errors() {
    let pool = testing_pool(2).build().await.unwrap();
    for i in 0..20 {
        pool.execute("echo", json!({"i": i})).await.unwrap();
    }
    for i in 0..3 {
        let message = format!("planned failure {i}");
        let error = pool
            .execute("raise_error", json!({"message": message}))
            .await
            .unwrap_err();
        assert_eq!(error.kind().as_str(), "python_exception");
    }
    pool.execute("no_such_command", json!({}))
        .await
        .unwrap_err();

    let timeline = pool.timeline();
    assert_eq!(timeline.interval_ms, 1000);
    let ok: u64 = timeline.samples.iter().map(|s| s.ok).sum();
    let err: u64 = timeline.samples.iter().map(|s| s.err).sum();
    assert_eq!((ok, err), (20, 4), "{timeline:?}");
    let busy = timeline
        .samples
        .iter()
        .filter(|s| s.ok + s.err > 0)
        .collect::<Vec<_>>();
    for s in &busy {
        let (p50, p95, p99) = (s.p50_us.unwrap(), s.p95_us.unwrap(), s.p99_us.unwrap());
        assert!(
            0 < p50 && p50 <= p95 && p95 <= p99 && p99 < 10_000_000,
            "{s:?}"
        );
    }
    let last = timeline.samples.last().unwrap();
    assert!(last.at_ms <= timeline.now_ms && timeline.now_ms < last.at_ms + 1000);

    let errors = pool.recent_errors();
    assert_eq!(errors.len(), 4, "{errors:?}");
    for (i, e) in errors[..3].iter().enumerate() {
        assert_eq!(
            (e.command.as_str(), e.category.as_str(), e.kind.as_str()),
            ("raise_error", "python", "python_exception")
        );
        assert!(e.message.contains(&format!("planned failure {i}")), "{e:?}");
        assert!(e.worker_id.as_deref().is_some_and(|w| w.starts_with('w')));
    }
    let unknown = &errors[3];
    assert_eq!(
        (
            unknown.command.as_str(),
            unknown.kind.as_str(),
            unknown.worker_id.as_deref()
        ),
        ("(unknown)", "unknown_command", None)
    );
    let encoded = serde_json::to_value(&errors[0]).unwrap();
    for key in [
        "at_ms",
        "command",
        "category",
        "kind",
        "message",
        "worker_id",
    ] {
        assert!(encoded.get(key).is_some(), "{key} in {encoded}");
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn queue_depth_and_busy_workers_are_sampled_every_second() {
    let pool = testing_pool(1).build().await.unwrap();
    let sleeper = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.execute("sleep", json!({"seconds": 3})).await })
    };
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.execute("echo", json!({})).await })
    };
    wait_until(
        Duration::from_secs(20),
        "a busy worker and a queued call sampled",
        || {
            pool.timeline()
                .samples
                .iter()
                .any(|s| s.busy_workers == Some(1) && s.queue_depth == Some(1))
        },
    )
    .await;
    sleeper.await.unwrap().unwrap();
    waiter.await.unwrap().unwrap();
    wait_until(Duration::from_secs(20), "an idle second sampled", || {
        pool.timeline()
            .samples
            .last()
            .is_some_and(|s| s.busy_workers == Some(0) && s.queue_depth == Some(0))
    })
    .await;
    let slow = pool
        .timeline()
        .samples
        .iter()
        .filter_map(|s| s.p99_us)
        .max()
        .unwrap();
    assert!(slow >= 2_900_000, "the 3 s call's latency: {slow} µs");
    pool.shutdown().await;
}
