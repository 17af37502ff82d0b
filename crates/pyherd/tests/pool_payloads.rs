//! What crosses the pipes arrives intact: large unicode payloads, call context, both
//! JSON codecs, async handlers, handler files given by path.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::testing_pool;
use pyherd::{CallOptions, ErrorKind, Pool};
use serde_json::json;
use serde_json::value::RawValue;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mebibyte_unicode_payload_round_trips_unchanged() {
    let pool = testing_pool(2).build().await.unwrap();
    // Two-, three- and four-byte UTF-8, escapes and control characters, > 1 MiB encoded.
    let unit = "héllo wörld — 漢字かな 🦀🐍 \"quoted\" back\\slash\ttab\nnewline\u{1}";
    let text = unit.repeat((1 << 20) / unit.len() + 1);
    assert!(text.len() > 1 << 20);
    let args = json!({"text": text, "nested": [{"k": "ü"}, null, 1.5, -7, true]});
    let reply = pool.execute("echo", args.clone()).await.unwrap();
    assert_eq!(reply, args);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_sees_its_worker_session_request_and_deadline() {
    let pool = testing_pool(1).build().await.unwrap();
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let opts = CallOptions::new()
        .session_id("session-42")
        .timeout(Duration::from_secs(10));
    let reply = pool
        .execute_with("ctx_info", json!({}), &opts)
        .await
        .unwrap();
    let ctx = reply.value().unwrap();
    assert_eq!(ctx["worker_id"], "w1");
    assert_eq!(reply.worker_id(), "w1");
    assert_eq!(ctx["session_id"], "session-42");
    assert_eq!(ctx["request_id"].as_str(), Some(reply.request_id()));
    assert!(
        reply.request_id().starts_with('r'),
        "{}",
        reply.request_id()
    );
    let deadline = ctx["deadline"].as_f64().unwrap();
    assert!(
        deadline > before + 9.0 && deadline < before + 11.0,
        "{deadline} vs {before}"
    );
    let remaining = ctx["remaining"].as_f64().unwrap();
    assert!(remaining > 8.0 && remaining <= 10.0, "{remaining}");
    let plain = pool.execute("ctx_info", json!({})).await.unwrap();
    assert!(plain["session_id"].is_null());
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stdlib_json_codec_works_when_orjson_is_absent_or_disabled() {
    let pool = testing_pool(1)
        .env("PYHERD_JSON", "stdlib")
        .build()
        .await
        .unwrap();
    let info = pool.execute("info", json!({})).await.unwrap();
    assert_eq!(info["json"], "json");
    let args = json!({"text": "ünïcödé 🐍", "n": [1, 2.5, null]});
    assert_eq!(pool.execute("echo", args.clone()).await.unwrap(), args);
    // The standard library reads an integer beyond 64 bits exactly, so it is not refused
    // as it is for orjson.
    let big = RawValue::from_string("[123456789012345678901234567890]".into()).unwrap();
    let reply = pool
        .execute_raw("echo", big, &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(reply.raw().get(), "[123456789012345678901234567890]");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn args_orjson_cannot_read_as_meant_are_refused_before_any_worker() {
    let pool = testing_pool(1).build().await.unwrap();
    let info = pool.execute("info", json!({})).await.unwrap();
    assert_eq!(info["json"], "orjson");
    for (args, words) in [
        ("[123456789012345678901234567890]", "beyond 64 bits"),
        (r#"{"x": 1e400}"#, "range of a double"),
        (r#""\ud800""#, "lone surrogate"),
    ] {
        let raw = RawValue::from_string(args.into()).unwrap();
        let e = pool
            .execute_raw("echo", raw.clone(), &CallOptions::new())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::MalformedRequest, "{args}");
        assert!(e.message().contains(words), "{e}");
        let Err(e) = pool.stream_raw("echo", raw, &CallOptions::new()).await else {
            panic!("{args} was streamed");
        };
        assert_eq!(e.kind(), &ErrorKind::MalformedRequest, "{args}");
    }
    // A surrogate pair, written as escapes, is one character and passes.
    let pair = RawValue::from_string(r#""\ud83d\udc0d""#.into()).unwrap();
    let reply = pool
        .execute_raw("echo", pair, &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(reply.decode::<String>().unwrap(), "🐍");
    assert_eq!(pool.workers()[0].requests, 2);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_handlers_and_handler_files_by_path_work() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/handlers.py");
    let pool: Pool = testing_pool(1).handlers(examples).build().await.unwrap();
    assert_eq!(
        pool.execute("async_echo", json!([1, 2])).await.unwrap(),
        json!([1, 2])
    );
    let greeting = pool
        .execute("greet", json!({"name": "herd"}))
        .await
        .unwrap();
    assert_eq!(greeting["greeting"], "hello, herd");
    let counts = pool
        .execute("word_count", json!({"text": "a b a"}))
        .await
        .unwrap();
    assert_eq!(counts, json!({"words": 3, "unique": 2}));
    let info = pool.execute("info", json!({})).await.unwrap();
    let rss = info["rss_bytes"].as_u64().unwrap();
    assert!(rss > 1 << 20);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pythonpath_given_to_the_workers_is_added_to_the_package_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("extra_handlers.py"),
        "from pyherd_worker import handler\n\n@handler\ndef extra(args):\n    return 'found'\n",
    )
    .unwrap();
    let pool = Pool::builder()
        .workers(1)
        .env("PYTHONPATH", dir.path().to_string_lossy())
        .handlers("extra_handlers")
        .build()
        .await
        .unwrap();
    assert_eq!(
        pool.execute("extra", json!({})).await.unwrap(),
        json!("found")
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_spin_reaches_spawned_and_forked_workers() {
    let pool = testing_pool(1).build().await.unwrap();
    let info = pool.execute("info", json!({})).await.unwrap();
    assert_eq!(info["idle_spin_us"], 100, "the default: {info}");
    pool.shutdown().await;
    for (spin, preload) in [(0, None), (2500, None), (2500, Some("json"))] {
        let mut builder = testing_pool(1).idle_spin_us(spin);
        if let Some(module) = preload {
            builder = builder.preload(module);
        }
        let pool = builder.build().await.unwrap();
        assert_eq!(pool.zygote_pid().is_some(), preload.is_some());
        let info = pool.execute("info", json!({})).await.unwrap();
        assert_eq!(info["idle_spin_us"], spin, "{info}");
        // Calls keep coming and going whatever the spin.
        for n in 0..20 {
            assert_eq!(pool.execute("echo", json!(n)).await.unwrap(), json!(n));
        }
        pool.shutdown().await;
    }
    let Err(refused) = testing_pool(1).idle_spin_us(10_001).build().await else {
        panic!("a spin over the limit was taken");
    };
    assert_eq!(refused.kind(), &ErrorKind::InvalidConfig);
    assert!(refused.message().contains("idle_spin_us"), "{refused}");
}
