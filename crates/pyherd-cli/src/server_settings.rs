//! Settings of `serve` that guard the server: the token, `insecure`, and the connection
//! and request limits. Each is a flag, a `PYHERD_*` variable and a `pyherd.toml` key of the
//! flag's name with underscores; a flag or variable wins over the file.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;

use crate::http::{Limits, Token, check_bind};

/// The file keys read here (and removed from the table before the pool's keys are read).
pub(crate) const KEYS: [&str; 9] = [
    "token",
    "token_file",
    "insecure",
    "max_header_bytes",
    "max_connections",
    "header_timeout_ms",
    "body_timeout_ms",
    "send_timeout_ms",
    "max_streams",
];
/// Bounds of `max_header_bytes`: under the lower one ordinary requests do not fit; over
/// the upper one the HTTP parser's own buffer limit applies first.
const HEADER_BYTES: std::ops::RangeInclusive<usize> = 1024..=262_144;

/// The flags (and their variables).
#[derive(Clone, Default, Args)]
pub(crate) struct ServerArgs {
    /// Bearer token that every request but /healthz and / must carry; prefer
    /// --token-file, the command line is visible to other users [default: none]
    #[arg(long, env = "PYHERD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File whose content (surrounding whitespace trimmed) is the token
    #[arg(long, env = "PYHERD_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Listen on a non-loopback address without a token (something else guards the port);
    /// `--insecure=false` (or PYHERD_INSECURE=false) turns off `insecure = true` in the file
    #[arg(
        long,
        env = "PYHERD_INSECURE",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    insecure: Option<bool>,
    /// Largest request head (request line and headers), bytes; larger is a 431 [default: 16384]
    #[arg(long, env = "PYHERD_MAX_HEADER_BYTES")]
    max_header_bytes: Option<usize>,
    /// Most connections open at once; more are answered 503 [default: 256]
    #[arg(long, env = "PYHERD_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Longest time a request head may take to arrive, and an idle connection may stay
    /// open, ms [default: 10000]
    #[arg(long, env = "PYHERD_HEADER_TIMEOUT_MS")]
    header_timeout_ms: Option<u64>,
    /// Longest time a request body may take to arrive, ms; slower is a 408 [default: 30000]
    #[arg(long, env = "PYHERD_BODY_TIMEOUT_MS")]
    body_timeout_ms: Option<u64>,
    /// Longest time an answer may wait for the client to take more of it, ms; a
    /// connection stalled longer is closed [default: 30000]
    #[arg(long, env = "PYHERD_SEND_TIMEOUT_MS")]
    send_timeout_ms: Option<u64>,
    /// Most Server-Sent Event streams open at once; more get 503 resource/too_many_streams
    /// [default: 64]
    #[arg(long, env = "PYHERD_MAX_STREAMS")]
    max_streams: Option<usize>,
}

/// The same keys in `pyherd.toml`.
#[derive(Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerFile {
    token: Option<String>,
    token_file: Option<PathBuf>,
    insecure: Option<bool>,
    max_header_bytes: Option<usize>,
    max_connections: Option<usize>,
    header_timeout_ms: Option<u64>,
    body_timeout_ms: Option<u64>,
    send_timeout_ms: Option<u64>,
    max_streams: Option<usize>,
}

impl fmt::Debug for ServerFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerFile")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("token_file", &self.token_file)
            .field("insecure", &self.insecure)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("max_connections", &self.max_connections)
            .field("header_timeout_ms", &self.header_timeout_ms)
            .field("body_timeout_ms", &self.body_timeout_ms)
            .field("send_timeout_ms", &self.send_timeout_ms)
            .field("max_streams", &self.max_streams)
            .finish()
    }
}

impl ServerFile {
    /// Takes this module's keys out of a `pyherd.toml` table.
    pub(crate) fn take(table: &mut toml::Table) -> anyhow::Result<Self> {
        let mut mine = toml::Table::new();
        for key in KEYS {
            if let Some(value) = table.remove(key) {
                mine.insert(key.to_owned(), value);
            }
        }
        Ok(toml::Value::Table(mine).try_into()?)
    }
}

/// What `serve` runs with.
pub(crate) struct ServerSettings {
    pub(crate) token: Option<Token>,
    pub(crate) limits: Limits,
}

impl ServerArgs {
    /// Flags over the file, checked; refuses a non-loopback `addr` without a token or
    /// `insecure`.
    pub(crate) fn resolve(
        &self,
        file: &ServerFile,
        addr: SocketAddr,
    ) -> anyhow::Result<ServerSettings> {
        let token = match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => bail!("give the token once: --token or --token-file"),
            (Some(text), None) => Some(text.clone()),
            (None, Some(path)) => Some(read_token(path)?),
            (None, None) => match (&file.token, &file.token_file) {
                (Some(_), Some(_)) => bail!("give the token once: `token` or `token_file`"),
                (Some(text), None) => Some(text.clone()),
                (None, Some(path)) => Some(read_token(path)?),
                (None, None) => None,
            },
        };
        let token = token
            .map(|t| Token::new(&t))
            .transpose()
            .map_err(anyhow::Error::msg)?;
        let insecure = self.insecure(file);
        check_bind(addr, token.is_some(), insecure).map_err(anyhow::Error::msg)?;
        let limits = self.limits(file)?;
        Ok(ServerSettings { token, limits })
    }

    /// Whether `insecure` is on: by the flag (or its variable) or the file; off by default.
    pub(crate) fn insecure(&self, file: &ServerFile) -> bool {
        self.insecure.or(file.insecure).unwrap_or(false)
    }

    /// The limits: flags over the file over the defaults, checked.
    pub(crate) fn limits(&self, file: &ServerFile) -> anyhow::Result<Limits> {
        let mut limits = Limits::default();
        let ms = Duration::from_millis;
        if let Some(v) = self.max_header_bytes.or(file.max_header_bytes) {
            if !HEADER_BYTES.contains(&v) {
                bail!("max_header_bytes must be {HEADER_BYTES:?}, not {v}");
            }
            limits.max_header_bytes = v;
        }
        if let Some(v) = self.max_connections.or(file.max_connections) {
            if v == 0 {
                bail!("max_connections must be at least 1");
            }
            limits.max_connections = v;
        }
        if let Some(v) = self.header_timeout_ms.or(file.header_timeout_ms) {
            if v == 0 {
                bail!("header_timeout_ms must be at least 1");
            }
            limits.header_timeout = ms(v);
        }
        if let Some(v) = self.body_timeout_ms.or(file.body_timeout_ms) {
            if v == 0 {
                bail!("body_timeout_ms must be at least 1");
            }
            limits.body_timeout = ms(v);
        }
        if let Some(v) = self.send_timeout_ms.or(file.send_timeout_ms) {
            if v == 0 {
                bail!("send_timeout_ms must be at least 1");
            }
            limits.send_timeout = ms(v);
        }
        if let Some(v) = self.max_streams.or(file.max_streams) {
            if v == 0 {
                bail!("max_streams must be at least 1");
            }
            limits.max_streams = v;
        }
        Ok(limits)
    }
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    Ok(text.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef";

    fn loopback() -> SocketAddr {
        "127.0.0.1:7878".parse().unwrap()
    }

    fn file(text: &str) -> anyhow::Result<ServerFile> {
        ServerFile::take(&mut toml::from_str(text).unwrap())
    }

    #[test]
    fn file_keys_are_taken_and_flags_win() {
        let mut table: toml::Table =
            toml::from_str("workers = 2\nmax_connections = 8\nbody_timeout_ms = 500\n").unwrap();
        let server = ServerFile::take(&mut table).unwrap();
        assert_eq!(table.len(), 1, "the pool's key stays");
        let args = ServerArgs {
            max_connections: Some(4),
            header_timeout_ms: Some(250),
            ..ServerArgs::default()
        };
        let limits = args.resolve(&server, loopback()).unwrap().limits;
        assert_eq!(limits.max_connections, 4);
        assert_eq!(limits.body_timeout, Duration::from_millis(500));
        assert_eq!(limits.header_timeout, Duration::from_millis(250));
        assert_eq!(limits.max_header_bytes, Limits::default().max_header_bytes);
    }

    #[test]
    fn out_of_range_limits_are_refused_by_name() {
        let cases = [
            ("max_header_bytes = 100\n", "max_header_bytes"),
            ("max_connections = 0\n", "max_connections"),
            ("max_streams = 0\n", "max_streams"),
            ("header_timeout_ms = 0\n", "header_timeout_ms"),
            ("body_timeout_ms = 0\n", "body_timeout_ms"),
            ("send_timeout_ms = 0\n", "send_timeout_ms"),
        ];
        for (text, key) in cases {
            let e = ServerArgs::default()
                .resolve(&file(text).unwrap(), loopback())
                .err()
                .unwrap();
            assert!(e.to_string().contains(key), "{e}");
        }
        let e = file("max_connections = \"many\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("max_connections"), "{e:#}");
    }

    #[test]
    fn the_token_comes_from_a_flag_a_file_or_the_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{SECRET}\n")).unwrap();
        let from_file = ServerArgs {
            token_file: Some(path.clone()),
            ..ServerArgs::default()
        };
        let anywhere: SocketAddr = "0.0.0.0:7878".parse().unwrap();
        assert!(from_file.resolve(&ServerFile::default(), anywhere).is_ok());
        let configured = file(&format!("token = \"{SECRET}\"\n")).unwrap();
        assert!(format!("{configured:?}").contains("***"));
        assert!(!format!("{configured:?}").contains(SECRET));
        let settings = ServerArgs::default()
            .resolve(&configured, anywhere)
            .unwrap();
        assert!(settings.token.is_some());
        let both = ServerArgs {
            token: Some(SECRET.into()),
            ..from_file.clone()
        };
        let e = both.resolve(&configured, anywhere).err().unwrap();
        assert!(e.to_string().contains("once"), "{e}");
        let missing = ServerArgs {
            token_file: Some(dir.path().join("absent")),
            ..ServerArgs::default()
        };
        let e = missing.resolve(&configured, anywhere).err().unwrap();
        assert!(format!("{e:#}").contains("token file"), "{e:#}");
        let e = ServerArgs::default()
            .resolve(&ServerFile::default(), anywhere)
            .err()
            .unwrap();
        assert!(e.to_string().contains("refusing"), "{e}");
        let insecure = file("insecure = true\n").unwrap();
        assert!(ServerArgs::default().resolve(&insecure, anywhere).is_ok());
    }
}
