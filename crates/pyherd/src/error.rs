//! The one error type of pyherd: a category, a kind, a message, whether a retry
//! can help, and the context needed to act on it (worker, pid, stderr tail, traceback).

use std::fmt;

use serde::Serialize;

/// The broad class of a failure; callers and the HTTP API branch on it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Category {
    /// The pool or a worker could not be set up (bad config, Python failed to start).
    Initialization,
    /// A connection to an external service failed.
    Connection,
    /// The host lost its worker mid-call (crash, garbage on the wire).
    Communication,
    /// A deadline passed (in the queue or while running).
    Timeout,
    /// A limit was reached (queue full, result too large).
    Resource,
    /// A worker failed its health check.
    HealthCheck,
    /// A session-level failure.
    Session,
    /// The Python handler raised or returned something unusable.
    Python,
    /// The host itself (shutting down, I/O on its side).
    System,
    /// The caller asked for something invalid (unknown command, payload too large).
    InvalidRequest,
}

impl Category {
    /// The wire/JSON name, e.g. `"invalid_request"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initialization => "initialization",
            Self::Connection => "connection",
            Self::Communication => "communication",
            Self::Timeout => "timeout",
            Self::Resource => "resource",
            Self::HealthCheck => "health_check",
            Self::Session => "session",
            Self::Python => "python",
            Self::System => "system",
            Self::InvalidRequest => "invalid_request",
        }
    }

    /// Parses a wire name; unknown names are `System` (the worker is ours, so this means a bug).
    pub(crate) fn from_wire(name: &str) -> Self {
        match name {
            "initialization" => Self::Initialization,
            "connection" => Self::Connection,
            "communication" => Self::Communication,
            "timeout" => Self::Timeout,
            "resource" => Self::Resource,
            "health_check" => Self::HealthCheck,
            "session" => Self::Session,
            "python" => Self::Python,
            "invalid_request" => Self::InvalidRequest,
            _ => Self::System,
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The precise failure. Each kind belongs to one [`Category`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A configuration value is out of range.
    InvalidConfig,
    /// The Python process could not be started at all (interpreter missing, exec failed).
    SpawnFailed,
    /// The Python process exited before it said hello.
    StartupFailed,
    /// No hello within the startup timeout.
    StartupTimeout,
    /// A handler module raised while being imported.
    HandlerImportFailed,
    /// The worker's first frame was not a valid `hello` (garbage, another protocol version).
    HandshakeFailed,
    /// No worker can take the call and new workers keep failing to start (the spawn
    /// circuit breaker is open); the context has the last failure's stderr tail.
    SpawnFailing,
    /// Waited in the queue past the queue timeout.
    QueueTimeout,
    /// Ran past the execution timeout; the worker was killed and replaced.
    ExecutionTimeout,
    /// The queue was full.
    PoolSaturated,
    /// The worker died during the call.
    WorkerCrashed,
    /// No handler of that name.
    UnknownCommand,
    /// The handler raised.
    PythonException,
    /// The handler's result cannot be written as JSON.
    ResultNotSerializable,
    /// The handler's result is larger than the frame limit.
    ResultTooLarge,
    /// The request is larger than the frame limit.
    PayloadTooLarge,
    /// The request is malformed (bad JSON body, missing field, unserialisable args).
    MalformedRequest,
    /// The result is valid JSON but does not fit the type the caller asked for.
    ResultTypeMismatch,
    /// The pool is shutting down and takes no more calls.
    ShuttingDown,
    /// No live session has that id (never created, deleted or expired).
    SessionNotFound,
    /// A session with that id already exists.
    SessionExists,
    /// The store holds as many live sessions as it may.
    QuotaExceeded,
    /// No program of that id in the session nor among the global programs.
    ProgramNotFound,
    /// A session or program id that is empty, too long or has characters outside
    /// `A-Z a-z 0-9 - _ . :`.
    InvalidId,
    /// The command keeps its state in a session and was called without one.
    SessionRequired,
    /// A DSPy signature that cannot be built.
    InvalidSignature,
    /// The language model failed (network, provider, output that cannot be parsed).
    LmError,
    /// The session's worker is busy and the call asked not to wait (`strict_fail_fast`).
    WorkerBusy,
    /// The command's circuit breaker is open: it harmed workers too often, so calls to it
    /// fail at once until the breaker half-opens (`retry_after_ms` in the context).
    CircuitOpen,
    /// A request id that is empty, over 128 characters, has characters outside
    /// `A-Z a-z 0-9 - _ . :`, or names a call still in flight.
    InvalidRequestId,
    /// The call was cancelled (its future or stream dropped, or [`crate::Pool::cancel`]).
    Cancelled,
    /// No call in flight has that request id (never made, or already finished).
    CallNotFound,
    /// As many streams are open as the server allows (`max_streams`).
    TooManyStreams,
    /// A kind sent by the worker that this host does not know.
    Other(String),
}

impl ErrorKind {
    /// The wire/JSON name, e.g. `"queue_timeout"`.
    pub fn as_str(&self) -> &str {
        match self {
            Self::InvalidConfig => "invalid_config",
            Self::SpawnFailed => "spawn_failed",
            Self::StartupFailed => "startup_failed",
            Self::StartupTimeout => "startup_timeout",
            Self::HandlerImportFailed => "handler_import_failed",
            Self::HandshakeFailed => "handshake_failed",
            Self::SpawnFailing => "spawn_failing",
            Self::QueueTimeout => "queue_timeout",
            Self::ExecutionTimeout => "execution_timeout",
            Self::PoolSaturated => "pool_saturated",
            Self::WorkerCrashed => "worker_crashed",
            Self::UnknownCommand => "unknown_command",
            Self::PythonException => "python_exception",
            Self::ResultNotSerializable => "result_not_serializable",
            Self::ResultTooLarge => "result_too_large",
            Self::PayloadTooLarge => "payload_too_large",
            Self::MalformedRequest => "malformed_request",
            Self::ResultTypeMismatch => "result_type_mismatch",
            Self::ShuttingDown => "shutting_down",
            Self::SessionNotFound => "session_not_found",
            Self::SessionExists => "session_exists",
            Self::QuotaExceeded => "quota_exceeded",
            Self::ProgramNotFound => "program_not_found",
            Self::InvalidId => "invalid_id",
            Self::SessionRequired => "session_required",
            Self::InvalidSignature => "invalid_signature",
            Self::LmError => "lm_error",
            Self::WorkerBusy => "worker_busy",
            Self::CircuitOpen => "circuit_open",
            Self::InvalidRequestId => "invalid_request_id",
            Self::Cancelled => "cancelled",
            Self::CallNotFound => "call_not_found",
            Self::TooManyStreams => "too_many_streams",
            Self::Other(name) => name,
        }
    }

    /// The category a host-made error of this kind has.
    pub fn category(&self) -> Category {
        match self {
            Self::InvalidConfig
            | Self::SpawnFailed
            | Self::StartupFailed
            | Self::StartupTimeout
            | Self::HandlerImportFailed
            | Self::HandshakeFailed
            | Self::SpawnFailing => Category::Initialization,
            Self::WorkerCrashed => Category::Communication,
            Self::QueueTimeout | Self::ExecutionTimeout => Category::Timeout,
            Self::PoolSaturated
            | Self::ResultTooLarge
            | Self::WorkerBusy
            | Self::CircuitOpen
            | Self::TooManyStreams => Category::Resource,
            Self::SessionNotFound
            | Self::SessionExists
            | Self::QuotaExceeded
            | Self::ProgramNotFound => Category::Session,
            Self::UnknownCommand
            | Self::PayloadTooLarge
            | Self::MalformedRequest
            | Self::ResultTypeMismatch
            | Self::InvalidId
            | Self::SessionRequired
            | Self::InvalidSignature
            | Self::InvalidRequestId
            | Self::Cancelled
            | Self::CallNotFound => Category::InvalidRequest,
            Self::PythonException | Self::ResultNotSerializable | Self::LmError => Category::Python,
            Self::ShuttingDown | Self::Other(_) => Category::System,
        }
    }

    /// Whether trying the same call again can succeed (for idempotent calls).
    pub fn default_retryable(&self) -> bool {
        matches!(
            self,
            Self::QueueTimeout | Self::PoolSaturated | Self::WorkerCrashed | Self::WorkerBusy
        )
    }

    pub(crate) fn from_wire(name: &str) -> Self {
        match name {
            "handler_import_failed" => Self::HandlerImportFailed,
            "unknown_command" => Self::UnknownCommand,
            "python_exception" => Self::PythonException,
            "result_not_serializable" => Self::ResultNotSerializable,
            "result_too_large" => Self::ResultTooLarge,
            "payload_too_large" => Self::PayloadTooLarge,
            "malformed_request" => Self::MalformedRequest,
            "invalid_signature" => Self::InvalidSignature,
            "lm_error" => Self::LmError,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Where and why: every field that is known for this failure.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ErrorContext {
    /// The worker that served (or failed) the call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// That worker's Python process id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The command called.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The call's request id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The session the call belonged to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The program the call named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub program_id: Option<String>,
    /// How the Python process ended (`exit status: 3`, `signal: 9 (SIGKILL)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<String>,
    /// The last lines the Python process wrote to stderr (and stdout).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr_tail: Option<String>,
    /// The Python exception's type, e.g. `ValueError` or `mymod.MyError`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python_type: Option<String>,
    /// The Python traceback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
    /// The timeout that passed, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// A size limit that was exceeded, in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<u64>,
    /// How many times an idempotent call was tried (the first attempt and its retries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Milliseconds until trying again can help (an open circuit breaker half-opens).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// A pyherd failure. Cheap to move (one box); see [`Category`] and [`ErrorKind`].
#[derive(Clone, PartialEq, Eq)]
pub struct Error {
    inner: Box<Inner>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct Inner {
    category: Category,
    kind: ErrorKind,
    message: String,
    retryable: bool,
    context: ErrorContext,
}

impl Error {
    /// An error of `kind` with the kind's category and retryability.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let category = kind.category();
        let retryable = kind.default_retryable();
        Self {
            inner: Box::new(Inner {
                category,
                kind,
                message: message.into(),
                retryable,
                context: ErrorContext::default(),
            }),
        }
    }

    /// An error as the worker reported it (category and kind from the wire).
    pub(crate) fn from_wire(
        category: &str,
        kind: &str,
        message: String,
        retryable: Option<bool>,
    ) -> Self {
        let kind = ErrorKind::from_wire(kind);
        let retryable = retryable.unwrap_or_else(|| kind.default_retryable());
        Self {
            inner: Box::new(Inner {
                category: Category::from_wire(category),
                kind,
                message,
                retryable,
                context: ErrorContext::default(),
            }),
        }
    }

    /// Adds or changes context fields.
    #[must_use]
    pub fn with_context(mut self, f: impl FnOnce(&mut ErrorContext)) -> Self {
        f(&mut self.inner.context);
        self
    }

    /// The broad class.
    pub fn category(&self) -> Category {
        self.inner.category
    }

    /// The precise failure.
    pub fn kind(&self) -> &ErrorKind {
        &self.inner.kind
    }

    /// A human-readable explanation.
    pub fn message(&self) -> &str {
        &self.inner.message
    }

    /// Whether repeating an idempotent call can succeed.
    pub fn is_retryable(&self) -> bool {
        self.inner.retryable
    }

    /// Where and why.
    pub fn context(&self) -> &ErrorContext {
        &self.inner.context
    }

    /// The error as one JSON object:
    /// `{"category","kind","message","retryable","context":{…}}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(&*self.inner).unwrap_or_else(|_| {
            serde_json::json!({"category": "system", "kind": "internal", "message": self.message()})
        })
    }
}

impl Serialize for Error {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.inner.serialize(s)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.inner, f)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}: {}",
            self.inner.category, self.inner.kind, self.inner.message
        )?;
        if let Some(tail) = &self.inner.context.stderr_tail {
            write!(f, "\n--- python stderr (last lines) ---\n{tail}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_carry_their_category_and_retryability() {
        let e = Error::new(ErrorKind::QueueTimeout, "waited 5 s");
        assert_eq!(e.category(), Category::Timeout);
        assert!(e.is_retryable());
        let e = Error::new(ErrorKind::ExecutionTimeout, "ran 30 s");
        assert!(!e.is_retryable());
        assert_eq!(e.to_string(), "timeout/execution_timeout: ran 30 s");
    }

    #[test]
    fn wire_errors_keep_unknown_kinds_and_map_unknown_categories_to_system() {
        let e = Error::from_wire("python", "rate_limited", "slow down".into(), Some(true));
        assert_eq!(e.category(), Category::Python);
        assert_eq!(e.kind(), &ErrorKind::Other("rate_limited".into()));
        assert!(e.is_retryable());
        let e = Error::from_wire("nonsense", "x", String::new(), None);
        assert_eq!(e.category(), Category::System);
    }

    #[test]
    fn json_shape_omits_unknown_context() {
        let e = Error::new(ErrorKind::WorkerCrashed, "gone").with_context(|c| {
            c.worker_id = Some("w1".into());
            c.exit_status = Some("signal: 9 (SIGKILL)".into());
        });
        let v = e.to_json();
        assert_eq!(v["category"], "communication");
        assert_eq!(v["kind"], "worker_crashed");
        assert_eq!(v["retryable"], true);
        assert_eq!(v["context"]["worker_id"], "w1");
        assert!(v["context"].get("traceback").is_none());
    }
}
