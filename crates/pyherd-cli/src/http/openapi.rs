//! The OpenAPI 3.1 document of the API, served at `GET /openapi.json` and generated from
//! the code: each handler's `#[utoipa::path]` (method, path, parameters, request body,
//! responses) and the `ToSchema` types it names, which are the types the handlers
//! serialise. [`super::api`] registers every route with `.routes(routes!(handler))`, so
//! a route and its documentation are added in one step and cannot be served apart.
//!
//! Errors: every error body is [`ErrorResponse`]; the sets of error statuses an operation
//! can answer are the `*Errors` types below, named in a handler's `responses(...)`.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use pyherd::{Category, ErrorContext};
use serde::Serialize;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::response::{Response as DocResponse, ResponseBuilder};
use utoipa::openapi::schema::{OneOfBuilder, Schema};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr};
use utoipa::{IntoResponses, OpenApi, ToSchema};

/// Title, description and tags of the document; paths and schemas come from the routes.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "pyherd",
        description = "A supervised herd of Python workers, callable over HTTP. Every \
            error is an `ErrorResponse` whose status follows from its category and kind. \
            A path that is not listed here answers 404 (`invalid_request/not_found`), a \
            listed path called with another method 405 (`invalid_request/method_not_allowed`)."
    ),
    components(schemas(ErrorResponse, ErrorBody, StreamEvent)),
    tags(
        (name = "calls", description = "Run a command on a worker"),
        (name = "sessions", description = "Sessions and their programs"),
        (name = "programs", description = "Programs every session can run"),
        (name = "operations", description = "Stats, workers, health, metrics, this document"),
    )
)]
pub(crate) struct ApiDoc;

/// Every error the API answers: `{"ok": false, "error": {...}}`.
#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorResponse {
    /// Always `false`.
    ok: bool,
    error: ErrorBody,
}

/// What failed: its category and kind, a message, whether trying again can help, and
/// the context known (worker, pid, session, Python traceback, stderr tail, limits).
#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    category: Category,
    /// The precise failure within its category: `malformed_request`, `invalid_id`,
    /// `unknown_command`, `payload_too_large`, `session_required`, `invalid_signature`,
    /// `not_found` and `method_not_allowed` (routes), `session_not_found`,
    /// `program_not_found`, `session_exists`, `quota_exceeded`, `python_exception`,
    /// `result_not_serializable`, `result_too_large`, `lm_error`, `worker_crashed`,
    /// `queue_timeout`, `execution_timeout`, `pool_saturated`, `worker_busy`,
    /// `circuit_open`, `shutting_down`, `spawn_failing`, `startup_failed`,
    /// `invalid_request_id`, `cancelled`, `call_not_found`, `too_many_streams`,
    /// `unauthorized`, `body_timeout`, `unsupported_media_type`, `too_many_connections`, …
    /// (a handler may raise a kind of its own).
    kind: String,
    /// What happened, for people.
    message: String,
    /// Whether the same call may succeed if tried again.
    retryable: bool,
    context: ErrorContext,
}

impl From<&pyherd::Error> for ErrorBody {
    fn from(e: &pyherd::Error) -> Self {
        Self {
            category: e.category(),
            kind: e.kind().as_str().to_owned(),
            message: e.message().to_owned(),
            retryable: e.is_retryable(),
            context: e.context().clone(),
        }
    }
}

/// One event of a stream, as `{"event": name, "data": the event's data}`: SSE carries
/// the name in its `event:` field and the data, as JSON, in its `data:` field.
#[derive(Serialize, ToSchema)]
#[serde(tag = "event", content = "data", rename_all = "lowercase")]
pub(crate) enum StreamEvent {
    /// A chunk the handler yielded: any JSON value.
    Chunk(serde_json::Value),
    /// The stream ran to its end.
    End(StreamEnd),
    /// The stream failed, after the chunks sent before: the error (the `error` of an
    /// `ErrorResponse`).
    Error(Box<ErrorBody>),
}

/// The data of a stream's `end` event.
#[derive(Serialize, ToSchema)]
pub(crate) struct StreamEnd {
    /// The call's request id.
    pub(crate) request_id: String,
    /// The worker that streamed.
    pub(crate) worker_id: String,
    /// Time from sending the call to the worker until its end, in microseconds.
    pub(crate) duration_us: u64,
    /// Chunks streamed.
    pub(crate) chunks: u64,
}

/// The generated document.
pub(crate) fn document() -> &'static utoipa::openapi::OpenApi {
    static DOCUMENT: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(|| {
        let mut document = super::api().into_openapi();
        guarded(&mut document);
        event_schemas(&mut document);
        document
    });
    &DOCUMENT
}

/// Names the schema of each event of every `text/event-stream` answer: OpenAPI 3.1 has
/// no place for it, so it is the media type's `x-event-schema` (a `StreamEvent`).
fn event_schemas(document: &mut utoipa::openapi::OpenApi) {
    let event = serde_json::json!({"$ref": "#/components/schemas/StreamEvent"});
    for item in document.paths.paths.values_mut() {
        for operation in [&mut item.get, &mut item.post].into_iter().flatten() {
            for response in operation.responses.responses.values_mut() {
                let RefOr::T(response) = response else {
                    continue;
                };
                if let Some(RefOr::T(content)) = response.content.get_mut(EVENT_STREAM) {
                    let extensions = Extensions::builder()
                        .add("x-event-schema", event.clone())
                        .build();
                    content.extensions = Some(extensions);
                }
            }
        }
    }
}

/// The media type of Server-Sent Events.
pub(crate) const EVENT_STREAM: &str = "text/event-stream";

/// `GET /openapi.json`: this API's OpenAPI document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API",
        body = Object, content_type = "application/json"))
)]
pub(crate) async fn openapi_json() -> Response {
    match document().to_json() {
        Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => super::error::ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "document_unavailable",
            format!("cannot write the OpenAPI document: {e}"),
        )
        .into_response(),
    }
}

/// Paths the token does not guard (see `auth`).
const OPEN_PATHS: [&str; 2] = ["/healthz", "/"];

/// What the body checks answer to a body sent to an operation that takes none.
const UNASKED_BODY: [(u16, &str); 4] = [
    (
        400,
        "A body was sent (this operation takes none) nesting deeper than 127 levels (`malformed_request`)",
    ),
    (
        408,
        "A body was sent (this operation takes none) slower than `body_timeout_ms` (`body_timeout`)",
    ),
    (
        413,
        "A body was sent (this operation takes none) over the size limit (`payload_too_large`)",
    ),
    (
        415,
        "A body was sent (this operation takes none) that is not JSON (`unsupported_media_type`)",
    ),
];

/// Adds what the server's guards answer before any handler runs, in one place for every
/// operation: the bearer token (when the server has one) and its 401, a body too slow
/// (408) or not JSON (415), also a body too large (413) or too deep (400) where the
/// operation takes none, and a 503 when the server holds `max_connections` already.
fn guarded(document: &mut utoipa::openapi::OpenApi) {
    document
        .components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    let mut guards = Vec::new();
    for (path, item) in &mut document.paths.paths {
        let open = OPEN_PATHS.contains(&path.as_str());
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            guards.clear();
            if !open {
                // `{}` first: without a token configured, no credentials are needed.
                operation.security = Some(vec![
                    SecurityRequirement::default(),
                    SecurityRequirement::new("bearer", Vec::<String>::new()),
                ]);
                guards.push((401, "The server has a token and the request did not carry it as `Authorization: Bearer` (`unauthorized`)"));
            }
            if operation.request_body.is_some() {
                guards.push((
                    408,
                    "The body arrived slower than `body_timeout_ms` (`body_timeout`)",
                ));
                guards.push((415, "The body is not JSON (`unsupported_media_type`)"));
            } else {
                // The body checks read any body sent, though the operation takes none.
                guards.extend(UNASKED_BODY);
            }
            guards.push((
                503,
                "The server holds `max_connections` connections (`too_many_connections`)",
            ));
            for (status, response) in errors(&guards) {
                match operation.responses.responses.entry(status) {
                    Entry::Vacant(place) => {
                        place.insert(response);
                    }
                    Entry::Occupied(mut place) => also_an_error(place.get_mut()),
                }
            }
        }
    }
}

/// Lets a response documented with a body of its own (the 503 of `/readyz`) also carry
/// the error body a guard answers with the same status.
fn also_an_error(response: &mut RefOr<DocResponse>) {
    let RefOr::T(response) = response else {
        return;
    };
    for content in response.content.values_mut() {
        let RefOr::T(content) = content else {
            continue;
        };
        let Some(schema) = content.schema.take() else {
            continue;
        };
        let is_error =
            matches!(&schema, RefOr::Ref(r) if r.ref_location.ends_with("/ErrorResponse"));
        content.schema = Some(if is_error {
            schema
        } else {
            let either = OneOfBuilder::new()
                .item(schema)
                .item(Ref::from_schema_name("ErrorResponse"));
            RefOr::T(Schema::OneOf(either.build()))
        });
    }
}

/// Responses with the error body, one per `(status, when)`.
fn errors(cases: &[(u16, &str)]) -> BTreeMap<String, RefOr<DocResponse>> {
    cases
        .iter()
        .map(|(status, when)| {
            let content = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorResponse")))
                .build();
            let response = ResponseBuilder::new()
                .description(*when)
                .content("application/json", content)
                .build();
            (status.to_string(), RefOr::T(response))
        })
        .collect()
}

/// Declares a set of error responses, for a handler's `responses(...)`.
macro_rules! error_set {
    ($(#[$doc:meta])* $name:ident: $(($status:literal, $when:expr)),+ $(,)?) => {
        $(#[$doc])*
        pub(crate) struct $name;

        impl IntoResponses for $name {
            fn responses() -> BTreeMap<String, RefOr<DocResponse>> {
                errors(&[$(($status, $when)),+])
            }
        }
    };
}

const MALFORMED: &str = "Malformed request: body, query or id (`malformed_request`, `invalid_id`)";
const TOO_LARGE: &str = "The body is over the frame limit (`payload_too_large`)";

error_set!(
    /// What a call to a worker can answer.
    CallErrors:
    (400, "Malformed request or invalid arguments (`malformed_request`, `invalid_id`, `invalid_request_id`, `session_required`, `invalid_signature`)"),
    (404, "No such command or session (`unknown_command`, `session_not_found`, `program_not_found`)"),
    (409, "The call was cancelled (`cancelled`)"),
    (413, "The body is over the frame limit (`payload_too_large`)"),
    (429, "A new session would pass `max_sessions` (`quota_exceeded`)"),
    (500, "The handler raised or returned what cannot be sent (`python_exception`, `result_not_serializable`, `result_too_large`)"),
    (502, "The worker died during the call, or the language model failed (`worker_crashed`, `lm_error`)"),
    (503, "No worker could take the call: queue full or waited too long, breaker open, shutting down, workers failing to start, too many streams (`pool_saturated`, `queue_timeout`, `circuit_open`, `worker_busy`, `shutting_down`, `spawn_failing`, `too_many_streams`); `Retry-After` says when to try again"),
    (504, "The call ran past its timeout; its worker was replaced (`execution_timeout`)"),
);

error_set!(
    /// What creating a session can answer.
    CreateErrors:
    (400, MALFORMED),
    (409, "A session with that id exists (`session_exists`)"),
    (413, TOO_LARGE),
    (429, "The store holds `max_sessions` live sessions (`quota_exceeded`)"),
);

error_set!(
    /// What reading or deleting a session or program can answer.
    LookupErrors:
    (400, MALFORMED),
    (404, "No such session or program (`session_not_found`, `program_not_found`)"),
);

error_set!(
    /// What changing a session can answer.
    UpdateErrors:
    (400, MALFORMED),
    (404, "No such session (`session_not_found`)"),
    (413, TOO_LARGE),
);

error_set!(
    /// What cancelling a call can answer.
    CancelErrors:
    (400, "Not a request id (`invalid_request_id`, `malformed_request`)"),
    (404, "No call in flight has that request id (`call_not_found`)"),
);

error_set!(
    /// What a reload can answer.
    ReloadErrors:
    (503, "The new code failed to start (`handler_import_failed`, `startup_failed`) and the workers not replaced keep serving, or the pool is shutting down (`shutting_down`)"),
);

/// What the events of a stream are.
pub(crate) const STREAM_EVENTS: &str = "Server-Sent Events: one `chunk` event per chunk \
    (data: the chunk's JSON), then `end` (data: a `StreamEnd`) or `error` (data: the error \
    object, an `ErrorBody`); each event, as `{event, data}`, is a `StreamEvent` \
    (`x-event-schema`)";

error_set!(
    /// What a bad query can answer.
    QueryErrors:
    (400, MALFORMED),
);
