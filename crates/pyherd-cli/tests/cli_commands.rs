//! `pyherd exec` and `pyherd bench` as a user runs them.

mod common;

use common::run;
use serde_json::Value;

#[test]
fn exec_prints_the_result_on_stdout() {
    let (code, stdout, _) = run(&["exec", "echo", r#"{"a": [1, "ü"]}"#]);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v, serde_json::json!({"a": [1, "ü"]}));
    let (code, stdout, _) = run(&["exec", "ping"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("\"pong\":true"), "{stdout}");
}

/// A stdout closed before the result is written (`pyherd exec … | true`) is a plain
/// failure (exit 1, said on stderr), for `exec` and `serve` alike, not a panic.
#[test]
fn a_closed_stdout_is_an_error_not_a_panic() {
    for args in [
        &["exec", "ping"][..],
        &["serve", "--bind", "127.0.0.1:0", "--workers", "1"],
    ] {
        let mut child = common::pyherd(None)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("cannot write to stdout"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// Relative paths (the interpreter, the state and cache directories) are the host's, even
/// when the workers run in another `working_dir`; a `working_dir` that is not a directory
/// is refused by name.
#[test]
fn relative_paths_are_the_hosts_whatever_the_workers_working_dir() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .unwrap();
    let python = String::from_utf8(out.stdout).unwrap();
    std::fs::create_dir(dir.path().join("bin")).unwrap();
    std::os::unix::fs::symlink(python.trim(), dir.path().join("bin/py")).unwrap();
    std::fs::write(
        dir.path().join("pyherd.toml"),
        format!(
            "working_dir = {:?}\n",
            elsewhere.path().display().to_string()
        ),
    )
    .unwrap();
    let out = common::pyherd(Some(dir.path()))
        .args([
            "exec",
            "--python",
            "bin/py",
            "--state-dir",
            "st",
            "--cache-dir",
            "cache",
            "ping",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("pong"));
    assert!(dir.path().join("cache").is_dir() && dir.path().join("st").is_dir());
    std::fs::write(
        dir.path().join("pyherd.toml"),
        "working_dir = \"/nonexistent-dir\"\n",
    )
    .unwrap();
    let out = common::pyherd(Some(dir.path()))
        .args(["exec", "ping"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("working_dir must name an existing directory"),
        "{stderr}"
    );
}

#[test]
fn exec_prints_errors_as_json_on_stderr_with_an_exit_code_per_category() {
    let cases: [(&[&str], i32, &str); 4] = [
        (&["exec", "no_such"], 2, "unknown_command"),
        (&["exec", "echo", "{broken"], 2, "malformed_request"),
        (
            &["exec", "--handlers", "pyherd_worker.testing", "raise_error"],
            4,
            "python_exception",
        ),
        (
            &[
                "exec",
                "--handlers",
                "pyherd_worker.testing",
                "--request-timeout-ms",
                "200",
                "sleep",
                r#"{"seconds": 30}"#,
            ],
            5,
            "execution_timeout",
        ),
    ];
    for (args, exit, kind) in cases {
        let (code, stdout, stderr) = run(args);
        assert_eq!(code, Some(exit), "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        let line = stderr.lines().last().unwrap();
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {stderr}"));
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"]["kind"], kind, "{args:?}");
    }
}

#[test]
fn bench_reports_throughput_and_latency_as_json() {
    let (code, stdout, stderr) = run(&[
        "bench",
        "--workers",
        "2",
        "--requests",
        "500",
        "--concurrency",
        "8",
        "--command",
        "echo",
        "--args",
        r#"{"x": 1}"#,
        "--json",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["requests"], 500);
    assert_eq!(v["errors"], 0);
    assert!(v["seconds"].as_f64().unwrap() > 0.0);
    assert!(v["throughput_rps"].as_f64().unwrap() > 0.0);
    let lat = &v["latency_us"];
    let (p50, p90, p99, max) = (
        lat["p50"].as_u64().unwrap(),
        lat["p90"].as_u64().unwrap(),
        lat["p99"].as_u64().unwrap(),
        lat["max"].as_u64().unwrap(),
    );
    assert!(0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= max, "{lat}");
    assert!(v["startup_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_text_output_and_failing_calls() {
    let (code, stdout, _) = run(&[
        "bench",
        "--workers",
        "1",
        "--requests",
        "50",
        "--concurrency",
        "4",
    ]);
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("calls/s") && stdout.contains("p99"),
        "{stdout}"
    );
    let (code, stdout, _) = run(&[
        "bench",
        "--workers",
        "1",
        "--requests",
        "20",
        "--command",
        "nope",
    ]);
    assert_eq!(code, Some(1), "errors make bench fail");
    assert!(
        stdout.contains("20 errors") && stdout.contains("unknown_command"),
        "{stdout}"
    );
    let (code, _, stderr) = run(&["bench", "--requests", "0"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("--requests"), "{stderr}");
}

#[test]
fn bench_runs_dspy_programs_in_a_session_after_its_setup_calls() {
    let lm = r#"configure_lm={"provider": "dummy", "answers": {"": {"answer": "42"}}}"#;
    let program = r#"create_program={"id": "qa", "signature": "question -> answer"}"#;
    let (code, stdout, stderr) = run(&[
        "bench",
        "--dspy",
        "--workers",
        "2",
        "--session",
        "bench",
        "--setup-call",
        lm,
        "--setup-call",
        program,
        "--command",
        "execute_program",
        "--args",
        r#"{"program_id": "qa", "inputs": {"question": "why?"}}"#,
        "--requests",
        "100",
        "--concurrency",
        "4",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        (v["requests"].as_u64(), v["errors"].as_u64()),
        (Some(100), Some(0))
    );
    // Without the session, execute_program has no program to run: every call fails.
    let (code, stdout, _) = run(&[
        "bench",
        "--dspy",
        "--workers",
        "1",
        "--command",
        "execute_program",
        "--requests",
        "5",
    ]);
    assert_eq!(code, Some(1));
    assert!(stdout.contains("session_required"), "{stdout}");
    for bad in [
        "configure_lm",
        "configure_lm={broken",
        r#"configure_lm={"provider": "dummy"}"#,
    ] {
        let (code, _, stderr) = run(&[
            "bench",
            "--dspy",
            "--workers",
            "1",
            "--session",
            "s",
            "--setup-call",
            bad,
        ]);
        assert_ne!(code, Some(0), "{bad}");
        assert!(
            stderr.contains("setup-call") || stderr.contains("setup call"),
            "{bad}: {stderr}"
        );
    }
}

#[test]
fn exec_runs_a_call_in_a_session() {
    let (code, stdout, stderr) = run(&[
        "exec",
        "--handlers",
        "pyherd_worker.testing",
        "--session",
        "cli-1",
        "ctx_info",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["session_id"], "cli-1");
    let (code, _, stderr) = run(&["exec", "--session", "bad id", "echo"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("invalid_id"), "{stderr}");
}

#[test]
fn every_worker_state_transition_is_logged_with_its_fields() {
    let out = common::pyherd(None)
        .env("PYHERD_LOG", "trace")
        .args(["exec", "echo", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let transitions: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("worker state"))
        .collect();
    for (from, to, reason) in [
        ("starting", "ready", "started"),
        ("ready", "busy", "call"),
        ("busy", "ready", "answered"),
        ("ready", "draining", "shutdown"),
        ("draining", "stopped", "shutdown"),
    ] {
        let needle = format!("from=\"{from}\" to=\"{to}\" reason=\"{reason}\" ms=");
        assert!(
            transitions
                .iter()
                .any(|l| l.contains("worker=w1 pid=") && l.contains(&needle)),
            "no {needle} in\n{stderr}"
        );
    }
    assert_eq!(transitions.len(), 5, "{stderr}");
}

#[test]
fn exec_idempotent_retries_a_call_that_crashed_its_worker() {
    let dir = tempfile::tempdir().unwrap();
    let args = serde_json::json!({
        "marker": dir.path().join("marker"),
        "log": dir.path().join("log"),
    })
    .to_string();
    let flaky = common::fixture("flaky.py");
    let base = ["exec", "--handlers", flaky.as_str(), "--retry-base-ms", "5"];
    let (code, stdout, stderr) =
        run(&[&base[..], &["--idempotent", "crash_first", &args]].concat());
    assert_eq!(code, Some(0), "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert_eq!(log.lines().collect::<Vec<_>>(), ["w1", "w2"]);
    assert_eq!(v["worker"], "w2");
    std::fs::remove_file(dir.path().join("marker")).unwrap();
    let (code, _, stderr) = run(&[&base[..], &["crash_first", &args]].concat());
    assert_eq!(code, Some(6), "{stderr}");
    assert!(stderr.contains("worker_crashed"), "{stderr}");
}

#[test]
fn bad_retry_settings_are_refused_by_name() {
    let (code, _, stderr) = run(&["exec", "--retry-backoff", "quadratic", "ping"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("quadratic") && stderr.contains("retry_backoff"),
        "{stderr}"
    );
    let (code, _, stderr) = run(&["exec", "--retry-attempts", "0", "ping"]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("retry_attempts"), "{stderr}");
    let (code, _, stderr) = run(&["exec", "--breaker-open-ms", "0", "ping"]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("breaker_open"), "{stderr}");
}

#[test]
fn bench_draws_a_progress_bar_on_a_terminal_only() {
    let args = ["bench", "--workers", "1", "--requests", "300"];
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        !stderr.contains("calls") && !stdout.contains("300/300"),
        "{stderr}"
    );
    // On a terminal (a pseudo-terminal from Python's pty), the bar is drawn as the calls
    // go, then cleared for the report.
    let mut command = common::pyherd(None);
    command.args(args);
    let program = command.get_program().to_owned();
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import pty, sys; sys.exit(pty.spawn(sys.argv[1:]) >> 8)",
        ])
        .arg(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let terminal = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{terminal}");
    let drawn = terminal.matches("/300 calls").count();
    assert!(drawn >= 2, "{terminal}");
    assert!(
        terminal.contains("on 1 worker (ready in"),
        "the report follows: {terminal}"
    );
}

#[test]
fn each_flag_is_described_once_in_help() {
    for sub in ["serve", "exec", "bench", "config", "setup"] {
        let (code, help, stderr) = run(&[sub, "--help"]);
        assert_eq!(code, Some(0), "{sub}: {stderr}");
        let said = help.matches("Where pyherd keeps its state").count();
        assert_eq!(said, 1, "{sub} --help:\n{help}");
        assert_eq!(
            help.matches("[default: .pyherd]").count(),
            1,
            "{sub}:\n{help}"
        );
    }
}
