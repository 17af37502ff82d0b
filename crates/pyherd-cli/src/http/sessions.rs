//! Sessions and programs: `/v1/sessions…` and the global `/v1/programs…`.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use pyherd::session::{self, Program, Session, SessionPage, SessionSpec, SessionUpdate, check_id};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::ApiError;
use super::execute::{ExecuteRequest, ExecuteResponse, answer_call, call, parse_body};
use super::openapi::{CallErrors, CreateErrors, LookupErrors, QueryErrors, UpdateErrors};

/// Most sessions one page of `GET /v1/sessions` may hold.
const MAX_PAGE: usize = 1000;
/// Sessions on a page when the request does not say.
const DEFAULT_PAGE: usize = 100;

type ApiResult = Result<Response, ApiError>;

/// `POST /v1/sessions`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBody {
    /// The id (`A-Z a-z 0-9 - _ . :`, at most 128 characters) [default: generated].
    session_id: Option<String>,
    /// Time to live after the last access, s [default: the server's `session_ttl_ms`].
    ttl_s: Option<u64>,
    /// Any JSON [default: `{}`].
    #[schema(value_type = Option<Value>)]
    metadata: Option<Box<RawValue>>,
}

/// `PATCH /v1/sessions/{id}`: what is given replaces what the session has.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatchBody {
    /// New metadata.
    #[schema(value_type = Option<Value>)]
    metadata: Option<Box<RawValue>>,
    /// New time to live, s.
    ttl_s: Option<u64>,
}

/// The metadata of a body, read as given (see [`session::metadata_from_json`]).
fn metadata(raw: Option<Box<RawValue>>) -> Result<Option<Value>, ApiError> {
    Ok(raw
        .as_deref()
        .map(session::metadata_from_json)
        .transpose()?)
}

/// A page of `GET /v1/sessions`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Sessions on the page, 1..=1000 [default: 100].
    limit: Option<usize>,
    /// The `next_after` of the previous page.
    after: Option<String>,
}

/// A deleted session.
#[derive(Serialize, ToSchema)]
pub(crate) struct SessionDeleted {
    session_id: String,
    /// Always `true`.
    deleted: bool,
}

/// A deleted program.
#[derive(Serialize, ToSchema)]
pub(crate) struct ProgramDeleted {
    program_id: String,
    /// Always `true`.
    deleted: bool,
}

/// `GET /v1/programs`.
#[derive(Serialize, ToSchema)]
pub(crate) struct ProgramList {
    /// Every global program, in id order.
    programs: Vec<Program>,
}

/// The path's ids, each checked (they name store keys and appear in logs).
fn ids<T>(path: Result<Path<T>, PathRejection>, names: &[&str]) -> Result<T, ApiError>
where
    T: AsRef<[String]>,
{
    let Path(ids) = path.map_err(|e| ApiError::malformed(format!("bad path: {e}")))?;
    for (id, what) in ids.as_ref().iter().zip(names) {
        check_id(what, id)?;
    }
    Ok(ids)
}

fn one(path: Result<Path<[String; 1]>, PathRejection>, what: &str) -> Result<String, ApiError> {
    let [id] = ids(path, &[what])?;
    Ok(id)
}

fn ttl(seconds: Option<u64>) -> Option<Duration> {
    seconds.map(Duration::from_secs)
}

/// Creates a session.
#[utoipa::path(post, path = "/v1/sessions", tag = "sessions", request_body = CreateBody,
    responses((status = 201, description = "Created", body = Session), CreateErrors))]
pub(crate) async fn create(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body: CreateBody = parse_body(body)?;
    let mut spec = SessionSpec::new();
    spec.id = body.session_id;
    spec.ttl = ttl(body.ttl_s);
    spec.metadata = metadata(body.metadata)?;
    let session = state.pool.sessions().create(spec).await?;
    Ok((StatusCode::CREATED, Json(session)).into_response())
}

/// Live sessions in id order, a page at a time.
#[utoipa::path(get, path = "/v1/sessions", tag = "sessions", params(ListQuery),
    responses((status = 200, description = "A page", body = SessionPage), QueryErrors))]
pub(crate) async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult {
    let Query(query) = query.map_err(|e| ApiError::malformed(format!("bad query: {e}")))?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::malformed(format!(
            "limit must be 1..={MAX_PAGE}, not {limit}"
        )));
    }
    let page = state.pool.sessions().list(query.after, limit).await?;
    Ok(Json(page).into_response())
}

/// One session (an access: its TTL restarts).
#[utoipa::path(get, path = "/v1/sessions/{id}", tag = "sessions", params(("id" = String, Path, description = "The session id")),
    responses((status = 200, description = "The session", body = Session), LookupErrors))]
pub(crate) async fn get(
    State(state): State<AppState>,
    path: Result<Path<[String; 1]>, PathRejection>,
) -> ApiResult {
    let id = one(path, "session")?;
    Ok(Json(state.pool.sessions().get(&id).await?).into_response())
}

/// Changes a session's metadata or TTL.
#[utoipa::path(patch, path = "/v1/sessions/{id}", tag = "sessions", params(("id" = String, Path, description = "The session id")),
    request_body = PatchBody,
    responses((status = 200, description = "The session, changed", body = Session), UpdateErrors))]
pub(crate) async fn patch(
    State(state): State<AppState>,
    path: Result<Path<[String; 1]>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let id = one(path, "session")?;
    let body: PatchBody = parse_body(body)?;
    let mut update = SessionUpdate::default();
    update.metadata = metadata(body.metadata)?;
    update.ttl = ttl(body.ttl_s);
    Ok(Json(state.pool.sessions().update(&id, update).await?).into_response())
}

/// Deletes a session.
#[utoipa::path(delete, path = "/v1/sessions/{id}", tag = "sessions", params(("id" = String, Path, description = "The session id")),
    responses((status = 200, description = "Deleted", body = SessionDeleted), LookupErrors))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    path: Result<Path<[String; 1]>, PathRejection>,
) -> ApiResult {
    let id = one(path, "session")?;
    let removed = state.pool.sessions().delete(&id).await?;
    Ok(Json(SessionDeleted {
        session_id: removed.id,
        deleted: true,
    })
    .into_response())
}

/// `POST /v1/sessions/{id}/execute`: the body of `/v1/execute`, in this session.
#[utoipa::path(post, path = "/v1/sessions/{id}/execute", tag = "sessions", params(("id" = String, Path, description = "The session id"), ("X-Request-Id" = Option<String>, Header, description = "The call's request id (1-128 of `A-Z a-z 0-9 . _ : -`); one is made when absent")),
    request_body = ExecuteRequest,
    responses((status = 200, description = "The handler's result", body = ExecuteResponse),
        CallErrors))]
pub(crate) async fn execute(
    State(state): State<AppState>,
    path: Result<Path<[String; 1]>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer_call(&headers, |request_id| async move {
        call(&state, session_request(path, body)?, request_id).await
    })
    .await
}

/// The body of a call in the session named by the path (the body may name it too).
pub(crate) fn session_request(
    path: Result<Path<[String; 1]>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<ExecuteRequest, ApiError> {
    let id = one(path, "session")?;
    let mut request: ExecuteRequest = parse_body(body)?;
    match &request.session_id {
        Some(other) if *other != id => {
            return Err(ApiError::malformed(format!(
                "the body names session {other:?}, the path {id:?}"
            )));
        }
        _ => request.session_id = Some(id),
    }
    Ok(request)
}

/// A program of the session.
#[utoipa::path(get, path = "/v1/sessions/{id}/programs/{program_id}", tag = "sessions",
    params(("id" = String, Path, description = "The session id"), ("program_id" = String, Path, description = "The program id")),
    responses((status = 200, description = "The program", body = Program), LookupErrors))]
pub(crate) async fn get_program(
    State(state): State<AppState>,
    path: Result<Path<[String; 2]>, PathRejection>,
) -> ApiResult {
    let [session, program] = ids(path, &["session", "program"])?;
    let program = state
        .pool
        .sessions()
        .get_program(&session, &program)
        .await?;
    Ok(Json(program).into_response())
}

/// Stores (or replaces) a program of the session; a worker validates its definition.
#[utoipa::path(put, path = "/v1/sessions/{id}/programs/{program_id}", tag = "sessions",
    params(("id" = String, Path, description = "The session id"), ("program_id" = String, Path, description = "The program id")),
    request_body(content = Object, description = "The definition: `signature` and optional \
        `program_type` (`predict`, `chain_of_thought`), as the DSPy adapter takes them"),
    responses((status = 200, description = "The program", body = Program), CallErrors))]
pub(crate) async fn put_program(
    State(state): State<AppState>,
    path: Result<Path<[String; 2]>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let [session, program] = ids(path, &["session", "program"])?;
    let spec: Map<String, Value> = parse_body(body)?;
    let program = state
        .pool
        .put_program(Some(&session), &program, spec)
        .await?;
    Ok(Json(program).into_response())
}

/// Deletes a program of the session.
#[utoipa::path(delete, path = "/v1/sessions/{id}/programs/{program_id}", tag = "sessions",
    params(("id" = String, Path, description = "The session id"), ("program_id" = String, Path, description = "The program id")),
    responses((status = 200, description = "Deleted", body = ProgramDeleted), LookupErrors))]
pub(crate) async fn delete_program(
    State(state): State<AppState>,
    path: Result<Path<[String; 2]>, PathRejection>,
) -> ApiResult {
    let [session, program] = ids(path, &["session", "program"])?;
    let removed = state
        .pool
        .sessions()
        .delete_program(&session, &program)
        .await?;
    Ok(Json(ProgramDeleted {
        program_id: removed.id,
        deleted: true,
    })
    .into_response())
}

/// Every global program.
#[utoipa::path(get, path = "/v1/programs", tag = "programs",
    responses((status = 200, description = "The global programs", body = ProgramList)))]
pub(crate) async fn list_globals(State(state): State<AppState>) -> ApiResult {
    let programs = state.pool.sessions().list_global_programs().await?;
    Ok(Json(ProgramList { programs }).into_response())
}

/// A global program.
#[utoipa::path(get, path = "/v1/programs/{program_id}", tag = "programs", params(("program_id" = String, Path, description = "The program id")),
    responses((status = 200, description = "The program", body = Program), LookupErrors))]
pub(crate) async fn get_global(
    State(state): State<AppState>,
    path: Result<Path<[String; 1]>, PathRejection>,
) -> ApiResult {
    let id = one(path, "program")?;
    Ok(Json(state.pool.sessions().get_global_program(&id).await?).into_response())
}

/// Stores (or replaces) a program every session can run.
#[utoipa::path(put, path = "/v1/programs/{program_id}", tag = "programs", params(("program_id" = String, Path, description = "The program id")),
    request_body(content = Object, description = "The definition, as for a session program"),
    responses((status = 200, description = "The program", body = Program), CallErrors))]
pub(crate) async fn put_global(
    State(state): State<AppState>,
    path: Result<Path<[String; 1]>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let id = one(path, "program")?;
    let spec: Map<String, Value> = parse_body(body)?;
    Ok(Json(state.pool.put_program(None, &id, spec).await?).into_response())
}

/// Deletes a global program.
#[utoipa::path(delete, path = "/v1/programs/{program_id}", tag = "programs", params(("program_id" = String, Path, description = "The program id")),
    responses((status = 200, description = "Deleted", body = ProgramDeleted), LookupErrors))]
pub(crate) async fn delete_global(
    State(state): State<AppState>,
    path: Result<Path<[String; 1]>, PathRejection>,
) -> ApiResult {
    let id = one(path, "program")?;
    let removed = state.pool.sessions().delete_global_program(&id).await?;
    Ok(Json(ProgramDeleted {
        program_id: removed.id,
        deleted: true,
    })
    .into_response())
}
