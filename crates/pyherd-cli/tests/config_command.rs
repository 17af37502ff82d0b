//! `pyherd config` (the effective configuration and where each value came from) and
//! `pyherd completions`, as a user runs them.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

/// `pyherd <args>` in `dir` with the extra environment; exit code, stdout, stderr.
fn pyherd(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = common::pyherd(Some(dir));
    cmd.envs(env.iter().copied()).args(args);
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `pyherd config --json` in `dir`: the report.
fn report(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Value {
    let args = [&["config", "--json"][..], args].concat();
    let (code, stdout, stderr) = pyherd(dir, env, &args);
    assert_eq!(code, Some(0), "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

fn entry<'a>(report: &'a Value, key: &str) -> &'a Value {
    report["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == key)
        .unwrap_or_else(|| panic!("no setting {key} in {report}"))
}

/// The long flags a subcommand's `--help` lists, but `--help` itself.
fn flags_of(subcommand: &str) -> BTreeSet<String> {
    let (code, help, _) = common::run(&[subcommand, "--help"]);
    assert_eq!(code, Some(0));
    help.split_whitespace()
        .filter_map(|word| word.strip_prefix("--"))
        // `--workers`, `--workers,` or `--dspy[=<DSPY>]`: the name is what comes first.
        .filter_map(|flag| {
            flag.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .next()
                .map(|name| name.trim_end_matches('-').to_owned())
        })
        .filter(|flag| !flag.is_empty() && flag != "help")
        .collect()
}

#[test]
fn each_value_is_reported_with_the_source_that_won() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pyherd.toml"),
        "workers = 3\nqueue_timeout_ms = 250\nmax_queue = 7\nkill_timeout_ms = 900\nmax_streams = 3\n\
         token = \"config-token-0123456789\"\n",
    )
    .unwrap();
    let env = [
        ("PYHERD_MAX_QUEUE", "9"),
        ("PYHERD_REQUEST_TIMEOUT_MS", "1234"),
        ("PYHERD_WORKERS", "4"),
        ("PYHERD_DSPY", "true"),
        ("PYHERD_MAX_CONNECTIONS", "9"),
    ];
    let report = report(
        dir.path(),
        &env,
        &[
            "--workers",
            "5",
            "--bind",
            "127.0.0.1:9",
            "--body-timeout-ms",
            "500",
        ],
    );
    assert_eq!(report["file"], "pyherd.toml");
    let check = |key: &str, value: Value, source: &str, origin: Option<&str>| {
        let e = entry(&report, key);
        assert_eq!(
            (&e["value"], e["source"].as_str()),
            (&value, Some(source)),
            "{e}"
        );
        assert_eq!(e["origin"].as_str(), origin, "{e}");
    };
    // flag > env > file > default, for each layer that is present.
    check("workers", 5.into(), "flag", Some("--workers"));
    check("bind", "127.0.0.1:9".into(), "flag", Some("--bind"));
    check("max_queue", 9.into(), "env", Some("PYHERD_MAX_QUEUE"));
    check(
        "request_timeout_ms",
        1234.into(),
        "env",
        Some("PYHERD_REQUEST_TIMEOUT_MS"),
    );
    check("dspy", true.into(), "env", Some("PYHERD_DSPY"));
    check("queue_timeout_ms", 250.into(), "file", Some("pyherd.toml"));
    check("kill_timeout_ms", 900.into(), "file", Some("pyherd.toml"));
    check("max_sessions", 10_000.into(), "default", None);
    check("session_ttl_ms", 3_600_000.into(), "default", None);
    check("session_sweep_interval_ms", 60_000.into(), "default", None);
    check("affinity", "hint".into(), "default", None);
    check("requirements", json!(["dspy==3.4.1"]), "default", None);
    check("max_requests", Value::Null, "default", None);
    check("idle_spin_us", 100.into(), "default", None);
    // The server's settings, resolved like the pool's; the token never shown.
    check(
        "body_timeout_ms",
        500.into(),
        "flag",
        Some("--body-timeout-ms"),
    );
    check(
        "max_connections",
        9.into(),
        "env",
        Some("PYHERD_MAX_CONNECTIONS"),
    );
    check("max_streams", 3.into(), "file", Some("pyherd.toml"));
    check("header_timeout_ms", 10_000.into(), "default", None);
    check("token", "***".into(), "file", Some("pyherd.toml"));
    check("insecure", false.into(), "default", None);
    let handlers = &entry(&report, "handlers")["value"];
    assert_eq!(handlers[0], "pyherd_worker.dspy_adapter", "{handlers}");

    // The table says the same, one line per setting.
    let (code, text, _) = pyherd(dir.path(), &env, &["config", "--workers", "5"]);
    assert_eq!(code, Some(0));
    let line = |key: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("no line for {key}:\n{text}"))
            .to_owned()
    };
    assert!(line("workers").ends_with("flag (--workers)"), "{text}");
    assert!(
        line("max_queue").ends_with("env (PYHERD_MAX_QUEUE)"),
        "{text}"
    );
    assert!(
        line("queue_timeout_ms").ends_with("file (pyherd.toml)"),
        "{text}"
    );
    assert!(line("max_sessions").ends_with("default"), "{text}");
    assert!(line("max_requests").contains(" none "), "{text}");
    assert!(line("insecure").contains(" false "), "{text}");

    // --config names another file.
    let other = dir.path().join("other.toml");
    std::fs::write(&other, "max_sessions = 5\n").unwrap();
    let report = report_with_config(dir.path(), &other);
    assert_eq!(entry(&report, "max_sessions")["value"], 5);
    assert_eq!(entry(&report, "workers")["source"], "default");
    assert_eq!(entry(&report, "config")["source"], "flag");
}

/// A switch turned on in the file is turned off by its variable set to false (or by
/// `--switch=false`): the environment beats the file for switches too.
#[test]
fn a_switch_on_in_the_file_is_turned_off_by_the_environment_or_a_flag() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pyherd.toml"),
        "dspy = true\ninsecure = true\n",
    )
    .unwrap();
    let on = report(dir.path(), &[], &[]);
    for key in ["dspy", "insecure"] {
        assert_eq!(entry(&on, key)["value"], true, "{key}");
    }
    let env = [("PYHERD_DSPY", "false"), ("PYHERD_INSECURE", "0")];
    let off = report(dir.path(), &env, &[]);
    for key in ["dspy", "insecure"] {
        assert_eq!(entry(&off, key)["value"], false, "{key}");
        assert_eq!(entry(&off, key)["source"], "env", "{key}");
    }
    assert_eq!(entry(&off, "handlers")["value"], json!([]));
    let flags = report(dir.path(), &[], &["--dspy=false", "--insecure=false"]);
    for key in ["dspy", "insecure"] {
        assert_eq!(entry(&flags, key)["value"], false, "{key}");
        assert_eq!(entry(&flags, key)["source"], "flag", "{key}");
    }
    let on = report(dir.path(), &[("PYHERD_DSPY", "false")], &["--dspy"]);
    assert_eq!(entry(&on, "dspy")["value"], true);
    // A word that is neither yes nor no is refused, not taken as on.
    for (env, args) in [
        (&[][..], &["config", "--insecure=disable"][..]),
        (&[("PYHERD_DSPY", "nope")], &["config"]),
    ] {
        let (code, _, stderr) = pyherd(dir.path(), env, args);
        assert_eq!(code, Some(2), "{args:?} {env:?}: {stderr}");
    }
    // `config` serves nothing, so it does not warn about serving without a token.
    let (code, _, stderr) = pyherd(dir.path(), &[], &["config", "--bind", "0.0.0.0:7878"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("serving without a token"), "{stderr}");
}

#[test]
fn the_cache_directory_of_the_environment_or_its_flag_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pyherd.toml"),
        "cache_dir = \"/from/file\"\n",
    )
    .unwrap();
    let cache = dir.path().join("cache");
    let cache = cache.to_str().unwrap();
    let env = [("PYHERD_CACHE_DIR", cache)];
    let from_env = report(dir.path(), &env, &[]);
    let e = entry(&from_env, "cache_dir");
    assert_eq!(e["value"], cache, "{e}");
    assert_eq!(e["source"], "env", "{e}");
    assert_eq!(e["origin"], "PYHERD_CACHE_DIR", "{e}");
    assert_eq!(from_env["unknown_env"], json!([]));
    // The flag beats the variable.
    let flagged = dir.path().join("flagged");
    let flagged = flagged.to_str().unwrap();
    let with_flag = report(dir.path(), &env, &["--cache-dir", flagged]);
    let e = entry(&with_flag, "cache_dir");
    assert_eq!(e["value"], flagged, "{e}");
    assert_eq!(e["origin"], "--cache-dir", "{e}");
    // The pool uses it too: the worker package is written there.
    let (code, stdout, stderr) = pyherd(dir.path(), &env, &["exec", "--workers", "1", "ping"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("pong"), "{stdout}");
    let written = std::fs::read_dir(cache).unwrap().flatten();
    assert!(
        written
            .map(|d| d.file_name())
            .any(|n| n.to_string_lossy().starts_with("worker-")),
        "nothing written to {cache}"
    );
}

fn report_with_config(dir: &Path, file: &Path) -> Value {
    report(dir, &[], &["--config", file.to_str().unwrap()])
}

#[test]
fn every_flag_of_serve_is_a_setting_of_config() {
    let dir = tempfile::tempdir().unwrap();
    let serve = flags_of("serve");
    assert!(
        serve.contains("max-queue") && serve.contains("bind"),
        "{serve:?}"
    );
    let config = flags_of("config");
    let missing: Vec<_> = serve.difference(&config).collect();
    assert!(missing.is_empty(), "config does not take {missing:?}");
    let report = report(dir.path(), &[], &[]);
    let keys: BTreeSet<String> = report["settings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap().to_owned())
        .collect();
    for flag in &serve {
        assert!(
            keys.contains(&flag.replace('-', "_")),
            "--{flag} is not reported"
        );
    }
    // The file-only keys are there too.
    for key in ["kill_timeout_ms", "env", "working_dir", "requirements"] {
        assert!(keys.contains(key), "{key}");
    }
}

#[test]
fn unknown_file_keys_are_refused_and_unknown_variables_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pyherd.toml"), "wrokers = 2\n").unwrap();
    let (code, _, stderr) = pyherd(dir.path(), &[], &["config"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("wrokers"), "{stderr}");
    // The hint names the keys of the pool, the server and the rest of the file alike.
    for key in [
        "workers",
        "kill_timeout_ms",
        "bind",
        "token_file",
        "max_streams",
        "dspy",
    ] {
        assert!(stderr.contains(&format!("`{key}`")), "{key}: {stderr}");
    }
    std::fs::remove_file(dir.path().join("pyherd.toml")).unwrap();

    let env = [
        ("PYHERD_WROKERS", "2"),
        ("PYHERD_LOG", "warn"),
        ("PYHERD_URL", "http://127.0.0.1:1"),
    ];
    let report = report(dir.path(), &env, &[]);
    assert_eq!(report["unknown_env"], serde_json::json!(["PYHERD_WROKERS"]));
    let (code, _, stderr) = pyherd(dir.path(), &env, &["config"]);
    assert_eq!(code, Some(0));
    assert!(
        stderr.contains("PYHERD_WROKERS is not a pyherd setting"),
        "{stderr}"
    );
    assert!(!stderr.contains("PYHERD_LOG"), "{stderr}");
    assert!(!stderr.contains("PYHERD_URL"), "{stderr}");
    // The commands that run a pool say it too.
    let (code, stdout, stderr) = pyherd(dir.path(), &env, &["exec", "--workers", "1", "ping"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("pong"), "{stdout}");
    assert!(stderr.contains("PYHERD_WROKERS"), "{stderr}");
    assert!(!stderr.contains("PYHERD_URL"), "{stderr}");
}

#[test]
fn a_bad_value_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = pyherd(dir.path(), &[("PYHERD_MAX_QUEUE", "0")], &["config"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("max_queue"), "{stderr}");
    let (code, _, stderr) = pyherd(dir.path(), &[], &["config", "--bind", "nowhere"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("nowhere"), "{stderr}");
    // What `serve` refuses, `config` refuses too: a short token, a missing token file,
    // a non-loopback address without a token.
    for (env, args, says) in [
        (&[("PYHERD_TOKEN", "short")][..], &["config"][..], "token"),
        (
            &[],
            &["config", "--token-file", "/nonexistent/token"],
            "/nonexistent/token",
        ),
        (
            &[],
            &["config", "--bind", "0.0.0.0:7878"],
            "refusing to listen",
        ),
    ] {
        let (code, _, stderr) = pyherd(dir.path(), env, args);
        assert_ne!(code, Some(0), "{args:?}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[test]
fn completion_scripts_name_the_subcommands_and_bash_accepts_its_own() {
    let (code, bash, _) = common::run(&["completions", "bash"]);
    assert_eq!(code, Some(0));
    for sub in [
        "serve",
        "exec",
        "bench",
        "setup",
        "cleanup",
        "config",
        "completions",
    ] {
        assert!(bash.contains(sub), "{sub} missing");
    }
    assert!(bash.contains("--max-queue"));
    let mut check = Command::new("bash")
        .arg("-n")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(bash.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for shell in ["zsh", "fish"] {
        let (code, script, _) = common::run(&["completions", shell]);
        assert_eq!(code, Some(0));
        assert!(
            script.contains("serve") && script.contains("max-queue"),
            "{shell}"
        );
    }
    let (code, _, stderr) = common::run(&["completions", "tcsh"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("tcsh"), "{stderr}");
}
