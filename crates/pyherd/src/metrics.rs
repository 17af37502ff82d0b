//! Request metrics kept by the pool itself (no global recorder): latency histograms per
//! command and outcome and the queue wait, rendered in the Prometheus text format.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::pool::WorkerInfo;
use crate::worker::WorkerState;

/// Upper bounds of the latency buckets, in microseconds (rendered in seconds).
const BUCKETS_US: [u64; 18] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

/// The `command` label of calls to commands no worker has (kept apart so callers cannot
/// create unbounded label values).
pub(crate) const UNKNOWN_COMMAND: &str = "(unknown)";

#[derive(Default)]
struct Histogram {
    /// Observations by bucket, the last for those over every bound: the count is their
    /// sum, so a scrape never shows a bucket above `+Inf` while observations land.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, micros: u64) {
        let i = BUCKETS_US
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(micros, Ordering::Relaxed);
    }

    /// Observations so far.
    fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Writes the `_bucket`, `_sum` and `_count` samples of `name` with `labels` (rendered
    /// `key="value"` pairs, possibly none).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS_US.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = *bound as f64 / 1e6;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let count = cumulative + self.buckets[BUCKETS_US.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// The histograms of one command, by outcome (`ok` or an error kind).
#[derive(Default)]
struct CommandSeries {
    outcomes: RwLock<Vec<(Box<str>, Arc<Histogram>)>>,
}

impl CommandSeries {
    fn histogram(&self, outcome: &str) -> Option<Arc<Histogram>> {
        if let Some((_, h)) = self
            .outcomes
            .read()
            .ok()?
            .iter()
            .find(|(o, _)| &**o == outcome)
        {
            return Some(h.clone());
        }
        let mut outcomes = self.outcomes.write().ok()?;
        if let Some((_, h)) = outcomes.iter().find(|(o, _)| &**o == outcome) {
            return Some(h.clone());
        }
        let h = Arc::new(Histogram::default());
        outcomes.push((outcome.into(), h.clone()));
        Some(h)
    }
}

/// Histograms by command and outcome (`command` × `outcome` label pairs).
#[derive(Default)]
struct Family {
    commands: RwLock<HashMap<Box<str>, Arc<CommandSeries>>>,
}

impl Family {
    fn observe(&self, command: &str, outcome: &str, elapsed: Duration) {
        if let Some(h) = self.series(command).and_then(|s| s.histogram(outcome)) {
            h.observe(micros(elapsed));
        }
    }

    fn series(&self, command: &str) -> Option<Arc<CommandSeries>> {
        if let Some(s) = self.commands.read().ok()?.get(command) {
            return Some(s.clone());
        }
        let mut commands = self.commands.write().ok()?;
        Some(commands.entry(command.into()).or_default().clone())
    }

    /// Every series with its rendered labels, sorted by them.
    fn rows(&self) -> Vec<(String, Arc<Histogram>)> {
        let Ok(commands) = self.commands.read() else {
            return Vec::new();
        };
        let mut rows = Vec::new();
        for (command, series) in commands.iter() {
            if let Ok(outcomes) = series.outcomes.read() {
                for (outcome, h) in outcomes.iter() {
                    let labels = format!(
                        "command=\"{}\",outcome=\"{}\"",
                        escape(command),
                        escape(outcome)
                    );
                    rows.push((labels, h.clone()));
                }
            }
        }
        drop(commands);
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows
    }
}

/// Request metrics: calls by command and outcome (end to end, and their execution on a
/// worker) and the time calls waited in the queue.
#[derive(Default)]
pub(crate) struct Metrics {
    requests: Family,
    execution: Family,
    queue_wait: Histogram,
}

impl Metrics {
    /// Records one finished call (`elapsed` from submission to answer).
    pub(crate) fn observe(&self, command: &str, outcome: &str, elapsed: Duration) {
        self.requests.observe(command, outcome, elapsed);
    }

    /// Records one call's execution on a worker.
    pub(crate) fn executed(&self, command: &str, outcome: &str, elapsed: Duration) {
        self.execution.observe(command, outcome, elapsed);
    }

    /// Records the time a call waited before a worker took it.
    pub(crate) fn waited(&self, elapsed: Duration) {
        self.queue_wait.observe(micros(elapsed));
    }

    /// Appends `pyherd_requests_total`, `pyherd_request_duration_seconds`,
    /// `pyherd_request_execution_seconds` and `pyherd_queue_wait_seconds`.
    pub(crate) fn render(&self, out: &mut String) {
        let rows = self.requests.rows();
        header(
            out,
            "pyherd_requests_total",
            "counter",
            "Calls finished, by command and outcome (ok or the error kind).",
        );
        for (labels, h) in &rows {
            let _ = writeln!(out, "pyherd_requests_total{{{labels}}} {}", h.count());
        }
        header(
            out,
            "pyherd_request_duration_seconds",
            "histogram",
            "Time from submission to answer (queue wait plus execution, retries included), by command and outcome.",
        );
        for (labels, h) in &rows {
            h.render(out, "pyherd_request_duration_seconds", labels);
        }
        header(
            out,
            "pyherd_request_execution_seconds",
            "histogram",
            "Time a worker spent on a call (from sending it to its answer), by command and outcome.",
        );
        for (labels, h) in &self.execution.rows() {
            h.render(out, "pyherd_request_execution_seconds", labels);
        }
        header(
            out,
            "pyherd_queue_wait_seconds",
            "histogram",
            "Time calls waited in the queue before a worker took them.",
        );
        self.queue_wait.render(out, "pyherd_queue_wait_seconds", "");
    }
}

fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
}

/// Appends the per-worker families, `pyherd_worker_rss_bytes`,
/// `pyherd_worker_cpu_seconds_total` and `pyherd_worker_requests_total`, for the workers
/// that have a live process (labelled by worker id).
pub(crate) fn render_workers(out: &mut String, workers: &[WorkerInfo]) {
    let live: Vec<&WorkerInfo> = workers
        .iter()
        .filter(|w| w.state != WorkerState::Stopped && w.pid.is_some())
        .collect();
    header(
        out,
        "pyherd_worker_rss_bytes",
        "gauge",
        "Resident memory of each worker's Python process.",
    );
    for w in &live {
        if let Some(rss) = w.rss_bytes {
            let _ = writeln!(
                out,
                "pyherd_worker_rss_bytes{{worker=\"{}\"}} {rss}",
                escape(&w.id)
            );
        }
    }
    header(
        out,
        "pyherd_worker_cpu_seconds_total",
        "counter",
        "CPU time (user plus system) used by each worker's Python process.",
    );
    for w in &live {
        if let Some(cpu) = w.cpu_seconds {
            let _ = writeln!(
                out,
                "pyherd_worker_cpu_seconds_total{{worker=\"{}\"}} {cpu}",
                escape(&w.id)
            );
        }
    }
    header(
        out,
        "pyherd_worker_requests_total",
        "counter",
        "Calls answered by each worker's Python process.",
    );
    for w in &live {
        let _ = writeln!(
            out,
            "pyherd_worker_requests_total{{worker=\"{}\"}} {}",
            escape(&w.id),
            w.requests
        );
    }
}

/// Writes the `# HELP` and `# TYPE` lines of a metric family.
pub(crate) fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a label value (backslash, quote, newline).
pub(crate) fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labelled() {
        let m = Metrics::default();
        m.observe("echo", "ok", Duration::from_micros(80));
        m.observe("echo", "ok", Duration::from_millis(3));
        m.observe("echo", "queue_timeout", Duration::from_secs(5));
        m.executed("echo", "ok", Duration::from_micros(60));
        m.waited(Duration::from_millis(20));
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("pyherd_requests_total{command=\"echo\",outcome=\"ok\"} 2"));
        assert!(out.contains(
            "pyherd_request_execution_seconds_bucket{command=\"echo\",outcome=\"ok\",le=\"0.0001\"} 1"
        ));
        assert!(out.contains("pyherd_queue_wait_seconds_bucket{le=\"0.01\"} 0"));
        assert!(out.contains("pyherd_queue_wait_seconds_bucket{le=\"0.025\"} 1"));
        assert!(out.contains("pyherd_queue_wait_seconds_count 1"));
        assert!(out.contains("pyherd_queue_wait_seconds_sum 0.02"));
        assert!(out.contains("pyherd_request_duration_seconds_bucket{command=\"echo\",outcome=\"ok\",le=\"0.0001\"} 1"));
        assert!(out.contains(
            "pyherd_request_duration_seconds_bucket{command=\"echo\",outcome=\"ok\",le=\"0.005\"} 2"
        ));
        assert!(out.contains(
            "pyherd_request_duration_seconds_bucket{command=\"echo\",outcome=\"ok\",le=\"+Inf\"} 2"
        ));
        assert!(out.contains(
            "pyherd_request_duration_seconds_count{command=\"echo\",outcome=\"queue_timeout\"} 1"
        ));
        assert!(out.contains(
            "pyherd_request_duration_seconds_sum{command=\"echo\",outcome=\"queue_timeout\"} 5"
        ));
    }

    #[test]
    fn an_observation_over_every_bound_counts_in_inf_only() {
        let m = Metrics::default();
        m.waited(Duration::from_secs(100));
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains("pyherd_queue_wait_seconds_bucket{le=\"60\"} 0"),
            "{out}"
        );
        assert!(
            out.contains("pyherd_queue_wait_seconds_bucket{le=\"+Inf\"} 1"),
            "{out}"
        );
        assert!(out.contains("pyherd_queue_wait_seconds_count 1"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
