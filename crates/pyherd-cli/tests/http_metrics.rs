//! `/metrics` follows the Prometheus text format and naming conventions (checked by a
//! strict parser), lists exactly the metrics the README documents, and `/v1/workers`
//! reports each worker's CPU time.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Server, execute, get_json};
use serde_json::{Value, json};

/// One metric family: its type, help and samples (sample name, labels, value).
#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

fn valid_name(name: &str, colons: bool) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colons && c == ':'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colons && c == ':'))
}

/// Parses `{a="x",b="y"}` (escapes `\\`, `\"`, `\n`); returns the labels and the rest.
fn labels(text: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let Some(mut rest) = text.strip_prefix('{') else {
        return Ok((labels, text));
    };
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("a label without =")?;
        let name = &rest[..eq];
        if !valid_name(name, false) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("an unquoted label value")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().ok_or("an unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("a dangling escape")?.1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, c) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &rest[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// Parses the whole exposition and checks it strictly: HELP and TYPE once per family and
/// before its samples, samples of a family together, names and labels well formed, no
/// series twice, counters named `_total`, histograms with `_bucket` (ascending `le`,
/// cumulative counts, `+Inf` equal to `_count`), `_sum` and `_count` per label set.
fn parse_strict(text: &str) -> Result<BTreeMap<String, Family>, String> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut series = BTreeSet::new();
    for line in text.lines() {
        if line.is_empty() {
            return Err("an empty line".into());
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let (keyword, rest) = comment
                .split_once(' ')
                .ok_or(format!("bad comment {line}"))?;
            let (name, value) = rest.split_once(' ').ok_or(format!("bad comment {line}"))?;
            if !valid_name(name, true) || !name.starts_with("pyherd_") {
                return Err(format!("bad family name {name}"));
            }
            let family = families.entry(name.to_owned()).or_default();
            if !family.samples.is_empty() {
                return Err(format!("{keyword} of {name} after its samples"));
            }
            match keyword {
                "HELP" if family.help.is_empty() && !value.is_empty() => family.help = value.into(),
                "TYPE" if family.kind.is_empty() => {
                    if !["counter", "gauge", "histogram"].contains(&value) {
                        return Err(format!("{name} has type {value}"));
                    }
                    family.kind = value.into();
                }
                _ => return Err(format!("unexpected or repeated {line}")),
            }
            if order.last() != Some(&name.to_owned()) {
                if order.contains(&name.to_owned()) {
                    return Err(format!("{name} is described in two places"));
                }
                order.push(name.to_owned());
            }
            continue;
        }
        let end = line.find(['{', ' ']).ok_or(format!("bad sample {line}"))?;
        let name = &line[..end];
        let (labels, rest) = labels(&line[end..]).map_err(|e| format!("{e} in {line}"))?;
        let value: f64 = rest
            .strip_prefix(' ')
            .and_then(|v| v.parse().ok())
            .ok_or(format!("bad value in {line}"))?;
        let family_name = order.last().ok_or(format!("{line} before any TYPE"))?;
        let family = families.get_mut(family_name).ok_or("no family")?;
        if family.help.is_empty() || family.kind.is_empty() {
            return Err(format!("{family_name} lacks HELP or TYPE"));
        }
        let allowed: Vec<String> = match family.kind.as_str() {
            "histogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{family_name}{s}"))
                .collect(),
            _ => vec![family_name.clone()],
        };
        if !allowed.iter().any(|a| a == name) {
            return Err(format!("{line} is not a sample of {family_name}"));
        }
        if !value.is_finite() || (family.kind != "gauge" && value < 0.0) {
            return Err(format!("bad value in {line}"));
        }
        if !series.insert(format!("{name}{labels:?}")) {
            return Err(format!("{line}: the series appears twice"));
        }
        family.samples.push((name.to_owned(), labels, value));
    }
    for (name, family) in &families {
        if family.kind.is_empty() || family.help.is_empty() {
            return Err(format!("{name} lacks HELP or TYPE"));
        }
        match family.kind.as_str() {
            "counter" if !name.ends_with("_total") => return Err(format!("counter {name}")),
            "gauge" | "histogram" if name.ends_with("_total") => {
                return Err(format!("{} {name} ends with _total", family.kind));
            }
            "histogram" => check_histogram(name, family)?,
            _ => {}
        }
    }
    Ok(families)
}

/// One histogram series: its buckets (bound, cumulative count), `_count`, whether it has
/// a `_sum`.
type Series = (Vec<(f64, f64)>, Option<f64>, bool);

fn check_histogram(name: &str, family: &Family) -> Result<(), String> {
    if !name.ends_with("_seconds") && !name.ends_with("_bytes") {
        return Err(format!("histogram {name} has no unit"));
    }
    let mut groups: BTreeMap<Vec<(String, String)>, Series> = BTreeMap::new();
    for (sample, labels, value) in &family.samples {
        let mut key: BTreeMap<String, String> = labels.clone();
        let le = key.remove("le");
        let group = groups
            .entry(key.into_iter().collect())
            .or_insert((Vec::new(), None, false));
        match sample.strip_prefix(name) {
            Some("_bucket") => {
                let le = le.ok_or(format!("a bucket of {name} without le"))?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().map_err(|_| format!("bad le {le}"))?
                };
                group.0.push((bound, *value));
            }
            Some("_count") => group.1 = Some(*value),
            Some("_sum") => group.2 = true,
            _ => return Err(format!("{sample} in {name}")),
        }
    }
    for (labels, (buckets, count, sum)) in groups {
        let ascending = buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
        let last = buckets.last().copied();
        if !ascending || last.map(|l| l.0) != Some(f64::INFINITY) {
            return Err(format!(
                "{name}{labels:?}: buckets not cumulative up to +Inf"
            ));
        }
        if last.map(|l| l.1) != count || !sum {
            return Err(format!(
                "{name}{labels:?}: +Inf differs from _count, or no _sum"
            ));
        }
    }
    Ok(())
}

async fn metrics_text(server: &Server) -> String {
    let response = reqwest::get(server.url("/metrics")).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response.text().await.unwrap()
}

/// The rows of the README's metrics table (in its Observability section).
fn readme_rows() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let section = readme
        .split("\n## Observability\n")
        .nth(1)
        .expect("an Observability section")
        .split("\n## ")
        .next()
        .unwrap();
    section
        .lines()
        .filter(|l| l.starts_with("| `pyherd_"))
        .map(str::to_owned)
        .collect()
}

/// The metric names the README's table documents.
fn documented() -> BTreeSet<String> {
    readme_rows()
        .iter()
        .map(|l| {
            let name = &l["| `".len()..];
            name[..name.find('`').unwrap()].to_owned()
        })
        .collect()
}

#[tokio::test]
async fn metrics_pass_a_strict_format_check_and_match_the_readme() {
    let server = Server::start(&[
        "--workers",
        "2",
        "--handlers",
        "pyherd_worker.testing",
        "--breaker-commands",
        "raise_error",
    ]);
    for body in [
        json!({"command": "echo", "args": 1}),
        json!({"command": "raise_error"}),
        json!({"command": "nope"}),
        json!({"command": "echo", "args": 2, "session_id": "m-1"}),
        json!({"command": "sleep", "args": {"seconds": 0.02}}),
    ] {
        execute(&server, body).await;
    }
    let text = metrics_text(&server).await;
    let families = parse_strict(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let exposed: BTreeSet<String> = families.keys().cloned().collect();
    assert_eq!(exposed, documented(), "/metrics vs the README");

    let sample = |family: &str, labels: &[(&str, &str)]| -> f64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        families[family]
            .samples
            .iter()
            .find(|(name, l, _)| name == family && *l == want)
            .unwrap_or_else(|| panic!("{family}{labels:?} in\n{text}"))
            .2
    };
    assert_eq!(
        sample(
            "pyherd_requests_total",
            &[("command", "echo"), ("outcome", "ok")]
        ),
        2.0
    );
    assert_eq!(
        sample(
            "pyherd_requests_total",
            &[("command", "raise_error"), ("outcome", "python_exception")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            "pyherd_requests_total",
            &[("command", "(unknown)"), ("outcome", "unknown_command")]
        ),
        1.0
    );
    let count = |family: &str| {
        families[family]
            .samples
            .iter()
            .filter(|(name, _, _)| name.ends_with("_count"))
            .map(|s| s.2)
            .sum::<f64>()
    };
    assert_eq!(
        count("pyherd_queue_wait_seconds"),
        4.0,
        "calls taken by a worker"
    );
    assert_eq!(count("pyherd_request_execution_seconds"), 4.0);
    let workers = get_json(&server.url("/v1/workers")).await;
    for w in workers["workers"].as_array().unwrap() {
        let id = w["id"].as_str().unwrap();
        let rss = sample("pyherd_worker_rss_bytes", &[("worker", id)]);
        assert!(rss > 1e6, "{rss}");
        sample("pyherd_worker_cpu_seconds_total", &[("worker", id)]);
        assert_eq!(
            sample("pyherd_worker_requests_total", &[("worker", id)]),
            w["requests"].as_f64().unwrap()
        );
    }
    assert_eq!(
        sample("pyherd_session_affinity_total", &[("result", "miss")]),
        0.0
    );
    assert_eq!(sample("pyherd_sessions", &[]), 1.0);
    // Every reason a restart is counted under is named in the README's row.
    let row = readme_rows()
        .into_iter()
        .find(|l| l.starts_with("| `pyherd_worker_restarts_total`"))
        .unwrap();
    let reasons: Vec<&String> = families["pyherd_worker_restarts_total"]
        .samples
        .iter()
        .filter_map(|(_, labels, _)| labels.get("reason"))
        .collect();
    assert!(reasons.len() >= 8, "{reasons:?}");
    for reason in reasons {
        assert!(
            row.contains(&format!("`{reason}`")),
            "{reason} missing from {row}"
        );
    }
    assert_eq!(
        sample(
            "pyherd_circuit_breaker_state",
            &[("command", "raise_error"), ("state", "closed")]
        ),
        1.0
    );
    server.terminate();
}

#[test]
fn the_strict_check_refuses_what_prometheus_would_misread() {
    let ok =
        "# HELP pyherd_x_total X.\n# TYPE pyherd_x_total counter\npyherd_x_total{a=\"b\\\"c\"} 1\n";
    assert!(parse_strict(ok).is_ok());
    let histogram = |buckets: &str| {
        format!(
            "# HELP pyherd_h_seconds H.\n# TYPE pyherd_h_seconds histogram\n{buckets}pyherd_h_seconds_sum 1\npyherd_h_seconds_count 2\n"
        )
    };
    assert!(
        parse_strict(&histogram(
            "pyherd_h_seconds_bucket{le=\"0.1\"} 1\npyherd_h_seconds_bucket{le=\"+Inf\"} 2\n"
        ))
        .is_ok()
    );
    for bad in [
        "pyherd_x_total 1\n".to_owned(),
        "# HELP pyherd_x X.\n# TYPE pyherd_x counter\npyherd_x 1\n".to_owned(),
        "# HELP pyherd_x_total X.\n# TYPE pyherd_x_total counter\npyherd_x_total{a=\"b} 1\n".into(),
        "# HELP pyherd_x_total X.\n# TYPE pyherd_x_total counter\npyherd_x_total 1\npyherd_x_total 2\n".into(),
        "# TYPE pyherd_g gauge\npyherd_g 1\n".into(),
        histogram("pyherd_h_seconds_bucket{le=\"0.1\"} 3\npyherd_h_seconds_bucket{le=\"+Inf\"} 2\n"),
        histogram("pyherd_h_seconds_bucket{le=\"0.1\"} 1\npyherd_h_seconds_bucket{le=\"+Inf\"} 1\n"),
        histogram("pyherd_h_seconds_bucket{le=\"0.1\"} 1\n"),
    ] {
        assert!(parse_strict(&bad).is_err(), "accepted:\n{bad}");
    }
}

#[tokio::test]
async fn a_handler_burning_cpu_raises_its_workers_cpu_seconds() {
    let server = Server::start(&["--workers", "1", "--handlers", "pyherd_worker.testing"]);
    let cpu = |workers: &Value| workers["workers"][0]["cpu_seconds"].as_f64().unwrap();
    let before = cpu(&get_json(&server.url("/v1/workers")).await);
    let (status, body) = execute(
        &server,
        json!({"command": "cpu", "args": {"n": 3_000_000}, "timeout_ms": 60_000}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // The call ran to its end: the kernel has already counted its CPU time.
    let after = cpu(&get_json(&server.url("/v1/workers")).await);
    assert!(after - before >= 0.1, "{before} -> {after}");
    let text = metrics_text(&server).await;
    let line = text
        .lines()
        .find(|l| l.starts_with("pyherd_worker_cpu_seconds_total{worker=\"w1\"} "))
        .unwrap_or_else(|| panic!("{text}"));
    let exposed: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(exposed >= after, "{exposed} < {after}");
    server.terminate();
}
