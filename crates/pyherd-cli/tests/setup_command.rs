//! `pyherd setup`: a real virtual environment with a real (local) package installed by
//! pip, then used by `exec`; and its failures.

mod common;

use std::path::Path;
use std::process::Command;

use common::run;
use serde_json::Value;

/// Writes a minimal pure-Python wheel of the module `pyherd_probe` (VALUE = 42), so pip
/// installs something real without a package index.
fn probe_wheel(dir: &Path) -> String {
    let wheel = dir.join("pyherd_probe-1.0-py3-none-any.whl");
    let script = r#"
import base64, hashlib, sys, zipfile
info = "pyherd_probe-1.0.dist-info"
files = {
    "pyherd_probe.py": b"VALUE = 42\n",
    info + "/METADATA": b"Metadata-Version: 2.1\nName: pyherd-probe\nVersion: 1.0\n",
    info + "/WHEEL": b"Wheel-Version: 1.0\nGenerator: pyherd-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
with zipfile.ZipFile(sys.argv[1], "w") as z:
    for name, data in files.items():
        z.writestr(name, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(info + "/RECORD,,")
    z.writestr(info + "/RECORD", "\n".join(record) + "\n")
"#;
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(&wheel)
        .status()
        .unwrap();
    assert!(status.success());
    wheel.to_string_lossy().into_owned()
}

#[test]
fn setup_makes_an_environment_that_exec_then_uses() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let wheel = probe_wheel(dir.path());
    let (code, stdout, stderr) = run(&["setup", "--state-dir", state, "--requirement", &wheel]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("environment ready"), "{stdout}");
    // Progress was shown (plain lines when stderr is not a terminal).
    assert!(stderr.contains("pyherd setup: installing"), "{stderr}");
    let python = Path::new(state).join("venv/bin/python");
    let probe = Command::new(&python)
        .args(["-c", "import pyherd_probe; print(pyherd_probe.VALUE)"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&probe.stdout).trim(), "42");

    let (code, stdout, stderr) = run(&["exec", "--state-dir", state, "info"]);
    assert_eq!(code, Some(0), "{stderr}");
    let info: Value = serde_json::from_str(stdout.trim()).unwrap();
    let executable = info["executable"].as_str().unwrap();
    assert!(
        executable.starts_with(state),
        "{executable} is not in {state}"
    );
    // Naming an interpreter overrides the environment.
    let (code, stdout, _) = run(&["exec", "--state-dir", state, "--python", "python3", "info"]);
    assert_eq!(code, Some(0));
    assert!(!stdout.contains(state), "{stdout}");
    // Running it again installs into the same environment.
    let (code, _, stderr) = run(&["setup", "--state-dir", state, "--requirement", &wheel]);
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn setup_installs_the_requirements_of_the_configuration_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("from-file");
    let wheel = probe_wheel(dir.path());
    let config = dir.path().join("pyherd.toml");
    let text = format!(
        "state_dir = {:?}\nrequirements = [{wheel:?}]\n",
        state.to_str().unwrap()
    );
    std::fs::write(&config, &text).unwrap();
    let (code, stdout, stderr) = run(&["setup", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains(&format!("installing {wheel}")), "{stderr}");
    assert!(stdout.contains("serve, exec and bench use it"), "{stdout}");
    // PYHERD_PYTHON set: serve, exec and bench would run that interpreter, and it says so.
    let with_python_set = |args: &[&str]| {
        let out = common::pyherd(None)
            .env("PYHERD_PYTHON", "python3")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let config_arg = config.to_str().unwrap();
    let stdout = with_python_set(&["setup", "--config", config_arg]);
    assert!(
        stdout.contains("PYHERD_PYTHON names another interpreter"),
        "{stdout}"
    );
    let stdout = with_python_set(&["exec", "--config", config_arg, "info"]);
    assert!(!stdout.contains(state.to_str().unwrap()), "{stdout}");
    // A file that names the interpreter: the environment is made, and said to be unused.
    std::fs::write(&config, format!("{text}python = \"python3\"\n")).unwrap();
    let (code, stdout, stderr) = run(&["setup", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("do not use it"), "{stdout}");
    let probe = Command::new(state.join("venv/bin/python"))
        .args(["-c", "import pyherd_probe; print(pyherd_probe.VALUE)"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&probe.stdout).trim(), "42");
}

#[test]
fn setup_failures_say_what_failed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let missing = dir.path().join("missing-1.0-py3-none-any.whl");
    let (code, _, stderr) = run(&[
        "setup",
        "--state-dir",
        state,
        "--requirement",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("installing"), "{stderr}");
    assert!(stderr.contains("missing-1.0-py3-none-any.whl"), "{stderr}");
    // The environment it left (made, but without its requirements) is not used...
    assert!(Path::new(state).join("venv/bin/python").is_file());
    let (code, _, stderr) = run(&["exec", "--state-dir", state, "info"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("is not ready"), "{stderr}");
    // ...until a setup finishes there.
    let wheel = probe_wheel(dir.path());
    let (code, _, stderr) = run(&["setup", "--state-dir", state, "--requirement", &wheel]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stdout, stderr) = run(&["exec", "--state-dir", state, "info"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(state), "{stdout}");
    let (code, _, stderr) = run(&[
        "setup",
        "--state-dir",
        dir.path().join("other").to_str().unwrap(),
        "--python",
        "/nonexistent/python3",
    ]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("/nonexistent/python3"), "{stderr}");
}

/// An environment made another way (by hand, or by an older pyherd) has no mark of an
/// unfinished setup: it is used.
#[test]
fn an_environment_made_by_hand_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let status = Command::new("python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(state.join("venv"))
        .status()
        .unwrap();
    assert!(status.success());
    let state = state.to_str().unwrap();
    let (code, stdout, stderr) = run(&["exec", "--state-dir", state, "info"]);
    assert_eq!(code, Some(0), "{stderr}");
    let info: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(
        info["executable"].as_str().unwrap().starts_with(state),
        "{info}"
    );
}
