//! Operations: stats, workers, liveness, readiness, Prometheus metrics.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::error::ApiError;

pub(crate) async fn stats(State(state): State<AppState>) -> Response {
    Json(state.pool.stats()).into_response()
}

pub(crate) async fn workers(State(state): State<AppState>) -> Response {
    Json(json!({ "workers": state.pool.workers() })).into_response()
}

/// The process is up and answering.
pub(crate) async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

/// 200 only while at least one worker can take calls. The body says why not: the
/// workers by state and, while new workers keep failing to start, that failure
/// (`spawn_failing`, with the Python stderr tail).
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let stats = state.pool.stats();
    let ready = state.pool.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({
        "ready": ready,
        "available": stats.available,
        "busy": stats.busy,
        "starting": stats.starting,
        "degraded": stats.degraded,
        "draining": stats.draining,
    });
    if let Some(failure) = state.pool.spawn_failure() {
        body["spawn_failing"] = failure.to_json();
    }
    (status, Json(body)).into_response()
}

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
