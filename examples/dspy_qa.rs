//! Many users' DSPy programs on one pool: 20 sessions, each with its own LM (a DummyLM
//! that answers in that user's name) and its own ChainOfThought program, ask 500
//! questions at once on 4 workers. Every answer must come from its own session's LM.
//!
//! Needs `dspy` in the interpreter: `pip install dspy==3.4.1`, or `pyherd setup` and
//! `PYHERD_PYTHON=.pyherd/venv/bin/python`. Run from the repository root:
//! `cargo run -p pyherd --example dspy_qa`.

use std::collections::BTreeMap;
use std::time::Instant;

use pyherd::{CallOptions, Pool};
use serde_json::json;

const SESSIONS: usize = 20;
const QUESTIONS: usize = 500;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let python = std::env::var("PYHERD_PYTHON").unwrap_or_else(|_| "python3".into());
    let pool = Pool::builder()
        .workers(4)
        .python(python)
        .handlers("pyherd_worker.dspy_adapter")
        .build()
        .await?;
    let options = CallOptions::new();

    for user in 0..SESSIONS {
        let session = format!("user-{user}");
        let answer = format!("the answer of user-{user}'s model");
        let lm = json!({
            "provider": "dummy",
            "answers": {"": {"reasoning": "thinking it through", "answer": answer}},
        });
        pool.execute_in_session(&session, "configure_lm", lm, &options)
            .await?;
        let program = json!({
            "id": "qa",
            "signature": "question -> answer",
            "program_type": "chain_of_thought",
        });
        pool.execute_in_session(&session, "create_program", program, &options)
            .await?;
    }

    let started = Instant::now();
    let calls = (0..QUESTIONS).map(|i| {
        let session = format!("user-{}", i % SESSIONS);
        let pool = &pool;
        let options = &options;
        async move {
            let inputs =
                json!({"program_id": "qa", "inputs": {"question": format!("question {i}?")}});
            let reply = pool
                .execute_in_session(&session, "execute_program", inputs, options)
                .await?;
            let answer = reply.value()?["outputs"]["answer"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            Ok::<_, pyherd::Error>((session, answer))
        }
    });
    let answers = futures::future::try_join_all(calls).await?;
    let elapsed = started.elapsed();

    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let mut foreign = 0;
    for (session, answer) in &answers {
        *tally.entry(answer.clone()).or_default() += 1;
        if *answer != format!("the answer of {session}'s model") {
            foreign += 1;
        }
    }
    for (answer, count) in &tally {
        println!("{count:>4} × {answer}");
    }
    println!(
        "{} questions in {:.2} s ({:.0}/s); answers from another session's LM: {foreign}",
        answers.len(),
        elapsed.as_secs_f64(),
        answers.len() as f64 / elapsed.as_secs_f64()
    );
    let stats = pool.stats();
    println!(
        "stats: {} requests, {} errors, sessions live {}, affinity hits {} misses {}",
        stats.requests,
        stats.errors,
        stats.sessions.live,
        stats.affinity_hits,
        stats.affinity_misses
    );
    for w in pool.workers() {
        println!("worker {} served {}", w.id, w.requests);
    }
    pool.shutdown().await;
    if foreign > 0 {
        return Err(format!("{foreign} answers came from another session's LM").into());
    }
    Ok(())
}
