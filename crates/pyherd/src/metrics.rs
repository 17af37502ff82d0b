//! Request metrics kept by the pool itself (no global recorder): a latency histogram
//! per command and outcome, rendered in the Prometheus text format.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

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
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, micros: u64) {
        if let Some(i) = BUCKETS_US.iter().position(|&bound| micros <= bound) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(micros, Ordering::Relaxed);
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

/// Per-command request metrics.
#[derive(Default)]
pub(crate) struct Metrics {
    commands: RwLock<HashMap<Box<str>, Arc<CommandSeries>>>,
}

impl Metrics {
    /// Records one finished call.
    pub(crate) fn observe(&self, command: &str, outcome: &str, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if let Some(h) = self.series(command).and_then(|s| s.histogram(outcome)) {
            h.observe(micros);
        }
    }

    fn series(&self, command: &str) -> Option<Arc<CommandSeries>> {
        if let Some(s) = self.commands.read().ok()?.get(command) {
            return Some(s.clone());
        }
        let mut commands = self.commands.write().ok()?;
        Some(commands.entry(command.into()).or_default().clone())
    }

    /// Appends `pyherd_requests_total` and `pyherd_request_duration_seconds`.
    pub(crate) fn render(&self, out: &mut String) {
        let Ok(commands) = self.commands.read() else {
            return;
        };
        let mut rows: Vec<(String, Arc<Histogram>)> = Vec::new();
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

        header(
            out,
            "pyherd_requests_total",
            "counter",
            "Calls finished, by command and outcome (ok or the error kind).",
        );
        for (labels, h) in &rows {
            let _ = writeln!(
                out,
                "pyherd_requests_total{{{labels}}} {}",
                h.count.load(Ordering::Relaxed)
            );
        }
        header(
            out,
            "pyherd_request_duration_seconds",
            "histogram",
            "Time from submission to answer (queue wait plus execution), by command and outcome.",
        );
        for (labels, h) in &rows {
            let mut cumulative = 0;
            for (bound, bucket) in BUCKETS_US.iter().zip(&h.buckets) {
                cumulative += bucket.load(Ordering::Relaxed);
                let le = *bound as f64 / 1e6;
                let _ = writeln!(
                    out,
                    "pyherd_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}"
                );
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "pyherd_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {count}"
            );
            let sum = h.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "pyherd_request_duration_seconds_sum{{{labels}}} {sum}");
            let _ = writeln!(
                out,
                "pyherd_request_duration_seconds_count{{{labels}}} {count}"
            );
        }
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
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("pyherd_requests_total{command=\"echo\",outcome=\"ok\"} 2"));
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
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
