//! `POST /v1/reload`: the zero-downtime reload of the handler code that SIGHUP also starts.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use pyherd::ReloadReport;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::ApiError;
use super::openapi::ReloadErrors;

/// A reload that replaced every worker.
#[derive(Serialize, ToSchema)]
pub(crate) struct Reloaded {
    /// Always `true`.
    ok: bool,
    reload: ReloadReport,
}

/// Replaces every worker with one running the handler code anew and answers with the
/// report (`{"ok": true, "reload": {workers, zygote_pid, duration_ms}}`), or with the
/// error that stopped it (the workers not replaced keep serving). The reload runs to its
/// end even when the client goes away.
#[utoipa::path(post, path = "/v1/reload", tag = "operations",
    responses((status = 200, description = "Every worker was replaced", body = Reloaded),
        ReloadErrors))]
pub(crate) async fn reload(State(state): State<AppState>) -> Response {
    let pool = state.pool.clone();
    match tokio::spawn(async move { pool.reload().await }).await {
        Ok(Ok(report)) => Json(Reloaded {
            ok: true,
            reload: report,
        })
        .into_response(),
        Ok(Err(error)) => ApiError::from(error).into_response(),
        Err(_) => ApiError::from(pyherd::Error::new(
            pyherd::ErrorKind::ShuttingDown,
            "the reload task ended early",
        ))
        .into_response(),
    }
}
