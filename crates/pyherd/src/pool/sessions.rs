//! Calls in a session (DESIGN §5): the session comes from the store (created on first
//! use, except by `cleanup_session`, which ends it), the call goes preferably to the
//! session's last worker, and the worker that answered is remembered. With the DSPy
//! adapter loaded the host keeps the adapter's state: LM settings and programs live in
//! the session, and `execute_program` carries them to whichever worker runs it, so a
//! worker that never saw a program still runs it.

use std::sync::Arc;
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::{CallOptions, Pool, Reply};
use crate::error::{Error, ErrorKind};
use crate::session::{
    LookedIn, Program, Session, SessionStore, SessionUpdate, check_id, program_not_found,
};

/// The handlers module of the DSPy adapter.
pub(crate) const DSPY_MODULE: &str = "pyherd_worker.dspy_adapter";
/// The adapter name the DSPy handler module announces in its `hello`.
pub(crate) const DSPY_ADAPTER: &str = "dspy";

/// DSPy adapter commands the host answers from the store, without a worker.
pub(crate) const HOST_COMMANDS: [&str; 4] = [
    "list_programs",
    "get_program_info",
    "delete_program",
    "cleanup_session",
];

/// DSPy adapter commands a worker runs with state the host attaches.
const WORKER_COMMANDS: [&str; 3] = ["configure_lm", "create_program", "execute_program"];

/// What a worker's `create_program` answers.
#[derive(Deserialize)]
struct Created {
    signature: String,
    program_type: String,
    definition: Box<RawValue>,
}

/// The arguments of `execute_program` as a caller gives them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecuteArgs {
    program_id: String,
    #[serde(default = "empty_object")]
    inputs: Box<RawValue>,
}

/// `execute_program` as a worker receives it: the stored definition and LM attached.
#[derive(Serialize)]
struct ExecuteCall<'a> {
    program_id: &'a str,
    inputs: &'a RawValue,
    program: &'a RawValue,
    lm: Option<&'a RawValue>,
}

/// The arguments of the commands that name one program.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProgramRef {
    program_id: String,
}

/// The arguments of the commands that take none (`list_programs`, `cleanup_session`):
/// `{}` or `null`, so a caller's misplaced field is refused rather than ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

fn empty_object() -> Box<RawValue> {
    to_raw(&Map::new()).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

fn to_raw<T: Serialize + ?Sized>(value: &T) -> Result<Box<RawValue>, Error> {
    serde_json::value::to_raw_value(value)
        .map_err(|e| Error::new(ErrorKind::MalformedRequest, format!("args: {e}")))
}

fn parse_args<T: DeserializeOwned>(command: &str, args: &RawValue) -> Result<T, Error> {
    serde_json::from_str(args.get()).map_err(|e| {
        Error::new(
            ErrorKind::MalformedRequest,
            format!("{command} arguments are not valid: {e}"),
        )
    })
}

fn host_reply(value: &impl Serialize, started: Instant) -> Result<Reply, Error> {
    Ok(Reply::from_host(to_raw(value)?, started.elapsed()))
}

fn no_adapter() -> Error {
    Error::new(
        ErrorKind::UnknownCommand,
        "programs need the DSPy adapter: load the handlers module pyherd_worker.dspy_adapter \
         (pyherd --dspy)",
    )
}

impl Pool {
    /// Whether `command` is a DSPy adapter command, which keeps its state in a session.
    pub(super) fn needs_session(&self, command: &str) -> bool {
        self.inner.shared.dspy
            && (HOST_COMMANDS.contains(&command) || WORKER_COMMANDS.contains(&command))
    }

    /// Runs a known command in the session `session_id`.
    pub(super) async fn in_session(
        &self,
        session_id: &str,
        command: &str,
        args: Box<RawValue>,
        options: &CallOptions,
    ) -> Result<Reply, Error> {
        check_id("session", session_id)?;
        let store = self.sessions();
        let dspy = self.inner.shared.dspy;
        if dspy && command == "cleanup_session" {
            parse_args::<Option<NoArgs>>(command, &args)?;
            // It ends a session: one that does not exist is not created to be deleted.
            let started = Instant::now();
            let removed = store.delete(session_id).await?;
            return host_reply(
                &json!({
                    "session_id": removed.id,
                    "deleted": true,
                    "programs_removed": removed.programs.len(),
                }),
                started,
            );
        }
        let session = store.get_or_create(session_id).await?;
        if !dspy {
            return self.run_in(&session, command, args, options).await;
        }
        let started = Instant::now();
        match command {
            "configure_lm" => {
                let lm: Arc<RawValue> = Arc::from(args.clone());
                let reply = self.run_in(&session, command, args, options).await?;
                let update = SessionUpdate {
                    lm: Some(lm),
                    ..SessionUpdate::default()
                };
                store.update(session_id, update).await?;
                Ok(reply)
            }
            "create_program" => {
                let mut spec: Map<String, Value> = parse_args(command, &args)?;
                let id = match spec.remove("id") {
                    Some(Value::String(id)) => id,
                    _ => {
                        return Err(Error::new(
                            ErrorKind::MalformedRequest,
                            "create_program needs an \"id\" string",
                        ));
                    }
                };
                let (program, reply) = self
                    .validate_program(Some(&session), &id, spec, options)
                    .await?;
                let program = store.put_program(session_id, program).await?;
                let summary = json!({
                    "program_id": program.id,
                    "signature": program.signature,
                    "program_type": program.program_type,
                });
                Ok(reply.with_result(to_raw(&summary)?))
            }
            "execute_program" => self.execute_program(&session, &args, options).await,
            "list_programs" => {
                parse_args::<Option<NoArgs>>(command, &args)?;
                let session = store.get(session_id).await?;
                let globals = store.list_global_programs().await?;
                let programs: Vec<&Program> = session.programs.values().collect();
                host_reply(
                    &json!({"programs": programs, "global_programs": globals}),
                    started,
                )
            }
            "get_program_info" => {
                let wanted: ProgramRef = parse_args(command, &args)?;
                let (program, scope) = self.find_program(&session, &wanted.program_id).await?;
                let mut info = serde_json::to_value(&program).unwrap_or_default();
                if let Some(fields) = info.as_object_mut() {
                    fields.insert("scope".into(), scope.into());
                }
                host_reply(&info, started)
            }
            "delete_program" => {
                let wanted: ProgramRef = parse_args(command, &args)?;
                check_id("program", &wanted.program_id)?;
                let removed = store.delete_program(session_id, &wanted.program_id).await?;
                host_reply(&json!({"program_id": removed.id, "deleted": true}), started)
            }
            _ => self.run_in(&session, command, args, options).await,
        }
    }

    /// Validates a program on a worker and stores it in the session `session_id` (which
    /// must exist) or, with `None`, among the global programs every session can run.
    /// `spec` is `{signature, program_type?, instructions?}` as for `create_program`.
    ///
    /// # Errors
    /// `invalid_request/invalid_id`, `session/session_not_found`,
    /// `invalid_request/invalid_signature` and the errors of
    /// [`execute_with`](Self::execute_with); `invalid_request/unknown_command` when the
    /// DSPy adapter is not loaded.
    pub async fn put_program(
        &self,
        session_id: Option<&str>,
        program_id: &str,
        spec: Map<String, Value>,
    ) -> Result<Program, Error> {
        if !self.inner.shared.dspy {
            return Err(no_adapter());
        }
        let started = Instant::now();
        let outcome = self.store_program(session_id, program_id, spec).await;
        self.inner
            .shared
            .count("create_program", outcome.as_ref().err(), started);
        outcome
    }

    async fn store_program(
        &self,
        session_id: Option<&str>,
        program_id: &str,
        spec: Map<String, Value>,
    ) -> Result<Program, Error> {
        let store = self.sessions();
        match session_id {
            Some(id) => {
                check_id("session", id)?;
                let session = store.get(id).await?;
                let options = CallOptions::new().session_id(id);
                let (program, _) = self
                    .validate_program(Some(&session), program_id, spec, &options)
                    .await?;
                store.put_program(id, program).await
            }
            None => {
                let (program, _) = self
                    .validate_program(None, program_id, spec, &CallOptions::new())
                    .await?;
                store.put_global_program(program).await
            }
        }
    }

    /// Has a worker build `spec` (which proves the signature) and returns the program.
    async fn validate_program(
        &self,
        session: Option<&Session>,
        id: &str,
        mut spec: Map<String, Value>,
        options: &CallOptions,
    ) -> Result<(Program, Reply), Error> {
        check_id("program", id)?;
        match spec.get("id") {
            Some(Value::String(named)) if named == id => {}
            None | Some(Value::Null) => {}
            Some(named) => {
                return Err(Error::new(
                    ErrorKind::MalformedRequest,
                    format!("the program's spec names id {named}, not {id:?}"),
                ));
            }
        }
        spec.insert("id".into(), id.into());
        let args = to_raw(&spec)?;
        let reply = match session {
            Some(session) => {
                self.run_in(session, "create_program", args, options)
                    .await?
            }
            None => {
                self.submit("create_program", true, args, options, None)
                    .await?
            }
        };
        let created: Created = reply.decode()?;
        let program = Program::new(
            id,
            created.signature,
            created.program_type,
            Arc::from(created.definition),
        );
        Ok((program, reply))
    }

    /// The session's program `id`, else the global one; with where it was found.
    async fn find_program(
        &self,
        session: &Session,
        id: &str,
    ) -> Result<(Program, &'static str), Error> {
        check_id("program", id)?;
        if let Some(program) = session.programs.get(id) {
            return Ok((program.clone(), "session"));
        }
        match self.sessions().get_global_program(id).await {
            Ok(program) => Ok((program, "global")),
            Err(e) if e.kind() == &ErrorKind::ProgramNotFound => Err(program_not_found(
                LookedIn::SessionThenGlobals(&session.id),
                id,
            )),
            Err(e) => Err(e),
        }
    }

    async fn execute_program(
        &self,
        session: &Session,
        args: &RawValue,
        options: &CallOptions,
    ) -> Result<Reply, Error> {
        let wanted: ExecuteArgs = parse_args("execute_program", args)?;
        let id = wanted.program_id.as_str();
        let (program, _) = self.find_program(session, id).await?;
        let call = ExecuteCall {
            program_id: id,
            inputs: &wanted.inputs,
            program: &program.definition,
            lm: session.lm.as_deref(),
        };
        let reply = self
            .run_in(session, "execute_program", to_raw(&call)?, options)
            .await
            .map_err(|e| e.with_context(|c| c.program_id = Some(id.to_owned())))?;
        if let Err(e) = self
            .sessions()
            .record_execution(&session.id, &program)
            .await
        {
            // Deleted or replaced while it ran: the answer stands, nothing is credited.
            tracing::debug!(session = %session.id, program = id, error = %e, "execution not recorded");
        }
        Ok(reply)
    }

    /// Runs a call on a worker for the session and remembers the worker that answered.
    async fn run_in(
        &self,
        session: &Session,
        command: &str,
        args: Box<RawValue>,
        options: &CallOptions,
    ) -> Result<Reply, Error> {
        let preferred = session.last_worker.as_deref().map(Arc::from);
        let reply = self.submit(command, true, args, options, preferred).await?;
        remember_worker(
            &**self.sessions(),
            &session.id,
            session.last_worker.as_deref(),
            reply.worker_id(),
        )
        .await;
        Ok(reply)
    }
}

/// Records `worker`, which answered a call of session `id`, as the session's last worker
/// (the one its affinity prefers), unless it already is (`last`).
pub(super) async fn remember_worker(
    store: &dyn SessionStore,
    id: &str,
    last: Option<&str>,
    worker: &str,
) {
    if last == Some(worker) {
        return;
    }
    let update = SessionUpdate {
        last_worker: Some(worker.to_owned()),
        ..SessionUpdate::default()
    };
    if let Err(e) = store.update(id, update).await {
        tracing::debug!(session = id, error = %e, "last worker not recorded");
    }
}
