//! `POST /v1/stream` and `POST /v1/sessions/{id}/stream`: a streaming call as
//! Server-Sent Events. One `chunk` event per chunk (data: the chunk's JSON), then an
//! `end` event (`{"request_id","worker_id","duration_us","chunks"}`) or an `error` event
//! (the usual error object). Errors found before the stream starts are plain JSON error
//! responses. A client that disconnects drops the stream, which cancels the call.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use pyherd::{CallStream, Error, ErrorKind};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::AppState;
use super::error::ApiError;
use super::execute::{ExecuteRequest, answer_call, parse_body, with_request_id};
use super::openapi::{CallErrors, EVENT_STREAM, ErrorBody, STREAM_EVENTS, StreamEnd, StreamEvent};
use super::sessions::session_request;

/// Streams open at once when `max_streams` is not set.
pub(crate) const DEFAULT_MAX_STREAMS: usize = 64;

/// The open streams, bounded by `max_streams`.
#[derive(Clone)]
pub(crate) struct StreamLimit {
    permits: Arc<Semaphore>,
    max: usize,
}

impl StreamLimit {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    fn acquire(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.permits.clone().try_acquire_owned().map_err(|_| {
            ApiError::from(Error::new(
                ErrorKind::TooManyStreams,
                format!(
                    "{} streams are open, the most this server allows (max_streams)",
                    self.max
                ),
            ))
        })
    }
}

/// Runs one call and answers its chunks as Server-Sent Events.
#[utoipa::path(post, path = "/v1/stream", tag = "calls", request_body = ExecuteRequest,
    params(("X-Request-Id" = Option<String>, Header, description = "The call's request id (1-128 of `A-Z a-z 0-9 . _ : -`); one is made when absent")),
    responses((status = 200, description = STREAM_EVENTS, body = String,
        content_type = EVENT_STREAM), CallErrors))]
pub(crate) async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer_call(&headers, |request_id| async move {
        open(&state, parse_body(body)?, request_id).await
    })
    .await
}

/// Runs one call in the session and answers its chunks as Server-Sent Events.
#[utoipa::path(post, path = "/v1/sessions/{id}/stream", tag = "sessions", request_body = ExecuteRequest,
    params(("id" = String, Path, description = "The session id"), ("X-Request-Id" = Option<String>, Header, description = "The call's request id (1-128 of `A-Z a-z 0-9 . _ : -`); one is made when absent")),
    responses((status = 200, description = STREAM_EVENTS, body = String,
        content_type = EVENT_STREAM), CallErrors))]
pub(crate) async fn session_stream(
    State(state): State<AppState>,
    path: Result<Path<[String; 1]>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer_call(&headers, |request_id| async move {
        open(&state, session_request(path, body)?, request_id).await
    })
    .await
}

/// Starts the call and answers with its events.
async fn open(
    state: &AppState,
    request: ExecuteRequest,
    request_id: Option<String>,
) -> Result<Response, ApiError> {
    let permit = state.streams.acquire()?;
    let options = request.options(request_id)?;
    let stream = state
        .pool
        .stream_raw(&request.command, request.args, &options)
        .await?;
    let rid = stream.request_id().to_owned();
    let events = Sse::new(events(stream, permit)).keep_alive(KeepAlive::default());
    Ok(with_request_id(events.into_response(), &rid))
}

/// The stream's events; the permit is held until the last one (or the client's leaving).
fn events(
    stream: CallStream,
    permit: OwnedSemaphorePermit,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(Some((stream, permit)), |state| async move {
        let (mut stream, permit) = state?;
        let event = match stream.next().await {
            Some(Ok(chunk)) => {
                let event = StreamEvent::Chunk(chunk).sse();
                return Some((Ok(event), Some((stream, permit))));
            }
            Some(Err(e)) => StreamEvent::Error(Box::new(ErrorBody::from(&e))).sse(),
            None => match stream.end() {
                Some(end) => StreamEvent::End(StreamEnd {
                    request_id: stream.request_id().to_owned(),
                    worker_id: end.worker_id.clone(),
                    duration_us: u64::try_from(end.duration.as_micros()).unwrap_or(u64::MAX),
                    chunks: end.chunks,
                })
                .sse(),
                None => return None,
            },
        };
        drop((stream, permit));
        Some((Ok(event), None))
    })
}

impl StreamEvent {
    /// As Server-Sent Events carry it: the name in `event:`, the data as JSON in `data:`.
    fn sse(&self) -> Event {
        let (name, data) = match self {
            Self::Chunk(chunk) => ("chunk", serde_json::to_string(chunk)),
            Self::End(end) => ("end", serde_json::to_string(end)),
            Self::Error(error) => ("error", serde_json::to_string(error)),
        };
        // JSON values and plain structs of strings and numbers always serialise.
        Event::default().event(name).data(data.unwrap_or_default())
    }
}
