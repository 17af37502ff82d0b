//! Every error leaves the API as `{"ok": false, "error": {category, kind, message,
//! retryable, context}}` with a status code chosen here and nowhere else.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use pyherd::{Category, Error, ErrorKind};
use serde_json::json;

/// The header that carries a call's request id, both ways.
pub(crate) const REQUEST_ID: &str = "x-request-id";

/// Seconds a client should wait before retrying a 503, unless the error's context says
/// (`retry_after_ms` of an open circuit breaker, rounded up to whole seconds).
const RETRY_AFTER_SECONDS: u64 = 1;

/// An error on its way to the client.
pub(crate) struct ApiError {
    status: StatusCode,
    body: serde_json::Value,
}

impl ApiError {
    /// An error of the API itself (no pool error behind it), e.g. an unknown route.
    pub(crate) fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({
                "category": "invalid_request",
                "kind": kind,
                "message": message.into(),
                "retryable": false,
                "context": {},
            }),
        }
    }

    /// A malformed request (400).
    pub(crate) fn malformed(message: impl Into<String>) -> Self {
        Self::from(Error::new(ErrorKind::MalformedRequest, message))
    }

    /// This error as the answer to the call with request id `id`: the id goes into its
    /// context, and so into its `X-Request-Id` header, unless it has one already (an
    /// error of the pool carries the call's own).
    pub(crate) fn for_request(mut self, id: Option<&str>) -> Self {
        let context = self
            .body
            .get_mut("context")
            .and_then(serde_json::Value::as_object_mut);
        if let (Some(id), Some(context)) = (id, context) {
            context
                .entry("request_id")
                .or_insert_with(|| id.to_owned().into());
        }
        self
    }
}

/// The status code for a pool error.
pub(crate) fn status_of(error: &Error) -> StatusCode {
    match error.kind() {
        ErrorKind::UnknownCommand
        | ErrorKind::SessionNotFound
        | ErrorKind::ProgramNotFound
        | ErrorKind::CallNotFound => StatusCode::NOT_FOUND,
        ErrorKind::SessionExists | ErrorKind::Cancelled => StatusCode::CONFLICT,
        ErrorKind::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::QueueTimeout
        | ErrorKind::PoolSaturated
        | ErrorKind::ShuttingDown
        | ErrorKind::WorkerBusy
        | ErrorKind::CircuitOpen
        | ErrorKind::TooManyStreams => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::ExecutionTimeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::WorkerCrashed | ErrorKind::LmError => StatusCode::BAD_GATEWAY,
        _ => match error.category() {
            Category::InvalidRequest => StatusCode::BAD_REQUEST,
            Category::Communication => StatusCode::BAD_GATEWAY,
            Category::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Category::Initialization => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        },
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        Self {
            status: status_of(&error),
            body: error.to_json(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let rid = self.body["context"]["request_id"]
            .as_str()
            .and_then(|id| HeaderValue::from_str(id).ok());
        let body = json!({"ok": false, "error": self.body});
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(rid) = rid {
            response.headers_mut().insert(REQUEST_ID, rid);
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            let seconds = self.body["context"]["retry_after_ms"]
                .as_u64()
                .map_or(RETRY_AFTER_SECONDS, |ms| ms.div_ceil(1000).max(1));
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_documented_status() {
        let cases = [
            (ErrorKind::MalformedRequest, 400),
            (ErrorKind::UnknownCommand, 404),
            (ErrorKind::PayloadTooLarge, 413),
            (ErrorKind::PythonException, 500),
            (ErrorKind::ResultNotSerializable, 500),
            (ErrorKind::ResultTooLarge, 500),
            (ErrorKind::WorkerCrashed, 502),
            (ErrorKind::PoolSaturated, 503),
            (ErrorKind::QueueTimeout, 503),
            (ErrorKind::ShuttingDown, 503),
            (ErrorKind::ExecutionTimeout, 504),
            (ErrorKind::StartupFailed, 503),
            (ErrorKind::SessionNotFound, 404),
            (ErrorKind::ProgramNotFound, 404),
            (ErrorKind::SessionExists, 409),
            (ErrorKind::QuotaExceeded, 429),
            (ErrorKind::WorkerBusy, 503),
            (ErrorKind::CircuitOpen, 503),
            (ErrorKind::LmError, 502),
            (ErrorKind::InvalidId, 400),
            (ErrorKind::InvalidSignature, 400),
            (ErrorKind::SessionRequired, 400),
            (ErrorKind::InvalidRequestId, 400),
            (ErrorKind::CallNotFound, 404),
            (ErrorKind::Cancelled, 409),
            (ErrorKind::TooManyStreams, 503),
        ];
        for (kind, status) in cases {
            let e = Error::new(kind.clone(), "x");
            assert_eq!(status_of(&e).as_u16(), status, "{kind}");
        }
    }

    #[test]
    fn a_503_says_when_to_retry() {
        let r = ApiError::from(Error::new(ErrorKind::PoolSaturated, "full")).into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let open = Error::new(ErrorKind::CircuitOpen, "open")
            .with_context(|c| c.retry_after_ms = Some(59_001));
        let r = ApiError::from(open).into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "60");
        let r = ApiError::from(Error::new(ErrorKind::ExecutionTimeout, "slow")).into_response();
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
    }
}
