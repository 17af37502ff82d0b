//! `pyherd setup`: a Python virtual environment in the state directory with the
//! configured requirements (default: dspy). `serve`, `exec` and `bench` use it when it
//! exists and no interpreter is named.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::settings::{PoolArgs, venv_incomplete, venv_python};

/// Lines of pip's output kept to explain a failure.
const TAIL_LINES: usize = 30;

#[derive(Args)]
pub(crate) struct SetupArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// A pip requirement to install instead of the configured ones (repeatable)
    #[arg(long = "requirement")]
    requirements: Vec<String>,
}

/// Shows progress: a spinner with the latest line on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {elapsed:>4} {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Self { bar }
    }

    fn step(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(line.trim().to_owned()),
            None => eprintln!("pyherd setup: {}", line.trim_end()),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

pub(crate) async fn run(args: SetupArgs) -> anyhow::Result<u8> {
    let settings = args.pool.resolve_for_setup()?;
    let requirements = if args.requirements.is_empty() {
        settings.requirements
    } else {
        args.requirements
    };
    let venv = settings.state_dir.join("venv");
    let python = venv_python(&settings.state_dir);
    // Marked incomplete while it changes: a setup that fails or is cut short leaves it
    // unused.
    std::fs::create_dir_all(&venv)
        .with_context(|| format!("cannot create the environment {}", venv.display()))?;
    let incomplete = venv_incomplete(&settings.state_dir);
    std::fs::write(&incomplete, "")
        .with_context(|| format!("cannot write {}", incomplete.display()))?;
    let progress = Progress::new();
    if !python.is_file() {
        progress.step(&format!("creating the environment {}", venv.display()));
        let base = settings.pool.python.as_os_str();
        run_step(
            Command::new(base).arg("-m").arg("venv").arg(&venv),
            &progress,
        )
        .await
        .with_context(|| {
            format!(
                "`{} -m venv {}` failed",
                Path::new(base).display(),
                venv.display()
            )
        })?;
    }
    if !requirements.is_empty() {
        progress.step(&format!("installing {}", requirements.join(" ")));
        run_step(
            Command::new(&python)
                .args(["-m", "pip", "install", "--disable-pip-version-check"])
                .args(["--progress-bar", "off"])
                .args(&requirements),
            &progress,
        )
        .await
        .with_context(|| format!("installing {} failed", requirements.join(" ")))?;
    }
    progress.finish();
    let version = Command::new(&python)
        .args(["-c", "import sys; print(sys.version.split()[0])"])
        .output()
        .await
        .with_context(|| format!("cannot run {}", python.display()))?;
    std::fs::remove_file(&incomplete)
        .with_context(|| format!("cannot remove {}", incomplete.display()))?;
    let used = if settings.python_in_file {
        "the configuration file names another interpreter (`python`), so serve, exec and bench do not use it"
    } else if std::env::var_os("PYHERD_PYTHON").is_some() {
        "PYHERD_PYTHON names another interpreter, so serve, exec and bench do not use it while it is set"
    } else {
        "serve, exec and bench use it"
    };
    crate::print_line(format_args!(
        "pyherd: environment ready at {} (Python {}, {}); {used}",
        venv.display(),
        String::from_utf8_lossy(&version.stdout).trim(),
        if requirements.is_empty() {
            "no requirements".to_owned()
        } else {
            requirements.join(", ")
        }
    ))?;
    Ok(0)
}

/// Runs one command, showing its output as progress; fails with its last lines.
async fn run_step(command: &mut Command, progress: &Progress) -> anyhow::Result<()> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start it")?;
    let (lines, mut incoming) = mpsc::unbounded_channel();
    if let Some(out) = child.stdout.take() {
        forward(out, lines.clone());
    }
    if let Some(err) = child.stderr.take() {
        forward(err, lines);
    }
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    while let Some(line) = incoming.recv().await {
        progress.step(&line);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let status = child.wait().await.context("cannot wait for it")?;
    if !status.success() {
        progress.finish();
        let tail: Vec<String> = tail.into();
        bail!("{status}; its last output:\n{}", tail.join("\n"));
    }
    Ok(())
}

fn forward(stream: impl AsyncRead + Unpin + Send + 'static, lines: mpsc::UnboundedSender<String>) {
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
}
