//! The per-group state machine: sessions, their events, `last_seq` and the idempotency window.
//!
//! `decide_*` look at the state and turn a validated request into either an answer or a
//! command to log; `apply` executes a logged command. Apply is deterministic and re-checks the
//! command against the state, so replaying a log (or a replica applying it) always reaches the
//! same state even if a command was decided against a view that later changed.

use crate::command::{AppendCommand, ArchiveAckCommand, Command, CreateCommand};
use crate::event::{render_event, EventFields};
use crate::time::Timestamp;
use crate::validate::{AppendRequest, CreateRequest};
use crate::SessionId;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};

/// Default number of most recent events whose idempotency keys are remembered per session.
pub const DEFAULT_IDEMPOTENCY_WINDOW: u64 = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    pub title: Option<String>,
    pub metadata: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub last_seq: u64,
    /// Events `1..=archived_seq` are in the cold archive (a contiguous prefix).
    pub archived_seq: u64,
    /// Seq of `events[0]`; events below it are no longer held here.
    first_seq: u64,
    events: VecDeque<Bytes>,
    /// idempotency key → (seq, fingerprint), for keys of the most recent `window` events.
    keys: HashMap<String, (u64, u128)>,
    key_order: VecDeque<(u64, String)>,
}

/// The header of a session as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    pub id: String,
    pub title: Option<String>,
    pub metadata: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub last_seq: u64,
}

impl Session {
    fn new(cmd: &CreateCommand) -> Self {
        Session {
            id: cmd.id.clone(),
            title: cmd.title.clone(),
            metadata: cmd.metadata.clone(),
            created_at: cmd.created_at,
            updated_at: cmd.created_at,
            last_seq: 0,
            archived_seq: 0,
            first_seq: 1,
            events: VecDeque::new(),
            keys: HashMap::new(),
            key_order: VecDeque::new(),
        }
    }

    pub fn view(&self) -> SessionView {
        SessionView {
            id: self.id.clone(),
            title: self.title.clone(),
            metadata: self.metadata.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
            last_seq: self.last_seq,
        }
    }

    /// Events with `after < seq <= upto`, at most `limit` of them, oldest first.
    pub fn events_between(&self, after: u64, upto: u64, limit: usize) -> Vec<Bytes> {
        let upto = upto.min(self.last_seq);
        let start = after.saturating_add(1).max(self.first_seq);
        if start > upto {
            return Vec::new();
        }
        let from = (start - self.first_seq) as usize;
        let count = ((upto - start + 1) as usize).min(limit);
        self.events.range(from..from + count).cloned().collect()
    }

    /// The lowest seq still held in memory.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    fn lookup_key(&self, key: &str) -> Option<(u64, u128)> {
        self.keys.get(key).copied()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendDecision {
    NotFound,
    /// The same event was already appended under this idempotency key.
    Deduped {
        seq: u64,
        last_seq: u64,
    },
    IdempotencyConflict {
        key: String,
        seq: u64,
    },
    ExpectedSeqConflict {
        expected: u64,
        current: u64,
    },
    Accept(AppendCommand),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateDecision {
    Exists,
    Accept(CreateCommand),
}

/// What applying a command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Created,
    Appended {
        seq: u64,
    },
    /// The archive mark advanced; `trimmed` events left memory.
    Archived {
        trimmed: u64,
    },
    /// The command no longer fitted the state (duplicate create, stale seq, replayed key).
    Ignored,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupState {
    sessions: HashMap<String, Session>,
    idempotency_window: u64,
}

impl GroupState {
    pub fn new(idempotency_window: u64) -> Self {
        GroupState {
            sessions: HashMap::new(),
            idempotency_window: idempotency_window.max(1),
        }
    }

    /// The window is configuration, not data: a restarted node adopts its current setting.
    pub fn with_idempotency_window(mut self, window: u64) -> Self {
        self.idempotency_window = window.max(1);
        self
    }

    pub fn session(&self, id: &str) -> Option<&Session> {
        self.sessions.get(id)
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.sessions.values()
    }

    pub fn decide_create(
        &self,
        id: SessionId,
        req: &CreateRequest,
        now: Timestamp,
    ) -> CreateDecision {
        if self.sessions.contains_key(id.as_str()) {
            return CreateDecision::Exists;
        }
        CreateDecision::Accept(CreateCommand {
            id: id.into_string(),
            title: req.title.clone(),
            metadata: req.metadata.clone(),
            created_at: now,
        })
    }

    /// Idempotency is decided before `expected_seq`, so a retry of an append that already
    /// succeeded is answered as a dedupe even though its `expected_seq` is now stale.
    pub fn decide_append(
        &self,
        session_id: &str,
        req: &AppendRequest,
        now: Timestamp,
    ) -> AppendDecision {
        let Some(session) = self.sessions.get(session_id) else {
            return AppendDecision::NotFound;
        };
        if let Some(key) = &req.idempotency_key {
            if let Some((seq, fingerprint)) = session.lookup_key(key) {
                return if fingerprint == req.fingerprint {
                    AppendDecision::Deduped {
                        seq,
                        last_seq: session.last_seq,
                    }
                } else {
                    AppendDecision::IdempotencyConflict {
                        key: key.clone(),
                        seq,
                    }
                };
            }
        }
        if let Some(expected) = req.expected_seq {
            if expected != session.last_seq {
                return AppendDecision::ExpectedSeqConflict {
                    expected,
                    current: session.last_seq,
                };
            }
        }
        let seq = session.last_seq + 1;
        let event = render_event(&EventFields {
            seq,
            event_type: &req.event_type,
            payload: &req.payload,
            actor: &req.actor,
            source: req.source.as_deref(),
            metadata: &req.metadata,
            refs: &req.refs,
            idempotency_key: req.idempotency_key.as_deref(),
            inserted_at: now,
        });
        AppendDecision::Accept(AppendCommand {
            session_id: session_id.to_owned(),
            seq,
            idempotency_key: req.idempotency_key.clone(),
            fingerprint: req.fingerprint,
            inserted_at: now,
            event: Bytes::from(event),
        })
    }

    pub fn apply(&mut self, cmd: &Command) -> Applied {
        match cmd {
            Command::Create(c) => {
                if self.sessions.contains_key(&c.id) {
                    return Applied::Ignored;
                }
                self.sessions.insert(c.id.clone(), Session::new(c));
                Applied::Created
            }
            Command::Append(a) => {
                let window = self.idempotency_window;
                let Some(session) = self.sessions.get_mut(&a.session_id) else {
                    return Applied::Ignored;
                };
                if a.seq != session.last_seq + 1 {
                    return Applied::Ignored;
                }
                if let Some(key) = &a.idempotency_key {
                    if session.keys.contains_key(key) {
                        return Applied::Ignored;
                    }
                    session.keys.insert(key.clone(), (a.seq, a.fingerprint));
                    session.key_order.push_back((a.seq, key.clone()));
                }
                session.last_seq = a.seq;
                session.updated_at = session.updated_at.max(a.inserted_at);
                session.events.push_back(a.event.clone());
                while let Some((seq, _)) = session.key_order.front() {
                    if seq + window > a.seq {
                        break;
                    }
                    if let Some((_, key)) = session.key_order.pop_front() {
                        session.keys.remove(&key);
                    }
                }
                Applied::Appended { seq: a.seq }
            }
            Command::ArchiveAck(ack) => self.apply_archive_ack(ack),
        }
    }

    fn apply_archive_ack(&mut self, ack: &ArchiveAckCommand) -> Applied {
        let Some(session) = self.sessions.get_mut(&ack.session_id) else {
            return Applied::Ignored;
        };
        if ack.archived_seq <= session.archived_seq || ack.archived_seq > session.last_seq {
            return Applied::Ignored;
        }
        session.archived_seq = ack.archived_seq;
        let keep_from = ack.archived_seq.saturating_sub(ack.keep_hot) + 1;
        let mut trimmed = 0;
        while session.first_seq < keep_from && session.events.pop_front().is_some() {
            session.first_seq += 1;
            trimmed += 1;
        }
        Applied::Archived { trimmed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn create(state: &mut GroupState, id: &str) {
        let req = CreateRequest::parse(b"{}").unwrap();
        match state.decide_create(SessionId::parse(id).unwrap(), &req, Timestamp(1)) {
            CreateDecision::Accept(c) => {
                assert_eq!(state.apply(&Command::Create(c)), Applied::Created)
            }
            CreateDecision::Exists => panic!("exists"),
        }
    }

    fn request(payload: &str, key: Option<&str>, expected: Option<u64>) -> AppendRequest {
        let mut body = format!(r#"{{"type":"t","actor":"a","payload":{payload}"#);
        if let Some(k) = key {
            body.push_str(&format!(r#","idempotency_key":"{k}""#));
        }
        if let Some(e) = expected {
            body.push_str(&format!(r#","expected_seq":{e}"#));
        }
        body.push('}');
        AppendRequest::parse(body.as_bytes()).unwrap()
    }

    /// Decide then apply, as a leader does; returns the decision.
    fn append(state: &mut GroupState, id: &str, req: &AppendRequest) -> AppendDecision {
        let decision = state.decide_append(id, req, Timestamp(2));
        if let AppendDecision::Accept(cmd) = &decision {
            assert_eq!(
                state.apply(&Command::Append(cmd.clone())),
                Applied::Appended { seq: cmd.seq }
            );
        }
        decision
    }

    #[test]
    fn create_twice_is_refused() {
        let mut s = GroupState::new(10);
        create(&mut s, "a");
        let req = CreateRequest::parse(b"{}").unwrap();
        assert_eq!(
            s.decide_create(SessionId::parse("a").unwrap(), &req, Timestamp(1)),
            CreateDecision::Exists
        );
    }

    #[test]
    fn dedupe_is_decided_before_expected_seq() {
        let mut s = GroupState::new(10);
        create(&mut s, "a");
        let first = request(r#"{"n":1}"#, Some("k"), Some(0));
        assert!(matches!(
            append(&mut s, "a", &first),
            AppendDecision::Accept(_)
        ));
        append(&mut s, "a", &request("{}", None, None));
        assert_eq!(
            append(&mut s, "a", &first),
            AppendDecision::Deduped {
                seq: 1,
                last_seq: 2
            }
        );
        assert!(matches!(
            append(&mut s, "a", &request(r#"{"n":2}"#, Some("k"), None)),
            AppendDecision::IdempotencyConflict { seq: 1, .. }
        ));
        assert_eq!(
            append(&mut s, "a", &request("{}", None, Some(1))),
            AppendDecision::ExpectedSeqConflict {
                expected: 1,
                current: 2
            }
        );
        assert_eq!(
            append(&mut s, "x", &request("{}", None, None)),
            AppendDecision::NotFound
        );
    }

    #[test]
    fn apply_ignores_stale_commands() {
        let mut s = GroupState::new(10);
        create(&mut s, "a");
        let AppendDecision::Accept(cmd) =
            s.decide_append("a", &request("{}", Some("k"), None), Timestamp(3))
        else {
            panic!()
        };
        assert_eq!(
            s.apply(&Command::Append(cmd.clone())),
            Applied::Appended { seq: 1 }
        );
        assert_eq!(s.apply(&Command::Append(cmd)), Applied::Ignored);
        assert_eq!(s.session("a").unwrap().last_seq, 1);
    }

    #[test]
    fn window_forgets_old_keys_only() {
        let mut s = GroupState::new(3);
        create(&mut s, "a");
        for i in 0..5 {
            append(&mut s, "a", &request("{}", Some(&format!("k{i}")), None));
        }
        // Events 3, 4, 5 are the window: k2, k3, k4 remembered; k0, k1 forgotten.
        assert!(matches!(
            append(&mut s, "a", &request("{}", Some("k2"), None)),
            AppendDecision::Deduped { seq: 3, .. }
        ));
        assert!(matches!(
            append(&mut s, "a", &request("{}", Some("k0"), None)),
            AppendDecision::Accept(_)
        ));
    }

    #[test]
    fn events_between_respects_bounds() {
        let mut s = GroupState::new(10);
        create(&mut s, "a");
        for _ in 0..5 {
            append(&mut s, "a", &request("{}", None, None));
        }
        let session = s.session("a").unwrap();
        assert_eq!(session.events_between(0, 5, 100).len(), 5);
        assert_eq!(session.events_between(2, 4, 100).len(), 2);
        assert_eq!(session.events_between(0, 5, 2).len(), 2);
        assert_eq!(session.events_between(5, 9, 100).len(), 0);
        assert_eq!(session.events_between(9, 3, 100).len(), 0);
        let third: serde_json::Value =
            serde_json::from_slice(&session.events_between(2, 3, 1)[0]).unwrap();
        assert_eq!(third["seq"], 3);
    }

    #[test]
    fn archive_ack_trims_but_keeps_keys_and_recent_events() {
        let mut s = GroupState::new(100);
        create(&mut s, "a");
        for i in 0..10 {
            append(&mut s, "a", &request("{}", Some(&format!("k{i}")), None));
        }
        let ack = |seq, keep| {
            Command::ArchiveAck(ArchiveAckCommand {
                session_id: "a".into(),
                archived_seq: seq,
                keep_hot: keep,
            })
        };
        assert_eq!(
            s.apply(&ack(11, 2)),
            Applied::Ignored,
            "cannot archive past last_seq"
        );
        assert_eq!(s.apply(&ack(6, 2)), Applied::Archived { trimmed: 4 });
        let session = s.session("a").unwrap();
        assert_eq!(session.first_seq(), 5);
        assert_eq!(session.archived_seq, 6);
        assert_eq!(session.events_between(0, 10, 100).len(), 6);
        assert_eq!(s.apply(&ack(6, 0)), Applied::Ignored, "not monotonic");
        assert_eq!(s.apply(&ack(10, 0)), Applied::Archived { trimmed: 6 });
        assert!(s
            .session("a")
            .unwrap()
            .events_between(0, 10, 100)
            .is_empty());
        // Idempotency keys outlive trimming.
        assert!(matches!(
            append(&mut s, "a", &request("{}", Some("k0"), None)),
            AppendDecision::Deduped { seq: 1, .. }
        ));
        assert!(matches!(
            append(&mut s, "a", &request("{}", None, None)),
            AppendDecision::Accept(AppendCommand { seq: 11, .. })
        ));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append {
            key: Option<u8>,
            payload: u8,
            expected: Option<u64>,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        (
            proptest::option::of(0u8..20),
            0u8..3,
            proptest::option::of(0u64..40),
        )
            .prop_map(|(key, payload, expected)| Op::Append {
                key,
                payload,
                expected,
            })
    }

    proptest! {
        /// Against a simple model: seqs are gapless, a key maps to one seq forever (within the
        /// window), expected_seq is honoured, and replaying the log gives the same state.
        #[test]
        fn matches_model_and_replays_identically(ops in proptest::collection::vec(op(), 1..200)) {
            let mut s = GroupState::new(DEFAULT_IDEMPOTENCY_WINDOW);
            create(&mut s, "a");
            let mut log = Vec::new();
            let mut model_keys: HashMap<u8, (u64, u8)> = HashMap::new();
            let mut last = 0u64;
            for Op::Append { key, payload, expected } in ops {
                let req = request(
                    &format!(r#"{{"p":{payload}}}"#),
                    key.map(|k| format!("k{k}")).as_deref(),
                    expected,
                );
                let decision = s.decide_append("a", &req, Timestamp(5));
                match (key.and_then(|k| model_keys.get(&k).copied()), &decision) {
                    (Some((seq, p)), AppendDecision::Deduped { seq: got, .. }) => {
                        prop_assert_eq!(p, payload);
                        prop_assert_eq!(seq, *got);
                    }
                    (Some((seq, p)), AppendDecision::IdempotencyConflict { seq: got, .. }) => {
                        prop_assert_ne!(p, payload);
                        prop_assert_eq!(seq, *got);
                    }
                    (None, AppendDecision::ExpectedSeqConflict { expected: e, current }) => {
                        prop_assert_eq!(Some(*e), expected);
                        prop_assert_ne!(*e, last);
                        prop_assert_eq!(*current, last);
                    }
                    (None, AppendDecision::Accept(cmd)) => {
                        prop_assert!(expected.is_none() || expected == Some(last));
                        prop_assert_eq!(cmd.seq, last + 1);
                        last += 1;
                        if let Some(k) = key {
                            model_keys.insert(k, (last, payload));
                        }
                        let c = Command::Append(cmd.clone());
                        prop_assert_eq!(s.apply(&c), Applied::Appended { seq: last });
                        log.push(c);
                    }
                    (model, got) => prop_assert!(false, "model {:?} vs {:?}", model, got),
                }
            }
            prop_assert_eq!(s.session("a").unwrap().last_seq, last);
            let mut replayed = GroupState::new(DEFAULT_IDEMPOTENCY_WINDOW);
            create(&mut replayed, "a");
            for c in &log {
                replayed.apply(c);
            }
            let a = s.session("a").unwrap();
            let b = replayed.session("a").unwrap();
            prop_assert_eq!(a.events_between(0, last, usize::MAX), b.events_between(0, last, usize::MAX));
            prop_assert_eq!(&a.keys, &b.keys);
        }
    }
}
