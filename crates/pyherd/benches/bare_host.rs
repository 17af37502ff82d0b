//! A control for `scripts/bench-dspy`: the bare skeleton of the pool's dispatch, with
//! nothing else. Two real workers (`python -m pyherd_worker --handlers
//! pyherd_worker.dspy_adapter`), a multi-threaded tokio runtime, one shared queue, one
//! task per worker that writes a call to its pipe and reads the reply, and callers that
//! each wait for their answer on a oneshot channel: the hand-offs of the pool, without
//! its sessions, JSON, timeouts, metrics, spans or supervision. Every call sends the same
//! `execute_program` frame, built once.
//!
//! `--threads` runs each worker's I/O on its own OS thread with blocking reads and writes
//! instead of a task on the runtime; the callers stay tasks on the runtime.
//!
//! `--in-flight N` lets each worker's task keep up to N calls written to the worker's pipe
//! and not yet answered (default 1, as in the pool): with more than one, a busy worker
//! finds its next call already in its pipe instead of sleeping until the host sends it.
//!
//! Usage: `bare_host [--threads | --in-flight N] CALLS CALLERS` (run from the
//! repository's root, with dspy installed). The workers run `$PYHERD_PYTHON`, as the
//! pool's do, else `python3`, with the pool's idle spin (`$PYHERD_IDLE_SPIN_US`, else its
//! default of 100 µs). Prints `{"throughput_rps": …}`.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// Starts the worker with its stdin and stdout on fds 3 and 4, as the host gives them.
const TRAMPOLINE: &str = "import os, sys
os.dup2(0, 3); os.dup2(1, 4)
os.dup2(os.open(os.devnull, os.O_RDWR), 0); os.dup2(2, 1)
spin = os.environ.get('PYHERD_IDLE_SPIN_US', '100')
os.execvp(sys.executable, [sys.executable, '-m', 'pyherd_worker', '--handlers', 'pyherd_worker.dspy_adapter', '--idle-spin-us', spin])";

/// One call: the frame to send and where its reply goes.
type Job = (Arc<[u8]>, oneshot::Sender<Vec<u8>>);

fn frame(message: &Value) -> anyhow::Result<Vec<u8>> {
    let body = serde_json::to_vec(message)?;
    let mut out = u32::try_from(body.len())?.to_be_bytes().to_vec();
    out.extend(body);
    Ok(out)
}

/// A worker driven with blocking I/O (used to prepare every worker, and by `--threads`).
struct Worker {
    requests: std::process::ChildStdin,
    replies: std::io::BufReader<std::process::ChildStdout>,
    _process: std::process::Child,
}

impl Worker {
    fn start() -> anyhow::Result<Self> {
        let python = std::env::var_os("PYHERD_PYTHON").unwrap_or_else(|| "python3".into());
        let mut process = std::process::Command::new(python)
            .args(["-c", TRAMPOLINE])
            .env("PYTHONPATH", "python")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the workers' Python")?;
        let requests = process.stdin.take().context("stdin")?;
        let replies = std::io::BufReader::new(process.stdout.take().context("stdout")?);
        let mut worker = Self {
            requests,
            replies,
            _process: process,
        };
        let hello = worker.read().context(
            "the worker ended before its hello (run this from the repository's root, with dspy installed)",
        )?;
        let hello: Value = serde_json::from_slice(&hello)?;
        ensure!(
            hello["t"] == "hello",
            "the worker did not say hello: {hello}"
        );
        Ok(worker)
    }

    fn read(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut header = [0; 4];
        self.replies.read_exact(&mut header)?;
        let mut body = vec![0; usize::try_from(u32::from_be_bytes(header))?];
        self.replies.read_exact(&mut body)?;
        Ok(body)
    }

    fn call(&mut self, frame: &[u8]) -> anyhow::Result<Vec<u8>> {
        self.requests.write_all(frame)?;
        self.read()
    }

    /// Creates the program, warms the worker up, and returns the `execute_program` frame.
    fn prepare(&mut self) -> anyhow::Result<Arc<[u8]>> {
        let create = frame(&json!({
            "t": "call", "id": 1, "cmd": "create_program", "deadline_ms": 1_u64 << 62,
            "args": {"id": "qa", "signature": "question -> answer"},
        }))?;
        let created: Value = serde_json::from_slice(&self.call(&create)?)?;
        let execute = frame(&json!({
            "t": "call", "id": 2, "rid": "r2", "cmd": "execute_program", "session_id": "bench",
            "deadline_ms": 1_u64 << 62,
            "args": {
                "program_id": "qa",
                "inputs": {"question": "What is the capital of France?"},
                "program": created["result"]["definition"],
                "lm": {"provider": "dummy", "answers": {"": {"answer": "Paris"}}},
            },
        }))?;
        for _ in 0..200 {
            check(&self.call(&execute)?)?;
        }
        Ok(execute.into())
    }
}

fn check(reply: &[u8]) -> anyhow::Result<()> {
    ensure!(
        reply.starts_with(br#"{"t":"ok""#),
        "the worker answered: {}",
        String::from_utf8_lossy(reply)
    );
    Ok(())
}

/// Serves calls from `queue` on `worker` in a task of the runtime, over async pipes, with
/// up to `in_flight` calls written to the worker and not yet answered.
async fn serve_async(
    worker: Worker,
    queue: async_channel::Receiver<Job>,
    in_flight: usize,
) -> anyhow::Result<()> {
    let Worker {
        requests,
        replies,
        _process: process,
    } = worker;
    let mut requests = tokio::process::ChildStdin::from_std(requests)?;
    let mut replies =
        tokio::io::BufReader::new(tokio::process::ChildStdout::from_std(replies.into_inner())?);
    let mut waiting = VecDeque::new();
    loop {
        if waiting.is_empty() {
            let Ok((frame, answer)) = queue.recv().await else {
                break;
            };
            requests.write_all(&frame).await?;
            waiting.push_back(answer);
        }
        while waiting.len() < in_flight {
            let Ok((frame, answer)) = queue.try_recv() else {
                break;
            };
            requests.write_all(&frame).await?;
            waiting.push_back(answer);
        }
        let mut header = [0; 4];
        replies.read_exact(&mut header).await?;
        let mut body = vec![0; usize::try_from(u32::from_be_bytes(header))?];
        replies.read_exact(&mut body).await?;
        if let Some(answer) = waiting.pop_front() {
            let _ = answer.send(body);
        }
    }
    drop(process);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (threads, in_flight, counts) = match args.as_slice() {
        [flag, counts @ ..] if flag == "--threads" => (true, 1, counts),
        [flag, n, counts @ ..] if flag == "--in-flight" => (
            false,
            n.parse()
                .context("--in-flight takes a whole number of at least 1")?,
            counts,
        ),
        counts => (false, 1, counts),
    };
    let [calls, callers] = counts else {
        bail!("usage: bare_host [--threads | --in-flight N] CALLS CALLERS");
    };
    ensure!(in_flight >= 1, "--in-flight must be at least 1");
    let (calls, callers): (u64, u64) = (calls.parse()?, callers.parse()?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (sender, queue) = async_channel::unbounded::<Job>();
    let mut frame = None;
    for _ in 0..2 {
        let mut worker = Worker::start()?;
        frame = Some(worker.prepare()?);
        let queue = queue.clone();
        if threads {
            std::thread::spawn(move || {
                while let Ok((frame, answer)) = queue.recv_blocking() {
                    let Ok(reply) = worker.call(&frame) else {
                        return;
                    };
                    let _ = answer.send(reply);
                }
            });
        } else {
            runtime.spawn(serve_async(worker, queue, in_flight));
        }
    }
    let frame = frame.context("no worker")?;
    let next = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    runtime.block_on(async {
        let tasks: Vec<_> = (0..callers)
            .map(|_| {
                let (sender, frame, next) = (sender.clone(), frame.clone(), next.clone());
                tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < calls {
                        let (answer, reply) = oneshot::channel();
                        sender.send((frame.clone(), answer)).await?;
                        check(&reply.await?)?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        anyhow::Ok(())
    })?;
    let seconds = began.elapsed().as_secs_f64();
    println!("{}", json!({"throughput_rps": calls as f64 / seconds}));
    sender.close();
    Ok(())
}
