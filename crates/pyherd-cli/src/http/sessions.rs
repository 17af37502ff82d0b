//! Sessions and programs: `/v1/sessions…` and the global `/v1/programs…`.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use pyherd::session::{SessionSpec, SessionUpdate, check_id};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::AppState;
use super::error::ApiError;
use super::execute::{ExecuteRequest, call, parse_body, request_id};

/// Most sessions one page of `GET /v1/sessions` may hold.
const MAX_PAGE: usize = 1000;
/// Sessions on a page when the request does not say.
const DEFAULT_PAGE: usize = 100;

type ApiResult = Result<Response, ApiError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    session_id: Option<String>,
    ttl_s: Option<u64>,
    metadata: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    metadata: Option<Value>,
    ttl_s: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    limit: Option<usize>,
    after: Option<String>,
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

pub(crate) async fn create(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body: CreateBody = parse_body(body)?;
    let mut spec = SessionSpec::new();
    spec.id = body.session_id;
    spec.ttl = ttl(body.ttl_s);
    spec.metadata = body.metadata;
    let session = state.pool.sessions().create(spec).await?;
    Ok((StatusCode::CREATED, Json(session)).into_response())
}

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

pub(crate) async fn get(
    State(state): State<AppState>,
    path: Result<Path<[String; 1]>, PathRejection>,
) -> ApiResult {
    let id = one(path, "session")?;
    Ok(Json(state.pool.sessions().get(&id).await?).into_response())
}

pub(crate) async fn patch(
    State(state): State<AppState>,
    path: Result<Path<[String; 1]>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let id = one(path, "session")?;
    let body: PatchBody = parse_body(body)?;
    let mut update = SessionUpdate::default();
    update.metadata = body.metadata;
    update.ttl = ttl(body.ttl_s);
    Ok(Json(state.pool.sessions().update(&id, update).await?).into_response())
}

pub(crate) async fn delete(
    State(state): State<AppState>,
    path: Result<Path<[String; 1]>, PathRejection>,
) -> ApiResult {
    let id = one(path, "session")?;
    let removed = state.pool.sessions().delete(&id).await?;
    Ok(Json(json!({"session_id": removed.id, "deleted": true})).into_response())
}

/// `POST /v1/sessions/{id}/execute`: the body of `/v1/execute`, in this session.
pub(crate) async fn execute(
    State(state): State<AppState>,
    path: Result<Path<[String; 1]>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let request_id = request_id(&headers)?;
        let request = session_request(path, body)?;
        call(&state, request, request_id).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
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
    Ok(Json(json!({"program_id": removed.id, "deleted": true})).into_response())
}

pub(crate) async fn list_globals(State(state): State<AppState>) -> ApiResult {
    let programs = state.pool.sessions().list_global_programs().await?;
    Ok(Json(json!({ "programs": programs })).into_response())
}

pub(crate) async fn get_global(
    State(state): State<AppState>,
    path: Result<Path<[String; 1]>, PathRejection>,
) -> ApiResult {
    let id = one(path, "program")?;
    Ok(Json(state.pool.sessions().get_global_program(&id).await?).into_response())
}

pub(crate) async fn put_global(
    State(state): State<AppState>,
    path: Result<Path<[String; 1]>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let id = one(path, "program")?;
    let spec: Map<String, Value> = parse_body(body)?;
    Ok(Json(state.pool.put_program(None, &id, spec).await?).into_response())
}

pub(crate) async fn delete_global(
    State(state): State<AppState>,
    path: Result<Path<[String; 1]>, PathRejection>,
) -> ApiResult {
    let id = one(path, "program")?;
    let removed = state.pool.sessions().delete_global_program(&id).await?;
    Ok(Json(json!({"program_id": removed.id, "deleted": true})).into_response())
}
