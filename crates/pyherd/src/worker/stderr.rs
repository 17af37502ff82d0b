//! A worker's stderr (and stdout, which points at it): drained concurrently so the
//! worker never blocks on a full pipe, logged (target `pyherd::python`, with the worker
//! id and pid) at a bounded rate with a count of the lines suppressed, and its last lines
//! kept for error context.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinHandle;

/// Lines kept for error context.
const TAIL_LINES: usize = 40;
/// Longest line kept or logged; longer ones are cut into pieces of this size.
const MAX_LINE: usize = 4096;
/// Lines logged in a burst before rate limiting starts.
const LOG_BURST: u32 = 200;
/// Lines per second logged once the burst is used up.
const LOG_RATE: u32 = 50;

/// The last lines a worker wrote.
#[derive(Default)]
pub(crate) struct StderrTail {
    lines: Mutex<VecDeque<String>>,
}

impl StderrTail {
    fn push(&self, line: String) {
        if let Ok(mut lines) = self.lines.lock() {
            if lines.len() == TAIL_LINES {
                lines.pop_front();
            }
            lines.push_back(line);
        }
    }

    /// The kept lines joined by newlines, or `None` when the worker wrote nothing.
    pub(crate) fn text(&self) -> Option<String> {
        let lines = self.lines.lock().ok()?;
        (!lines.is_empty()).then(|| {
            lines
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join("\n")
        })
    }
}

/// A token bucket: `LOG_BURST` lines at once, then `LOG_RATE` per second.
struct RateLimit {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl RateLimit {
    fn new() -> Self {
        Self {
            tokens: f64::from(LOG_BURST),
            last: Instant::now(),
            suppressed: 0,
        }
    }

    fn allow(&mut self, now: Instant) -> bool {
        let refill = now.duration_since(self.last).as_secs_f64() * f64::from(LOG_RATE);
        self.tokens = (self.tokens + refill).min(f64::from(LOG_BURST));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// How long the output must stay quiet before lines suppressed by the rate limit are
/// reported (they are also reported with the next line logged, and at the end).
const QUIET_REPORT: Duration = Duration::from_secs(1);

/// Where the lines come from: the worker id (or `zygote`) and its pid.
struct Source {
    worker: Arc<str>,
    pid: u32,
}

impl Source {
    fn line(&self, line: &str) {
        tracing::info!(target: "pyherd::python", worker = %self.worker, pid = self.pid, "{line}");
    }

    /// Reports the lines the rate limit dropped since the last report, if any.
    fn suppressed(&self, limit: &mut RateLimit) {
        if limit.suppressed > 0 {
            tracing::warn!(target: "pyherd::python", worker = %self.worker, pid = self.pid,
                suppressed = limit.suppressed, "python output was rate-limited: {} lines suppressed", limit.suppressed);
            limit.suppressed = 0;
        }
    }
}

/// Drains `stderr` of process `pid` until it closes it; the task ends by itself.
pub(crate) fn drain<R>(
    stderr: R,
    worker_id: Arc<str>,
    pid: u32,
    tail: Arc<StderrTail>,
) -> JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let source = Source {
            worker: worker_id,
            pid,
        };
        let mut stderr = stderr;
        let mut buf = Vec::with_capacity(8192);
        let mut limit = RateLimit::new();
        let emit = |bytes: &[u8], limit: &mut RateLimit| {
            let line = String::from_utf8_lossy(bytes)
                .trim_end_matches('\r')
                .to_owned();
            if limit.allow(Instant::now()) {
                source.suppressed(limit);
                source.line(&line);
            }
            tail.push(line);
        };
        let mut chunk = [0u8; 8192];
        loop {
            let read = if limit.suppressed > 0 {
                match tokio::time::timeout(QUIET_REPORT, stderr.read(&mut chunk)).await {
                    Ok(read) => read,
                    Err(_) => {
                        source.suppressed(&mut limit);
                        continue;
                    }
                }
            } else {
                stderr.read(&mut chunk).await
            };
            let n = match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            let mut start = 0;
            while let Some(pos) = buf[start..].iter().position(|&b| b == b'\n') {
                let end = start + pos;
                for piece in buf[start..end].chunks(MAX_LINE) {
                    emit(piece, &mut limit);
                }
                start = end + 1;
            }
            buf.drain(..start);
            while buf.len() >= MAX_LINE {
                emit(&buf[..MAX_LINE], &mut limit);
                buf.drain(..MAX_LINE);
            }
        }
        if !buf.is_empty() {
            emit(&buf, &mut limit);
        }
        source.suppressed(&mut limit);
    })
}

/// Waits (bounded) for the drain to reach the end of the stream, so the tail holds the
/// last words of a worker that just died. Calling it again is harmless.
pub(crate) async fn finish(task: &mut JoinHandle<()>, within: Duration) {
    // A finished task may already have been awaited: polling it again would panic.
    if !task.is_finished() {
        let _ = tokio::time::timeout(within, task).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finishing_a_drain_twice_is_harmless() {
        let (reader, writer) = tokio::io::duplex(64);
        drop(writer);
        let tail = Arc::new(StderrTail::default());
        let mut task = drain(reader, "w1".into(), 1, tail);
        finish(&mut task, Duration::from_secs(5)).await;
        assert!(task.is_finished());
        finish(&mut task, Duration::from_secs(5)).await;
    }

    #[test]
    fn the_tail_keeps_the_last_lines() {
        let tail = StderrTail::default();
        assert_eq!(tail.text(), None);
        for i in 0..(TAIL_LINES + 5) {
            tail.push(format!("line {i}"));
        }
        let text = tail.text().unwrap();
        assert!(text.starts_with("line 5\n"));
        assert!(text.ends_with(&format!("line {}", TAIL_LINES + 4)));
    }

    #[test]
    fn logging_is_limited_to_a_burst_then_a_rate() {
        let mut limit = RateLimit::new();
        let t0 = Instant::now();
        let allowed = (0..1000).filter(|_| limit.allow(t0)).count();
        assert_eq!(allowed, LOG_BURST as usize);
        assert_eq!(limit.suppressed, 1000 - u64::from(LOG_BURST));
        let later = t0 + Duration::from_secs(1);
        let allowed = (0..1000).filter(|_| limit.allow(later)).count();
        assert_eq!(allowed, LOG_RATE as usize);
    }
}
