//! `pyherd bench --respawns N`: how fast workers start, and what they cost in memory.
//!
//! Builds the pool (its start time is the time until every worker is ready), reads the
//! proportional set size of its idle workers and zygote from `/proc/<pid>/smaps_rollup`,
//! then SIGKILLs a worker N times (one slot after another) and times each replacement from
//! the kill until the pool shows it ready. The kill comes first, so each figure is an
//! upper bound of the time from the host noticing the death to the replacement's hello.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pyherd::{Pool, PoolBuilder, PoolConfig, WorkerState};

/// How often the pool is looked at while a replacement starts.
const POLL: Duration = Duration::from_micros(100);

/// Runs the measurement; prints text, or one JSON object with `json`.
pub(crate) async fn run(config: PoolConfig, respawns: u64, json: bool) -> anyhow::Result<u8> {
    // A replacement that takes longer than two start-ups is failing to start.
    let limit = config.startup_timeout * 2;
    let began = Instant::now();
    let pool = PoolBuilder::from_config(config).build().await?;
    let startup = began.elapsed();
    let report = measure(&pool, startup, respawns, limit).await;
    pool.shutdown().await;
    let report = report?;
    if json {
        crate::print_line(report)?;
    } else {
        crate::print_line(serde_json::to_string_pretty(&report)?)?;
    }
    Ok(0)
}

async fn measure(
    pool: &Pool,
    startup: Duration,
    respawns: u64,
    limit: Duration,
) -> anyhow::Result<serde_json::Value> {
    let workers = pool.workers();
    let pids: Vec<u32> = workers.iter().filter_map(|w| w.pid).collect();
    let worker_pss = pids
        .iter()
        .map(|&p| pss_kib(p))
        .sum::<anyhow::Result<u64>>()?;
    let zygote_pss = pool.zygote_pid().map(pss_kib).transpose()?.unwrap_or(0);
    let first_started_by = count(workers.iter().map(|w| w.started_by.as_str()));

    let mut times = Vec::new();
    let mut replaced_by = Vec::new();
    for i in 0..respawns {
        let slot = usize::try_from(i)? % workers.len();
        let (time, how) = respawn(pool, slot, limit).await?;
        times.push(time.as_secs_f64() * 1e3);
        replaced_by.push(how);
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = ((times.len() as f64 - 1.0) * q).round() as usize;
        times.get(i).copied().unwrap_or(0.0)
    };
    Ok(serde_json::json!({
        "workers": workers.len(),
        "startup_ms": startup.as_secs_f64() * 1e3,
        "started_by": first_started_by,
        "zygote": pool.zygote_pid().is_some(),
        "pss_kib": {"workers": worker_pss, "zygote": zygote_pss, "total": worker_pss + zygote_pss},
        "respawn_ms": {
            "samples": times.len(), "min": at(0.0), "p50": at(0.5), "p90": at(0.9), "max": at(1.0),
        },
        "respawn_started_by": count(replaced_by.iter().map(String::as_str)),
    }))
}

/// SIGKILLs the worker in `slot` and waits until a replacement is ready there; the time
/// from the kill, and how the replacement was started.
async fn respawn(pool: &Pool, slot: usize, limit: Duration) -> anyhow::Result<(Duration, String)> {
    let old = pool
        .workers()
        .get(slot)
        .and_then(|w| w.pid)
        .context("the slot has no worker")?;
    let pool = pool.clone();
    tokio::task::spawn_blocking(move || {
        let pid = i32::try_from(old).context("pid")?;
        let killed = Instant::now();
        kill(Pid::from_raw(pid), Signal::SIGKILL).context("kill the worker")?;
        loop {
            let workers = pool.workers();
            let ready = workers
                .get(slot)
                .filter(|w| w.state == WorkerState::Ready && w.pid.is_some_and(|p| p != old));
            if let Some(w) = ready {
                return Ok((killed.elapsed(), w.started_by.as_str().to_owned()));
            }
            if killed.elapsed() > limit {
                bail!("no replacement for worker {old} within {limit:?}");
            }
            std::thread::sleep(POLL);
        }
    })
    .await
    .context("the respawn timer panicked")?
}

/// How many times each name occurs.
fn count<'a>(names: impl Iterator<Item = &'a str>) -> BTreeMap<&'a str, u64> {
    let mut counts = BTreeMap::new();
    for name in names {
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// Proportional set size of a process in KiB, from `/proc/<pid>/smaps_rollup`.
fn pss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    text.lines()
        .find_map(|line| line.strip_prefix("Pss:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no Pss line in {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pss_is_read_from_smaps_rollup_and_a_missing_process_is_named() {
        let own = pss_kib(std::process::id()).unwrap();
        assert!(own > 100, "{own} KiB");
        let e = pss_kib(u32::MAX).unwrap_err();
        assert!(format!("{e:#}").contains("smaps_rollup"), "{e:#}");
        let counts = count(["fork", "spawn", "fork"].into_iter());
        assert_eq!(counts.get("fork"), Some(&2));
    }
}
