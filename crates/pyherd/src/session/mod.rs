//! Sessions and programs (DESIGN §5): the state a user's calls share, kept by the host
//! in a [`SessionStore`] so that any worker can serve any session.
//!
//! A session has an id, metadata, programs (id → definition), its LM configuration,
//! the worker that served it last, and a TTL counted from its last access. Expired
//! sessions are never returned, whether or not the sweep has removed them yet.

mod memory;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use serde::{Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

pub use self::memory::{MAX_TTL, MemoryStore};
use crate::error::{Error, ErrorKind};

/// Longest session or program id.
pub const MAX_ID_LEN: usize = 128;

/// What a [`SessionStore`] operation returns.
pub type StoreFuture<'a, T> = BoxFuture<'a, Result<T, Error>>;

/// Where sessions and programs live. [`MemoryStore`] is the embedded default; a shared
/// (networked) store lets several hosts serve the same sessions.
///
/// Every operation on a session that does not exist, or whose TTL has passed, fails with
/// `session/session_not_found`; operations that read or change a session count as an
/// access and restart its TTL, except [`exists`](Self::exists) and [`list`](Self::list).
pub trait SessionStore: Send + Sync + 'static {
    /// Creates a session; its id is generated when `spec.id` is `None`.
    /// Errors: `session/session_exists`, `session/quota_exceeded`, `invalid_request/invalid_id`.
    fn create(&self, spec: SessionSpec) -> StoreFuture<'_, Session>;
    /// The session `id`.
    fn get<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Session>;
    /// The session `id`, created with the default TTL if there is none.
    fn get_or_create<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Session>;
    /// Changes what `update` names and leaves the rest.
    fn update<'a>(&'a self, id: &'a str, update: SessionUpdate) -> StoreFuture<'a, Session>;
    /// Removes the session and returns it as it was.
    fn delete<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Session>;
    /// Live sessions in id order, `limit` (at least 1) of them after the id `after`.
    /// Errors: `invalid_request/malformed_request` for a `limit` of 0.
    fn list(&self, after: Option<String>, limit: usize) -> StoreFuture<'_, SessionPage>;
    /// Whether a live session `id` exists (not an access).
    fn exists<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool>;
    /// Counts kept by this store.
    fn stats(&self) -> SessionStats;
    /// Stores (or replaces) a program of the session.
    fn put_program<'a>(&'a self, session: &'a str, program: Program) -> StoreFuture<'a, Program>;
    /// A program of the session. Errors: `session/program_not_found` besides the above.
    fn get_program<'a>(&'a self, session: &'a str, program: &'a str) -> StoreFuture<'a, Program>;
    /// Counts one execution of `ran`, a program of the session or a global one, and
    /// returns it updated: only while it is stored as it ran (the same `created_at` and
    /// definition), so a program replaced or deleted while it ran, or a global one of
    /// the same id, is not credited (`session/program_not_found`).
    fn record_execution<'a>(
        &'a self,
        session: &'a str,
        ran: &'a Program,
    ) -> StoreFuture<'a, Program>;
    /// Removes a program of the session and returns it.
    fn delete_program<'a>(&'a self, session: &'a str, program: &'a str)
    -> StoreFuture<'a, Program>;
    /// Stores (or replaces) a program every session can run.
    fn put_global_program(&self, program: Program) -> StoreFuture<'_, Program>;
    /// A global program.
    fn get_global_program<'a>(&'a self, program: &'a str) -> StoreFuture<'a, Program>;
    /// Removes a global program and returns it.
    fn delete_global_program<'a>(&'a self, program: &'a str) -> StoreFuture<'a, Program>;
    /// Every global program, in id order.
    fn list_global_programs(&self) -> StoreFuture<'_, Vec<Program>>;
    /// Removes every expired session; returns how many.
    fn sweep(&self) -> StoreFuture<'_, usize>;
}

/// Session metadata read from JSON text as given. An integer beyond 64 bits, which a
/// [`Value`] would keep only as a rounded float, is refused rather than changed.
///
/// # Errors
/// `invalid_request/malformed_request` naming what is wrong.
pub fn metadata_from_json(json: &RawValue) -> Result<Value, Error> {
    let malformed = |why: String| {
        Error::new(
            ErrorKind::MalformedRequest,
            format!("the session metadata cannot be kept as given: {why}"),
        )
    };
    if let Some(why) = crate::protocol::unreadable(json.get()) {
        return Err(malformed(why));
    }
    serde_json::from_str(json.get()).map_err(|e| malformed(e.to_string()))
}

/// How to create a session.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct SessionSpec {
    /// The id; generated when `None`.
    pub id: Option<String>,
    /// Time to live after the last access; the store's default when `None`.
    pub ttl: Option<Duration>,
    /// Any JSON; `{}` when `None`.
    pub metadata: Option<Value>,
}

impl SessionSpec {
    /// A session with a generated id and the defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the id.
    #[must_use]
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the TTL.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Sets the metadata.
    #[must_use]
    pub fn metadata(mut self, metadata: Value) -> Self {
        self.metadata = Some(metadata);
        self
    }
}

/// A change to a session; `None` fields are left as they are.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SessionUpdate {
    /// New metadata (replaces the old).
    pub metadata: Option<Value>,
    /// New TTL.
    pub ttl: Option<Duration>,
    /// New LM configuration (as given to `configure_lm`).
    pub lm: Option<Arc<RawValue>>,
    /// The worker that served the session last.
    pub last_worker: Option<String>,
}

/// A session as stored. Serialises with the LM's `api_key` hidden, program ids only,
/// times in RFC 3339 and the TTL in seconds.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Session {
    /// The id.
    #[serde(rename = "session_id")]
    pub id: String,
    /// The caller's JSON.
    pub metadata: Value,
    /// Programs by id.
    #[serde(serialize_with = "program_ids")]
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub programs: BTreeMap<String, Program>,
    /// The LM configuration given to `configure_lm`, if any, as its JSON (sent with
    /// every `execute_program` as it is, so it is kept serialised).
    #[serde(serialize_with = "redacted")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub lm: Option<Arc<RawValue>>,
    /// The worker that served the session last.
    pub last_worker: Option<String>,
    /// When it was created.
    #[serde(serialize_with = "rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub created_at: SystemTime,
    /// When it was last read or changed.
    #[serde(serialize_with = "rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub last_accessed: SystemTime,
    /// Time to live after the last access.
    #[serde(rename = "ttl_s", serialize_with = "seconds")]
    #[cfg_attr(feature = "openapi", schema(value_type = u64))]
    pub ttl: Duration,
}

impl Session {
    /// When the session expires unless it is accessed before.
    pub fn expires_at(&self) -> SystemTime {
        self.last_accessed + self.ttl
    }
}

/// A program definition with its bookkeeping.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Program {
    /// The id.
    #[serde(rename = "program_id")]
    pub id: String,
    /// The signature as text, e.g. `question -> answer`.
    pub signature: String,
    /// `predict` or `chain_of_thought`.
    pub program_type: String,
    /// The definition a worker builds the program from, as the worker validated it (kept
    /// serialised: it travels with every execution).
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub definition: Arc<RawValue>,
    /// When it was stored.
    #[serde(serialize_with = "rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub created_at: SystemTime,
    /// Successful executions.
    pub execution_count: u64,
    /// When it last ran successfully.
    #[serde(serialize_with = "rfc3339_opt")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub last_executed: Option<SystemTime>,
}

impl Program {
    /// A program stored now, never run.
    pub fn new(
        id: impl Into<String>,
        signature: impl Into<String>,
        program_type: impl Into<String>,
        definition: Arc<RawValue>,
    ) -> Self {
        Self {
            id: id.into(),
            signature: signature.into(),
            program_type: program_type.into(),
            definition,
            created_at: SystemTime::now(),
            execution_count: 0,
            last_executed: None,
        }
    }
}

/// One page of [`SessionStore::list`].
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct SessionPage {
    /// The sessions, in id order.
    pub sessions: Vec<Session>,
    /// Pass as `after` for the next page; `None` on the last page.
    pub next_after: Option<String>,
}

/// Counts kept by a store.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SessionStats {
    /// Sessions stored and not expired.
    pub live: usize,
    /// Sessions created since the store started.
    pub created: u64,
    /// Sessions removed because their TTL passed.
    pub expired: u64,
    /// Sessions deleted by a caller.
    pub deleted: u64,
    /// Global programs stored.
    pub global_programs: usize,
}

/// Refuses ids that are empty, longer than [`MAX_ID_LEN`], hold characters outside
/// `A-Z a-z 0-9 - _ . :`, or are the path segments `.` and `..` (ids travel in URL paths,
/// where clients resolve those away, and in logs).
///
/// # Errors
/// `invalid_request/invalid_id`.
pub fn check_id(what: &str, id: &str) -> Result<(), Error> {
    let valid = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if valid {
        Ok(())
    } else {
        let shown: String = id.chars().take(40).collect();
        Err(Error::new(
            ErrorKind::InvalidId,
            format!(
                "{what} id {shown:?} is not 1..={MAX_ID_LEN} characters of A-Z a-z 0-9 - _ . : \
                 (nor `.` or `..`)"
            ),
        ))
    }
}

pub(crate) fn session_not_found(id: &str) -> Error {
    Error::new(
        ErrorKind::SessionNotFound,
        format!("no session {id:?} (never created, deleted or expired)"),
    )
    .with_context(|c| c.session_id = Some(id.to_owned()))
}

/// Where a program was looked for.
#[derive(Clone, Copy)]
pub(crate) enum LookedIn<'a> {
    /// The session's own programs.
    Session(&'a str),
    /// The session's, then the global programs (what a session's execution runs).
    SessionThenGlobals(&'a str),
    /// The global programs.
    Globals,
}

pub(crate) fn program_not_found(looked_in: LookedIn<'_>, id: &str) -> Error {
    let (place, session) = match looked_in {
        LookedIn::Session(s) => (format!("in session {s:?}"), Some(s)),
        LookedIn::SessionThenGlobals(s) => (
            format!("in session {s:?} nor among the global programs"),
            Some(s),
        ),
        LookedIn::Globals => ("among the global programs".to_owned(), None),
    };
    Error::new(
        ErrorKind::ProgramNotFound,
        format!("no program {id:?} {place}"),
    )
    .with_context(|c| {
        c.session_id = session.map(str::to_owned);
        c.program_id = Some(id.to_owned());
    })
}

fn program_ids<S: Serializer>(
    programs: &BTreeMap<String, Program>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(programs.keys())
}

/// The LM configuration without secrets: an `api_key` is shown as `"***"`.
fn redacted<S: Serializer>(lm: &Option<Arc<RawValue>>, s: S) -> Result<S::Ok, S::Error> {
    let Some(raw) = lm else {
        return s.serialize_none();
    };
    let mut shown: Value = serde_json::from_str(raw.get()).map_err(serde::ser::Error::custom)?;
    if let Some(key) = shown.get_mut("api_key") {
        *key = Value::from("***");
    }
    shown.serialize(s)
}

/// `value` as raw JSON shared cheaply (definitions and LM settings travel with every call).
///
/// # Panics
/// Never: a [`Value`] always serialises.
pub fn raw_json(value: &Value) -> Arc<RawValue> {
    serde_json::value::to_raw_value(value)
        .map(Arc::from)
        .unwrap_or_else(|_| Arc::from(RawValue::NULL.to_owned()))
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

fn rfc3339_opt<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

fn seconds<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        for good in ["a", "user-1", "s_2.x:y", &"x".repeat(MAX_ID_LEN)] {
            check_id("session", good).unwrap();
        }
        let long = "x".repeat(MAX_ID_LEN + 1);
        for bad in ["", ".", "..", "../etc", "a b", "é", "a/b", "a\0b", &long] {
            let e = check_id("session", bad).unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::InvalidId, "{bad:?}");
        }
    }

    #[test]
    fn a_session_serialises_without_secrets() {
        let mut programs = BTreeMap::new();
        programs.insert(
            "qa".to_owned(),
            Program::new("qa", "q -> a", "predict", raw_json(&Value::Null)),
        );
        let session = Session {
            id: "s1".into(),
            metadata: serde_json::json!({"user": 7}),
            programs,
            lm: Some(raw_json(
                &serde_json::json!({"model": "openai/x", "api_key": "sk-secret"}),
            )),
            last_worker: None,
            created_at: SystemTime::UNIX_EPOCH,
            last_accessed: SystemTime::UNIX_EPOCH,
            ttl: Duration::from_secs(60),
        };
        let v = serde_json::to_value(&session).unwrap();
        assert_eq!(v["session_id"], "s1");
        assert_eq!(v["programs"], serde_json::json!(["qa"]));
        assert_eq!(v["lm"]["api_key"], "***");
        assert_eq!(v["lm"]["model"], "openai/x");
        assert_eq!(v["created_at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["ttl_s"], 60);
        assert!(!v.to_string().contains("sk-secret"));
    }
}
