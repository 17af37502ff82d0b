//! Reload: every worker is replaced by one running the handler code anew, under load,
//! with no failed call; a reload whose new code fails to import leaves the old workers
//! serving; with `preload` the zygote is replaced too.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{running, wait_until, worker_pids};
use pyherd::{CallOptions, ErrorKind, Pool, PoolBuilder, StartedBy};
use serde_json::json;
use tokio::task::JoinHandle;

/// The preloaded module: the version the handler answers with. Versions have different
/// lengths: Python trusts its cached bytecode when a source keeps its size and its
/// modification second.
fn write_version(dir: &Path, version: &str) {
    std::fs::write(
        dir.join("reload_version.py"),
        format!("VERSION = {version:?}\n"),
    )
    .unwrap();
}

/// A temp dir with the handler file and its version module.
fn handler_dir(version: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("reload_handlers.py"),
        "import reload_version\nfrom pyherd_worker import handler\n\n\n@handler\n\
         def version(args, ctx):\n    return reload_version.VERSION\n",
    )
    .unwrap();
    write_version(dir.path(), version);
    dir
}

fn pool_in(dir: &Path, workers: usize) -> PoolBuilder {
    Pool::builder()
        .workers(workers)
        .handlers(dir.join("reload_handlers.py").to_string_lossy())
        .env("PYTHONPATH", dir.to_string_lossy())
        .startup_timeout(Duration::from_secs(30))
        .queue_timeout(Duration::from_secs(30))
}

/// A pool of 2 workers forked from a zygote that preloads `reload_version` (v1): its
/// handler directory, the pool and the zygote's pid.
async fn preloaded() -> (tempfile::TempDir, Pool, u32) {
    let dir = handler_dir("v1");
    let pool = pool_in(dir.path(), 2)
        .preload("reload_version")
        .build()
        .await
        .unwrap();
    let zygote = pool.zygote_pid().unwrap();
    (dir, pool, zygote)
}

/// Calls `version` from several tasks (one of them in a session) until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(pool: &Pool, tasks: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let tasks = (0..tasks)
            .map(|i| {
                let (pool, stop, failures) = (pool.clone(), stop.clone(), failures.clone());
                tokio::spawn(async move {
                    let options = if i == 0 {
                        CallOptions::new().session_id("reload-session")
                    } else {
                        CallOptions::new()
                    };
                    let mut seen = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match pool.execute_with("version", json!({}), &options).await {
                            Ok(reply) => {
                                let v: String = reply.decode().unwrap();
                                if seen.last() != Some(&v) {
                                    seen.push(v);
                                }
                            }
                            Err(e) => {
                                eprintln!("failed call: {e}");
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    seen
                })
            })
            .collect();
        Self {
            stop,
            failures,
            tasks,
        }
    }

    /// Stops the load; the failed calls and each task's sequence of versions seen.
    async fn finish(self) -> (u64, Vec<Vec<String>>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut seen = Vec::new();
        for task in self.tasks {
            seen.push(task.await.unwrap());
        }
        (self.failures.load(Ordering::Relaxed), seen)
    }
}

fn reload_restarts(pool: &Pool) -> u64 {
    let metrics = pool.render_metrics();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("pyherd_worker_restarts_total{reason=\"reload\"} "))
        .expect("the reload restarts metric")
        .parse()
        .unwrap()
}

/// Every worker answers `version`: asks each enough times to have reached all of them.
async fn all_answer(pool: &Pool, version: &str) {
    let calls: Vec<_> = (0..pool.workers().len() * 8)
        .map(|_| pool.execute("version", json!({})))
        .collect();
    for answer in futures::future::join_all(calls).await {
        assert_eq!(answer.unwrap(), version);
    }
}

async fn reload_under_load(preload: bool) {
    let dir = handler_dir("v1");
    let mut builder = pool_in(dir.path(), 3);
    if preload {
        builder = builder.preload("reload_version");
    }
    let pool = builder.build().await.unwrap();
    let zygote = pool.zygote_pid();
    assert_eq!(zygote.is_some(), preload);
    all_answer(&pool, "v1").await;
    let old = worker_pids(&pool);
    let load = Load::start(&pool, 4);
    wait_until(Duration::from_secs(10), "load to run", || {
        pool.stats().requests > 50
    })
    .await;
    write_version(dir.path(), "v2-new");
    let report = pool.reload().await.unwrap();
    wait_until(
        Duration::from_secs(10),
        "more load after the reload",
        || pool.stats().requests > 100,
    )
    .await;
    let requests_before = pool.stats().requests;
    wait_until(Duration::from_secs(10), "calls on the new workers", || {
        pool.stats().requests > requests_before + 50
    })
    .await;
    let (failures, seen) = load.finish().await;
    assert_eq!(failures, 0, "no call may fail during a reload");
    for versions in &seen {
        assert_eq!(
            versions.last().map(String::as_str),
            Some("v2-new"),
            "{seen:?}"
        );
    }
    assert_eq!(report.workers.len(), 3, "{report:?}");
    let new = worker_pids(&pool);
    assert!(new.iter().all(|p| !old.contains(p)), "{old:?} → {new:?}");
    for (w, pid) in report.workers.iter().zip(&new) {
        assert_eq!(w.pid, *pid, "{report:?}");
        assert!(old.contains(&w.old_pid), "{report:?}");
    }
    assert_eq!(reload_restarts(&pool), 3);
    all_answer(&pool, "v2-new").await;
    if preload {
        let new_zygote = pool.zygote_pid().unwrap();
        assert_eq!(report.zygote_pid, Some(new_zygote));
        assert_ne!(Some(new_zygote), zygote, "the zygote was replaced");
        let old_zygote = zygote.unwrap();
        wait_until(Duration::from_secs(10), "the old zygote to end", || {
            !running(old_zygote)
        })
        .await;
        assert!(
            pool.workers()
                .iter()
                .all(|w| w.started_by == StartedBy::Fork)
        );
    } else {
        assert_eq!(report.zygote_pid, None);
    }
    pool.shutdown().await;
    for pid in old.iter().chain(&new) {
        assert!(!running(*pid), "worker {pid} outlived the pool");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_replaces_every_worker_with_no_failed_call() {
    reload_under_load(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_preload_a_reload_replaces_the_zygote_and_reimports_preloaded_modules() {
    reload_under_load(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_code_that_fails_to_import_stops_the_reload_and_old_workers_keep_serving() {
    let dir = handler_dir("v1");
    let pool = pool_in(dir.path(), 2).build().await.unwrap();
    let old = worker_pids(&pool);
    let load = Load::start(&pool, 3);
    std::fs::write(
        dir.path().join("reload_version.py"),
        "raise RuntimeError('broken on purpose')\n",
    )
    .unwrap();
    let error = pool.reload().await.unwrap_err();
    assert_eq!(error.kind(), &ErrorKind::HandlerImportFailed, "{error}");
    assert!(
        error
            .message()
            .contains("reload stopped after 0 of 2 workers"),
        "{error}"
    );
    let tail = error.context().stderr_tail.clone().unwrap_or_default();
    let traceback = error.context().traceback.clone().unwrap_or_default();
    assert!(
        tail.contains("broken on purpose") || traceback.contains("broken on purpose"),
        "{error:?}"
    );
    let requests = pool.stats().requests;
    wait_until(
        Duration::from_secs(10),
        "calls after the failed reload",
        || pool.stats().requests > requests + 20,
    )
    .await;
    assert_eq!(worker_pids(&pool), old, "the old workers keep serving");
    assert_eq!(reload_restarts(&pool), 0);
    write_version(dir.path(), "v3-fixed");
    let report = pool.reload().await.unwrap();
    assert_eq!(report.workers.len(), 2);
    let (failures, seen) = load.finish().await;
    assert_eq!(failures, 0, "no call may fail");
    assert!(
        seen.iter()
            .all(|v| v.first().map(String::as_str) == Some("v1"))
    );
    all_answer(&pool, "v3-fixed").await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preload_that_fails_on_reload_keeps_the_zygote_and_its_workers() {
    let (dir, pool, zygote) = preloaded().await;
    let old = worker_pids(&pool);
    let load = Load::start(&pool, 2);
    std::fs::write(
        dir.path().join("reload_version.py"),
        "raise RuntimeError('broken preload')\n",
    )
    .unwrap();
    let error = pool.reload().await.unwrap_err();
    assert_eq!(error.kind(), &ErrorKind::StartupFailed, "{error}");
    assert!(error.message().contains("broken preload"), "{error}");
    assert_eq!(pool.zygote_pid(), Some(zygote));
    assert_eq!(worker_pids(&pool), old);
    all_answer(&pool, "v1").await;
    let (failures, _) = load.finish().await;
    assert_eq!(failures, 0);
    pool.shutdown().await;
}

/// The zygotes of run `run_id`: this process's children that run the zygote (the workers
/// it forks are its own children).
fn zygotes(run_id: &str) -> Vec<u32> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1));
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if ppid == Some(me.as_str()) && cmdline.contains("zygote") && cmdline.contains(run_id) {
            found.push(pid);
        }
    }
    found
}

/// Waits for the zygote `old` to end, then checks that `new` is the pool's only zygote.
async fn only_zygote_left(pool: &Pool, old: u32, new: u32) {
    wait_until(Duration::from_secs(20), "the old zygote to end", || {
        !running(old)
    })
    .await;
    assert_eq!(zygotes(pool.run_id()), [new]);
}

/// A reload whose new zygote came up but whose first replacement failed keeps the zygote
/// it had: failed reloads do not leave zygotes behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_replaced_no_worker_keeps_its_zygote_and_ends_the_new_one() {
    let (dir, pool, zygote) = preloaded().await;
    assert_eq!(zygotes(pool.run_id()), [zygote]);
    let handlers = dir.path().join("reload_handlers.py");
    let good = std::fs::read_to_string(&handlers).unwrap();
    std::fs::write(&handlers, "raise RuntimeError('broken handlers')\n").unwrap();
    for _ in 0..3 {
        let error = pool.reload().await.unwrap_err();
        assert_eq!(error.kind(), &ErrorKind::HandlerImportFailed, "{error}");
        assert_eq!(pool.zygote_pid(), Some(zygote));
        assert_eq!(
            zygotes(pool.run_id()),
            [zygote],
            "a failed reload left a zygote"
        );
    }
    all_answer(&pool, "v1").await;
    std::fs::write(&handlers, good).unwrap();
    write_version(dir.path(), "v2-after");
    pool.reload().await.unwrap();
    let renewed = pool.zygote_pid().unwrap();
    assert_ne!(renewed, zygote);
    assert_eq!(zygotes(pool.run_id()), [renewed]);
    all_answer(&pool, "v2-after").await;
    pool.shutdown().await;
}

/// A reload that replaced some workers and then failed keeps both zygotes while workers
/// forked from the old one still serve, and ends the old one with the last of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_partial_reload_the_old_zygote_ends_with_its_last_worker() {
    let dir = handler_dir("v1");
    // The fourth worker to load the handlers fails: the reload's second replacement.
    let handlers = r#"
import os, reload_version
from pyherd_worker import handler

starts = os.path.join(os.path.dirname(__file__), "starts")
with open(starts, "a") as f:
    f.write("x")
if os.path.getsize(starts) == 4:
    raise RuntimeError("the fourth start fails")


@handler
def version(args, ctx):
    return reload_version.VERSION
"#;
    std::fs::write(dir.path().join("reload_handlers.py"), handlers).unwrap();
    let pool = pool_in(dir.path(), 2)
        .preload("reload_version")
        .build()
        .await
        .unwrap();
    let old_zygote = pool.zygote_pid().unwrap();
    let old = worker_pids(&pool);
    let error = pool.reload().await.unwrap_err();
    assert!(
        error
            .message()
            .contains("reload stopped after 1 of 2 workers"),
        "{error}"
    );
    let new_zygote = pool.zygote_pid().unwrap();
    assert_ne!(new_zygote, old_zygote);
    let mut both = zygotes(pool.run_id());
    both.sort_unstable();
    let mut expected = vec![old_zygote, new_zygote];
    expected.sort_unstable();
    assert_eq!(both, expected, "the old zygote's worker still serves");
    let still = worker_pids(&pool)
        .into_iter()
        .find(|pid| old.contains(pid))
        .expect("a worker the reload did not replace");
    common::sigkill(still);
    only_zygote_left(&pool, old_zygote, new_zygote).await;
    all_answer(&pool, "v1").await;
    pool.shutdown().await;
}

/// A worker forked from the old zygote that stopped for being idle (its slot parked)
/// does not keep that zygote once a reload has replaced the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_slot_does_not_keep_the_old_zygote_after_a_reload() {
    let dir = handler_dir("v1");
    let pool = pool_in(dir.path(), 2)
        .min_workers(1)
        .idle_timeout(Duration::from_secs(1))
        .preload("reload_version")
        .build()
        .await
        .unwrap();
    let old_zygote = pool.zygote_pid().unwrap();
    wait_until(Duration::from_secs(10), "a slot to park", || {
        pool.stats().workers == 1
    })
    .await;
    write_version(dir.path(), "v2-new");
    let report = pool.reload().await.unwrap();
    assert_eq!(report.workers.len(), 1, "{report:?}");
    only_zygote_left(&pool, old_zygote, report.zygote_pid.unwrap()).await;
    all_answer(&pool, "v2-new").await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reloads_run_one_after_the_other() {
    let dir = handler_dir("v1");
    let pool = pool_in(dir.path(), 2).build().await.unwrap();
    write_version(dir.path(), "v2-new");
    let (first, second) = tokio::join!(pool.reload(), pool.reload());
    let (first, second) = (first.unwrap(), second.unwrap());
    let first_new: Vec<u32> = first.workers.iter().map(|w| w.pid).collect();
    let second_old: Vec<u32> = second.workers.iter().map(|w| w.old_pid).collect();
    assert_eq!(
        second_old, first_new,
        "the second replaced what the first started"
    );
    assert_eq!(reload_restarts(&pool), 4);
    all_answer(&pool, "v2-new").await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_slots_are_left_alone_and_grow_with_the_new_code() {
    let dir = handler_dir("v1");
    let pool = pool_in(dir.path(), 1).max_workers(3).build().await.unwrap();
    write_version(dir.path(), "v2-new");
    let report = pool.reload().await.unwrap();
    assert_eq!(
        report.workers.len(),
        1,
        "only the slot in service: {report:?}"
    );
    assert_eq!(reload_restarts(&pool), 1);
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.execute_with("version", json!({}), &CallOptions::new())
                    .await
                    .map(|r| r.decode::<String>().unwrap())
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), "v2-new");
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_shut_down_refuses_to_reload() {
    let dir = handler_dir("v1");
    let pool = pool_in(dir.path(), 1).build().await.unwrap();
    pool.shutdown().await;
    let error = pool.reload().await.unwrap_err();
    assert_eq!(error.kind(), &ErrorKind::ShuttingDown, "{error}");
}

/// A worker killed at its call's timeout while a reload's replacement is on its way is
/// replaced by that one: no other worker is started for it, and the report names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_lost_while_its_replacement_comes_is_replaced_by_it_alone() {
    let pool = common::testing_pool(1).build().await.unwrap();
    let old = worker_pids(&pool)[0];
    let call = {
        let pool = pool.clone();
        let options = CallOptions::new().timeout(Duration::from_secs(5));
        tokio::spawn(async move {
            pool.execute_with("sleep", json!({"seconds": 60}), &options)
                .await
        })
    };
    wait_until(Duration::from_secs(5), "the call to run", || {
        pool.stats().busy == 1
    })
    .await;
    let report = pool.reload().await.unwrap();
    let e = call.await.unwrap().unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::ExecutionTimeout, "{e}");
    let [replaced] = &report.workers[..] else {
        panic!("{report:?}");
    };
    assert_eq!((replaced.old_id.as_str(), replaced.old_pid), ("w1", old));
    assert_eq!(replaced.id, "w2", "{report:?}");
    let ids: Vec<String> = pool.workers().into_iter().map(|w| w.id).collect();
    assert_eq!(ids, ["w2"]);
    assert_eq!(pool.stats().restarts, 1);
    assert_eq!(pool.execute("echo", json!(1)).await.unwrap(), json!(1));
    pool.shutdown().await;
}
