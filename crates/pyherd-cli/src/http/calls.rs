//! `DELETE /v1/calls/{request_id}`: cancels a call in flight (queued: removed at once;
//! running: stopped, or its worker killed and replaced). 200 with
//! `{"request_id","cancelled":true}`, 404 `invalid_request/call_not_found` when no call
//! in flight has that id.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use pyherd::{Error, ErrorKind};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::ApiError;
use super::execute::with_request_id;
use super::openapi::CancelErrors;

/// A call that was cancelled.
#[derive(Serialize, ToSchema)]
pub(crate) struct Cancelled {
    /// The call's request id.
    request_id: String,
    /// Always `true`.
    cancelled: bool,
}

/// Cancels the call in flight with this request id.
#[utoipa::path(delete, path = "/v1/calls/{request_id}", tag = "calls",
    params(("request_id" = String, Path, description = "The call's request id (its `X-Request-Id`)")),
    responses((status = 200, description = "The call was cancelled; its caller gets 409 `cancelled`", body = Cancelled),
        CancelErrors))]
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
        let body = Json(Cancelled {
            request_id: id.clone(),
            cancelled: true,
        });
        Ok(with_request_id(body.into_response(), &id))
    };
    run().unwrap_or_else(IntoResponse::into_response)
}
