//! The run registry of a real pool: its id on every worker, its file while the pool runs
//! (rewritten as workers come and go, removed at the end), a start-up sweep that survives
//! broken files, and a state directory that cannot be written.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{testing_pool, wait_until, worker_pids};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(20);

/// Field 22 of `/proc/<pid>/stat` and the process group (field 5).
fn start_time_and_group(pid: u32) -> (u64, i64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    (fields[19].parse().unwrap(), fields[2].parse().unwrap())
}

fn read_record(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn recorded_pids(path: &Path) -> BTreeSet<u32> {
    read_record(path)["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap() as u32)
        .collect()
}

#[tokio::test]
async fn the_file_lists_the_host_and_each_live_worker_and_goes_at_shutdown() {
    let state = tempfile::tempdir().unwrap();
    let pool = testing_pool(2)
        .state_dir(state.path())
        .build()
        .await
        .unwrap();
    let run_id = pool.run_id().to_owned();
    assert_eq!(run_id.len(), 16);
    assert!(run_id.chars().all(|c| c.is_ascii_hexdigit()));
    let file = pool.registry_file().unwrap().to_path_buf();
    assert_eq!(
        file,
        std::path::absolute(state.path().join("runs").join(format!("{run_id}.json"))).unwrap()
    );
    let record = read_record(&file);
    assert_eq!(record["version"], 1);
    assert_eq!(record["run_id"], run_id);
    let me = std::process::id();
    assert_eq!(record["host"]["pid"], me);
    assert_eq!(record["host"]["start_time"], start_time_and_group(me).0);
    let pids: BTreeSet<u32> = worker_pids(&pool).into_iter().collect();
    assert_eq!(recorded_pids(&file), pids);
    for w in record["workers"].as_array().unwrap() {
        let pid = w["pid"].as_u64().unwrap() as u32;
        let (start, group) = start_time_and_group(pid);
        assert_eq!(w["start_time"], start);
        assert_eq!(w["pgid"], group);
        assert_eq!(group, i64::from(pid), "a worker leads its own group");
        assert_eq!(w["run_id"], run_id);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let marker = format!("--run-id\0{run_id}\0");
        assert!(
            cmdline
                .windows(marker.len())
                .any(|w| w == marker.as_bytes()),
            "{}",
            String::from_utf8_lossy(&cmdline)
        );
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let var = format!("PYHERD_RUN_ID={run_id}");
        assert!(environ.split(|&b| b == 0).any(|e| e == var.as_bytes()));
    }
    assert!(
        !std::fs::read_dir(state.path().join("runs"))
            .unwrap()
            .any(|e| e.unwrap().path().extension().is_some_and(|x| x == "tmp")),
        "no temporary file is left beside the record"
    );

    // A worker dies: the file follows the replacement.
    let victim = *pids.iter().next().unwrap();
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    wait_until(LIMIT, "the file to list the replacement", || {
        let now = recorded_pids(&file);
        now.len() == 2 && !now.contains(&victim)
    })
    .await;
    assert_eq!(
        recorded_pids(&file),
        worker_pids(&pool).into_iter().collect()
    );

    pool.shutdown().await;
    drop(pool);
    wait_until(LIMIT, "the file to be removed", || !file.exists()).await;
}

#[tokio::test]
async fn an_unwritable_state_dir_runs_without_a_file_and_workers_still_carry_the_run_id() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "").unwrap();
    let pool = testing_pool(1)
        .state_dir(blocker.join("state"))
        .build()
        .await
        .unwrap();
    assert!(pool.registry_file().is_none());
    let pid = worker_pids(&pool)[0];
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let var = format!("PYHERD_RUN_ID={}", pool.run_id());
    assert!(environ.split(|&b| b == 0).any(|e| e == var.as_bytes()));
    assert_eq!(
        pool.execute("echo", json!({"a": 1})).await.unwrap(),
        json!({"a": 1})
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn broken_files_in_the_registry_do_not_stop_a_pool_and_are_kept() {
    let state = tempfile::tempdir().unwrap();
    let runs = state.path().join("runs");
    std::fs::create_dir_all(runs.join("unreadable.json")).unwrap();
    std::fs::write(runs.join("corrupt.json"), "{ not json").unwrap();
    std::fs::write(
        runs.join("future.json"),
        r#"{"version": 99, "run_id": "x", "host": {"pid": 1, "start_time": 1}, "workers": []}"#,
    )
    .unwrap();
    let pool = testing_pool(1)
        .state_dir(state.path())
        .build()
        .await
        .unwrap();
    assert_eq!(pool.execute("ping", json!({})).await.unwrap()["pong"], true);
    pool.shutdown().await;
    for name in ["unreadable.json", "corrupt.json", "future.json"] {
        assert!(runs.join(name).exists(), "{name} was removed");
    }
}

#[test]
fn the_sweep_reports_broken_files_and_ignores_a_missing_directory() {
    let state = tempfile::tempdir().unwrap();
    let report = pyherd::registry::sweep(&state.path().join("nowhere"));
    assert!(report.killed.is_empty() && report.skipped.is_empty() && report.removed.is_empty());
    let runs = state.path().join("runs");
    std::fs::create_dir_all(runs.join("unreadable.json")).unwrap();
    std::fs::write(runs.join("corrupt.json"), "[]").unwrap();
    std::fs::write(
        runs.join("future.json"),
        r#"{"version": 99, "run_id": "x", "host": {"pid": 1, "start_time": 1}, "workers": []}"#,
    )
    .unwrap();
    std::fs::write(runs.join("notes.txt"), "not a run file").unwrap();
    let report = pyherd::registry::sweep(state.path());
    let reasons: Vec<(String, &str)> = report
        .skipped
        .iter()
        .map(|s| {
            (
                s.file.file_name().unwrap().to_string_lossy().into_owned(),
                s.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("corrupt.json".to_owned(), "unreadable"),
            ("future.json".to_owned(), "unreadable"),
            ("unreadable.json".to_owned(), "unreadable"),
        ]
    );
    assert!(report.skipped[0].detail.contains("not a run record"));
    assert!(report.skipped[1].detail.contains("format version 99"));
    assert!(report.skipped[2].detail.contains("cannot be read"));
    assert!(report.removed.is_empty());
    // A runs "directory" that is a file cannot be listed: reported, not fatal.
    let odd = tempfile::tempdir().unwrap();
    std::fs::write(odd.path().join("runs"), "").unwrap();
    let report = pyherd::registry::sweep(odd.path());
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].reason.as_str(), "unreadable");
}
