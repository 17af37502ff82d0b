//! `POST /v1/reload`: the zero-downtime reload of the handler code that SIGHUP also starts.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::error::ApiError;

/// Replaces every worker with one running the handler code anew and answers with the
/// report (`{"ok": true, "reload": {workers, zygote_pid, duration_ms}}`), or with the
/// error that stopped it (the workers not replaced keep serving). The reload runs to its
/// end even when the client goes away.
pub(crate) async fn reload(State(state): State<AppState>) -> Response {
    let pool = state.pool.clone();
    match tokio::spawn(async move { pool.reload().await }).await {
        Ok(Ok(report)) => Json(json!({ "ok": true, "reload": report })).into_response(),
        Ok(Err(error)) => ApiError::from(error).into_response(),
        Err(_) => ApiError::from(pyherd::Error::new(
            pyherd::ErrorKind::ShuttingDown,
            "the reload task ended early",
        ))
        .into_response(),
    }
}
