//! What `/proc` says about a process: its start time, group, state and run-id marker.

/// The environment variable every worker (and every child it starts) carries.
pub(crate) const RUN_ID_VAR: &str = "PYHERD_RUN_ID";
/// The environment variable naming a worker (inherited by its children too).
pub(crate) const WORKER_ID_VAR: &str = "PYHERD_WORKER_ID";
/// The command-line flag of a worker that precedes its run id.
pub(crate) const RUN_ID_FLAG: &str = "--run-id";

/// The fields of `/proc/<pid>/stat` the registry uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    /// One letter: `R`, `S`, `D`, `Z` (zombie), `X` (dead), …
    pub(crate) state: char,
    /// The process group.
    pub(crate) pgid: i32,
    /// Clock ticks since boot when the process started (field 22): with the pid, it
    /// names one process for good, since a reused pid gets a later start time.
    pub(crate) start_time: u64,
}

impl Stat {
    /// Zombies and dead processes: nothing left to kill.
    pub(crate) fn is_gone(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// Reads `/proc/<pid>/stat`; `None` when the process does not exist.
pub(crate) fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// This process's own `/proc` fields.
pub(crate) fn own_stat() -> Option<Stat> {
    stat(std::process::id())
}

fn parse_stat(text: &str) -> Option<Stat> {
    // The command name (field 2) is in parentheses and may hold spaces and ')': the
    // fields that follow start after the last ')'. They are numbered from 3 (state).
    let mut fields = text.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let pgid = fields.nth(1)?.parse().ok()?;
    let start_time = fields.nth(16)?.parse().ok()?;
    Some(Stat {
        state,
        pgid,
        start_time,
    })
}

/// Whether the process carries `run_id`: as `PYHERD_RUN_ID` in its environment, or as
/// `--run-id <run_id>` on its command line. A process whose files cannot be read (gone,
/// or another user's) carries nothing.
pub(crate) fn carries(pid: u32, run_id: &str) -> bool {
    let read = |name: &str| std::fs::read(format!("/proc/{pid}/{name}")).unwrap_or_default();
    if env_value(&read("environ"), RUN_ID_VAR).as_deref() == Some(run_id) {
        return true;
    }
    let cmdline = read("cmdline");
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.windows(2)
        .any(|pair| pair[0] == RUN_ID_FLAG.as_bytes() && pair[1] == run_id.as_bytes())
}

/// The value of `name` in a `/proc/<pid>/environ` block.
pub(crate) fn env_value(environ: &[u8], name: &str) -> Option<String> {
    environ.split(|&b| b == 0).find_map(|entry| {
        let value = entry.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
        Some(String::from_utf8_lossy(value).into_owned())
    })
}

/// A running process that carries a run id in its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Marked {
    pub(crate) pid: u32,
    pub(crate) run_id: String,
    pub(crate) worker_id: Option<String>,
    pub(crate) stat: Stat,
}

/// Every running process (readable by this user, other than this one) whose environment
/// carries a run id.
pub(crate) fn marked_processes() -> Vec<Marked> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let Some(run_id) = env_value(&environ, RUN_ID_VAR) else {
            continue;
        };
        let Some(stat) = stat(pid).filter(|s| !s.is_gone()) else {
            continue;
        };
        found.push(Marked {
            pid,
            run_id,
            worker_id: env_value(&environ, WORKER_ID_VAR),
            stat,
        });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        let line = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 10 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(
            s,
            Stat {
                state: 'S',
                pgid: 4242,
                start_time: 987_654
            }
        );
        assert!(parse_stat("12 (x) S 1").is_none());
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn this_process_is_readable_and_unmarked() {
        let me = own_stat().unwrap();
        assert!(!me.is_gone());
        assert!(me.start_time > 0);
        assert!(!carries(std::process::id(), "0123456789abcdef"));
        assert!(!carries(u32::MAX, "0123456789abcdef"));
    }

    #[test]
    fn environment_values_are_found_by_exact_name() {
        let env = b"A=1\0PYHERD_RUN_ID_X=no\0PYHERD_RUN_ID=abc\0";
        assert_eq!(env_value(env, RUN_ID_VAR).as_deref(), Some("abc"));
        assert_eq!(env_value(env, "B"), None);
    }
}
