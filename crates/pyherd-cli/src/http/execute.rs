//! `POST /v1/execute`: one call through the pool.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use pyherd::{Affinity, CallOptions, Error, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::AppState;
use super::error::{ApiError, REQUEST_ID};

/// Longest `timeout_ms` a request may ask for (one day).
const MAX_TIMEOUT_MS: u64 = 86_400_000;

/// The request body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExecuteRequest {
    pub(crate) command: String,
    #[serde(default = "empty_object")]
    pub(crate) args: Box<RawValue>,
    pub(crate) session_id: Option<String>,
    timeout_ms: Option<u64>,
    affinity: Option<Affinity>,
    idempotent: Option<bool>,
}

fn empty_object() -> Box<RawValue> {
    serde_json::value::to_raw_value(&serde_json::Map::new())
        .unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// The success body; `result` is passed through as the worker wrote it.
#[derive(Serialize)]
struct ExecuteResponse<'a> {
    ok: bool,
    result: &'a RawValue,
    worker_id: &'a str,
    duration_us: u64,
}

/// The request id a client sent in `X-Request-Id`, checked.
///
/// # Errors
/// `invalid_request/invalid_request_id` (400) for a header that is not a valid id.
pub(crate) fn request_id(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(REQUEST_ID) else {
        return Ok(None);
    };
    let id = value.to_str().map_err(|_| {
        ApiError::from(Error::new(
            ErrorKind::InvalidRequestId,
            "the X-Request-Id header is not ASCII text",
        ))
    })?;
    pyherd::check_request_id(id)?;
    Ok(Some(id.to_owned()))
}

/// `response` with the `X-Request-Id` header.
pub(crate) fn with_request_id(mut response: Response, id: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

impl ExecuteRequest {
    /// The call's options; `request_id` from the `X-Request-Id` header.
    pub(crate) fn options(&self, request_id: Option<String>) -> Result<CallOptions, ApiError> {
        let mut options = CallOptions::new();
        if let Some(id) = request_id {
            options = options.request_id(id);
        }
        if let Some(ms) = self.timeout_ms {
            if !(1..=MAX_TIMEOUT_MS).contains(&ms) {
                return Err(ApiError::malformed(format!(
                    "timeout_ms must be 1..={MAX_TIMEOUT_MS}, not {ms}"
                )));
            }
            options = options.timeout(Duration::from_millis(ms));
        }
        if let Some(id) = &self.session_id {
            options = options.session_id(id.clone());
        }
        if let Some(affinity) = self.affinity {
            options = options.affinity(affinity);
        }
        if let Some(idempotent) = self.idempotent {
            options = options.idempotent(idempotent);
        }
        Ok(options)
    }
}

/// Parses the body, refusing what is malformed (400) or over the body limit (413).
pub(crate) fn parse_body<T: for<'de> Deserialize<'de>>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::from(Error::new(
                ErrorKind::PayloadTooLarge,
                "the request body is over the frame limit",
            ))
        } else {
            ApiError::malformed(format!("cannot read the request body: {rejection}"))
        }
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::malformed(format!("the request body is not valid: {e}")))
}

pub(crate) async fn execute(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match run(&state, &headers, body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn run(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request_id = request_id(headers)?;
    let request: ExecuteRequest = parse_body(body)?;
    call(state, request, request_id).await
}

/// Runs a parsed request (of `/v1/execute` or `/v1/sessions/{id}/execute`).
pub(crate) async fn call(
    state: &AppState,
    request: ExecuteRequest,
    request_id: Option<String>,
) -> Result<Response, ApiError> {
    let options = request.options(request_id)?;
    let reply = state
        .pool
        .execute_raw(&request.command, request.args, &options)
        .await?;
    let body = ExecuteResponse {
        ok: true,
        result: reply.raw(),
        worker_id: reply.worker_id(),
        duration_us: u64::try_from(reply.duration().as_micros()).unwrap_or(u64::MAX),
    };
    Ok(with_request_id(
        axum::Json(body).into_response(),
        reply.request_id(),
    ))
}
