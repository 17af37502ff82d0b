//! `POST /v1/execute`: one call through the pool.

use std::future::Future;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use pyherd::{Affinity, CallOptions, Error, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, REQUEST_ID};
use super::openapi::CallErrors;

/// Longest `timeout_ms` a request may ask for (one day).
const MAX_TIMEOUT_MS: u64 = 86_400_000;

/// The request body: a command and its arguments, with per-call options.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExecuteRequest {
    /// The handler to run, e.g. `echo`.
    pub(crate) command: String,
    /// The handler's arguments (any JSON; default `{}`).
    #[serde(default = "empty_object")]
    #[schema(value_type = Value)]
    pub(crate) args: Box<RawValue>,
    /// Run in this session (created on first use, except by the DSPy adapter's
    /// `cleanup_session`).
    pub(crate) session_id: Option<String>,
    /// Longest execution, 1..=86400000 ms [default: the server's `request_timeout_ms`].
    timeout_ms: Option<u64>,
    /// How a session call prefers the session's last worker.
    affinity: Option<Affinity>,
    /// Whether the call may be retried after a retryable error.
    idempotent: Option<bool>,
}

fn empty_object() -> Box<RawValue> {
    serde_json::value::to_raw_value(&serde_json::Map::new())
        .unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// The success body; `result` is passed through as the worker wrote it.
#[derive(Serialize, ToSchema)]
pub(crate) struct ExecuteResponse<'a> {
    /// Always `true`.
    ok: bool,
    /// What the handler returned (any JSON).
    #[schema(value_type = Value)]
    result: &'a RawValue,
    /// The worker that ran the call.
    worker_id: &'a str,
    /// Time from admission to the answer, µs.
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

/// Answers a call route: the `X-Request-Id` header is checked first, then `run` gets its
/// id, and an error `run` ends with carries that id (in its context and its header) even
/// when it came before the pool saw the call (a malformed body, a bad `timeout_ms`).
pub(crate) async fn answer_call<F, Fut>(headers: &HeaderMap, run: F) -> Response
where
    F: FnOnce(Option<String>) -> Fut,
    Fut: Future<Output = Result<Response, ApiError>>,
{
    let request_id = match request_id(headers) {
        Ok(id) => id,
        Err(error) => return error.into_response(),
    };
    let id = request_id.clone();
    match run(request_id).await {
        Ok(response) => response,
        Err(error) => error.for_request(id.as_deref()).into_response(),
    }
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

/// Parses the body, a JSON object, refusing what is malformed (400) or over the body
/// limit (413). (serde would also fill a struct from an array of its fields in order.)
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
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::malformed(
            "the request body must be a JSON object",
        ));
    }
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::malformed(format!("the request body is not valid: {e}")))
}

/// Runs one call on a free worker.
#[utoipa::path(post, path = "/v1/execute", tag = "calls", request_body = ExecuteRequest,
    params(("X-Request-Id" = Option<String>, Header, description = "The call's request id (1-128 of `A-Z a-z 0-9 . _ : -`); one is made when absent")),
    responses((status = 200, description = "The handler's result", body = ExecuteResponse),
        CallErrors))]
pub(crate) async fn execute(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer_call(&headers, |request_id| async move {
        call(&state, parse_body(body)?, request_id).await
    })
    .await
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
