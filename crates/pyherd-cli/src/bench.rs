//! `pyherd bench`: start a pool, send N calls from C concurrent callers, report
//! throughput and latency percentiles (text, or one JSON object with `--json`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use pyherd::{CallOptions, Pool, PoolBuilder};
use serde_json::value::RawValue;

use crate::settings::PoolArgs;

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// Calls to send
    #[arg(long, default_value_t = 10_000)]
    requests: u64,
    /// Callers sending at once
    #[arg(long, default_value_t = 64)]
    concurrency: u64,
    /// The handler to call
    #[arg(long, default_value = "echo")]
    command: String,
    /// Its arguments as JSON
    #[arg(long, default_value = "{}")]
    args: String,
    /// Run every call in this session
    #[arg(long)]
    session: Option<String>,
    /// A call made once before measuring, as COMMAND=ARGS_JSON (repeatable, in order; in
    /// the session when one is given), e.g. to configure an LM and create a program
    #[arg(long = "setup-call", value_name = "COMMAND=JSON")]
    setup_calls: Vec<String>,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
    /// Measure worker start instead of calls: the pool's start time and the PSS of its
    /// idle workers and zygote, then kill a worker N times and time each replacement
    #[arg(long, value_name = "N")]
    respawns: Option<u64>,
}

/// What one run measured.
struct Report {
    requests: u64,
    errors: u64,
    first_error: Option<String>,
    seconds: f64,
    latency: Histogram<u64>,
    startup: Duration,
}

pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<u8> {
    anyhow::ensure!(args.requests > 0, "--requests must be at least 1");
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let call_args = RawValue::from_string(args.args.clone()).context("--args is not valid JSON")?;
    let setup_calls = args
        .setup_calls
        .iter()
        .map(|text| parse_setup_call(text))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut options = CallOptions::new();
    if let Some(session) = &args.session {
        options = options.session_id(session.clone());
    }
    let settings = args.pool.resolve()?;
    if let Some(respawns) = args.respawns {
        return crate::bench_start::run(settings.pool, respawns, args.json).await;
    }
    let workers = settings.pool.workers;
    let began = Instant::now();
    let pool = PoolBuilder::from_config(settings.pool).build().await?;
    let startup = began.elapsed();
    let report = async {
        for (command, setup_args) in setup_calls {
            pool.execute_raw(&command, setup_args, &options)
                .await
                .with_context(|| format!("the setup call {command} failed"))?;
        }
        load(&pool, &args, call_args, &options, startup).await
    }
    .await;
    pool.shutdown().await;
    let report = report?;
    if args.json {
        crate::print_line(report.json())?;
    } else {
        crate::print_line(report.text(&args, workers))?;
    }
    Ok(if report.errors == 0 { 0 } else { 1 })
}

async fn load(
    pool: &Pool,
    args: &BenchArgs,
    call_args: Box<RawValue>,
    options: &CallOptions,
    startup: Duration,
) -> anyhow::Result<Report> {
    let progress = ProgressBar::new(args.requests);
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} calls  {elapsed} elapsed, eta {eta}")
            .context("progress bar template")?,
    );
    let next = Arc::new(AtomicU64::new(0));
    let command: Arc<str> = args.command.as_str().into();
    let began = Instant::now();
    let callers: Vec<_> = (0..args.concurrency.min(args.requests))
        .map(|_| {
            let (pool, next, command, call_args, progress, options) = (
                pool.clone(),
                next.clone(),
                command.clone(),
                call_args.clone(),
                progress.clone(),
                options.clone(),
            );
            let total = args.requests;
            tokio::spawn(async move {
                let mut latency = new_histogram()?;
                let mut errors = 0u64;
                let mut first_error = None;
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    let sent = Instant::now();
                    let raw = call_args.clone();
                    match pool.execute_raw(&command, raw, &options).await {
                        Ok(_) => {
                            let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                            latency.saturating_record(us.max(1));
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                    progress.inc(1);
                }
                anyhow::Ok((latency, errors, first_error))
            })
        })
        .collect();
    let mut latency = new_histogram()?;
    let mut errors = 0;
    let mut first_error = None;
    for caller in callers {
        let (h, e, first) = caller.await.context("a bench caller panicked")??;
        latency.add(&h).context("merging latency histograms")?;
        errors += e;
        first_error = first_error.or(first);
    }
    let seconds = began.elapsed().as_secs_f64();
    progress.finish_and_clear();
    Ok(Report {
        requests: args.requests,
        errors,
        first_error,
        seconds,
        latency,
        startup,
    })
}

/// `COMMAND=ARGS_JSON` of `--setup-call`.
fn parse_setup_call(text: &str) -> anyhow::Result<(String, Box<RawValue>)> {
    let (command, json) = text
        .split_once('=')
        .with_context(|| format!("--setup-call {text:?} is not COMMAND=ARGS_JSON"))?;
    let args = RawValue::from_string(json.to_owned())
        .with_context(|| format!("--setup-call {command}: the arguments are not valid JSON"))?;
    Ok((command.to_owned(), args))
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).context("latency histogram")
}

impl Report {
    fn throughput(&self) -> f64 {
        self.requests as f64 / self.seconds.max(f64::EPSILON)
    }

    fn json(&self) -> serde_json::Value {
        let q = |p: f64| self.latency.value_at_quantile(p);
        serde_json::json!({
            "requests": self.requests,
            "errors": self.errors,
            "seconds": self.seconds,
            "throughput_rps": self.throughput(),
            "latency_us": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": self.latency.max()},
            "startup_ms": self.startup.as_secs_f64() * 1e3,
        })
    }

    fn text(&self, args: &BenchArgs, workers: usize) -> String {
        let q = |p: f64| self.latency.value_at_quantile(p);
        let plural = |n: u64, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let mut text = format!(
            "{} × {} with {} on {} (ready in {:.0} ms)\n  {:.2} s, {:.0} calls/s, {} errors\n  \
             latency µs: p50 {}  p90 {}  p99 {}  max {}",
            self.requests,
            args.command,
            plural(args.concurrency, "caller"),
            plural(workers as u64, "worker"),
            self.startup.as_secs_f64() * 1e3,
            self.seconds,
            self.throughput(),
            self.errors,
            q(0.5),
            q(0.9),
            q(0.99),
            self.latency.max()
        );
        if let Some(e) = &self.first_error {
            text.push_str(&format!("\n  first error: {e}"));
        }
        text
    }
}
