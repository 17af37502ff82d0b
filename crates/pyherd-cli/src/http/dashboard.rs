//! The live dashboard: one self-contained page at `/` (inline CSS and JS, no request
//! leaves the server it came from) and the timeline it draws from.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use pyherd::{RecentError, TimelineSample};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;

/// The page, shipped inside the binary.
const PAGE: &str = include_str!("../../assets/dashboard.html");

/// Only inline code and same-origin fetches: the page loads nothing from anywhere else.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The last ten minutes second by second, and the last errors.
#[derive(Serialize, ToSchema)]
pub(crate) struct TimelineResponse {
    /// Width of a sample, in milliseconds.
    interval_ms: u64,
    /// Unix time of this snapshot, in milliseconds.
    now_ms: u64,
    /// One sample per second, oldest first; the last one is still being filled.
    samples: Vec<TimelineSample>,
    /// The last 50 errors calls ended with, oldest first.
    recent_errors: Vec<RecentError>,
}

/// `GET /`: the dashboard page.
#[utoipa::path(get, path = "/", tag = "operations",
    responses((status = 200, description = "The live dashboard (one HTML page)",
        body = String, content_type = "text/html; charset=utf-8")))]
pub(crate) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        PAGE,
    )
        .into_response()
}

/// `GET /v1/timeline`: the last ten minutes second by second and the last errors.
#[utoipa::path(get, path = "/v1/timeline", tag = "operations",
    responses((status = 200, description = "The timeline the dashboard draws", body = TimelineResponse)))]
pub(crate) async fn timeline(State(state): State<AppState>) -> Response {
    let timeline = state.pool.timeline();
    Json(TimelineResponse {
        interval_ms: timeline.interval_ms,
        now_ms: timeline.now_ms,
        samples: timeline.samples,
        recent_errors: state.pool.recent_errors(),
    })
    .into_response()
}
