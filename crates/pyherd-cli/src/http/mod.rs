//! The HTTP API of `pyherd serve`, by concern: calls (`execute`), streaming calls
//! (`stream`), cancelling calls (`calls`), sessions and programs (`sessions`), operations
//! (`admin`, `reload`), the live dashboard (`dashboard`), and the one mapping from errors
//! to status codes (`error`); the accept loop and its limits (`server`, `limits`) and the
//! token (`auth`).

mod admin;
mod auth;
mod calls;
mod dashboard;
mod error;
mod execute;
mod limits;
mod reload;
mod server;
mod sessions;
mod stream;

pub(crate) use auth::{Token, check_bind};
pub(crate) use server::{Limits, serve};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use pyherd::Pool;

/// Room for the JSON envelope of `/v1/execute` around a body of frame size: a body
/// over `max_frame_bytes + BODY_SLACK` is refused before it is read whole.
const BODY_SLACK: usize = 4096;

/// What every route can reach.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) pool: Pool,
    /// The open streams, bounded by `max_streams`.
    pub(crate) streams: stream::StreamLimit,
}

pub(crate) use stream::DEFAULT_MAX_STREAMS;

/// Every route of the API; at most `max_streams` streams are open at once.
pub(crate) fn router(pool: Pool, max_streams: usize) -> Router {
    let body_limit = pool.config().max_frame_bytes + BODY_SLACK;
    Router::new()
        .route("/v1/execute", post(execute::execute))
        .route("/v1/stream", post(stream::stream))
        .route("/v1/calls/{request_id}", delete(calls::cancel))
        .route("/v1/sessions", post(sessions::create).get(sessions::list))
        .route(
            "/v1/sessions/{id}",
            get(sessions::get)
                .patch(sessions::patch)
                .delete(sessions::delete),
        )
        .route("/v1/sessions/{id}/execute", post(sessions::execute))
        .route("/v1/sessions/{id}/stream", post(stream::session_stream))
        .route(
            "/v1/sessions/{id}/programs/{program_id}",
            get(sessions::get_program)
                .put(sessions::put_program)
                .delete(sessions::delete_program),
        )
        .route("/v1/programs", get(sessions::list_globals))
        .route(
            "/v1/programs/{program_id}",
            get(sessions::get_global)
                .put(sessions::put_global)
                .delete(sessions::delete_global),
        )
        .route("/v1/stats", get(admin::stats))
        .route("/v1/workers", get(admin::workers))
        .route("/v1/reload", post(reload::reload))
        .route("/healthz", get(admin::healthz))
        .route("/readyz", get(admin::readyz))
        .route("/metrics", get(admin::metrics))
        .route("/", get(dashboard::page))
        .route("/v1/timeline", get(dashboard::timeline))
        .fallback(admin::not_found)
        .method_not_allowed_fallback(admin::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(AppState {
            pool,
            streams: stream::StreamLimit::new(max_streams),
        })
}
