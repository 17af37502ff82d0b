//! SIGHUP (and `POST /v1/reload`) reload the handler code of a real `pyherd serve` under
//! HTTP load with no failed call; new code that fails to import leaves the old workers
//! serving and the failure logged.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Server, get_json, pyherd, wait_until};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// Versions have different lengths: Python trusts its cached bytecode when a source
/// keeps its size and its modification second.
fn write_version(dir: &Path, version: &str) {
    std::fs::write(
        dir.join("reload_version.py"),
        format!("VERSION = {version:?}\n"),
    )
    .unwrap();
}

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

/// `pyherd serve` with `workers` loading the handler file of `dir`, plus `extra` flags.
fn serve(dir: &Path, workers: usize, extra: &[&str]) -> Server {
    let mut cmd = pyherd(None);
    cmd.env("PYTHONPATH", dir);
    let handlers = dir
        .join("reload_handlers.py")
        .to_string_lossy()
        .into_owned();
    let workers = workers.to_string();
    let mut args = vec![
        "--workers",
        &workers,
        "--handlers",
        &handlers,
        "--queue-timeout-ms",
        "30000",
    ];
    args.extend_from_slice(extra);
    Server::start_with(cmd, &args)
}

/// HTTP clients calling `version` until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    answers: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(server: &Server, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let answers = Arc::new(AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|_| {
                let url = server.url("/v1/execute");
                let (stop, failures, answers) = (stop.clone(), failures.clone(), answers.clone());
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    let mut seen: Vec<String> = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let sent = client
                            .post(&url)
                            .json(&json!({"command": "version"}))
                            .send()
                            .await;
                        let (status, body) = match sent {
                            Ok(r) => (r.status().as_u16(), r.json::<Value>().await.ok()),
                            Err(e) => {
                                eprintln!("request failed: {e}");
                                (0, None)
                            }
                        };
                        match body.as_ref().and_then(|b| b["result"].as_str()) {
                            Some(v) if status == 200 => {
                                answers.fetch_add(1, Ordering::Relaxed);
                                if seen.last().map(String::as_str) != Some(v) {
                                    seen.push(v.to_owned());
                                }
                            }
                            _ => {
                                eprintln!("failed call: {status} {body:?}");
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
            answers,
            tasks,
        }
    }

    /// Waits until `n` more calls were answered.
    async fn more(&self, n: u64) {
        let from = self.answers.load(Ordering::Relaxed);
        let answers = self.answers.clone();
        wait_until(Duration::from_secs(30), "more answered calls", || {
            let answers = answers.clone();
            async move { answers.load(Ordering::Relaxed) >= from + n }
        })
        .await;
    }

    async fn finish(self) -> (u64, Vec<Vec<String>>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut seen = Vec::new();
        for task in self.tasks {
            seen.push(task.await.unwrap());
        }
        (self.failures.load(Ordering::Relaxed), seen)
    }
}

async fn pids(server: &Server) -> Vec<u32> {
    common::workers(server)
        .await
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

async fn sighup_reloads_under_load(extra: &[&str]) -> Server {
    let dir = handler_dir("v1");
    let server = serve(dir.path(), 3, extra);
    let old = pids(&server).await;
    let load = Load::start(&server, 4);
    load.more(50).await;
    write_version(dir.path(), "v2-new");
    common::signal(server.pid(), Signal::SIGHUP);
    wait_until(Duration::from_secs(60), "every worker replaced", || async {
        let workers = common::workers(&server).await;
        workers.len() == 3
            && workers
                .iter()
                .all(|(pid, state)| (state == "ready" || state == "busy") && !old.contains(pid))
    })
    .await;
    wait_until(
        Duration::from_secs(30),
        "the reload to be logged",
        || async { server.stderr().contains("reload done") },
    )
    .await;
    load.more(50).await;
    let (failures, seen) = load.finish().await;
    assert_eq!(failures, 0, "no HTTP call may fail during a reload");
    for versions in &seen {
        assert_eq!(versions.first().map(String::as_str), Some("v1"), "{seen:?}");
        assert_eq!(
            versions.last().map(String::as_str),
            Some("v2-new"),
            "{seen:?}"
        );
    }
    let log = server.stderr();
    for line in [
        "SIGHUP: reloading",
        "reload started",
        "reload: worker replaced",
    ] {
        assert!(log.contains(line), "{line:?} not logged:\n{log}");
    }
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("pyherd_worker_restarts_total{reason=\"reload\"} 3"),
        "{metrics}"
    );
    server
}

#[tokio::test]
async fn sighup_replaces_every_worker_under_http_load_with_no_failed_call() {
    let server = sighup_reloads_under_load(&[]).await;
    let workers = get_json(&server.url("/v1/workers")).await;
    assert!(
        workers["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["started_by"] == "spawn"),
        "{workers}"
    );
    assert!(server.terminate().success());
}

#[tokio::test]
async fn with_preload_sighup_forks_the_new_workers_from_a_new_zygote() {
    let server = sighup_reloads_under_load(&["--preload", "reload_version"]).await;
    let workers = get_json(&server.url("/v1/workers")).await;
    assert!(
        workers["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["started_by"] == "fork"),
        "{workers}"
    );
    let log = server.stderr();
    assert_eq!(
        log.matches("zygote ready").count(),
        2,
        "a second zygote:\n{log}"
    );
    assert!(server.terminate().success());
}

#[tokio::test]
async fn new_code_that_fails_to_import_keeps_the_old_workers_serving_and_is_logged() {
    let dir = handler_dir("v1");
    let server = serve(dir.path(), 2, &[]);
    let old = pids(&server).await;
    let load = Load::start(&server, 3);
    load.more(20).await;
    std::fs::write(
        dir.path().join("reload_version.py"),
        "raise RuntimeError('broken on purpose')\n",
    )
    .unwrap();
    common::signal(server.pid(), Signal::SIGHUP);
    wait_until(
        Duration::from_secs(30),
        "the failure to be logged",
        || async { server.stderr().contains("reload failed") },
    )
    .await;
    let log = server.stderr();
    assert!(log.contains("broken on purpose"), "{log}");
    assert!(log.contains("handler_import_failed"), "{log}");
    load.more(20).await;
    assert_eq!(pids(&server).await, old, "the old workers keep serving");

    // The same through the API: the error object says why.
    let (status, body) =
        common::request(reqwest::Method::POST, &server.url("/v1/reload"), None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["kind"], "handler_import_failed", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("reload stopped after 0 of 2 workers"),
        "{body}"
    );
    assert_eq!(pids(&server).await, old);

    write_version(dir.path(), "v3-fixed");
    let (status, body) =
        common::request(reqwest::Method::POST, &server.url("/v1/reload"), None).await;
    assert_eq!(status, 200, "{body}");
    let replaced = body["reload"]["workers"].as_array().unwrap();
    assert_eq!(replaced.len(), 2, "{body}");
    for w in replaced {
        assert!(
            old.contains(&(w["old_pid"].as_u64().unwrap() as u32)),
            "{body}"
        );
    }
    load.more(20).await;
    let (failures, seen) = load.finish().await;
    assert_eq!(failures, 0, "no HTTP call may fail");
    for versions in &seen {
        assert_eq!(
            versions.last().map(String::as_str),
            Some("v3-fixed"),
            "{seen:?}"
        );
    }
    assert!(server.terminate().success());
}
