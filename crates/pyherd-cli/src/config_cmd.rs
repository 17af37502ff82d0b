//! `pyherd config`: the effective configuration, every setting with its value and where
//! the value came from (a flag, a `PYHERD_*` variable, the file, or the default).
//!
//! The settings are not listed here: they are the flags of `serve` (read from its clap
//! definition, with their environment variables) plus the file-only keys of the pool's
//! configuration and `requirements`. A setting added as a flag or a `PoolConfig` field
//! is shown without a change to this file. A secret flag is marked
//! `hide_env_values = true` or named like a secret (see `secret_name`), and is printed as
//! `***`, as are the values of the workers' variables (`env`) named like one.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::serve::ServeArgs;
use crate::settings::{DSPY_MODULE, bind_address};

/// `PYHERD_*` variables that are not flags of `serve`: the log filter, the server
/// `pyherd status` asks, and what the host gives its workers.
const OTHER_VARIABLES: [&str; 5] = [
    "PYHERD_LOG",
    "PYHERD_URL",
    "PYHERD_RUN_ID",
    "PYHERD_WORKER_ID",
    "PYHERD_JSON",
];
/// Variables of test fixtures start with this.
const TEST_VARIABLES: &str = "PYHERD_TEST_";
/// Shown instead of a secret's value.
const REDACTED: &str = "***";

/// `pyherd config`: the flags of `serve`, and the output format.
#[derive(Args)]
pub(crate) struct ConfigArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Print JSON: {"file", "settings": [{key, value, source, origin}], "unknown_env"}
    #[arg(long)]
    json: bool,
}

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Source {
    Default,
    File,
    Env,
    Flag,
}

/// One setting as `pyherd config` shows it.
#[derive(Debug, Serialize)]
struct Entry {
    key: String,
    value: Value,
    source: Source,
    /// The flag (`--workers`), the variable (`PYHERD_WORKERS`) or the file's path.
    #[serde(skip_serializing_if = "Option::is_none")]
    origin: Option<String>,
}

#[derive(Serialize)]
struct Report {
    file: Option<PathBuf>,
    settings: Vec<Entry>,
    unknown_env: Vec<String>,
}

/// The `PYHERD_*` variables among `vars` that are neither a setting nor one of
/// [`OTHER_VARIABLES`]: each is named in a warning by every command that reads settings
/// (the environment is shared with other programs, so they are not refused).
pub(crate) fn unknown_env(vars: impl Iterator<Item = String>) -> Vec<String> {
    let cmd = ServeArgs::augment_args(clap::Command::new("serve"));
    let known: BTreeSet<&OsStr> = cmd.get_arguments().filter_map(|a| a.get_env()).collect();
    let mut unknown: Vec<String> = vars
        .filter(|name| name.starts_with("PYHERD_") && !name.starts_with(TEST_VARIABLES))
        .filter(|name| !OTHER_VARIABLES.contains(&name.as_str()))
        .filter(|name| !known.contains(OsStr::new(name)))
        .collect();
    unknown.sort();
    unknown
}

/// Logs a warning for each unknown `PYHERD_*` variable of this process.
pub(crate) fn warn_unknown_env() {
    for name in unknown_env(std::env::vars_os().filter_map(|(k, _)| k.into_string().ok())) {
        tracing::warn!(variable = %name, "{name} is not a pyherd setting; it is ignored");
    }
}

fn is_secret(arg: &clap::Arg) -> bool {
    arg.is_hide_env_values_set() || secret_name(arg.get_id().as_str())
}

/// A setting or a worker's environment variable named like a secret: a token, secret,
/// password, credential or key (`OPENAI_API_KEY`, `HF_TOKEN`, `DB_PASSWORD`).
fn secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["token", "secret", "password", "passwd", "credential"]
        .iter()
        .any(|s| name.contains(s))
        || name
            .split(['_', '-', '.'])
            .any(|part| part == "key" || part.ends_with("apikey"))
}

/// The workers' environment (the `env` setting) with the values of variables named like
/// secrets replaced by [`REDACTED`].
fn redact_env(env: &mut Value) {
    if let Value::Object(vars) = env {
        for (name, value) in vars.iter_mut() {
            if secret_name(name) {
                *value = REDACTED.into();
            }
        }
    }
}

/// The settings' effective values by key: the resolved pool configuration and the
/// server's own settings.
fn effective(args: &ServeArgs, file: Option<&Path>) -> anyhow::Result<Map<String, Value>> {
    let settings = args.pool.resolve()?;
    let bind = bind_address(args.bind.as_deref(), settings.bind.as_deref())?;
    let dspy = settings.pool.handlers.iter().any(|h| h == DSPY_MODULE);
    let Value::Object(mut values) = serde_json::to_value(&settings.pool)? else {
        anyhow::bail!("the pool configuration is not a table");
    };
    values.insert("bind".into(), bind.to_string().into());
    values.insert(
        "insecure".into(),
        args.server.insecure(&settings.server).into(),
    );
    // Checked as `serve` checks them: the token and the bind rule too.
    let limits = args.server.resolve(&settings.server, bind)?.limits;
    let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    values.insert("max_header_bytes".into(), limits.max_header_bytes.into());
    values.insert("max_connections".into(), limits.max_connections.into());
    values.insert(
        "header_timeout_ms".into(),
        millis(limits.header_timeout).into(),
    );
    values.insert("body_timeout_ms".into(), millis(limits.body_timeout).into());
    values.insert("send_timeout_ms".into(), millis(limits.send_timeout).into());
    values.insert("max_streams".into(), limits.max_streams.into());
    values.insert("dspy".into(), dspy.into());
    values.insert("requirements".into(), settings.requirements.into());
    values.insert("config".into(), serde_json::to_value(file)?);
    Ok(values)
}

fn file_table(file: Option<&Path>) -> anyhow::Result<toml::Table> {
    let Some(path) = file else {
        return Ok(toml::Table::new());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
    Ok(toml::from_str(&text)?)
}

fn toml_to_json(value: &toml::Value) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// Every setting: the flags of `serve` in their order, then the file-only keys.
fn entries(
    matches: &ArgMatches,
    file: Option<&Path>,
    table: &toml::Table,
    mut values: Map<String, Value>,
) -> Vec<Entry> {
    let cmd = ServeArgs::augment_args(clap::Command::new("serve"));
    let file_origin = file.map(|p| p.display().to_string());
    let mut out = Vec::new();
    for arg in cmd.get_arguments() {
        let key = arg.get_id().as_str().to_owned();
        // A switch that is off says nothing: the file may still turn it on.
        let set = arg.get_action().takes_values() || matches.get_flag(&key);
        let (source, origin, raw) = match matches.value_source(&key) {
            Some(ValueSource::CommandLine) if set => {
                let flag = arg.get_long().map(|l| format!("--{l}"));
                (Source::Flag, flag, raw_values(matches, &key))
            }
            Some(ValueSource::EnvVariable) if set => {
                let var = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                (Source::Env, var, raw_values(matches, &key))
            }
            _ => match table.get(&key) {
                Some(v) => (Source::File, file_origin.clone(), toml_to_json(v)),
                None => (Source::Default, None, Value::Null),
            },
        };
        let mut value = values.remove(&key).unwrap_or(raw);
        if is_secret(arg) && !value.is_null() {
            value = REDACTED.into();
        }
        out.push(Entry {
            key,
            value,
            source,
            origin,
        });
    }
    for (key, mut value) in values {
        if key == "env" {
            redact_env(&mut value);
        }
        let (source, origin) = if table.contains_key(&key) {
            (Source::File, file_origin.clone())
        } else {
            (Source::Default, None)
        };
        out.push(Entry {
            key,
            value,
            source,
            origin,
        });
    }
    out
}

fn raw_values(matches: &ArgMatches, key: &str) -> Value {
    let values: Vec<Value> = matches
        .get_raw(key)
        .into_iter()
        .flatten()
        .map(|v| Value::from(v.to_string_lossy().into_owned()))
        .collect();
    match <[Value; 1]>::try_from(values) {
        Ok([one]) => one,
        Err(many) => Value::Array(many),
    }
}

fn show(value: &Value) -> String {
    match value {
        Value::Null => "none".to_owned(),
        other => other.to_string(),
    }
}

/// Prints the effective configuration. `matches` are those of the `config` subcommand
/// (they tell a flag from its environment variable).
pub(crate) fn run(args: &ConfigArgs, matches: &ArgMatches) -> anyhow::Result<u8> {
    let file = args.serve.pool.config_file();
    let values = effective(&args.serve, file.as_deref())?;
    let table = file_table(file.as_deref())?;
    let report = Report {
        settings: entries(matches, file.as_deref(), &table, values),
        unknown_env: unknown_env(std::env::vars_os().filter_map(|(k, _)| k.into_string().ok())),
        file,
    };
    let mut out = String::new();
    if args.json {
        out = serde_json::to_string_pretty(&report)? + "\n";
    } else {
        let width = report
            .settings
            .iter()
            .map(|e| e.key.len())
            .max()
            .unwrap_or(0);
        let shown: Vec<String> = report.settings.iter().map(|e| show(&e.value)).collect();
        let value_width = shown.iter().map(String::len).max().unwrap_or(0).min(40);
        out.push_str("# precedence: flag > PYHERD_* environment > file > default\n");
        for (entry, value) in report.settings.iter().zip(&shown) {
            let source = match (&entry.source, &entry.origin) {
                (Source::Default, _) => "default".to_owned(),
                (Source::File, Some(path)) => format!("file ({path})"),
                (Source::Env, Some(var)) => format!("env ({var})"),
                (Source::Flag, Some(flag)) => format!("flag ({flag})"),
                (source, None) => format!("{source:?}").to_lowercase(),
            };
            let line = format!("{:width$}  {value:value_width$}  {source}", entry.key);
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("cannot write to stdout")?;
    for name in &report.unknown_env {
        eprintln!("pyherd: warning: {name} is not a pyherd setting; it is ignored");
    }
    Ok(0)
}

/// The `ConfigArgs` of a command line, with its matches (for tests).
#[cfg(test)]
fn parse(args: &[&str]) -> ArgMatches {
    ConfigArgs::augment_args(clap::Command::new("config"))
        .try_get_matches_from(std::iter::once("config").chain(args.iter().copied()))
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_variables_are_named_and_known_ones_are_not() {
        let vars = [
            "PYHERD_WORKERS",
            "PYHERD_WROKERS",
            "PYHERD_BIND",
            "PYHERD_LOG",
            "PYHERD_URL",
            "PYHERD_CACHE_DIR",
            "PYHERD_TEST_MARKER",
            "HOME",
            "PYHERD_MAX_QUEUE",
            "PYHERD_ZZZ",
        ];
        let unknown = unknown_env(vars.iter().map(|v| (*v).to_owned()));
        assert_eq!(unknown, ["PYHERD_WROKERS", "PYHERD_ZZZ"]);
    }

    #[test]
    fn a_secret_is_shown_redacted() {
        let matches = clap::Command::new("x")
            .arg(clap::Arg::new("api").long("api").hide_env_values(true))
            .arg(clap::Arg::new("token").long("token"))
            .arg(clap::Arg::new("workers").long("workers"))
            .get_matches_from(["x", "--api", "k", "--token", "t", "--workers", "2"]);
        let cmd = clap::Command::new("x")
            .arg(clap::Arg::new("api").hide_env_values(true))
            .arg(clap::Arg::new("token"))
            .arg(clap::Arg::new("workers"));
        let secret: Vec<bool> = cmd.get_arguments().map(is_secret).collect();
        assert_eq!(secret, [true, true, false]);
        assert_eq!(raw_values(&matches, "api"), "k");
    }

    #[test]
    fn the_workers_secret_variables_are_shown_redacted() {
        let mut env = serde_json::json!({
            "HF_TOKEN": "hf_1", "DB_PASSWORD": "p", "OPENAI_API_KEY": "sk", "AWS_SECRET_ACCESS_KEY": "s",
            "MY_APIKEY": "k", "GCP_CREDENTIALS": "c", "LANG": "C", "KEYBOARD": "us", "MONKEY_ID": "7",
        });
        redact_env(&mut env);
        let shown: Vec<&str> = ["LANG", "KEYBOARD", "MONKEY_ID"]
            .iter()
            .map(|k| env[k].as_str().unwrap())
            .collect();
        assert_eq!(shown, ["C", "us", "7"]);
        for k in [
            "HF_TOKEN",
            "DB_PASSWORD",
            "OPENAI_API_KEY",
            "AWS_SECRET_ACCESS_KEY",
            "MY_APIKEY",
            "GCP_CREDENTIALS",
        ] {
            assert_eq!(env[k], REDACTED, "{k}");
        }
    }

    #[test]
    fn every_serve_flag_is_an_entry_with_its_source() {
        let matches = parse(&["--workers", "3", "--dspy", "--handlers", "a.py,b.py"]);
        let mut values = Map::new();
        values.insert("workers".into(), 3.into());
        let table: toml::Table = toml::from_str("max_queue = 7\nkill_timeout_ms = 9").unwrap();
        values.insert("kill_timeout_ms".into(), 9.into());
        let file = Path::new("/etc/pyherd.toml");
        let list = entries(&matches, Some(file), &table, values);
        let by_key = |k: &str| list.iter().find(|e| e.key == k).unwrap();
        assert_eq!(by_key("workers").source, Source::Flag);
        assert_eq!(by_key("workers").origin.as_deref(), Some("--workers"));
        assert_eq!(by_key("dspy").value, "true");
        assert_eq!(
            by_key("handlers").value,
            serde_json::json!(["a.py", "b.py"])
        );
        assert_eq!(by_key("max_queue").source, Source::File);
        assert_eq!(by_key("max_queue").value, 7);
        assert_eq!(by_key("kill_timeout_ms").source, Source::File);
        assert_eq!(by_key("bind").source, Source::Default);
        let cmd = ServeArgs::augment_args(clap::Command::new("serve"));
        assert_eq!(list.len(), cmd.get_arguments().count() + 1);
    }
}
