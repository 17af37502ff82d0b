//! pyherd runs a supervised herd of Python worker processes and lets Rust call them.
//!
//! Workers start in parallel and speak a framed JSON protocol on dedicated pipes; calls
//! wait in a bounded FIFO queue with a timeout; a worker that hangs past its deadline or
//! dies is killed (with its whole process group) and replaced, failing only its own call.
//!
//! ```no_run
//! # async fn demo() -> Result<(), pyherd::Error> {
//! use pyherd::{CallOptions, Pool};
//! use std::time::Duration;
//!
//! let pool = Pool::builder().workers(4).handlers("examples/handlers.py").build().await?;
//! let reply = pool
//!     .execute_with("echo", serde_json::json!([1, 2, 3]), &CallOptions::new().timeout(Duration::from_secs(2)))
//!     .await?;
//! println!("{} answered {}", reply.worker_id(), reply.raw());
//! pool.shutdown().await;
//! # Ok(()) }
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
pub mod error;
mod metrics;
pub mod policy;
mod pool;
mod protocol;
mod python;
pub mod registry;
pub mod session;
mod telemetry;
mod worker;

pub use config::{Affinity, PoolConfig};
pub use error::{Category, Error, ErrorContext, ErrorKind};
pub use policy::{Backoff, BreakerInfo, BreakerState, Recovery};
pub use pool::{
    CallOptions, CallStream, HOST_WORKER_ID, MAX_REQUEST_ID_LEN, Pool, PoolBuilder, PoolStats,
    RecentError, ReloadReport, ReloadedWorker, Reply, STREAM_BUFFER, StreamEnd, Timeline,
    TimelineSample, WorkerInfo, check_request_id,
};
pub use worker::{StartedBy, WorkerState};

/// The README's Rust examples compile as doc tests, so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeExamples;
