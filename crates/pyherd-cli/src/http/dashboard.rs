//! The live dashboard: one self-contained page at `/` (inline CSS and JS, no request
//! leaves the server it came from) and the timeline it draws from.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;

/// The page, shipped inside the binary.
const PAGE: &str = include_str!("../../assets/dashboard.html");

/// Only inline code and same-origin fetches: the page loads nothing from anywhere else.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /`: the dashboard page.
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
pub(crate) async fn timeline(State(state): State<AppState>) -> Response {
    let timeline = state.pool.timeline();
    Json(json!({
        "interval_ms": timeline.interval_ms,
        "now_ms": timeline.now_ms,
        "samples": timeline.samples,
        "recent_errors": state.pool.recent_errors(),
    }))
    .into_response()
}
