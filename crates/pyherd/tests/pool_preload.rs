//! Fast respawn: with `preload`, a zygote imports the modules once, freezes its heap, and
//! every worker (first start, replacement after a crash or a recycle) is forked from it;
//! the pool falls back to spawning workers while the zygote is down or when a preload
//! module fails to import, and leaves no process behind.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{exists, fixture, running, sigkill, wait_until, worker_pids};
use pyherd::{ErrorKind, Pool, PoolBuilder, StartedBy, WorkerState};
use serde_json::{Value, json};

/// A pool whose workers load `preload_probe.py`, with the fixtures on `PYTHONPATH`.
fn probe_pool(workers: usize) -> PoolBuilder {
    let fixtures = PathBuf::from(fixture("preload_probe.py"))
        .parent()
        .expect("fixtures dir")
        .to_string_lossy()
        .into_owned();
    Pool::builder()
        .workers(workers)
        .handlers(fixture("preload_probe.py"))
        .env("PYTHONPATH", fixtures)
        .startup_timeout(Duration::from_secs(20))
}

/// The parent pid of `pid`, from `/proc/<pid>/stat`.
fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Every worker is ready and none of them is one of `old`.
fn replaced(pool: &Pool, old: &[u32]) -> bool {
    let workers = pool.workers();
    workers
        .iter()
        .all(|w| w.state == WorkerState::Ready && w.pid.is_some_and(|p| !old.contains(&p)))
}

fn started_by(pool: &Pool) -> Vec<StartedBy> {
    pool.workers().iter().map(|w| w.started_by).collect()
}

/// Calls the probe until each of the pool's workers answered once; their answers.
async fn probe_each(pool: &Pool) -> Vec<Value> {
    let mut seen = std::collections::BTreeMap::new();
    let mut calls = 0;
    while seen.len() < pool.workers().len() {
        calls += 1;
        assert!(calls < 500, "not every worker answered: {seen:?}");
        let calls: Vec<_> = (0..4)
            .map(|_| pool.execute("preload_probe", json!({})))
            .collect();
        for answer in futures::future::join_all(calls).await {
            let answer = answer.unwrap();
            seen.insert(answer["pid"].as_u64().unwrap(), answer);
        }
    }
    seen.into_values().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_forked_from_a_zygote_that_imported_the_preload_modules() {
    let pool = probe_pool(2)
        .preload("preloaded_fixture")
        .build()
        .await
        .unwrap();
    let zygote = pool.zygote_pid().expect("a zygote is up");
    assert_eq!(started_by(&pool), [StartedBy::Fork, StartedBy::Fork]);
    for answer in probe_each(&pool).await {
        let pid = answer["pid"].as_u64().unwrap();
        assert_eq!(answer["preloaded"], true, "{answer}");
        assert_eq!(answer["imported_by"], zygote, "{answer}");
        assert_ne!(pid, u64::from(zygote));
        assert_eq!(answer["ppid"], zygote, "{answer}");
        assert_eq!(answer["pgrp"], pid, "a forked worker leads its own group");
        assert_eq!(answer["worker_env"], answer["worker_id"], "{answer}");
    }
    let json = serde_json::to_value(pool.workers()).unwrap();
    assert_eq!(json[0]["started_by"], "fork", "{json}");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forked_worker_runs_with_the_zygotes_heap_frozen() {
    let pool = probe_pool(2)
        .preload("preloaded_fixture")
        .build()
        .await
        .unwrap();
    assert_eq!(started_by(&pool), [StartedBy::Fork, StartedBy::Fork]);
    for answer in probe_each(&pool).await {
        let frozen = answer["frozen"].as_u64().unwrap();
        assert!(frozen > 0, "nothing frozen in a forked worker: {answer}");
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_preload_workers_are_spawned_and_import_modules_themselves() {
    let pool = probe_pool(1).build().await.unwrap();
    assert_eq!(pool.zygote_pid(), None);
    assert_eq!(started_by(&pool), [StartedBy::Spawn]);
    let answer = pool.execute("preload_probe", json!({})).await.unwrap();
    assert_eq!(answer["preloaded"], false, "{answer}");
    assert_eq!(answer["imported_by"], answer["pid"], "{answer}");
    assert_eq!(answer["frozen"], 0, "{answer}");
    let json = serde_json::to_value(pool.workers()).unwrap();
    assert_eq!(json[0]["started_by"], "spawn", "{json}");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_forked_worker_is_replaced_by_a_fork_and_reaped() {
    let pool = probe_pool(2)
        .preload("preloaded_fixture")
        .build()
        .await
        .unwrap();
    let zygote = pool.zygote_pid().unwrap();
    let old = worker_pids(&pool);
    sigkill(old[0]);
    wait_until(Duration::from_secs(10), "a replacement", || {
        pool.workers()
            .iter()
            .all(|w| w.state == WorkerState::Ready && w.pid != Some(old[0]))
    })
    .await;
    wait_until(Duration::from_secs(5), "the zygote to reap it", || {
        !exists(old[0])
    })
    .await;
    assert_eq!(started_by(&pool), [StartedBy::Fork, StartedBy::Fork]);
    let new = worker_pids(&pool);
    assert!(new.iter().all(|&p| ppid(p) == Some(zygote)), "{new:?}");
    assert_eq!(pool.stats().restarts, 1);
    for answer in probe_each(&pool).await {
        assert_eq!(answer["imported_by"], zygote, "{answer}");
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_recycled_by_max_requests_is_replaced_by_a_fork() {
    let pool = probe_pool(1)
        .preload("preloaded_fixture")
        .max_requests(2)
        .build()
        .await
        .unwrap();
    let zygote = pool.zygote_pid().unwrap();
    let old = worker_pids(&pool);
    for _ in 0..2 {
        let answer = pool.execute("preload_probe", json!({})).await.unwrap();
        assert_eq!(answer["pid"], old[0], "{answer}");
    }
    wait_until(Duration::from_secs(10), "a replacement", || {
        replaced(&pool, &old)
    })
    .await;
    wait_until(Duration::from_secs(5), "the zygote to reap it", || {
        !exists(old[0])
    })
    .await;
    assert_eq!(started_by(&pool), [StartedBy::Fork]);
    assert_eq!(pool.zygote_pid(), Some(zygote));
    let new = worker_pids(&pool);
    assert_eq!(ppid(new[0]), Some(zygote));
    let metrics = pool.render_metrics();
    let recycled = "pyherd_worker_restarts_total{reason=\"max_requests\"} 1\n";
    assert!(metrics.contains(recycled), "{metrics}");
    assert_eq!(pool.stats().restarts, 1);
    let answer = pool.execute("preload_probe", json!({})).await.unwrap();
    assert_eq!(answer["pid"], new[0], "{answer}");
    assert_eq!(answer["imported_by"], zygote, "{answer}");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_spawns_workers_while_its_zygote_is_down_then_forks_again() {
    let pool = probe_pool(2)
        .preload("preloaded_fixture")
        .build()
        .await
        .unwrap();
    let zygote = pool.zygote_pid().unwrap();
    let old = worker_pids(&pool);
    sigkill(zygote);
    // Its workers die with it (their parent-death signal) and are replaced by spawns:
    // a new zygote is started only after a backoff of a second.
    wait_until(Duration::from_secs(10), "spawned replacements", || {
        replaced(&pool, &old)
    })
    .await;
    assert_eq!(started_by(&pool), [StartedBy::Spawn, StartedBy::Spawn]);
    for pid in old.iter().chain([&zygote]) {
        wait_until(
            Duration::from_secs(5),
            "the old processes to be reaped",
            || !exists(*pid),
        )
        .await;
    }
    for answer in probe_each(&pool).await {
        assert_eq!(answer["preloaded"], false, "{answer}");
    }
    wait_until(Duration::from_secs(20), "a new zygote", || {
        pool.zygote_pid().is_some_and(|z| z != zygote)
    })
    .await;
    let new_zygote = pool.zygote_pid().unwrap();
    let spawned = worker_pids(&pool);
    sigkill(spawned[0]);
    wait_until(Duration::from_secs(10), "a forked replacement", || {
        pool.workers()
            .iter()
            .all(|w| w.state == WorkerState::Ready && w.pid != Some(spawned[0]))
    })
    .await;
    let workers = pool.workers();
    let forked = workers
        .iter()
        .find(|w| w.started_by == StartedBy::Fork)
        .expect("the replacement is forked");
    assert_eq!(ppid(forked.pid.unwrap()), Some(new_zygote));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preload_module_that_fails_to_import_leaves_workers_spawned() {
    // The last one imports fine but starts a thread: forking after it is unsafe.
    for module in [
        "raise_at_import",
        "no_such_module_for_pyherd",
        "thread_at_import",
    ] {
        let pool = probe_pool(2).preload(module).build().await.unwrap();
        assert_eq!(pool.zygote_pid(), None, "{module}");
        assert_eq!(started_by(&pool), [StartedBy::Spawn, StartedBy::Spawn]);
        let answer = pool.execute("preload_probe", json!({})).await.unwrap();
        assert_eq!(answer["preloaded"], false, "{answer}");
        let old = worker_pids(&pool);
        sigkill(old[0]);
        wait_until(Duration::from_secs(10), "a replacement", || {
            pool.workers()
                .iter()
                .all(|w| w.state == WorkerState::Ready && w.pid != Some(old[0]))
        })
        .await;
        assert_eq!(started_by(&pool), [StartedBy::Spawn, StartedBy::Spawn]);
        pool.shutdown().await;
    }
}

/// A pool of one worker with the testing handlers, forked from a zygote.
async fn one_forked_testing_worker() -> Pool {
    let pool = common::testing_pool(1)
        .preload("json")
        .build()
        .await
        .unwrap();
    assert_eq!(started_by(&pool), [StartedBy::Fork]);
    pool
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forked_worker_that_crashes_reports_its_exit_status_and_stderr() {
    let pool = one_forked_testing_worker().await;
    let e = pool.execute("crash", json!({"code": 7})).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::WorkerCrashed, "{e}");
    let ctx = e.context();
    assert_eq!(ctx.exit_status.as_deref(), Some("exit status: 7"), "{e}");
    assert!(
        ctx.stderr_tail
            .as_deref()
            .unwrap_or("")
            .contains("exiting on purpose"),
        "{e}"
    );
    let dead = ctx.pid.unwrap();
    assert!(!exists(dead), "the crashed worker {dead} was reaped");
    let e = pool.execute("kill_self", json!({})).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::WorkerCrashed, "{e}");
    assert!(
        e.context()
            .exit_status
            .as_deref()
            .unwrap_or("")
            .contains("SIGKILL"),
        "{e}"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forked_worker_dying_with_a_child_holding_its_pipes_is_found_at_once() {
    let pool = one_forked_testing_worker().await;
    common::crash_with_a_child_holding_the_pipes(&pool).await;
    pool.shutdown().await;
}

/// A zygote that stops (here frozen with SIGSTOP) reaps and reports nothing: a forked
/// worker's death is still found at once, by the host looking for the process itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forked_worker_dying_while_its_zygote_is_frozen_is_found_at_once() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pool = one_forked_testing_worker().await;
    let zygote = pool.zygote_pid().unwrap();
    let child = common::child_holding_the_pipes(&pool).await;
    let zygote_pid = Pid::from_raw(i32::try_from(zygote).unwrap());
    kill(zygote_pid, Signal::SIGSTOP).unwrap();
    let began = std::time::Instant::now();
    let opts = pyherd::CallOptions::new().timeout(Duration::from_secs(20));
    let e = pool
        .execute_with("crash", json!({"code": 7}), &opts)
        .await
        .unwrap_err();
    let elapsed = began.elapsed();
    kill(zygote_pid, Signal::SIGCONT).unwrap();
    assert_eq!(e.kind(), &ErrorKind::WorkerCrashed, "{e}");
    assert!(e.is_retryable());
    let status = e.context().exit_status.clone().unwrap_or_default();
    assert!(
        status.contains("its zygote did not report its end"),
        "{status}"
    );
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    wait_until(Duration::from_secs(5), "the child to die", || {
        !running(child)
    })
    .await;
    wait_until(Duration::from_secs(20), "a replacement", || {
        pool.stats().available == 1
    })
    .await;
    assert_eq!(pool.execute("echo", json!(1)).await.unwrap(), json!(1));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_and_drop_end_the_zygote_and_every_forked_worker() {
    let pool = common::testing_pool(2)
        .preload("json")
        .build()
        .await
        .unwrap();
    let zygote = pool.zygote_pid().unwrap();
    let pids = worker_pids(&pool);
    let child = pool.execute("spawn_child", json!({})).await.unwrap()["pid"]
        .as_u64()
        .unwrap() as u32;
    pool.shutdown().await;
    for pid in &pids {
        assert!(!exists(*pid), "worker {pid} left behind");
    }
    // Its group was sent SIGKILL: it dies as soon as it is scheduled.
    wait_until(Duration::from_secs(5), "the worker's child to end", || {
        !running(child)
    })
    .await;
    drop(pool);
    wait_until(Duration::from_secs(5), "the zygote to end", || {
        !exists(zygote)
    })
    .await;

    let pool = common::testing_pool(2)
        .preload("json")
        .build()
        .await
        .unwrap();
    let zygote = pool.zygote_pid().unwrap();
    let pids = worker_pids(&pool);
    drop(pool);
    wait_until(Duration::from_secs(5), "every process to end", || {
        pids.iter().chain([&zygote]).all(|&p| !running(p))
    })
    .await;
}

/// The `--preload` arguments of the zygote's command line.
fn zygote_preloads(zygote: u32) -> Vec<String> {
    let cmdline = std::fs::read(format!("/proc/{zygote}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    args.windows(2)
        .filter(|w| w[0] == "--preload")
        .map(|w| w[1].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_preload_the_dspy_adapter_is_imported_by_the_zygote_too() {
    let pool = pyherd::Pool::builder()
        .workers(1)
        .handlers("pyherd_worker.dspy_adapter")
        .preload("dspy")
        .startup_timeout(std::time::Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let zygote = pool.zygote_pid().expect("a zygote is up");
    assert_eq!(
        zygote_preloads(zygote),
        ["dspy", "pyherd_worker.dspy_adapter"]
    );
    assert_eq!(started_by(&pool), [StartedBy::Fork]);
    assert!(pool.handlers().iter().any(|h| h == "execute_program"));
    pool.shutdown().await;
    // Without the adapter among the handlers, only the named modules are preloaded.
    let pool = probe_pool(1)
        .preload("preloaded_fixture")
        .build()
        .await
        .unwrap();
    let zygote = pool.zygote_pid().expect("a zygote is up");
    assert_eq!(zygote_preloads(zygote), ["preloaded_fixture"]);
    pool.shutdown().await;
}
