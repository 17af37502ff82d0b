//! `pyherd cleanup`: the registry sweep a pool runs at start, by hand, with a report.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use pyherd::registry::{SweepReport, sweep};

use crate::settings::{DEFAULT_FILE, DEFAULT_STATE_DIR, read_file};

#[derive(Args)]
pub(crate) struct CleanupArgs {
    /// Configuration file whose `state_dir` to use [default: ./pyherd.toml when it exists]
    #[arg(long, env = "PYHERD_CONFIG")]
    config: Option<PathBuf>,
    /// The state directory whose run registry to sweep [default: .pyherd]
    #[arg(long, env = "PYHERD_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Print the report as one JSON object
    #[arg(long)]
    json: bool,
}

/// Kills what runs whose host died left behind, prints what was killed and skipped.
/// Exits 0 whatever was found; only a bad configuration file is an error.
pub(crate) fn run(args: &CleanupArgs) -> anyhow::Result<u8> {
    let state_dir = match &args.state_dir {
        Some(dir) => dir.clone(),
        None => {
            let file = match &args.config {
                Some(path) => Some(read_file(path)?),
                None if Path::new(DEFAULT_FILE).is_file() => {
                    Some(read_file(Path::new(DEFAULT_FILE))?)
                }
                None => None,
            };
            file.and_then(|f| f.state_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
        }
    };
    let report = sweep(&state_dir);
    let text = if args.json {
        serde_json::to_string(&report).context("cannot write the report")?
    } else {
        render(&report)
    };
    crate::print_line(text)?;
    Ok(0)
}

fn render(report: &SweepReport) -> String {
    let mut lines = vec![format!(
        "swept {}: {} killed, {} skipped, {} run file(s) removed",
        report.state_dir.display(),
        report.killed.len(),
        report.skipped.len(),
        report.removed.len()
    )];
    for k in &report.killed {
        lines.push(format!(
            "killed  run {} worker {} pid {}{}",
            k.run_id,
            k.worker_id.as_deref().unwrap_or("-"),
            k.pid,
            if k.group {
                " (with its process group)"
            } else {
                ""
            }
        ));
    }
    for s in &report.skipped {
        let mut what = match &s.run_id {
            Some(run) => format!("run {run}"),
            None => format!("file {}", s.file.display()),
        };
        if let Some(worker) = &s.worker_id {
            what.push_str(&format!(" worker {worker}"));
        }
        if let Some(pid) = s.pid {
            what.push_str(&format!(" pid {pid}"));
        }
        let detail = if s.detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", s.detail)
        };
        lines.push(format!("skipped {what}: {}{detail}", s.reason));
    }
    for file in &report.removed {
        lines.push(format!("removed {}", file.display()));
    }
    lines.join("\n")
}
