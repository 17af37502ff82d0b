//! DSPy programs through a real pool with the real adapter and dspy's DummyLM: the same
//! outputs as dspy run directly, sessions isolated from each other, programs that
//! survive their worker, and every error kind of the adapter.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{sigkill, wait_until, worker_pids};
use pyherd::{CallOptions, Category, Error, ErrorKind, Pool, Reply};
use serde_json::{Map, Value, json};

const ADAPTER: &str = "pyherd_worker.dspy_adapter";
const WAIT: Duration = Duration::from_secs(10);

async fn pool_of(handlers: &str, workers: usize) -> Pool {
    Pool::builder()
        .workers(workers)
        .handlers(handlers)
        .startup_timeout(Duration::from_secs(60))
        .build()
        .await
        .unwrap()
}

async fn dspy_pool(workers: usize) -> Pool {
    pool_of(ADAPTER, workers).await
}

async fn call(pool: &Pool, session: &str, command: &str, args: Value) -> Result<Reply, Error> {
    pool.execute_in_session(session, command, args, &CallOptions::new())
        .await
}

async fn ok(pool: &Pool, session: &str, command: &str, args: Value) -> Value {
    call(pool, session, command, args)
        .await
        .unwrap_or_else(|e| panic!("{command}: {e}"))
        .value()
        .unwrap()
}

/// `get_program_info` of `program` in the session `s`.
async fn program_info(pool: &Pool, program: &str) -> Value {
    ok(
        pool,
        "s",
        "get_program_info",
        json!({"program_id": program}),
    )
    .await
}

fn dummy(answers: Value) -> Value {
    json!({"provider": "dummy", "answers": answers})
}

fn ask(program: &str, question: &str) -> Value {
    json!({"program_id": program, "inputs": {"question": question}})
}

/// Answers that depend on the question, so equal outputs mean the same prompts were built.
fn answers() -> Value {
    json!({
        "capital of France": {"reasoning": "France's capital is Paris.", "answer": "Paris"},
        "2 + 2": {"reasoning": "Two and two make four.", "answer": "4"},
        "": {"reasoning": "No idea.", "answer": "unknown"},
    })
}

const QUESTIONS: [&str; 3] = [
    "What is the capital of France?",
    "What is 2 + 2?",
    "Who wrote Hamlet?",
];

/// The same programs run by dspy itself, in a plain Python process.
fn run_directly(program_type: &str) -> Vec<Value> {
    let script = r#"
import json, sys
import dspy
from dspy.utils import DummyLM
answers, program_type, questions = json.loads(sys.argv[1])
lm = DummyLM(answers)
module = dspy.ChainOfThought("question -> answer") if program_type == "chain_of_thought" else dspy.Predict("question -> answer")
out = []
with dspy.context(lm=lm):
    for q in questions:
        out.append(module(question=q).toDict())
print(json.dumps(out))
"#;
    let input = json!([answers(), program_type, QUESTIONS]).to_string();
    let output = Command::new("python3")
        .args(["-c", script, &input])
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_through_the_pool_equal_dspy_run_directly() {
    let pool = dspy_pool(2).await;
    ok(&pool, "s", "configure_lm", dummy(answers())).await;
    for program_type in ["predict", "chain_of_thought"] {
        let created = ok(
            &pool,
            "s",
            "create_program",
            json!({"id": program_type, "signature": "question -> answer", "program_type": program_type}),
        )
        .await;
        assert_eq!(
            created,
            json!({"program_id": program_type, "signature": "question -> answer", "program_type": program_type})
        );
        let direct = run_directly(program_type);
        for (question, expected) in QUESTIONS.iter().zip(&direct) {
            let result = ok(&pool, "s", "execute_program", ask(program_type, question)).await;
            assert_eq!(result["program_id"], program_type);
            assert_eq!(&result["outputs"], expected, "{program_type}: {question}");
            assert!(result["duration_ms"].as_f64().unwrap() >= 0.0);
        }
    }
    assert_eq!(direct_answer(&run_directly("predict")[0]), "Paris");
    pool.shutdown().await;
}

fn direct_answer(outputs: &Value) -> &str {
    outputs["answer"].as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_program_keeps_working_after_its_worker_is_killed() {
    let pool = dspy_pool(2).await;
    ok(&pool, "s", "configure_lm", dummy(answers())).await;
    let spec =
        json!({"id": "qa", "signature": "question -> answer", "program_type": "chain_of_thought"});
    ok(&pool, "s", "create_program", spec).await;
    let before = call(&pool, "s", "execute_program", ask("qa", QUESTIONS[0]))
        .await
        .unwrap();
    let pid = pool
        .workers()
        .into_iter()
        .find(|w| w.id == before.worker_id())
        .and_then(|w| w.pid)
        .unwrap();
    sigkill(pid);
    wait_until(WAIT, "the pool to notice the death", || {
        !worker_pids(&pool).contains(&pid)
    })
    .await;
    let after = call(&pool, "s", "execute_program", ask("qa", QUESTIONS[0]))
        .await
        .unwrap();
    assert_ne!(after.worker_id(), before.worker_id());
    assert_eq!(
        after.value().unwrap()["outputs"],
        before.value().unwrap()["outputs"]
    );
    let info = program_info(&pool, "qa").await;
    assert_eq!(info["execution_count"], 2);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_with_different_lms_never_see_each_others_answers() {
    let pool = dspy_pool(2).await;
    for user in ["alice", "bob"] {
        let lm = dummy(json!({"": {"answer": format!("{user}'s answer")}}));
        ok(&pool, user, "configure_lm", lm).await;
        let spec = json!({"id": "qa", "signature": "question -> answer"});
        ok(&pool, user, "create_program", spec).await;
    }
    let calls = (0..200).map(|i| {
        let user = if i % 2 == 0 { "alice" } else { "bob" };
        let pool = &pool;
        async move {
            let reply = call(pool, user, "execute_program", ask("qa", &format!("q{i}")))
                .await
                .unwrap();
            let worker = reply.worker_id().to_owned();
            let answer = reply.value().unwrap()["outputs"]["answer"].clone();
            (user, worker, answer)
        }
    });
    let answers = futures::future::join_all(calls).await;
    for (user, _, answer) in &answers {
        assert_eq!(*answer, format!("{user}'s answer"));
    }
    // A worker served both sessions' programs: the answer depends on the session, never
    // on the worker.
    let served_both = |worker: &str| {
        ["alice", "bob"]
            .iter()
            .all(|user| answers.iter().any(|(u, w, _)| u == user && w == worker))
    };
    assert!(
        answers.iter().any(|(_, worker, _)| served_both(worker)),
        "no worker served both sessions"
    );
    assert_eq!(pool.stats().errors, 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_whose_answers_differ_only_in_order_get_their_own_answers() {
    // dspy's DummyLM answers with the first key found in the prompt, and "" is in every
    // prompt, so these two LMs answer differently on one worker.
    let pool = dspy_pool(1).await;
    let france_first = json!({"France": {"answer": "Paris"}, "": {"answer": "unknown"}});
    let catch_all_first = json!({"": {"answer": "unknown"}, "France": {"answer": "Paris"}});
    for (user, lm) in [("france", france_first), ("catch-all", catch_all_first)] {
        ok(&pool, user, "configure_lm", dummy(lm)).await;
        let spec = json!({"id": "qa", "signature": "question -> answer"});
        ok(&pool, user, "create_program", spec).await;
    }
    for _ in 0..2 {
        for (user, expected) in [("france", "Paris"), ("catch-all", "unknown")] {
            let result = ok(&pool, user, "execute_program", ask("qa", QUESTIONS[0])).await;
            assert_eq!(result["outputs"]["answer"], expected, "{user}");
        }
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_fields_give_json_outputs_of_their_type() {
    let pool = dspy_pool(1).await;
    let lm = dummy(json!({"": {"answer": "4", "steps": "[\"add\", \"check\"]"}}));
    ok(&pool, "s", "configure_lm", lm).await;
    let signature = "question, count: int -> answer: int, steps: list[str]";
    let spec = json!({"id": "math", "signature": signature});
    let created = ok(&pool, "s", "create_program", spec).await;
    assert_eq!(created["signature"], signature);
    let inputs = json!({"question": QUESTIONS[1], "count": 2});
    let args = json!({"program_id": "math", "inputs": inputs});
    let result = ok(&pool, "s", "execute_program", args).await;
    assert_eq!(
        result["outputs"],
        json!({"answer": 4, "steps": ["add", "check"]})
    );
    let info = program_info(&pool, "math").await;
    assert_eq!(info["signature"], signature);
    let inputs = json!({"question": QUESTIONS[1], "count": "two"});
    let args = json!({"program_id": "math", "inputs": inputs});
    let e = call(&pool, "s", "execute_program", args).await.unwrap_err();
    assert_eq!(e.kind().as_str(), "invalid_inputs", "{e}");
    assert!(e.message().contains("count"), "{e}");
    let spec = json!({"id": "bad", "signature": "question -> answer: dict"});
    let e = call(&pool, "s", "create_program", spec).await.unwrap_err();
    assert_eq!(e.kind().as_str(), "invalid_signature", "{e}");
    assert!(e.message().contains("list[str]"), "{e}");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn programs_are_listed_described_deleted_and_shared_globally() {
    let pool = dspy_pool(1).await;
    ok(&pool, "s", "configure_lm", dummy(answers())).await;
    let spec = json!({
        "id": "qa",
        "signature": {"inputs": [{"name": "question", "description": "a question"}], "outputs": [{"name": "answer"}]},
        "instructions": "Answer briefly.",
    });
    ok(&pool, "s", "create_program", spec).await;
    let mut global = Map::new();
    global.insert("signature".into(), json!("question -> answer"));
    global.insert("program_type".into(), json!("chain_of_thought"));
    let shared = pool.put_program(None, "shared", global).await.unwrap();
    assert_eq!(shared.program_type, "chain_of_thought");

    let result = ok(&pool, "s", "execute_program", ask("shared", QUESTIONS[1])).await;
    assert_eq!(result["outputs"]["answer"], "4");
    ok(&pool, "s", "execute_program", ask("qa", QUESTIONS[0])).await;

    let listed = ok(&pool, "s", "list_programs", json!({})).await;
    assert_eq!(listed["programs"][0]["program_id"], "qa");
    assert_eq!(listed["global_programs"][0]["program_id"], "shared");
    let info = program_info(&pool, "qa").await;
    assert_eq!(info["signature"], "question -> answer");
    assert_eq!(info["scope"], "session");
    assert_eq!(info["execution_count"], 1);
    assert!(info["created_at"].is_string() && info["last_executed"].is_string());
    assert_eq!(info["definition"]["instructions"], "Answer briefly.");
    let info = program_info(&pool, "shared").await;
    assert_eq!(
        (&info["scope"], &info["execution_count"]),
        (&json!("global"), &json!(1))
    );
    let reply = call(&pool, "s", "list_programs", json!(null))
        .await
        .unwrap();
    assert_eq!(reply.worker_id(), pyherd::HOST_WORKER_ID);
    // The commands that take no arguments refuse a field rather than ignore it: this
    // cleanup_session does not delete the session it is called in.
    for command in ["list_programs", "cleanup_session"] {
        let e = call(&pool, "s", command, json!({"session_id": "other"}))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::MalformedRequest, "{e}");
        assert!(e.message().contains("unknown field `session_id`"), "{e}");
    }
    assert!(pool.sessions().exists("s").await.unwrap());

    let deleted = ok(&pool, "s", "delete_program", json!({"program_id": "qa"})).await;
    assert_eq!(deleted, json!({"program_id": "qa", "deleted": true}));
    let e = call(&pool, "s", "execute_program", ask("qa", "q"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::ProgramNotFound);

    let cleaned = ok(&pool, "s", "cleanup_session", json!({})).await;
    assert_eq!(cleaned["deleted"], true);
    assert!(!pool.sessions().exists("s").await.unwrap());
    // Cleaning up a session that does not exist does not create it.
    let created = pool.sessions().stats().created;
    let e = call(&pool, "s", "cleanup_session", json!({}))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::SessionNotFound);
    assert_eq!(e.context().session_id.as_deref(), Some("s"));
    assert_eq!(pool.sessions().stats().created, created);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_adapter_error_has_its_kind_and_the_pool_keeps_serving() {
    let pool = dspy_pool(1).await;
    let expect = |e: Error, category: Category, kind: &str| {
        assert_eq!((e.category(), e.kind().as_str()), (category, kind), "{e}");
        e
    };
    // Without a session.
    let e = pool
        .execute("execute_program", ask("qa", "q"))
        .await
        .unwrap_err();
    expect(e, Category::InvalidRequest, "session_required");
    // A program that does not exist.
    for (command, args) in [
        ("execute_program", ask("nope", "q")),
        ("get_program_info", json!({"program_id": "nope"})),
        ("delete_program", json!({"program_id": "nope"})),
    ] {
        let e = call(&pool, "s", command, args).await.unwrap_err();
        let e = expect(e, Category::Session, "program_not_found");
        assert_eq!(e.context().program_id.as_deref(), Some("nope"), "{command}");
    }
    // Bad signatures.
    for signature in [
        json!("question answer"),
        json!("question -> "),
        json!({"inputs": []}),
    ] {
        let spec = json!({"id": "bad", "signature": signature});
        let e = call(&pool, "s", "create_program", spec).await.unwrap_err();
        expect(e, Category::InvalidRequest, "invalid_signature");
    }
    let e = call(&pool, "s", "get_program_info", json!({"program_id": "bad"}))
        .await
        .unwrap_err();
    expect(e, Category::Session, "program_not_found");
    // Arguments that do not fit.
    let e = call(&pool, "s", "execute_program", json!({"inputs": {}}))
        .await
        .unwrap_err();
    expect(e, Category::InvalidRequest, "malformed_request");
    for (command, args) in [
        ("create_program", json!({"signature": "q -> a"})),
        ("create_program", json!(["qa", "q -> a"])),
        ("get_program_info", json!({})),
        (
            "get_program_info",
            json!({"program_id": "qa", "surprise": 1}),
        ),
        ("delete_program", json!({"program_id": 7})),
    ] {
        let e = call(&pool, "s", command, args).await.unwrap_err();
        expect(e, Category::InvalidRequest, "malformed_request");
    }
    // Bad program ids, in a session and from the library.
    let spec = json!({"id": "no/slash", "signature": "q -> a"});
    let e = call(&pool, "s", "create_program", spec).await.unwrap_err();
    expect(e, Category::InvalidRequest, "invalid_id");
    let mut spec = Map::new();
    spec.insert("signature".into(), json!("q -> a"));
    for session in [Some("s"), None] {
        let e = pool
            .put_program(session, "a b", spec.clone())
            .await
            .unwrap_err();
        expect(e, Category::InvalidRequest, "invalid_id");
    }
    for command in ["get_program_info", "delete_program", "execute_program"] {
        for id in ["../x", ""] {
            let mut args = json!({"program_id": id});
            if command == "execute_program" {
                args["inputs"] = json!({});
            }
            let e = call(&pool, "s", command, args).await.unwrap_err();
            expect(e, Category::InvalidRequest, "invalid_id");
        }
    }
    // A spec naming another id than the one it is stored under.
    let mut named = spec.clone();
    named.insert("id".into(), json!("other"));
    let e = pool.put_program(Some("s"), "qa", named).await.unwrap_err();
    expect(e, Category::InvalidRequest, "malformed_request");
    let e = pool
        .put_program(Some("nobody"), "qa", spec)
        .await
        .unwrap_err();
    expect(e, Category::Session, "session_not_found");
    assert!(pool.sessions().get("s").await.unwrap().programs.is_empty());
    // No LM yet.
    ok(
        &pool,
        "s",
        "create_program",
        json!({"id": "qa", "signature": "question -> answer"}),
    )
    .await;
    let e = call(&pool, "s", "execute_program", ask("qa", "q"))
        .await
        .unwrap_err();
    expect(e, Category::InvalidRequest, "lm_not_configured");
    // An LM that fails: nothing listens on port 9.
    let unreachable = json!({
        "model": "openai/gpt-4o-mini",
        "api_base": "http://127.0.0.1:9/v1",
        "api_key": "sk-not-a-key",
        "num_retries": 0,
    });
    let configured = ok(&pool, "s", "configure_lm", unreachable).await;
    assert!(
        !configured.to_string().contains("sk-not-a-key"),
        "{configured}"
    );
    let e = call(&pool, "s", "execute_program", ask("qa", "q"))
        .await
        .unwrap_err();
    let e = expect(e, Category::Python, "lm_error");
    assert_eq!(e.kind(), &ErrorKind::LmError);
    assert!(!e.message().is_empty());
    assert_eq!(e.context().program_id.as_deref(), Some("qa"));
    let session = pool.sessions().get("s").await.unwrap();
    assert!(
        !serde_json::to_string(&session)
            .unwrap()
            .contains("sk-not-a-key")
    );
    // A bad LM configuration is refused and the old one kept.
    let e = call(&pool, "s", "configure_lm", json!({"provider": "dummy"}))
        .await
        .unwrap_err();
    expect(e, Category::InvalidRequest, "invalid_lm_config");
    let kept = pool.sessions().get("s").await.unwrap().lm.unwrap();
    let kept: Value = serde_json::from_str(kept.get()).unwrap();
    assert_eq!(kept["model"], "openai/gpt-4o-mini", "{kept}");
    // The pool still serves.
    ok(&pool, "s", "configure_lm", dummy(answers())).await;
    let result = ok(&pool, "s", "execute_program", ask("qa", QUESTIONS[0])).await;
    assert_eq!(result["outputs"]["answer"], "Paris");
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_program_answer_of_the_wrong_shape_stores_nothing() {
    let pool = pool_of(&common::fixture("wrong_adapter.py"), 1).await;
    let spec = json!({"id": "qa", "signature": "question -> answer"});
    let e = call(&pool, "s", "create_program", spec).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::ResultTypeMismatch, "{e}");
    assert!(pool.sessions().get("s").await.unwrap().programs.is_empty());
    let mut global = Map::new();
    global.insert("signature".into(), json!("question -> answer"));
    let e = pool.put_program(None, "qa", global).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::ResultTypeMismatch, "{e}");
    assert!(
        pool.sessions()
            .list_global_programs()
            .await
            .unwrap()
            .is_empty()
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_deleted_while_its_call_runs_keeps_nothing_of_the_call() {
    let pool = pool_of(&common::fixture("gated_adapter.py"), 1).await;
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    std::fs::write(&open, "").unwrap();
    let open = open.to_str().unwrap();
    // The gate of the call in `session`: a file that does not exist until it is opened.
    let gate = |session: &str| dir.path().join(session);
    // Runs `command` in `session` held at its closed gate, deletes the session meanwhile,
    // then opens the gate: the call's outcome.
    let deleted_meanwhile = |session: &'static str, command: &'static str, args: Value| {
        let pool = pool.clone();
        let gate = gate(session);
        async move {
            let call = tokio::spawn({
                let pool = pool.clone();
                async move { call(&pool, session, command, args).await }
            });
            wait_until(WAIT, "the call to run", || pool.stats().busy == 1).await;
            pool.sessions().delete(session).await.unwrap();
            std::fs::write(gate, "").unwrap();
            call.await.unwrap()
        }
    };

    let e = deleted_meanwhile("lm", "configure_lm", json!({"gate": gate("lm")}))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::SessionNotFound, "{e}");
    let spec = json!({"id": "p", "signature": "q -> a", "gate": gate("program")});
    let e = deleted_meanwhile("program", "create_program", spec)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::SessionNotFound, "{e}");
    // An execution's answer stands: there is only nothing left to count it in.
    let spec = json!({"id": "p", "signature": "q -> a", "gate": open});
    ok(&pool, "run", "create_program", spec).await;
    let args = json!({"program_id": "p", "inputs": {"gate": gate("run")}});
    let reply = deleted_meanwhile("run", "execute_program", args)
        .await
        .unwrap();
    assert_eq!(reply.value().unwrap()["outputs"]["a"], "done");
    // None of them was brought back.
    for session in ["lm", "program", "run"] {
        assert!(!pool.sessions().exists(session).await.unwrap(), "{session}");
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adapters_session_commands_cannot_be_streamed() {
    let pool = dspy_pool(1).await;
    let options = CallOptions::new().session_id("streamer");
    let e = pool
        .stream_with("execute_program", ask("qa", "Why?"), &options)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::MalformedRequest);
    assert!(e.message().contains("cannot be streamed"), "{e}");
    assert_eq!(e.context().command.as_deref(), Some("execute_program"));
    pool.shutdown().await;
}
