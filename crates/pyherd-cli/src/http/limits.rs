//! What one request may send: a body of JSON (415 otherwise), no larger than the limit
//! (413), arriving within the body timeout (408), nested no deeper than `MAX_DEPTH` (400).
//! The body is read here, whole, before any handler runs; the handlers then parse it.

use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use pyherd::{Error, ErrorKind};

use super::BODY_SLACK;
use super::error::ApiError;
use super::execute::request_id;

/// Deepest nesting of arrays and objects in a body, the envelope included. It is the
/// depth serde_json parses a value to (session metadata, a program's spec), so a body
/// within it is read whole wherever its depth lies; the raw `args`, passed to Python
/// unparsed, are held to it too.
pub(crate) const MAX_DEPTH: usize = 127;

/// The limits on a request body.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimits {
    /// Largest body, bytes.
    pub(crate) max_bytes: usize,
    /// Longest time from the end of the head to the end of the body.
    pub(crate) timeout: Duration,
}

/// The middleware: reads the body under the limits, then hands the request on.
pub(crate) async fn read_body(
    State(limits): State<BodyLimits>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    if body.is_end_stream() {
        return next.run(Request::from_parts(parts, body)).await;
    }
    // A refusal here is an answer to the call the client named, if it named one (read
    // only for a refusal: a body that passes has its id read by its route).
    let answer =
        |error: ApiError| error.for_request(request_id(&parts.headers).ok().flatten().as_deref());
    if let Some(refusal) = check_type(&parts.headers) {
        return answer(refusal).into_response();
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes as u64) {
        return closing(answer(too_large(limits.max_bytes)));
    }
    let read = tokio::time::timeout(
        limits.timeout,
        Limited::new(body, limits.max_bytes).collect(),
    );
    match read.await {
        Ok(Ok(collected)) => {
            let bytes = collected.to_bytes();
            if nesting(&bytes) > MAX_DEPTH {
                return answer(ApiError::malformed(format!(
                    "the body nests arrays and objects deeper than {MAX_DEPTH} levels"
                )))
                .into_response();
            }
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            closing(answer(too_large(limits.max_bytes)))
        }
        Ok(Err(e)) => closing(answer(ApiError::malformed(format!(
            "cannot read the request body: {e}"
        )))),
        Err(_) => closing(answer(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} ms (body_timeout_ms)",
                limits.timeout.as_millis()
            ),
        ))),
    }
}

/// A body must be JSON: no `Content-Type`, `application/json` (or a `+json` type), or the
/// form type `curl -d` sends by default (the body is still read as JSON).
fn check_type(headers: &HeaderMap) -> Option<ApiError> {
    let value = headers.get(header::CONTENT_TYPE)?;
    let essence = value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    let accepted = essence.as_deref().is_some_and(|t| {
        t == "application/json"
            || t == "application/x-www-form-urlencoded"
            || (t.starts_with("application/") && t.ends_with("+json"))
    });
    (!accepted).then(|| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "the body must be JSON (Content-Type: application/json), not {:?}",
                String::from_utf8_lossy(value.as_bytes())
            ),
        )
    })
}

/// The deepest nesting of `[` and `{` outside strings (a malformed body is left to the
/// parser, which names what is wrong with it).
fn nesting(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    deepest
}

fn too_large(limit: usize) -> ApiError {
    let error = Error::new(
        ErrorKind::PayloadTooLarge,
        format!(
            "the request body is over the limit of {limit} bytes (max_frame_bytes + {BODY_SLACK})"
        ),
    )
    .with_context(|c| c.limit_bytes = u64::try_from(limit).ok());
    ApiError::from(error)
}

/// The answer, and the connection closed after it: the rest of the body is not read.
fn closing(error: ApiError) -> Response {
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn nesting_counts_brackets_outside_strings() {
        assert_eq!(nesting(b"1"), 0);
        assert_eq!(nesting(br#"{"a": [1, {"b": []}]}"#), 4);
        assert_eq!(nesting(br#"{"a": "[[[[\"[[[", "b": ["\\", [0]]}"#), 3);
        assert_eq!(nesting(b"]]]]}[["), 2);
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(nesting(deep.as_bytes()), 100_000);
    }

    #[test]
    fn json_and_curls_default_type_are_accepted() {
        assert!(check_type(&HeaderMap::new()).is_none());
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/problem+json",
            "application/x-www-form-urlencoded",
        ] {
            assert!(check_type(&typed(ok)).is_none(), "{ok}");
        }
        for refused in [
            "text/plain",
            "multipart/form-data; boundary=x",
            "text/xml",
            "",
        ] {
            assert!(check_type(&typed(refused)).is_some(), "{refused}");
        }
    }
}
