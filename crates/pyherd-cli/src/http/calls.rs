//! `DELETE /v1/calls/{request_id}`: cancels a call in flight (queued: removed at once;
//! running: stopped, or its worker killed and replaced). 200 with
//! `{"request_id","cancelled":true}`, 404 `invalid_request/call_not_found` when no call
//! in flight has that id.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use pyherd::{Error, ErrorKind};
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use super::execute::with_request_id;

pub(crate) async fn cancel(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let run = || {
        let Path(id) = path.map_err(|e| ApiError::malformed(format!("bad path: {e}")))?;
        pyherd::check_request_id(&id)?;
        if !state.pool.cancel(&id) {
            return Err(ApiError::from(Error::new(
                ErrorKind::CallNotFound,
                format!("no call in flight has the request id {id:?}"),
            )));
        }
        let body = Json(json!({"request_id": id, "cancelled": true}));
        Ok(with_request_id(body.into_response(), &id))
    };
    run().unwrap_or_else(IntoResponse::into_response)
}
