//! The recent past of the pool, second by second: calls finished (ok and failed), their
//! latency percentiles, queue depth and busy workers over the last ten minutes, and the
//! last errors. The dashboard of `pyherd serve` draws its charts from it.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::error::Error;
use crate::worker::WorkerState;

/// Seconds of history kept (ten minutes).
pub(crate) const TIMELINE_SECONDS: usize = 600;
/// Errors kept by [`Pool::recent_errors`](crate::Pool::recent_errors).
pub(crate) const RECENT_ERRORS: usize = 50;
/// Longest error message kept, in characters; longer ones are cut and end with `…`.
pub(crate) const ERROR_MESSAGE_CHARS: usize = 300;
/// Highest latency the percentiles resolve (one hour, in microseconds); longer calls
/// count as this.
const LATENCY_MAX_US: u64 = 3_600_000_000;

/// The pool's last ten minutes, one sample per second, from
/// [`Pool::timeline`](crate::Pool::timeline).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Timeline {
    /// Width of a sample, in milliseconds (1000).
    pub interval_ms: u64,
    /// Unix time of this snapshot, in milliseconds.
    pub now_ms: u64,
    /// One sample per second, oldest first, without gaps, from the pool's start (or ten
    /// minutes ago) to the current second. The last one is still being filled.
    pub samples: Vec<TimelineSample>,
}

/// What happened during one second.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TimelineSample {
    /// Unix time of the second's start, in milliseconds.
    pub at_ms: u64,
    /// Calls that finished with a result during this second.
    pub ok: u64,
    /// Calls that finished with an error during this second.
    pub err: u64,
    /// Median latency (queue wait + execution) of the calls finished in this second, in
    /// microseconds; `None` when none finished. Percentiles are within 1%.
    pub p50_us: Option<u64>,
    /// 95th percentile latency, as `p50_us`.
    pub p95_us: Option<u64>,
    /// 99th percentile latency, as `p50_us`.
    pub p99_us: Option<u64>,
    /// Calls waiting for a worker, sampled once in this second (`None` when not sampled).
    pub queue_depth: Option<usize>,
    /// Workers running a call, sampled with `queue_depth`.
    pub busy_workers: Option<usize>,
}

/// One of the last errors calls ended with, from
/// [`Pool::recent_errors`](crate::Pool::recent_errors).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RecentError {
    /// Unix time the call ended, in milliseconds.
    pub at_ms: u64,
    /// The command called.
    pub command: String,
    /// The error's category (`python`, `timeout`, …).
    pub category: String,
    /// The error's kind (`python_exception`, `queue_timeout`, …).
    pub kind: String,
    /// The message, cut to 300 characters (then ending with `…`).
    pub message: String,
    /// The worker that failed the call, when one had taken it.
    pub worker_id: Option<String>,
}

/// One second being filled or kept.
struct Second {
    /// Seconds since the recorder started.
    index: u64,
    sample: TimelineSample,
}

struct Rings {
    seconds: VecDeque<Second>,
    /// Latencies of the calls finished in the newest second; folded into its sample
    /// when the next second begins.
    latency: Option<Histogram<u64>>,
    errors: VecDeque<RecentError>,
}

/// Records finished calls and samples into the rings; shared by the pool's handles.
pub(crate) struct Recorder {
    started: Instant,
    started_unix_ms: u64,
    rings: Mutex<Rings>,
}

impl Recorder {
    pub(crate) fn new() -> Self {
        Self {
            started: Instant::now(),
            started_unix_ms: unix_ms(SystemTime::now()),
            rings: Mutex::new(Rings {
                seconds: VecDeque::with_capacity(TIMELINE_SECONDS),
                latency: Histogram::new_with_bounds(1, LATENCY_MAX_US, 2).ok(),
                errors: VecDeque::with_capacity(RECENT_ERRORS),
            }),
        }
    }

    /// Counts one finished call that took `elapsed`; an error also joins the recent ones.
    pub(crate) fn record(&self, command: &str, elapsed: Duration, error: Option<&Error>) {
        let recent = error.map(|e| RecentError {
            at_ms: unix_ms(SystemTime::now()),
            command: command.to_owned(),
            category: e.category().as_str().to_owned(),
            kind: e.kind().as_str().to_owned(),
            message: truncate(e.message(), ERROR_MESSAGE_CHARS),
            worker_id: e.context().worker_id.clone(),
        });
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let Ok(mut rings) = self.rings.lock() else {
            return;
        };
        let rings = &mut *rings;
        if let Some(second) = self.roll(rings) {
            if recent.is_some() {
                second.err += 1;
            } else {
                second.ok += 1;
            }
        }
        if let Some(h) = rings.latency.as_mut() {
            h.saturating_record(micros.clamp(1, LATENCY_MAX_US));
        }
        if let Some(recent) = recent {
            if rings.errors.len() == RECENT_ERRORS {
                rings.errors.pop_front();
            }
            rings.errors.push_back(recent);
        }
    }

    /// Notes the queue depth and busy workers of the current second.
    pub(crate) fn sample(&self, queue_depth: usize, busy_workers: usize) {
        if let Some(second) = self
            .rings
            .lock()
            .as_deref_mut()
            .ok()
            .and_then(|r| self.roll(r))
        {
            second.queue_depth = Some(queue_depth);
            second.busy_workers = Some(busy_workers);
        }
    }

    /// The current second's sample, started (and the previous one's latencies folded in,
    /// the oldest dropped) if this is its first event.
    fn roll<'a>(&self, rings: &'a mut Rings) -> Option<&'a mut TimelineSample> {
        let index = self.started.elapsed().as_secs();
        let Rings {
            seconds, latency, ..
        } = rings;
        if seconds.back().is_none_or(|s| s.index != index) {
            if let (Some(last), Some(h)) = (seconds.back_mut(), latency.as_mut()) {
                fold(&mut last.sample, h);
                h.reset();
            }
            while seconds
                .front()
                .is_some_and(|s| s.index + TIMELINE_SECONDS as u64 <= index)
            {
                seconds.pop_front();
            }
            seconds.push_back(Second {
                index,
                sample: TimelineSample {
                    at_ms: self.at_ms(index),
                    ..TimelineSample::default()
                },
            });
        }
        seconds.back_mut().map(|last| &mut last.sample)
    }

    fn at_ms(&self, index: u64) -> u64 {
        self.started_unix_ms
            .saturating_add(index.saturating_mul(1000))
    }

    /// Every second of the window, oldest first; seconds without an event are empty.
    pub(crate) fn timeline(&self) -> Timeline {
        let now = self.started.elapsed().as_secs();
        let first = (now + 1).saturating_sub(TIMELINE_SECONDS as u64);
        let mut samples = Vec::with_capacity(usize::try_from(now + 1 - first).unwrap_or(0));
        if let Ok(rings) = self.rings.lock() {
            let mut kept = rings.seconds.iter().peekable();
            for index in first..=now {
                while kept.next_if(|s| s.index < index).is_some() {}
                let sample = match kept.next_if(|s| s.index == index) {
                    Some(s) if rings.seconds.back().is_some_and(|b| b.index == index) => {
                        let mut current = s.sample.clone();
                        if let Some(h) = rings.latency.as_ref() {
                            fold(&mut current, h);
                        }
                        current
                    }
                    Some(s) => s.sample.clone(),
                    None => TimelineSample {
                        at_ms: self.at_ms(index),
                        ..TimelineSample::default()
                    },
                };
                samples.push(sample);
            }
        }
        Timeline {
            interval_ms: 1000,
            now_ms: unix_ms(SystemTime::now()),
            samples,
        }
    }

    /// The last errors, oldest first.
    pub(crate) fn recent_errors(&self) -> Vec<RecentError> {
        self.rings
            .lock()
            .map(|r| r.errors.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Writes the percentiles of `h` into `sample` (nothing when `h` is empty).
fn fold(sample: &mut TimelineSample, h: &Histogram<u64>) {
    if h.is_empty() {
        return;
    }
    sample.p50_us = Some(h.value_at_quantile(0.50));
    sample.p95_us = Some(h.value_at_quantile(0.95));
    sample.p99_us = Some(h.value_at_quantile(0.99));
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `text` cut to `max` characters, ending with `…` when cut.
fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Samples the queue depth and busy workers every second until the pool closes.
pub(crate) async fn sample_every_second(shared: Weak<Shared>, closing: CancellationToken) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = closing.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let busy = shared
            .slots
            .iter()
            .filter(|s| s.status.state() == WorkerState::Busy)
            .count();
        shared
            .timeline
            .sample(shared.queued.load(Ordering::Relaxed), busy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn calls_land_in_their_second_with_percentiles_and_gaps_are_empty() {
        let recorder = Recorder::new();
        for i in 1..=100 {
            recorder.record("echo", ms(i), None);
        }
        recorder.sample(3, 2);
        let current = recorder.timeline();
        assert_eq!(current.samples.len(), 1);
        let first = &current.samples[0];
        assert_eq!((first.ok, first.err), (100, 0));
        let p50 = first.p50_us.unwrap();
        assert!((49_500..=50_500).contains(&p50), "{p50}");
        assert!(first.p95_us.unwrap() >= 94_000 && first.p99_us.unwrap() >= 98_000);
        assert_eq!((first.queue_depth, first.busy_workers), (Some(3), Some(2)));

        tokio::time::advance(Duration::from_secs(3)).await;
        let error = Error::new(ErrorKind::QueueTimeout, "late");
        recorder.record("slow", ms(7), Some(&error));
        let later = recorder.timeline();
        assert_eq!(later.samples.len(), 4);
        // The first second was folded when the fourth began: its percentiles stay.
        assert_eq!(later.samples[0].p50_us, Some(p50));
        for gap in &later.samples[1..3] {
            assert_eq!(
                (gap.ok, gap.err, gap.p50_us, gap.queue_depth),
                (0, 0, None, None)
            );
        }
        let last = &later.samples[3];
        assert_eq!((last.ok, last.err), (0, 1));
        assert!((6_900..=7_100).contains(&last.p99_us.unwrap()));
        let steps: Vec<u64> = later
            .samples
            .windows(2)
            .map(|w| w[1].at_ms - w[0].at_ms)
            .collect();
        assert_eq!(steps, [1000, 1000, 1000]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_keeps_ten_minutes() {
        let recorder = Recorder::new();
        recorder.record("echo", ms(1), None);
        tokio::time::advance(Duration::from_secs(TIMELINE_SECONDS as u64 - 1)).await;
        recorder.sample(0, 0);
        let full = recorder.timeline();
        assert_eq!(full.samples.len(), TIMELINE_SECONDS);
        assert_eq!(full.samples[0].ok, 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        recorder.sample(0, 0);
        let slid = recorder.timeline();
        assert_eq!(slid.samples.len(), TIMELINE_SECONDS);
        assert!(
            slid.samples.iter().all(|s| s.ok == 0),
            "the first second left"
        );
        tokio::time::advance(Duration::from_secs(3600)).await;
        let idle = recorder.timeline();
        assert_eq!(idle.samples.len(), TIMELINE_SECONDS);
        assert!(idle.samples.iter().all(|s| s.queue_depth.is_none()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_errors_are_kept_with_short_messages() {
        let recorder = Recorder::new();
        for i in 0..RECENT_ERRORS + 5 {
            let error = Error::new(ErrorKind::PythonException, format!("boom {i}"))
                .with_context(|c| c.worker_id = Some("w2".into()));
            recorder.record("fail", ms(1), Some(&error));
        }
        let long = Error::new(
            ErrorKind::WorkerCrashed,
            "é".repeat(ERROR_MESSAGE_CHARS + 10),
        );
        recorder.record("crash", ms(1), Some(&long));
        let errors = recorder.recent_errors();
        assert_eq!(errors.len(), RECENT_ERRORS);
        assert_eq!(errors[0].message, "boom 6");
        let first = &errors[0];
        assert_eq!(
            (
                first.command.as_str(),
                first.category.as_str(),
                first.kind.as_str()
            ),
            ("fail", "python", "python_exception")
        );
        assert_eq!(first.worker_id.as_deref(), Some("w2"));
        let last = errors.last().unwrap();
        assert_eq!(last.kind, "worker_crashed");
        assert_eq!(last.worker_id, None);
        assert_eq!(last.message.chars().count(), ERROR_MESSAGE_CHARS + 1);
        assert!(last.message.ends_with('…'));
        assert_eq!(truncate("short", 10), "short");
    }
}
