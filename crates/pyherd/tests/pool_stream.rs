//! Streaming calls through a real pool: sync and async generators, errors mid-stream,
//! plain handlers as one chunk, sessions, request ids, and backpressure (a slow reader
//! holds the worker back).

mod common;

use std::time::{Duration, Instant};

use common::{testing_pool, wait_until};
use futures::StreamExt;
use pyherd::{CallOptions, CallStream, ErrorKind, STREAM_BUFFER, WorkerState};
use serde_json::{Value, json};

/// Every item of a stream: the chunks, and the error that ended it, if any.
async fn collect(mut stream: CallStream) -> (Vec<Value>, Option<pyherd::Error>, CallStream) {
    let mut chunks = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => chunks.push(chunk),
            Err(e) => {
                assert!(stream.next().await.is_none(), "an error ends the stream");
                return (chunks, Some(e), stream);
            }
        }
    }
    (chunks, None, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_and_async_generators_stream_their_chunks_in_order() {
    let pool = testing_pool(1).build().await.unwrap();
    for command in ["count", "acount"] {
        let stream = pool.stream(command, json!({"to": 5})).await.unwrap();
        let (chunks, error, stream) = collect(stream).await;
        assert!(error.is_none(), "{error:?}");
        let expected: Vec<Value> = (0..5).map(|i| json!({"i": i})).collect();
        assert_eq!(chunks, expected, "{command}");
        let end = stream.end().expect("an end");
        assert_eq!((end.chunks, end.worker_id.as_str()), (5, "w1"));
    }
    // The worker is ready for the next call.
    assert_eq!(pool.execute("echo", json!(1)).await.unwrap(), json!(1));
    assert_eq!(pool.stats().available, 1);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exception_mid_stream_comes_after_the_chunks_sent() {
    let pool = testing_pool(1).build().await.unwrap();
    let pids = common::worker_pids(&pool);
    let stream = pool
        .stream("count_then_fail", json!({"n": 3}))
        .await
        .unwrap();
    let (chunks, error, stream) = collect(stream).await;
    assert_eq!(chunks, vec![json!(0), json!(1), json!(2)]);
    let error = error.expect("an error");
    assert_eq!(error.kind(), &ErrorKind::PythonException);
    assert_eq!(error.context().python_type.as_deref(), Some("ValueError"));
    assert_eq!(error.context().worker_id.as_deref(), Some("w1"));
    assert_eq!(error.context().command.as_deref(), Some("count_then_fail"));
    assert!(stream.end().is_none());
    // The worker lives on.
    assert_eq!(pool.execute("echo", json!(2)).await.unwrap(), json!(2));
    assert_eq!(common::worker_pids(&pool), pids);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unserialisable_chunk_ends_the_stream_with_a_typed_error() {
    let pool = testing_pool(1).build().await.unwrap();
    let stream = pool.stream("count_then_object", json!({})).await.unwrap();
    let (chunks, error, _) = collect(stream).await;
    assert_eq!(chunks, vec![json!(1)]);
    assert_eq!(error.unwrap().kind(), &ErrorKind::ResultNotSerializable);
    let stream = pool
        .stream("count", json!({"to": 2, "pad": 4096}))
        .await
        .unwrap();
    let (chunks, error, _) = collect(stream).await;
    assert_eq!(chunks.len(), 2, "{error:?}");
    pool.shutdown().await;

    let small = testing_pool(1).max_frame_bytes(2048).build().await.unwrap();
    let stream = small
        .stream("count", json!({"to": 2, "pad": 4096}))
        .await
        .unwrap();
    let (chunks, error, _) = collect(stream).await;
    assert!(chunks.is_empty());
    let error = error.unwrap();
    assert_eq!(error.kind(), &ErrorKind::ResultTooLarge);
    assert_eq!(error.context().limit_bytes, Some(2048));
    assert_eq!(small.execute("echo", json!(3)).await.unwrap(), json!(3));
    small.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_handler_streams_one_chunk_and_a_generator_executes_to_a_list() {
    let pool = testing_pool(1).build().await.unwrap();
    let stream = pool.stream("echo", json!({"a": 1})).await.unwrap();
    let (chunks, error, stream) = collect(stream).await;
    assert!(error.is_none());
    assert_eq!(chunks, vec![json!({"a": 1})]);
    assert_eq!(stream.end().unwrap().chunks, 1);
    let list = pool.execute("count", json!({"to": 3})).await.unwrap();
    assert_eq!(list, json!([{"i": 0}, {"i": 1}, {"i": 2}]));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_found_before_the_stream_starts_come_at_once() {
    let pool = testing_pool(1).max_queue(1).build().await.unwrap();
    let e = pool.stream("nope", json!({})).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::UnknownCommand);
    let bad_id = CallOptions::new().request_id("has space");
    let e = pool
        .stream_with("count", json!({}), &bad_id)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::InvalidRequestId);
    assert_eq!(e.context().command.as_deref(), Some("count"));
    let bad_session = CallOptions::new().session_id("a/b");
    let e = pool
        .stream_with("count", json!({}), &bad_session)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::InvalidId);
    // One stream runs, one waits: the queue (max 1) is full.
    let mut running = pool
        .stream("count", json!({"to": 100, "delay": 0.05}))
        .await
        .unwrap();
    assert!(running.next().await.unwrap().is_ok());
    let _waiting = pool.stream("count", json!({})).await.unwrap();
    let e = pool.stream("count", json!({})).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::PoolSaturated);
    pool.shutdown_with(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_reach_the_handler_and_the_reply() {
    let pool = testing_pool(1).build().await.unwrap();
    let options = CallOptions::new().request_id("job-42:a.b_c");
    let reply = pool
        .execute_with("ctx_info", json!({}), &options)
        .await
        .unwrap();
    assert_eq!(reply.request_id(), "job-42:a.b_c");
    assert_eq!(reply.value().unwrap()["request_id"], "job-42:a.b_c");
    let one = pool
        .execute_with("echo", json!(1), &CallOptions::new())
        .await
        .unwrap();
    let two = pool
        .execute_with("echo", json!(1), &CallOptions::new())
        .await
        .unwrap();
    assert_ne!(one.request_id(), two.request_id());
    let e = pool
        .execute_with("echo", json!(1), &CallOptions::new().request_id(""))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::InvalidRequestId);
    assert_eq!(e.context().command.as_deref(), Some("echo"));
    let stream = pool
        .stream_with(
            "stubborn_stream",
            json!({}),
            &CallOptions::new().request_id("s-1"),
        )
        .await
        .unwrap();
    assert_eq!(stream.request_id(), "s-1");
    let mut stream = stream;
    assert_eq!(stream.next().await.unwrap().unwrap()["request_id"], "s-1");
    // An id in flight cannot be taken twice.
    let e = pool
        .execute_with("echo", json!(1), &CallOptions::new().request_id("s-1"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::InvalidRequestId);
    assert!(e.message().contains("in flight"), "{e}");
    drop(stream);
    pool.shutdown_with(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_in_a_session_is_served_by_the_sessions_worker() {
    let pool = testing_pool(2).build().await.unwrap();
    let first = pool
        .execute_in_session("s1", "ctx_info", json!({}), &CallOptions::new())
        .await
        .unwrap();
    let options = CallOptions::new().session_id("s1");
    let mut stream = pool
        .stream_with("stubborn_stream", json!({}), &options)
        .await
        .unwrap();
    let chunk = stream.next().await.unwrap().unwrap();
    let pid = first.value().unwrap()["pid"].clone();
    assert_eq!(chunk["pid"], pid);
    drop(stream);
    pool.shutdown_with(Duration::ZERO).await;
}

/// A session's stream that ends well makes its worker the session's last, as a plain
/// call does, so the session's next call prefers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_ends_well_makes_its_worker_the_sessions_last() {
    let pool = testing_pool(2).build().await.unwrap();
    let options = CallOptions::new().session_id("s2");
    let stream = pool
        .stream_with("count", json!({"to": 2}), &options)
        .await
        .unwrap();
    let (chunks, error, stream) = collect(stream).await;
    assert_eq!((chunks.len(), error.map(|e| e.to_string())), (2, None));
    let worker = stream.end().expect("an end").worker_id.clone();
    let session = pool.sessions().get("s2").await.unwrap();
    assert_eq!(session.last_worker.as_deref(), Some(worker.as_str()));
    let next = pool
        .execute_in_session("s2", "echo", json!(1), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(next.worker_id(), worker);
    pool.shutdown().await;
}

/// A cancel that comes after the worker finished a stream, while its chunks still wait
/// for the reader, still cancels it: the reader gets `cancelled`, not the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_after_the_worker_finished_but_before_the_reader_did_cancels_the_stream() {
    let pool = testing_pool(1).build().await.unwrap();
    let options = CallOptions::new().request_id("late");
    let stream = pool
        .stream_with("count", json!({"to": 3}), &options)
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the worker to finish the stream",
        || {
            let worker = &pool.workers()[0];
            worker.requests == 1 && worker.state == WorkerState::Ready
        },
    )
    .await;
    assert!(pool.cancel("late"));
    let (chunks, error, _) = collect(stream).await;
    assert_eq!(chunks, Vec::<Value>::new());
    let error = error.expect("the stream ends with an error");
    assert_eq!(error.kind(), &ErrorKind::Cancelled, "{error}");
    assert_eq!(error.context().request_id.as_deref(), Some("late"));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_execution_timeout_covers_the_whole_stream() {
    let pool = testing_pool(1).build().await.unwrap();
    let options = CallOptions::new().timeout(Duration::from_millis(500));
    let stream = pool
        .stream_with("count", json!({"to": 1000, "delay": 0.01}), &options)
        .await
        .unwrap();
    let t = Instant::now();
    let (chunks, error, _) = collect(stream).await;
    assert!(!chunks.is_empty());
    assert_eq!(error.unwrap().kind(), &ErrorKind::ExecutionTimeout);
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(pool.execute("echo", json!(1)).await.unwrap(), json!(1));
    pool.shutdown().await;
}

/// A fast producer and a slow reader: the worker gets at most the host's buffer, the
/// pipe and the frame reader's buffer ahead of what was read, never the whole stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_the_worker_back() {
    let pool = testing_pool(1).build().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let progress = dir.path().join("progress");
    let produced = || {
        std::fs::read_to_string(&progress)
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(0)
    };
    // 4 KiB chunks: a 64 KiB pipe holds about 16.
    let total = 2000;
    let mut stream = pool
        .stream(
            "count",
            json!({"to": total, "pad": 4096, "progress": progress}),
        )
        .await
        .unwrap();
    assert!(stream.next().await.unwrap().is_ok());
    // The worker runs ahead as far as it may...
    wait_until(Duration::from_secs(20), "the worker to run ahead", || {
        produced() > STREAM_BUFFER
    })
    .await;
    // ...and no further, however long the reader waits.
    let bound = 1 + STREAM_BUFFER + 16 + 16 + 4;
    let watched = Instant::now();
    let mut most = 0;
    while watched.elapsed() < Duration::from_secs(1) {
        most = most.max(produced());
        assert!(
            most <= bound,
            "the worker produced {most} chunks ahead of 1 read"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(most < total);
    // Reading on lets it finish: every chunk arrives, in order.
    let mut next = 1;
    while let Some(chunk) = stream.next().await {
        assert_eq!(chunk.unwrap()["i"], next);
        next += 1;
    }
    assert_eq!(next, total);
    assert_eq!(produced(), total);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_counted_like_calls_in_stats_metrics_and_the_timeline() {
    let pool = testing_pool(1).build().await.unwrap();
    let (_, error, _) = collect(pool.stream("count", json!({"to": 3})).await.unwrap()).await;
    assert!(error.is_none(), "{error:?}");
    let failing = pool.stream("count_then_fail", json!({"n": 1})).await;
    let (_, error, _) = collect(failing.unwrap()).await;
    assert_eq!(error.unwrap().kind(), &ErrorKind::PythonException);
    let e = pool.stream("nope", json!({})).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::UnknownCommand);
    // A reader that goes away after the first chunk cancels the stream.
    let mut dropped = pool
        .stream("count", json!({"to": 1000, "delay": 0.01}))
        .await
        .unwrap();
    assert!(dropped.next().await.unwrap().is_ok());
    drop(dropped);

    let stats = pool.stats();
    assert_eq!((stats.requests, stats.errors), (4, 3));
    let timeline = pool.timeline();
    let (ok, err) = timeline
        .samples
        .iter()
        .fold((0, 0), |(ok, err), s| (ok + s.ok, err + s.err));
    assert_eq!((ok, err), (1, 3));
    let errors: Vec<(String, String)> = pool
        .recent_errors()
        .into_iter()
        .map(|e| (e.command, e.kind))
        .collect();
    let expected = [
        ("count_then_fail", "python_exception"),
        ("(unknown)", "unknown_command"),
        ("count", "cancelled"),
    ]
    .map(|(c, k)| (c.to_owned(), k.to_owned()));
    assert_eq!(errors, expected);
    // The worker's side of the cancelled stream is measured once it has stopped.
    let executed =
        "pyherd_request_execution_seconds_count{command=\"count\",outcome=\"cancelled\"} 1";
    wait_until(
        Duration::from_secs(5),
        "the cancelled stream's execution",
        || pool.render_metrics().contains(executed),
    )
    .await;
    let metrics = pool.render_metrics();
    for line in [
        "pyherd_requests_total{command=\"count\",outcome=\"ok\"} 1",
        "pyherd_requests_total{command=\"count\",outcome=\"cancelled\"} 1",
        "pyherd_requests_total{command=\"count_then_fail\",outcome=\"python_exception\"} 1",
        "pyherd_requests_total{command=\"(unknown)\",outcome=\"unknown_command\"} 1",
        "pyherd_request_execution_seconds_count{command=\"count\",outcome=\"ok\"} 1",
        "pyherd_request_execution_seconds_count{command=\"count_then_fail\",outcome=\"python_exception\"} 1",
        "pyherd_request_duration_seconds_count{command=\"count\",outcome=\"ok\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    pool.shutdown().await;
}
