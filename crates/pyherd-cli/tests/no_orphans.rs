//! No orphans: a `pyherd serve` killed with SIGKILL while its workers run calls leaves no
//! process of its run (not even a handler's own child); stale registry entries of dead
//! runs (and the temporary files their hosts died writing) are swept by `pyherd cleanup`
//! and by the next pool start, PID-reuse safe; broken files never crash either.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, execute, pyherd, running, wait_until};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(10);

/// Pids (other than this test's) carrying `run_id`: `PYHERD_RUN_ID` in the environment
/// or the id as a command-line argument. Zombies carry neither.
fn marked(run_id: &str) -> Vec<u32> {
    let me = std::process::id();
    let var = format!("PYHERD_RUN_ID={run_id}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let has = |block: &[u8], item: &[u8]| block.split(|&b| b == 0).any(|e| e == item);
        if has(&environ, var.as_bytes()) || has(&cmdline, run_id.as_bytes()) {
            found.push(pid);
        }
    }
    found
}

/// Field 22 of `/proc/<pid>/stat`.
fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap()
}

/// A fresh run id for a fake run.
fn fake_run_id(n: u32) -> String {
    format!("{:08x}{:08x}", std::process::id(), n)
}

/// A sleeping Python process carrying `run_id` (argument and environment), in its own
/// session, whose parent has exited: nobody in this test owns or reaps it.
fn detached_marked(run_id: &str, worker_id: &str) -> u32 {
    let script = "import os, subprocess, sys\n\
        rid, wid = sys.argv[1], sys.argv[2]\n\
        env = dict(os.environ, PYHERD_RUN_ID=rid, PYHERD_WORKER_ID=wid)\n\
        p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', '--run-id', rid],\n\
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n\
        print(p.pid)\n";
    let out = Command::new("python3")
        .args(["-c", script, run_id, worker_id])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// An unrelated process (no marker), owned by the test.
fn unrelated() -> Child {
    Command::new("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

/// Kills what a test started, should it fail half-way: detached processes only while
/// they still carry the test's run id (so a reused pid is never hit).
struct Leftovers {
    run_ids: Vec<String>,
    children: Vec<Child>,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for run_id in &self.run_ids {
            for pid in marked(run_id) {
                common::signal(pid, Signal::SIGKILL);
            }
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes a run file whose host is this test process with a wrong start time: a dead run.
fn stale_run(state: &Path, run_id: &str, host_start: u64, workers: &[(&str, u32, u64)]) -> PathBuf {
    let runs = state.join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    let workers: Vec<Value> = workers
        .iter()
        .map(|&(id, pid, start)| {
            json!({"worker_id": id, "run_id": run_id, "pid": pid, "pgid": pid, "start_time": start})
        })
        .collect();
    let record = json!({
        "version": 1,
        "run_id": run_id,
        "host": {"pid": std::process::id(), "start_time": host_start},
        "workers": workers,
    });
    let file = runs.join(format!("{run_id}.json"));
    std::fs::write(&file, serde_json::to_vec(&record).unwrap()).unwrap();
    file
}

fn cleanup(state: &Path, json_out: bool) -> (Option<i32>, String, String) {
    let mut cmd = pyherd(None);
    cmd.args(["cleanup", "--state-dir"]).arg(state);
    if json_out {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn wait_dead(pids: &[u32], what: &str) {
    wait_until(LIMIT, what, || async { pids.iter().all(|&p| !running(p)) }).await;
}

#[tokio::test]
async fn sigkill_of_serve_with_calls_running_leaves_no_process_of_its_run_within_2_s() {
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(&[
        "--workers",
        "2",
        "--handlers",
        "pyherd_worker.testing",
        "--state-dir",
        state.path().to_str().unwrap(),
    ]);
    let (code, body) = execute(&server, json!({"command": "spawn_child"})).await;
    assert_eq!(code, 200, "{body}");
    let grandchild = body["result"]["pid"].as_u64().unwrap() as u32;
    let files: Vec<PathBuf> = std::fs::read_dir(state.path().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let file = files[0].clone();
    let run_id = file.file_stem().unwrap().to_string_lossy().into_owned();
    let _leftovers = Leftovers {
        run_ids: vec![run_id.clone()],
        children: Vec::new(),
    };
    assert!(server.stderr().contains(&format!("run_id={run_id}")));
    // Every worker (the one with its own child among them) is in a call when the host dies.
    let client = reqwest::Client::new();
    let sleep = json!({"command": "sleep", "args": {"seconds": 600}, "timeout_ms": 600_000});
    let calls: Vec<_> = (0..2)
        .map(|_| tokio::spawn(client.post(server.url("/v1/execute")).json(&sleep).send()))
        .collect();
    wait_until(LIMIT, "both workers to run a call", || async {
        common::workers(&server)
            .await
            .iter()
            .all(|(_, state)| state == "busy")
    })
    .await;
    let workers: Vec<u32> = common::workers(&server)
        .await
        .into_iter()
        .map(|(pid, _)| pid)
        .collect();
    let before = marked(&run_id);
    for pid in workers.iter().chain([&grandchild]) {
        assert!(before.contains(pid), "{pid} not marked among {before:?}");
    }
    assert!(running(grandchild));

    common::signal(server.pid(), Signal::SIGKILL);
    let killed = Instant::now();
    let mut left = marked(&run_id);
    while !left.is_empty() && killed.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(2));
        left = marked(&run_id);
    }
    let took = killed.elapsed();
    assert!(left.is_empty(), "still running 2 s after SIGKILL: {left:?}");
    eprintln!(
        "the last process of the run was gone {} ms after SIGKILL",
        took.as_millis()
    );
    assert!(!running(grandchild));
    for call in calls {
        let answer = call.await.unwrap();
        assert!(answer.is_err(), "a call outlived its host: {answer:?}");
    }
    drop(server);
    wait_until(LIMIT, "the guardian to remove the run file", || async {
        !file.exists()
    })
    .await;
    let (code, out, err) = cleanup(state.path(), true);
    assert_eq!(code, Some(0), "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["killed"], json!([]), "{report}");
    assert_eq!(report["skipped"], json!([]), "{report}");
}

#[tokio::test]
async fn cleanup_kills_a_dead_runs_processes_and_spares_reused_pids_and_live_runs() {
    let state = tempfile::tempdir().unwrap();
    let dead = fake_run_id(1);
    let live = fake_run_id(2);
    let mut leftovers = Leftovers {
        run_ids: vec![dead.clone(), live.clone()],
        children: vec![unrelated(), unrelated()],
    };
    let recorded = detached_marked(&dead, "w1");
    let its_child = detached_marked(&dead, "w1");
    let (same_start, other_start) = (leftovers.children[0].id(), leftovers.children[1].id());
    let dead_file = stale_run(
        state.path(),
        &dead,
        1,
        &[
            ("w1", recorded, start_time(recorded)),
            ("w2", same_start, start_time(same_start)),
            ("w3", other_start, start_time(other_start) + 1),
        ],
    );
    let live_worker = detached_marked(&live, "w1");
    let me = start_time(std::process::id());
    let live_file = stale_run(
        state.path(),
        &live,
        me,
        &[("w1", live_worker, start_time(live_worker))],
    );
    std::fs::write(state.path().join("runs").join("corrupt.json"), "{").unwrap();

    let (code, out, err) = cleanup(state.path(), true);
    assert_eq!(code, Some(0), "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let mut killed: Vec<(u64, String, bool)> = report["killed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            assert_eq!(k["run_id"], dead, "{report}");
            (
                k["pid"].as_u64().unwrap(),
                k["worker_id"].as_str().unwrap().to_owned(),
                k["group"].as_bool().unwrap(),
            )
        })
        .collect();
    killed.sort();
    let mut expected = vec![
        (u64::from(recorded), "w1".to_owned(), true),
        (u64::from(its_child), "w1".to_owned(), false),
    ];
    expected.sort();
    assert_eq!(killed, expected, "{report}");
    let skipped: Vec<(Value, Value, &str)> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["pid"].clone(),
                s["run_id"].clone(),
                s["reason"].as_str().unwrap(),
            )
        })
        .collect();
    for entry in [
        (json!(same_start), json!(dead), "no_marker"),
        (json!(other_start), json!(dead), "start_time_differs"),
        (json!(std::process::id()), json!(live), "host_alive"),
        (Value::Null, Value::Null, "unreadable"),
    ] {
        assert!(skipped.contains(&entry), "{entry:?} not in {report}");
    }
    assert_eq!(skipped.len(), 4, "{report}");
    assert_eq!(report["removed"], json!([dead_file]));
    assert!(!dead_file.exists() && live_file.exists());
    wait_dead(&[recorded, its_child], "the dead run's processes to die").await;
    assert!(running(same_start) && running(other_start) && running(live_worker));

    // The same sweep again, for a person: nothing more to kill, what is left is said.
    let (code, out, err) = cleanup(state.path(), false);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("swept "), "{out}");
    assert!(out.contains("0 killed, 2 skipped"), "{out}");
    let host = std::process::id();
    assert!(
        out.contains(&format!("skipped run {live} pid {host}: host_alive")),
        "{out}"
    );
    assert!(out.contains("corrupt.json: unreadable"), "{out}");
    leftovers.children.iter_mut().for_each(|c| {
        let _ = c.kill();
    });
}

/// `<run file>.tmp`: the temporary file a host writes before renaming it over its run file.
fn temp_of(file: &Path) -> PathBuf {
    file.with_extension("json.tmp")
}

#[tokio::test]
async fn cleanup_removes_the_temporary_files_dead_runs_left_and_keeps_those_of_live_runs() {
    let state = tempfile::tempdir().unwrap();
    let me = start_time(std::process::id());
    // A host that died rewriting its run file: the file and a part of the next record.
    let died_writing = stale_run(state.path(), &fake_run_id(5), 1, &[]);
    std::fs::write(temp_of(&died_writing), r#"{"version": 1, "ru"#).unwrap();
    // A whole record never renamed, its run file gone (removed by its guardian, say),
    // with a worker still running: the temporary file is the run's record.
    let orphaned = fake_run_id(6);
    let leftovers = Leftovers {
        run_ids: vec![orphaned.clone()],
        children: Vec::new(),
    };
    let worker = detached_marked(&orphaned, "w1");
    let file = stale_run(
        state.path(),
        &orphaned,
        1,
        &[("w1", worker, start_time(worker))],
    );
    let orphaned_temp = temp_of(&file);
    std::fs::rename(&file, &orphaned_temp).unwrap();
    // Live runs (their host is this process) in the middle of a write: a part beside the
    // run file, and a first record not yet renamed.
    let live = stale_run(state.path(), &fake_run_id(7), me, &[]);
    std::fs::write(temp_of(&live), r#"{"vers"#).unwrap();
    let first = stale_run(state.path(), &fake_run_id(8), me, &[]);
    let first_temp = temp_of(&first);
    std::fs::rename(&first, &first_temp).unwrap();
    // The start of a first record: whose it is cannot be told.
    let unknown = temp_of(
        &state
            .path()
            .join("runs")
            .join(format!("{}.json", fake_run_id(9))),
    );
    std::fs::write(&unknown, "").unwrap();

    let (code, out, err) = cleanup(state.path(), true);
    assert_eq!(code, Some(0), "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        report["removed"],
        json!([died_writing, temp_of(&died_writing), orphaned_temp]),
        "{report}"
    );
    assert_eq!(
        report["killed"],
        json!([{"pid": worker, "worker_id": "w1", "run_id": orphaned, "group": true}]),
        "{report}"
    );
    let skipped: Vec<(Value, &str)> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["file"].clone(), s["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        skipped,
        [
            (json!(live), "host_alive"),
            (json!(first_temp), "host_alive"),
            (json!(unknown), "unreadable"),
        ],
        "{report}"
    );
    for kept in [&live, &temp_of(&live), &first_temp, &unknown] {
        assert!(kept.exists(), "{} was removed", kept.display());
    }
    wait_dead(&[worker], "the orphaned run's worker to die").await;
    drop(leftovers);

    // For a person: one more dead run's record never renamed, and what is left.
    let file = stale_run(state.path(), &fake_run_id(10), 1, &[]);
    std::fs::rename(&file, temp_of(&file)).unwrap();
    let (code, out, err) = cleanup(state.path(), false);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("0 killed, 3 skipped, 1 run file(s) removed"),
        "{out}"
    );
    assert!(
        out.contains(&format!("removed {}", temp_of(&file).display())),
        "{out}"
    );
    assert!(!temp_of(&file).exists());
}

#[tokio::test]
async fn the_next_pool_start_sweeps_a_dead_run() {
    let state = tempfile::tempdir().unwrap();
    let dead = fake_run_id(3);
    let leftovers = Leftovers {
        run_ids: vec![dead.clone()],
        children: vec![unrelated()],
    };
    let recorded = detached_marked(&dead, "w1");
    let its_child = detached_marked(&dead, "w1");
    let reused = leftovers.children[0].id();
    let file = stale_run(
        state.path(),
        &dead,
        1,
        &[
            ("w1", recorded, start_time(recorded)),
            ("w2", reused, start_time(reused) + 1),
        ],
    );
    let out = pyherd(None)
        .args(["exec", "--workers", "1", "--state-dir"])
        .arg(state.path())
        .arg("ping")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("killed a process left by a dead run"),
        "{stderr}"
    );
    assert!(!file.exists());
    wait_dead(&[recorded, its_child], "the dead run's processes to die").await;
    assert!(running(reused));
}

#[test]
fn an_unwritable_state_dir_is_a_warning_and_the_call_still_runs() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "").unwrap();
    let out = pyherd(None)
        .args(["exec", "--workers", "1", "--state-dir"])
        .arg(blocker.join("state"))
        .arg("ping")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("cannot write the run registry"), "{stderr}");
    let (code, out, err) = cleanup(&blocker.join("state"), false);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("0 killed, 1 skipped"), "{out}");
    assert!(out.contains("runs: unreadable"), "{out}");
}

/// `pyherd` run as a user without rights over `root`'s files: `nobody` through setpriv when
/// the tests run as root (root could read and remove anything), else the current user.
fn pyherd_unprivileged() -> Command {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0");
    if root {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            common::BIN,
        ]);
        cmd
    } else {
        pyherd(None)
    }
}

#[test]
fn files_a_sweep_cannot_read_or_remove_are_reported_and_it_still_exits_zero() {
    use std::os::unix::fs::PermissionsExt;
    let state = tempfile::tempdir().unwrap();
    let dead = fake_run_id(4);
    let file = stale_run(state.path(), &dead, 1, &[]);
    let secret = state.path().join("runs").join("secret.json");
    std::fs::write(&secret, "{}").unwrap();
    let mode = |path: &Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    mode(&secret, 0o000);
    mode(&state.path().join("runs"), 0o555);
    mode(state.path(), 0o755);
    let out = pyherd_unprivileged()
        .args(["cleanup", "--json", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    mode(&state.path().join("runs"), 0o755);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let reasons: Vec<(&str, &str)> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["file"].as_str().unwrap().rsplit('/').next().unwrap(),
                s["reason"].as_str().unwrap(),
            )
        })
        .collect();
    let dead_name = format!("{dead}.json");
    let mut expected = vec![
        (dead_name.as_str(), "remove_failed"),
        ("secret.json", "unreadable"),
    ];
    expected.sort_unstable();
    let mut reasons = reasons;
    reasons.sort_unstable();
    assert_eq!(reasons, expected, "{report}");
    assert_eq!(report["removed"], json!([]));
    assert!(file.exists());
}

#[test]
fn cleanup_reads_the_state_dir_of_the_configuration_file_and_reports_its_failures() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pyherd.toml");
    let state = dir.path().join("state");
    std::fs::write(
        &config,
        format!("state_dir = {:?}\n", state.to_str().unwrap()),
    )
    .unwrap();
    let out = pyherd(None)
        .args(["cleanup", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["state_dir"], json!(state));
    let out = pyherd(None)
        .args(["cleanup", "--config"])
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = pyherd(None)
        .args(["cleanup", "--state-dir"])
        .arg(&state)
        .stdout(full)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot write to stdout"));
}
