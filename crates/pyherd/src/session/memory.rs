//! The embedded [`SessionStore`]: everything in one map behind a lock that is never held
//! across an await. Expiry uses tokio's clock, so tests can pause time.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::time::Instant;

use super::{
    LookedIn, Program, Session, SessionPage, SessionSpec, SessionStats, SessionStore,
    SessionUpdate, StoreFuture, check_id, program_not_found, session_not_found,
};
use crate::error::{Error, ErrorKind};

/// Longest TTL a session may have (one year).
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Sessions and programs in this process's memory.
pub struct MemoryStore {
    state: Mutex<State>,
    default_ttl: Duration,
    max_sessions: usize,
    ids: RandomState,
}

struct Entry {
    session: Session,
    expires: Instant,
}

#[derive(Default)]
struct State {
    sessions: BTreeMap<String, Entry>,
    globals: BTreeMap<String, Program>,
    created: u64,
    expired: u64,
    deleted: u64,
    generated: u64,
}

impl State {
    /// Removes the session `id` if it expired, and counts it.
    fn expire(&mut self, id: &str, now: Instant) {
        if self.sessions.get(id).is_some_and(|e| e.expires <= now) {
            self.sessions.remove(id);
            self.expired += 1;
        }
    }

    /// The live session `id`, touched; an expired one is removed on the way.
    fn live(&mut self, id: &str, now: Instant) -> Result<&mut Session, Error> {
        self.expire(id, now);
        let entry = self
            .sessions
            .get_mut(id)
            .ok_or_else(|| session_not_found(id))?;
        entry.expires = deadline(now, entry.session.ttl);
        entry.session.last_accessed = SystemTime::now();
        Ok(&mut entry.session)
    }

    fn purge(&mut self, now: Instant) -> usize {
        let before = self.sessions.len();
        self.sessions.retain(|_, e| e.expires > now);
        let removed = before - self.sessions.len();
        self.expired += removed as u64;
        removed
    }
}

fn deadline(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl).unwrap_or(now + MAX_TTL)
}

fn done<'a, T: Send + 'a>(result: Result<T, Error>) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(result))
}

/// Why a session may not have `ttl` (it must be more than zero and at most [`MAX_TTL`]).
fn ttl_out_of_range(ttl: Duration) -> Option<String> {
    if !ttl.is_zero() && ttl <= MAX_TTL {
        return None;
    }
    // Whole seconds exactly (a float would round the largest), else with a fraction.
    let shown = if ttl.subsec_nanos() == 0 {
        format!("{} s", ttl.as_secs())
    } else {
        format!("{} s", ttl.as_secs_f64())
    };
    Some(format!(
        "must be more than 0 s and at most {} s, not {shown}",
        MAX_TTL.as_secs()
    ))
}

fn check_ttl(ttl: Duration) -> Result<Duration, Error> {
    match ttl_out_of_range(ttl) {
        Some(why) => Err(Error::new(
            ErrorKind::MalformedRequest,
            format!("a session TTL {why}"),
        )),
        None => Ok(ttl),
    }
}

impl MemoryStore {
    /// A store whose sessions live `default_ttl` after their last access (unless created
    /// with their own) and that holds at most `max_sessions` live sessions.
    ///
    /// # Errors
    /// `initialization/invalid_config` when `default_ttl` is zero or over [`MAX_TTL`], or
    /// `max_sessions` is zero (no session could ever be created).
    pub fn new(default_ttl: Duration, max_sessions: usize) -> Result<Self, Error> {
        if let Some(why) = ttl_out_of_range(default_ttl) {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!("the default session TTL {why}"),
            ));
        }
        if max_sessions == 0 {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "a session store must hold at least one session (max_sessions 0)",
            ));
        }
        Ok(Self {
            state: Mutex::new(State::default()),
            default_ttl,
            max_sessions,
            ids: RandomState::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, state: &mut State, spec: SessionSpec, now: Instant) -> Result<Session, Error> {
        let id = match spec.id {
            Some(id) => {
                check_id("session", &id)?;
                id
            }
            None => {
                state.generated += 1;
                let n = state.generated;
                format!(
                    "s-{:016x}{:016x}",
                    self.ids.hash_one((n, 1u8)),
                    self.ids.hash_one((n, 2u8))
                )
            }
        };
        let ttl = check_ttl(spec.ttl.unwrap_or(self.default_ttl))?;
        state.expire(&id, now);
        if state.sessions.contains_key(&id) {
            return Err(Error::new(
                ErrorKind::SessionExists,
                format!("a session {id:?} already exists"),
            )
            .with_context(|c| c.session_id = Some(id.clone())));
        }
        if state.sessions.len() >= self.max_sessions && state.purge(now) == 0 {
            return Err(Error::new(
                ErrorKind::QuotaExceeded,
                format!(
                    "the store holds its maximum of {} live sessions",
                    self.max_sessions
                ),
            ));
        }
        let at = SystemTime::now();
        let session = Session {
            id: id.clone(),
            metadata: spec
                .metadata
                .unwrap_or_else(|| Value::Object(Default::default())),
            programs: BTreeMap::new(),
            lm: None,
            last_worker: None,
            created_at: at,
            last_accessed: at,
            ttl,
        };
        state.sessions.insert(
            id,
            Entry {
                session: session.clone(),
                expires: deadline(now, ttl),
            },
        );
        state.created += 1;
        crate::telemetry::session_created(&session.id, ttl);
        Ok(session)
    }
}

impl SessionStore for MemoryStore {
    fn create(&self, spec: SessionSpec) -> StoreFuture<'_, Session> {
        let mut state = self.lock();
        done(self.insert(&mut state, spec, Instant::now()))
    }

    fn get<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Session> {
        done(self.lock().live(id, Instant::now()).map(|s| s.clone()))
    }

    fn get_or_create<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Session> {
        let now = Instant::now();
        let mut state = self.lock();
        let result = match state.live(id, now) {
            Ok(session) => Ok(session.clone()),
            Err(_) => self.insert(&mut state, SessionSpec::new().id(id), now),
        };
        done(result)
    }

    fn update<'a>(&'a self, id: &'a str, update: SessionUpdate) -> StoreFuture<'a, Session> {
        let result = (|| {
            let ttl = update.ttl.map(check_ttl).transpose()?;
            let now = Instant::now();
            let mut state = self.lock();
            let session = state.live(id, now)?;
            if let Some(metadata) = update.metadata {
                session.metadata = metadata;
            }
            if let Some(lm) = update.lm {
                session.lm = Some(lm);
            }
            if let Some(worker) = update.last_worker {
                session.last_worker = Some(worker);
            }
            if let Some(ttl) = ttl {
                session.ttl = ttl;
            }
            let session = session.clone();
            if let Some(entry) = state.sessions.get_mut(id) {
                entry.expires = deadline(now, session.ttl);
            }
            Ok(session)
        })();
        done(result)
    }

    fn delete<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Session> {
        let mut state = self.lock();
        let result = state.live(id, Instant::now()).map(|_| ()).and_then(|()| {
            let entry = state
                .sessions
                .remove(id)
                .ok_or_else(|| session_not_found(id))?;
            state.deleted += 1;
            Ok(entry.session)
        });
        done(result)
    }

    fn list(&self, after: Option<String>, limit: usize) -> StoreFuture<'_, SessionPage> {
        if limit == 0 {
            return done(Err(Error::new(
                ErrorKind::MalformedRequest,
                "a page of sessions holds at least one (limit 0)",
            )));
        }
        let now = Instant::now();
        let state = self.lock();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut live = state
            .sessions
            .range::<String, _>((start, Bound::Unbounded))
            .filter(|(_, e)| e.expires > now)
            .map(|(_, e)| e.session.clone());
        let sessions: Vec<Session> = live.by_ref().take(limit).collect();
        let next_after = if live.next().is_some() {
            sessions.last().map(|s| s.id.clone())
        } else {
            None
        };
        done(Ok(SessionPage {
            sessions,
            next_after,
        }))
    }

    fn exists<'a>(&'a self, id: &'a str) -> StoreFuture<'a, bool> {
        let now = Instant::now();
        done(Ok(self
            .lock()
            .sessions
            .get(id)
            .is_some_and(|e| e.expires > now)))
    }

    fn stats(&self) -> SessionStats {
        let now = Instant::now();
        let state = self.lock();
        SessionStats {
            live: state.sessions.values().filter(|e| e.expires > now).count(),
            created: state.created,
            expired: state.expired,
            deleted: state.deleted,
            global_programs: state.globals.len(),
        }
    }

    fn put_program<'a>(&'a self, session: &'a str, program: Program) -> StoreFuture<'a, Program> {
        let result = check_id("program", &program.id).and_then(|()| {
            let mut state = self.lock();
            let s = state.live(session, Instant::now())?;
            s.programs.insert(program.id.clone(), program.clone());
            Ok(program)
        });
        done(result)
    }

    fn get_program<'a>(&'a self, session: &'a str, program: &'a str) -> StoreFuture<'a, Program> {
        let mut state = self.lock();
        let result = state.live(session, Instant::now()).and_then(|s| {
            s.programs
                .get(program)
                .cloned()
                .ok_or_else(|| program_not_found(LookedIn::Session(session), program))
        });
        done(result)
    }

    fn record_execution<'a>(
        &'a self,
        session: &'a str,
        ran: &'a Program,
    ) -> StoreFuture<'a, Program> {
        let now = Instant::now();
        let mut state = self.lock();
        let same = |p: &Program| {
            p.created_at == ran.created_at && p.definition.get() == ran.definition.get()
        };
        let result = (|| {
            let id = ran.id.as_str();
            let in_session = state.live(session, now)?.programs.get(id).is_some_and(same);
            let found = if in_session {
                state
                    .sessions
                    .get_mut(session)
                    .and_then(|e| e.session.programs.get_mut(id))
            } else {
                state.globals.get_mut(id).filter(|p| same(p))
            };
            let found = found
                .ok_or_else(|| program_not_found(LookedIn::SessionThenGlobals(session), id))?;
            found.execution_count += 1;
            found.last_executed = Some(SystemTime::now());
            Ok(found.clone())
        })();
        done(result)
    }

    fn delete_program<'a>(
        &'a self,
        session: &'a str,
        program: &'a str,
    ) -> StoreFuture<'a, Program> {
        let mut state = self.lock();
        let result = state.live(session, Instant::now()).and_then(|s| {
            s.programs
                .remove(program)
                .ok_or_else(|| program_not_found(LookedIn::Session(session), program))
        });
        done(result)
    }

    fn put_global_program(&self, program: Program) -> StoreFuture<'_, Program> {
        let result = check_id("program", &program.id).map(|()| {
            self.lock()
                .globals
                .insert(program.id.clone(), program.clone());
            program
        });
        done(result)
    }

    fn get_global_program<'a>(&'a self, program: &'a str) -> StoreFuture<'a, Program> {
        let found = self.lock().globals.get(program).cloned();
        done(found.ok_or_else(|| program_not_found(LookedIn::Globals, program)))
    }

    fn delete_global_program<'a>(&'a self, program: &'a str) -> StoreFuture<'a, Program> {
        let removed = self.lock().globals.remove(program);
        done(removed.ok_or_else(|| program_not_found(LookedIn::Globals, program)))
    }

    fn list_global_programs(&self) -> StoreFuture<'_, Vec<Program>> {
        done(Ok(self.lock().globals.values().cloned().collect()))
    }

    fn sweep(&self) -> StoreFuture<'_, usize> {
        done(Ok(self.lock().purge(Instant::now())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HOUR: Duration = Duration::from_secs(3600);

    async fn get(store: &MemoryStore, id: &str) -> Result<Session, Error> {
        store.get(id).await
    }

    /// A `q -> a` Predict program named `id`.
    fn plain(id: &str) -> Program {
        Program::new(
            id,
            "q -> a",
            "predict",
            crate::session::raw_json(&json!({})),
        )
    }

    #[tokio::test]
    async fn sessions_are_created_read_changed_listed_and_deleted() {
        let store = MemoryStore::new(HOUR, 100).unwrap();
        let s = store
            .create(SessionSpec::new().id("a").metadata(json!({"user": 1})))
            .await
            .unwrap();
        assert_eq!((s.id.as_str(), &s.metadata), ("a", &json!({"user": 1})));
        let generated = store.create(SessionSpec::new()).await.unwrap();
        assert!(generated.id.starts_with("s-") && generated.id.len() == 34);
        check_id("session", &generated.id).unwrap();
        let e = store.create(SessionSpec::new().id("a")).await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::SessionExists);
        let update = SessionUpdate {
            metadata: Some(json!({"user": 2})),
            last_worker: Some("w3".into()),
            ..SessionUpdate::default()
        };
        let s = store.update("a", update).await.unwrap();
        assert_eq!(s.metadata, json!({"user": 2}));
        assert_eq!(
            get(&store, "a").await.unwrap().last_worker.as_deref(),
            Some("w3")
        );
        for id in ["b", "c", "d"] {
            store.create(SessionSpec::new().id(id)).await.unwrap();
        }
        let page = store.list(None, 2).await.unwrap();
        let ids: Vec<&str> = page.sessions.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(
            (ids, page.next_after.as_deref()),
            (vec!["a", "b"], Some("b"))
        );
        let page = store.list(page.next_after, 10).await.unwrap();
        assert_eq!(page.sessions.len(), 3);
        assert_eq!(page.next_after, None);
        // An empty page could only say "last page" and stop a pager early.
        let e = store.list(None, 0).await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::MalformedRequest);
        assert!(e.message().contains("limit 0"), "{e}");
        assert_eq!(store.delete("b").await.unwrap().id, "b");
        assert!(!store.exists("b").await.unwrap());
        assert_eq!(
            get(&store, "b").await.unwrap_err().kind(),
            &ErrorKind::SessionNotFound
        );
        assert_eq!(
            store.delete("b").await.unwrap_err().kind(),
            &ErrorKind::SessionNotFound
        );
        let stats = store.stats();
        assert_eq!((stats.live, stats.created, stats.deleted), (4, 5, 1));
    }

    #[test]
    fn a_store_that_could_hold_no_session_is_refused() {
        for (ttl, max, says) in [
            (
                Duration::ZERO,
                10,
                "the default session TTL must be more than 0 s",
            ),
            (MAX_TTL + Duration::from_nanos(1), 10, "at most 31536000 s"),
            (HOUR, 0, "max_sessions 0"),
        ] {
            let Err(e) = MemoryStore::new(ttl, max) else {
                panic!("a store of {ttl:?} and {max} sessions was made");
            };
            assert_eq!(e.kind(), &ErrorKind::InvalidConfig, "{ttl:?} {max}");
            assert!(e.message().contains(says), "{e}");
        }
        assert!(MemoryStore::new(Duration::from_millis(1), 1).is_ok());
    }

    #[tokio::test]
    async fn bad_ids_and_ttls_are_refused() {
        let store = MemoryStore::new(HOUR, 100).unwrap();
        let e = store
            .create(SessionSpec::new().id("../x"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::InvalidId);
        for (ttl, shown) in [
            (Duration::ZERO, "0 s"),
            (MAX_TTL + Duration::from_secs(1), "31536001 s"),
            (Duration::from_secs(u64::MAX), "18446744073709551615 s"),
            (Duration::from_millis(31_536_000_500), "31536000.5 s"),
        ] {
            let e = store.create(SessionSpec::new().ttl(ttl)).await.unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::MalformedRequest, "{ttl:?}");
            assert!(
                e.message().ends_with(&format!(
                    "must be more than 0 s and at most 31536000 s, not {shown}"
                )),
                "{e}"
            );
        }
        assert_eq!(store.stats().live, 0);
        store.create(SessionSpec::new().id("s")).await.unwrap();
        let update = SessionUpdate {
            ttl: Some(Duration::ZERO),
            metadata: Some(json!({"lost": false})),
            ..SessionUpdate::default()
        };
        let e = store.update("s", update).await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::MalformedRequest);
        let kept = get(&store, "s").await.unwrap();
        assert_eq!((kept.ttl, &kept.metadata), (HOUR, &json!({})));
        let bad = plain("a b");
        let e = store.put_program("s", bad).await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::InvalidId);
        assert!(get(&store, "s").await.unwrap().programs.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_ttl_counts_from_the_last_access_and_expired_sessions_are_never_returned() {
        let store = MemoryStore::new(HOUR, 100).unwrap();
        store
            .create(SessionSpec::new().id("short").ttl(Duration::from_secs(10)))
            .await
            .unwrap();
        store.create(SessionSpec::new().id("long")).await.unwrap();
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(9)).await;
            get(&store, "short").await.unwrap();
        }
        // `exists` and `list` are not accesses: they do not extend the TTL.
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(store.exists("short").await.unwrap());
        assert_eq!(store.list(None, 10).await.unwrap().sessions.len(), 2);
        tokio::time::advance(Duration::from_secs(1)).await;
        // Expired but not yet swept: already invisible to every operation.
        assert!(!store.exists("short").await.unwrap());
        assert_eq!(store.list(None, 10).await.unwrap().sessions.len(), 1);
        assert_eq!(store.stats().live, 1);
        assert_eq!(
            get(&store, "short").await.unwrap_err().kind(),
            &ErrorKind::SessionNotFound
        );
        let program = plain("p");
        let e = store.put_program("short", program).await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::SessionNotFound);
        assert_eq!(store.stats().expired, 1);
        // get_or_create makes a fresh one under the old id.
        let fresh = store.get_or_create("short").await.unwrap();
        assert_eq!(fresh.ttl, HOUR);
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_created_over_an_expired_one_counts_the_old_one_as_expired() {
        let store = MemoryStore::new(Duration::from_secs(10), 100).unwrap();
        for id in ["a", "b"] {
            store.create(SessionSpec::new().id(id)).await.unwrap();
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        store.create(SessionSpec::new().id("a")).await.unwrap();
        store.get_or_create("b").await.unwrap();
        let stats = store.stats();
        assert_eq!((stats.live, stats.created, stats.expired), (2, 4, 2));
        assert_eq!(store.sweep().await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweep_removes_what_expired_and_a_ttl_can_be_changed() {
        let store = MemoryStore::new(Duration::from_secs(60), 100).unwrap();
        for id in ["a", "b", "c"] {
            store.create(SessionSpec::new().id(id)).await.unwrap();
        }
        let update = SessionUpdate {
            ttl: Some(HOUR),
            ..SessionUpdate::default()
        };
        assert_eq!(store.update("c", update).await.unwrap().ttl, HOUR);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(store.sweep().await.unwrap(), 2);
        assert_eq!(store.sweep().await.unwrap(), 0);
        let stats = store.stats();
        assert_eq!((stats.live, stats.expired), (1, 2));
        assert!(store.exists("c").await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn the_quota_counts_live_sessions_only() {
        let store = MemoryStore::new(Duration::from_secs(60), 2).unwrap();
        store.create(SessionSpec::new().id("a")).await.unwrap();
        store
            .create(SessionSpec::new().id("b").ttl(Duration::from_secs(5)))
            .await
            .unwrap();
        let e = store.create(SessionSpec::new().id("c")).await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::QuotaExceeded);
        assert_eq!(e.category(), crate::Category::Session);
        let e = store.get_or_create("c").await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::QuotaExceeded);
        assert!(!store.exists("c").await.unwrap());
        tokio::time::advance(Duration::from_secs(6)).await;
        store.create(SessionSpec::new().id("c")).await.unwrap();
        assert_eq!(store.stats().live, 2);
    }

    #[tokio::test]
    async fn programs_belong_to_their_session_and_globals_to_all() {
        let store = MemoryStore::new(HOUR, 100).unwrap();
        store.create(SessionSpec::new().id("s")).await.unwrap();
        store.create(SessionSpec::new().id("t")).await.unwrap();
        let qa = Program::new(
            "qa",
            "question -> answer",
            "predict",
            crate::session::raw_json(&json!({"v": 1})),
        );
        let qa = store.put_program("s", qa).await.unwrap();
        assert_eq!(
            store.get_program("s", "qa").await.unwrap().signature,
            "question -> answer"
        );
        let e = store.get_program("t", "qa").await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::ProgramNotFound);
        assert_eq!(e.context().program_id.as_deref(), Some("qa"));
        let ran = store.record_execution("s", &qa).await.unwrap();
        assert_eq!(ran.execution_count, 1);
        assert!(ran.last_executed.is_some());
        assert_eq!(
            get(&store, "s").await.unwrap().programs["qa"].execution_count,
            1
        );

        let shared = Program::new(
            "shared",
            "text -> summary",
            "chain_of_thought",
            crate::session::raw_json(&json!({})),
        );
        let shared = store.put_global_program(shared).await.unwrap();
        let ran = store.record_execution("t", &shared).await.unwrap();
        assert_eq!(ran.execution_count, 1);
        assert_eq!(
            store
                .get_global_program("shared")
                .await
                .unwrap()
                .execution_count,
            1
        );
        assert_eq!(store.list_global_programs().await.unwrap().len(), 1);
        assert_eq!(store.stats().global_programs, 1);
        // A program replaced, or one of another scope with the same id, is not credited.
        let other = crate::session::raw_json(&json!({"v": 2}));
        let replaced = Program::new("qa", "q -> a", "predict", other.clone());
        store.put_program("s", replaced).await.unwrap();
        let e = store.record_execution("s", &qa).await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::ProgramNotFound);
        assert!(e.message().contains("nor among the global programs"), "{e}");
        let own = Program::new("shared", "q -> a", "predict", other);
        let own = store.put_program("t", own).await.unwrap();
        store.delete_program("t", "shared").await.unwrap();
        let e = store.record_execution("t", &own).await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::ProgramNotFound);
        assert_eq!(
            store
                .get_global_program("shared")
                .await
                .unwrap()
                .execution_count,
            1
        );
        // A session's own programs are looked for in the session only.
        let e = store.get_program("t", "shared").await.unwrap_err();
        assert!(e.message().ends_with("in session \"t\""), "{e}");
        for e in [
            store.record_execution("nobody", &shared).await.unwrap_err(),
            store.delete_program("nobody", "qa").await.unwrap_err(),
            store.get_program("nobody", "qa").await.unwrap_err(),
        ] {
            assert_eq!(e.kind(), &ErrorKind::SessionNotFound, "{e}");
        }

        assert_eq!(store.delete_program("s", "qa").await.unwrap().id, "qa");
        let e = store.delete_program("s", "qa").await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::ProgramNotFound);
        store.delete_global_program("shared").await.unwrap();
        let e = store.get_global_program("shared").await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::ProgramNotFound);
        let bad = plain("a b");
        let e = store.put_global_program(bad).await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::InvalidId);
    }
}
