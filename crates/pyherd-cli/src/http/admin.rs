//! Operations: stats, workers, liveness, readiness, Prometheus metrics.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use pyherd::{PoolStats, WorkerInfo};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::ApiError;
use super::openapi::ErrorBody;

/// `GET /v1/workers`.
#[derive(Serialize, ToSchema)]
pub(crate) struct WorkerList {
    /// Every worker in service, by slot.
    workers: Vec<WorkerInfo>,
}

/// `GET /healthz`.
#[derive(Serialize, ToSchema)]
pub(crate) struct Health {
    /// Always `ok`.
    status: &'static str,
}

/// `GET /readyz`: whether calls can be served, with the workers by state.
#[derive(Serialize, ToSchema)]
pub(crate) struct Readiness {
    /// At least one worker can take calls.
    ready: bool,
    /// Workers idle and ready.
    available: usize,
    /// Workers running a call.
    busy: usize,
    /// Workers starting.
    starting: usize,
    /// Workers that missed a health check.
    degraded: usize,
    /// Workers being retired.
    draining: usize,
    /// While new workers keep failing to start: the last failure, with its stderr tail.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<ErrorBody>)]
    spawn_failing: Option<serde_json::Value>,
}

/// The pool's counters now.
#[utoipa::path(get, path = "/v1/stats", tag = "operations",
    responses((status = 200, description = "The pool's counters", body = PoolStats)))]
pub(crate) async fn stats(State(state): State<AppState>) -> Response {
    Json(state.pool.stats()).into_response()
}

/// Every worker: id, pid, state, calls served, memory, age.
#[utoipa::path(get, path = "/v1/workers", tag = "operations",
    responses((status = 200, description = "The workers", body = WorkerList)))]
pub(crate) async fn workers(State(state): State<AppState>) -> Response {
    Json(WorkerList {
        workers: state.pool.workers(),
    })
    .into_response()
}

/// The process is up and answering.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Up", body = Health)))]
pub(crate) async fn healthz() -> Response {
    Json(Health { status: "ok" }).into_response()
}

/// 200 only while at least one worker can take calls. The body says why not: the
/// workers by state and, while new workers keep failing to start, that failure
/// (`spawn_failing`, with the Python stderr tail).
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "A worker can take calls", body = Readiness),
    (status = 503, description = "No worker can take calls", body = Readiness)))]
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let stats = state.pool.stats();
    let ready = state.pool.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        ready,
        available: stats.available,
        busy: stats.busy,
        starting: stats.starting,
        degraded: stats.degraded,
        draining: stats.draining,
        spawn_failing: state.pool.spawn_failure().map(|failure| failure.to_json()),
    };
    (status, Json(body)).into_response()
}

/// The Prometheus text exposition of the pool's metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200,
    description = "Prometheus text format 0.0.4", body = String,
    content_type = "text/plain; version=0.0.4; charset=utf-8")))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.pool.render_metrics(),
    )
        .into_response()
}

pub(crate) async fn not_found(uri: Uri) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {}", uri.path()),
    )
    .into_response()
}

pub(crate) async fn method_not_allowed(uri: Uri) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not take this method", uri.path()),
    )
    .into_response()
}
