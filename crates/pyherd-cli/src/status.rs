//! `pyherd status`: the workers and stats of a running `pyherd serve`, as a table or
//! JSON, once or refreshed every second (`--watch`).

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};

/// How often `--watch` refreshes.
const REFRESH: Duration = Duration::from_secs(1);
/// Longest wait for the server's answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Clears the terminal and moves the cursor home.
const CLEAR: &str = "\x1b[2J\x1b[H";

#[derive(Args)]
pub(crate) struct StatusArgs {
    /// Base URL of the server
    #[arg(long, env = "PYHERD_URL", default_value = "http://127.0.0.1:7878")]
    url: String,
    /// Bearer token, sent as `Authorization: Bearer <token>`
    #[arg(long, env = "PYHERD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Refresh every second until Ctrl-C
    #[arg(long)]
    watch: bool,
    /// Print one JSON object `{"stats": …, "workers": […]}` (one line per refresh)
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: StatusArgs) -> anyhow::Result<u8> {
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("cannot build the HTTP client")?;
    let base = args.url.trim_end_matches('/');
    let fetch = || fetch(&client, base, args.token.as_deref());
    if !args.watch {
        let (stats, workers) = fetch().await?;
        crate::print_line(render(&args, base, &stats, &workers))?;
        return Ok(0);
    }
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut ticks = tokio::time::interval(REFRESH);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (stats, workers) = tokio::select! {
            _ = interrupt.recv() => return Ok(0),
            fetched = async { ticks.tick().await; fetch().await } => fetched?,
        };
        let text = render(&args, base, &stats, &workers);
        if args.json {
            crate::print_line(&text)?;
        } else {
            crate::print_line(format_args!("{CLEAR}{text}"))?;
        }
    }
}

/// `/v1/stats` and the `workers` array of `/v1/workers`.
async fn fetch(
    client: &reqwest::Client,
    base: &str,
    token: Option<&str>,
) -> anyhow::Result<(Value, Value)> {
    let get = |path: &'static str| async move {
        let url = format!("{base}{path}");
        let mut request = client.get(&url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the pyherd server at {base}"))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .with_context(|| format!("{url} did not answer with JSON ({status})"))?;
        if !status.is_success() {
            let message = body["error"]["message"].as_str().unwrap_or("no message");
            bail!("{url} answered {status}: {message}");
        }
        Ok(body)
    };
    let (stats, workers) = futures::try_join!(get("/v1/stats"), get("/v1/workers"))?;
    Ok((stats, workers["workers"].clone()))
}

fn render(args: &StatusArgs, base: &str, stats: &Value, workers: &Value) -> String {
    if args.json {
        return json!({ "stats": stats, "workers": workers }).to_string();
    }
    let mut out = String::new();
    let n = |key: &str| stats[key].as_u64().unwrap_or(0);
    let _ = writeln!(
        out,
        "pyherd at {base}: {} workers ({} ready, {} busy, {} starting, {} degraded, {} draining), {} queued",
        n("workers"),
        n("available"),
        n("busy"),
        n("starting"),
        n("degraded"),
        n("draining"),
        n("queued"),
    );
    let _ = writeln!(
        out,
        "requests {}, errors {}, queue timeouts {}, restarts {}, retries {}, sessions {}{}",
        n("requests"),
        n("errors"),
        n("queue_timeouts"),
        n("restarts"),
        n("retries"),
        stats["sessions"]["live"].as_u64().unwrap_or(0),
        if stats["spawn_failing"] == true {
            ", SPAWN FAILING"
        } else {
            ""
        },
    );
    out.push('\n');
    let rows: Vec<[String; 7]> = workers
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|w| {
            let text = |key: &str| w[key].as_str().unwrap_or("-").to_owned();
            let number = |key: &str| {
                w[key]
                    .as_u64()
                    .map_or_else(|| "-".to_owned(), |v| v.to_string())
            };
            [
                text("id"),
                text("state"),
                number("pid"),
                w["rss_bytes"].as_u64().map_or_else(|| "-".to_owned(), mib),
                number("requests"),
                text("started_by"),
                w["uptime_ms"].as_u64().map_or_else(|| "-".to_owned(), age),
            ]
        })
        .collect();
    let header = ["ID", "STATE", "PID", "RSS", "REQUESTS", "STARTED_BY", "AGE"].map(str::to_owned);
    let mut widths = header.each_ref().map(String::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out.truncate(out.trim_end().len());
    out
}

/// Bytes in MiB with one decimal.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// An age as `42s`, `5m12s` or `3h07m`.
fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{:.1}s", ms as f64 / 1000.0),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_sizes_read_well() {
        assert_eq!(age(1_250), "1.2s");
        assert_eq!(age(312_000), "5m12s");
        assert_eq!(age(11_220_000), "3h07m");
        assert_eq!(mib(25 << 20), "25.0 MiB");
    }

    #[test]
    fn the_table_has_a_row_per_worker_and_tolerates_missing_fields() {
        let args = StatusArgs {
            url: String::new(),
            token: None,
            watch: false,
            json: false,
        };
        let stats = json!({"workers": 2, "available": 1, "busy": 1, "requests": 7});
        let workers = json!([
            {"id": "w1", "state": "ready", "pid": 41, "rss_bytes": 1048576, "requests": 3,
             "started_by": "spawn", "uptime_ms": 61000},
            {"id": "w2", "state": "starting"}
        ]);
        let text = render(&args, "http://x", &stats, &workers);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("pyherd at http://x: 2 workers (1 ready, 1 busy"),
            "{text}"
        );
        assert!(lines[1].starts_with("requests 7, errors 0"), "{text}");
        assert_eq!(
            lines[3].split_whitespace().collect::<Vec<_>>(),
            ["ID", "STATE", "PID", "RSS", "REQUESTS", "STARTED_BY", "AGE"]
        );
        assert_eq!(
            lines[4].split_whitespace().collect::<Vec<_>>(),
            ["w1", "ready", "41", "1.0", "MiB", "3", "spawn", "1m01s"]
        );
        assert_eq!(
            lines[5].split_whitespace().collect::<Vec<_>>(),
            ["w2", "starting", "-", "-", "-", "-", "-"]
        );
    }
}
