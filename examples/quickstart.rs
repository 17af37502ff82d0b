//! Start a pool with the example handlers, call it a few ways, print the stats.
//!
//! Run from the repository root: `cargo run -p pyherd --example quickstart`.

use std::time::Duration;

use pyherd::{CallOptions, Pool};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Serialize)]
struct Text<'a> {
    text: &'a str,
}

#[derive(Deserialize)]
struct Counts {
    words: u64,
    unique: u64,
}

#[tokio::main]
async fn main() -> Result<(), pyherd::Error> {
    let pool = Pool::builder()
        .workers(2)
        .handlers("examples/handlers.py")
        .build()
        .await?;

    // Untyped: JSON in, JSON out.
    let greeting = pool.execute("greet", json!({"name": "pyherd"})).await?;
    println!("greet      -> {greeting}");

    // Typed: any serde types.
    let counts: Counts = pool
        .call(
            "word_count",
            &Text {
                text: "the herd and the shepherd",
            },
        )
        .await?;
    println!(
        "word_count -> {} words, {} unique",
        counts.words, counts.unique
    );

    // With options, and the reply's details.
    let reply = pool
        .execute_with(
            "echo",
            json!([1, 2, 3]),
            &CallOptions::new().timeout(Duration::from_secs(2)),
        )
        .await?;
    println!(
        "echo       -> {} from {} in {:?}",
        reply.raw(),
        reply.worker_id(),
        reply.duration()
    );

    // Errors are typed: category, kind, message, context.
    match pool.execute("no_such_command", json!({})).await {
        Err(err) => println!(
            "error      -> {}/{}: {}",
            err.category(),
            err.kind(),
            err.message()
        ),
        Ok(value) => println!("unexpected -> {value}"),
    }

    // Many calls at once are queued fairly over the workers.
    let calls = (0..100).map(|i| pool.execute("echo", json!({ "i": i })));
    let answers = futures::future::try_join_all(calls).await?;
    println!("100 concurrent calls answered: {}", answers.len());

    println!("stats      -> {:?}", pool.stats());
    for w in pool.workers() {
        println!(
            "worker     -> {} pid {:?} {:?} served {}",
            w.id, w.pid, w.state, w.requests
        );
    }
    pool.shutdown().await;
    Ok(())
}
