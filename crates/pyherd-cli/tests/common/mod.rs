//! Runs the real `pyherd` binary: a server on a free loopback port, or one command.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_pyherd");

/// A fixture module of the library's tests.
pub fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../pyherd/tests/fixtures")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// A `pyherd serve` process; killed if the test ends without stopping it.
pub struct Server {
    child: Child,
    pub base: String,
    stderr: Arc<Mutex<String>>,
}

/// The `pyherd` command with a clean `PYHERD_*` environment.
pub fn pyherd(dir: Option<&Path>) -> Command {
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars() {
        if key.starts_with("PYHERD_") && key != "PYHERD_CACHE_DIR" {
            cmd.env_remove(key);
        }
    }
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    cmd
}

impl Server {
    /// `pyherd serve --bind 127.0.0.1:0 <args>`, ready when it prints its address.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(pyherd(None), args)
    }

    pub fn start_with(mut cmd: Command, args: &[&str]) -> Self {
        let mut child = cmd
            .args(["serve", "--bind", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pyherd serve");
        let stderr = drain(child.stderr.take().expect("stderr"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "pyherd serve did not start; stderr:\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        let base = line
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Self {
            child,
            base,
            stderr,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (bounded) for the server to exit by itself.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        wait_exit(&mut self.child, limit)
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        signal(self.child.id(), nix::sys::signal::Signal::SIGTERM);
        wait_exit(&mut self.child, Duration::from_secs(30))
            .expect("pyherd serve did not exit after SIGTERM")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Collects a pipe into a string on a thread.
pub fn drain(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

/// The text a [`drain`] collected once it holds every one of `needles`, or all it has
/// after `limit` (the reader can lag behind a process that has just exited).
pub fn drained(text: &Mutex<String>, needles: &[&str], limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let now = text.lock().unwrap().clone();
        if needles.iter().all(|n| now.contains(n)) || start.elapsed() > limit {
            return now;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).expect("signal");
}

/// Waits for a child to exit, polling; `None` after `limit`.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `cond` every 10 ms until it holds; panics with `what` after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// GET a JSON document.
pub async fn get_json(url: &str) -> serde_json::Value {
    reqwest::get(url)
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON body")
}

/// POST a JSON body to /v1/execute; status and body.
pub async fn execute(server: &Server, body: serde_json::Value) -> (u16, serde_json::Value) {
    post_execute(server.url("/v1/execute"), body).await
}

/// Any request with an optional JSON body; status and JSON body.
pub async fn request(
    method: reqwest::Method,
    url: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON body"))
}

/// POST a JSON body to `url`; status and body (owned arguments, for spawned tasks).
pub async fn post_execute(url: String, body: serde_json::Value) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .expect("POST");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON body"))
}

/// The process exists in the process table.
pub fn exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The process is running (exists and is not a zombie).
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Pids of the processes whose parent is `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1));
        if ppid == Some(parent.to_string().as_str()) {
            found.push(pid);
        }
    }
    found
}

/// Runs `pyherd ARGS`; exit code, stdout, stderr.
pub fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = pyherd(None).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `pyherd serve` with 2 workers loading `fixture`, stderr piped: for servers that are
/// not expected to come up.
pub fn spawn_serve_with_fixture(fixture_name: &str, startup_timeout_ms: u64) -> Child {
    pyherd(None)
        .args(["serve", "--bind", "127.0.0.1:0", "--workers", "2"])
        .args(["--startup-timeout-ms", &startup_timeout_ms.to_string()])
        .args(["--handlers", &fixture(fixture_name)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pyherd serve")
}

/// (pid, state) of every worker, from `/v1/workers`.
pub async fn workers(server: &Server) -> Vec<(u32, String)> {
    get_json(&server.url("/v1/workers")).await["workers"]
        .as_array()
        .expect("a workers array")
        .iter()
        .map(|w| {
            (
                w["pid"].as_u64().expect("a pid") as u32,
                w["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}
