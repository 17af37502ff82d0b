//! `pyherd serve --preload`: workers are forked from a zygote and say so in /v1/workers;
//! a preload that fails is a warning and workers are spawned; a host killed with SIGKILL
//! takes its zygote and forked workers with it.

mod common;

use std::time::Duration;

use common::{Server, execute, get_json, wait_until};
use nix::sys::signal::Signal;
use serde_json::json;

/// (pid, started_by) of every worker.
async fn started_by(server: &Server) -> Vec<(u32, String)> {
    let body = get_json(&server.url("/v1/workers")).await;
    body["workers"]
        .as_array()
        .expect("a list of workers")
        .iter()
        .map(|w| {
            (
                w["pid"].as_u64().expect("a pid") as u32,
                w["started_by"].as_str().expect("started_by").to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_server_killed_with_sigkill_leaves_neither_zygote_nor_forked_worker() {
    let server = Server::start(&["--workers", "2", "--preload", "json"]);
    let workers = started_by(&server).await;
    assert_eq!(workers.len(), 2);
    assert!(workers.iter().all(|(_, how)| how == "fork"), "{workers:?}");
    assert_eq!(execute(&server, json!({"command": "ping"})).await.0, 200);
    // The zygote is the server's only child; the workers are the zygote's.
    let zygote = common::children_of(server.pid());
    assert_eq!(zygote.len(), 1, "{zygote:?}");
    let forked = common::children_of(zygote[0]);
    assert!(
        workers.iter().all(|(pid, _)| forked.contains(pid)),
        "{workers:?} are children of the zygote {forked:?}"
    );
    common::signal(server.pid(), Signal::SIGKILL);
    drop(server);
    let pids: Vec<u32> = workers.iter().map(|(pid, _)| *pid).chain(zygote).collect();
    wait_until(
        Duration::from_secs(5),
        "the zygote and its workers to exit",
        || async { pids.iter().all(|&pid| !common::running(pid)) },
    )
    .await;
}

#[tokio::test]
async fn a_preload_that_fails_to_import_is_a_warning_and_workers_are_spawned() {
    let server = Server::start(&["--workers", "1", "--preload", "no_such_module_for_pyherd"]);
    let workers = started_by(&server).await;
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].1, "spawn");
    assert_eq!(execute(&server, json!({"command": "ping"})).await.0, 200);
    let stderr = server.stderr();
    assert!(stderr.contains("preload failed"), "{stderr}");
    assert!(
        stderr.contains("preloading 'no_such_module_for_pyherd' failed: ModuleNotFoundError"),
        "{stderr}"
    );
}

#[tokio::test]
async fn preload_comes_from_the_environment_comma_separated() {
    let mut cmd = common::pyherd(None);
    cmd.env("PYHERD_PRELOAD", "json,no_such_module_for_pyherd");
    let server = Server::start_with(cmd, &["--workers", "1"]);
    let workers = started_by(&server).await;
    assert_eq!(workers[0].1, "spawn", "the second module fails: no zygote");
    let stderr = server.stderr();
    assert!(
        stderr.contains("preloading 'no_such_module_for_pyherd' failed"),
        "{stderr}"
    );
}

#[test]
fn bench_respawns_reports_start_times_memory_and_how_replacements_started() {
    let (code, stdout, stderr) = common::run(&[
        "bench",
        "--workers",
        "2",
        "--preload",
        "json",
        "--respawns",
        "3",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(report["started_by"], json!({"fork": 2}), "{report}");
    assert_eq!(report["respawn_started_by"], json!({"fork": 3}), "{report}");
    assert_eq!(report["respawn_ms"]["samples"], 3, "{report}");
    assert!(
        report["respawn_ms"]["max"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    let pss = &report["pss_kib"];
    assert!(pss["zygote"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(
        pss["total"].as_u64(),
        Some(pss["workers"].as_u64().unwrap() + pss["zygote"].as_u64().unwrap())
    );

    let (code, stdout, stderr) = common::run(&["bench", "--workers", "1", "--respawns", "1"]);
    assert_eq!(code, Some(0), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("pretty JSON");
    assert_eq!(report["zygote"], false, "{report}");
    assert_eq!(
        report["respawn_started_by"],
        json!({"spawn": 1}),
        "{report}"
    );
}

#[test]
fn bench_respawns_fails_when_a_replacement_never_starts() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let out = common::pyherd(None)
        .env("PYHERD_TEST_MARKER", &marker)
        .args([
            "bench",
            "--workers",
            "1",
            "--respawns",
            "1",
            "--startup-timeout-ms",
            "1000",
        ])
        .args(["--handlers", &common::fixture("start_once.py")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no replacement for worker"), "{stderr}");
}
