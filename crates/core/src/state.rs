//! The per-group state machine: sessions, their events, `last_seq` and the idempotency window.
//!
//! `apply` executes a committed command and returns its answer. It is deterministic, so every
//! replica (and a replay of the log) reaches the same state and the same answers.
//! `settled_append` lets a node answer without replicating when the state already decides.

use crate::command::{AppendCommand, ArchiveMark, Command, CreateCommand};
use crate::event::{frame_with_seq, render_event_body, EventFields};
use crate::time::Timestamp;
use crate::validate::{AppendRequest, CreateRequest};
use crate::SessionId;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use starcite_deque::ChunkedDeque;
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
    /// Seq of `events[0]`; events below it are no longer held in memory.
    first_seq: u64,
    events: ChunkedDeque<Bytes>,
    /// Unarchived events moved to local disk to bound memory: contiguous runs, oldest first,
    /// the last one ending at `first_seq - 1`. Runs wholly archived are dropped.
    spilled: VecDeque<SpillRun>,
    /// idempotency key → (seq, fingerprint), for keys of the most recent `window` events.
    keys: HashMap<String, (u64, u128)>,
    key_order: ChunkedDeque<(u64, String)>,
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
            events: ChunkedDeque::new(),
            spilled: VecDeque::new(),
            keys: HashMap::new(),
            key_order: ChunkedDeque::new(),
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

    /// A copy without the events the archive already holds (a snapshot needs only what
    /// the archive cannot give back). With spilled runs, memory starts above the archive
    /// mark and every event is copied.
    fn without_archived_events(&self) -> Session {
        let skip = if self.spilled.is_empty() {
            ((self.archived_seq + 1).saturating_sub(self.first_seq) as usize).min(self.events.len())
        } else {
            0
        };
        Session {
            id: self.id.clone(),
            title: self.title.clone(),
            metadata: self.metadata.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
            last_seq: self.last_seq,
            archived_seq: self.archived_seq,
            first_seq: self.first_seq + skip as u64,
            events: self.events.iter_from(skip).cloned().collect(),
            spilled: self.spilled.clone(),
            keys: self.keys.clone(),
            key_order: self.key_order.clone(),
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
        self.events.iter_from(from).take(count).cloned().collect()
    }

    /// The lowest seq still held in memory.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// The lowest seq held on this replica (in memory or spilled); below it, only the
    /// archive has the events.
    pub fn first_local_seq(&self) -> u64 {
        self.spilled.front().map_or(self.first_seq, |r| r.from)
    }

    /// Events held in memory.
    pub fn hot_len(&self) -> usize {
        self.events.len()
    }

    /// The spilled runs holding any of the events `after < seq <= upto`, oldest first.
    pub fn spilled_between(&self, after: u64, upto: u64) -> Vec<SpillRun> {
        self.spilled
            .iter()
            .filter(|r| r.to > after && r.from <= upto)
            .cloned()
            .collect()
    }

    /// The spilled runs holding the events from `after + 1` (up to `upto`), when that is
    /// where they start on this replica; `None` when they start in memory or there are none.
    pub fn spilled_from(&self, after: u64, upto: u64) -> Option<Vec<SpillRun>> {
        if upto <= after || self.first_seq <= after + 1 {
            return None;
        }
        Some(self.spilled_between(after, upto.min(self.first_seq - 1)))
    }

    pub fn spilled_runs(&self) -> impl Iterator<Item = &SpillRun> {
        self.spilled.iter()
    }

    /// Puts `events`, those right below memory, back in front of it. Returns their cost.
    fn prepend(&mut self, events: Vec<Bytes>) -> u64 {
        self.first_seq -= events.len() as u64;
        let mut bytes = 0;
        for e in events.into_iter().rev() {
            bytes += event_cost(&e);
            self.events.push_front(e);
        }
        bytes
    }

    /// Takes the events below `seq` out of memory: into `keep`, for the caller to free where
    /// it likes, or dropped here. Returns how many, and the memory they held.
    fn release_memory_before(&mut self, seq: u64, mut keep: Option<&mut Vec<Bytes>>) -> (u64, u64) {
        let n = (seq.saturating_sub(self.first_seq) as usize).min(self.events.len());
        let mut bytes = 0;
        for event in self.events.drain_front(n) {
            bytes += event_cost(&event);
            if let Some(kept) = keep.as_deref_mut() {
                kept.push(event);
            }
        }
        self.first_seq += n as u64;
        (n as u64, bytes)
    }

    /// Records an idempotency key. A full key map doubles and rehashes everything in it, and
    /// under an even load of keyed appends every session's map fills at the same pace: all
    /// of them would rehash in the same few milliseconds, on every replica (as the event
    /// queues did, see `starcite-deque`). So a map grows a little early, by a share of its
    /// capacity that differs from session to session, as long as the window needs more room.
    fn remember_key(&mut self, key: &str, seq: u64, fingerprint: u128, window: u64) {
        let capacity = self.keys.capacity();
        if self.keys.len() >= capacity / 2 && (capacity as u64) < window {
            let early = capacity / 2 * key_map_stagger(&self.id) / KEY_MAP_STAGGER_STEPS;
            if self.keys.len() >= capacity - early {
                self.keys.reserve(capacity + 1 - self.keys.len());
            }
        }
        self.keys.insert(key.to_owned(), (seq, fingerprint));
        self.key_order.push_back((seq, key.to_owned()));
    }

    /// The answer for an append carrying `key` if the key is remembered: a dedupe when the
    /// event is the same, a conflict when it is not.
    fn check_key(&self, key: Option<&str>, fingerprint: u128) -> Option<Applied> {
        let key = key?;
        let &(seq, known) = self.keys.get(key)?;
        Some(if known == fingerprint {
            Applied::Deduped {
                seq,
                last_seq: self.last_seq,
            }
        } else {
            Applied::IdempotencyConflict {
                key: key.to_owned(),
                seq,
            }
        })
    }
}

/// How finely [`key_map_stagger`] spreads sessions.
const KEY_MAP_STAGGER_STEPS: usize = 64;

/// A session's share (out of [`KEY_MAP_STAGGER_STEPS`]) of half its key map's capacity by
/// which the map grows early: fixed per session and spread evenly over sessions, as placement
/// is (it is the session's group among that many).
fn key_map_stagger(session_id: &str) -> usize {
    crate::hash::group_of(session_id, KEY_MAP_STAGGER_STEPS as u32) as usize
}

/// What applying a command did; for a client command, its answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    Created,
    SessionExists,
    SessionNotFound,
    Appended {
        seq: u64,
    },
    /// The same event was already appended under this idempotency key; nothing appended.
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
    /// Archive marks advanced; `trimmed` events left memory.
    Archived {
        trimmed: u64,
    },
    /// Nothing to do (an archive mark that does not advance, a blank log entry).
    Ignored,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupState {
    sessions: HashMap<String, Session>,
    idempotency_window: u64,
    /// Memory held by events (see [`event_cost`]); derived, recounted after decoding.
    #[serde(skip)]
    hot_bytes: u64,
}

/// Where a spilled run's events are on local disk: a byte extent of a spill segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpillExtent {
    pub segment: u64,
    pub offset: u64,
    pub len: u64,
}

/// Events `from..=to` of a session, spilled to local disk at `extent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpillRun {
    pub from: u64,
    pub to: u64,
    pub extent: SpillExtent,
}

/// Events of one session taken from memory to be spilled: `from ..= from + events.len() - 1`.
#[derive(Debug, Clone)]
pub struct SpillChunk {
    pub session_id: String,
    pub from: u64,
    pub events: Vec<Bytes>,
}

/// What an event held in memory costs: its bytes plus the bookkeeping around them.
pub fn event_cost(frame: &[u8]) -> u64 {
    frame.len() as u64 + 64
}

impl CreateCommand {
    /// The leader's command for a validated create request (it stamps the time).
    pub fn new(id: SessionId, req: &CreateRequest, now: Timestamp) -> Self {
        CreateCommand {
            id: id.into_string(),
            title: req.title.clone(),
            metadata: req.metadata.clone(),
            created_at: now,
        }
    }

    pub fn view(&self) -> SessionView {
        SessionView {
            id: self.id.clone(),
            title: self.title.clone(),
            metadata: self.metadata.clone(),
            created_at: self.created_at,
            updated_at: self.created_at,
            last_seq: 0,
        }
    }
}

impl AppendCommand {
    /// The leader's command for a validated append request: it stamps `inserted_at` and
    /// renders everything of the event but its seq, which apply assigns.
    pub fn new(session_id: &str, req: &AppendRequest, now: Timestamp) -> Self {
        let body = render_event_body(&EventFields {
            seq: 0,
            event_type: &req.event_type,
            payload: &req.payload,
            actor: &req.actor,
            source: req.source.as_deref(),
            metadata: &req.metadata,
            refs: &req.refs,
            idempotency_key: req.idempotency_key.as_deref(),
            inserted_at: now,
        });
        AppendCommand {
            session_id: session_id.to_owned(),
            idempotency_key: req.idempotency_key.clone(),
            fingerprint: req.fingerprint,
            expected_seq: req.expected_seq,
            inserted_at: now,
            body: Bytes::from(body),
        }
    }
}

impl GroupState {
    pub fn new(idempotency_window: u64) -> Self {
        GroupState {
            sessions: HashMap::new(),
            idempotency_window: idempotency_window.max(1),
            hot_bytes: 0,
        }
    }

    /// Prepares a decoded state: the window is configuration, not data (a restarted node
    /// adopts its current setting), and the memory count is derived.
    pub fn restored(mut self, window: u64) -> Self {
        self.idempotency_window = window.max(1);
        self.hot_bytes = self.count_hot_bytes();
        self
    }

    fn count_hot_bytes(&self) -> u64 {
        self.sessions
            .values()
            .flat_map(|s| s.events.iter())
            .map(|e| event_cost(e))
            .sum()
    }

    /// Memory held by events of this group (archived ones kept hot included).
    pub fn hot_bytes(&self) -> u64 {
        self.hot_bytes
    }

    /// The state a snapshot records: everything but the events the archive already holds,
    /// which a restarted or new replica reads from the archive like any trimmed event. The
    /// hot copy of archived events is a read cache; writing it into every snapshot made a
    /// snapshot as large as the group's memory (a wave of them wrote the node's whole hot
    /// tier to disk again).
    pub fn for_snapshot(&self) -> GroupState {
        let mut copy = GroupState {
            sessions: self
                .sessions
                .iter()
                .map(|(id, session)| (id.clone(), session.without_archived_events()))
                .collect(),
            idempotency_window: self.idempotency_window,
            hot_bytes: 0,
        };
        copy.hot_bytes = copy.count_hot_bytes();
        copy
    }

    /// Drops from memory the events the archive already holds (kept hot for fast reads,
    /// which the archive then serves). Returns the memory freed.
    pub fn drop_archived(&mut self) -> u64 {
        self.take_archived().1
    }

    /// Takes the events the archive already holds out of memory and returns them, with the
    /// memory they held: freeing events that have gone cold costs about a microsecond each
    /// (cache misses), which a caller holding a lock the request path needs does better
    /// outside it.
    pub fn take_archived(&mut self) -> (Vec<Bytes>, u64) {
        let mut taken = Vec::new();
        let mut freed = 0;
        for session in self.sessions.values_mut() {
            // With spilled runs, memory starts above the archive mark: nothing to drop.
            if session.spilled.is_empty() {
                let (_, bytes) =
                    session.release_memory_before(session.archived_seq + 1, Some(&mut taken));
                freed += bytes;
            }
        }
        self.hot_bytes -= freed;
        (taken, freed)
    }

    /// Takes the events of every session out of memory for spilling, in runs of at most
    /// `max_run_bytes`, after dropping those already archived. The events stay readable in
    /// memory until [`GroupState::commit_spill`].
    pub fn take_spillable(&mut self, max_run_bytes: u64) -> Vec<SpillChunk> {
        self.drop_archived();
        let mut chunks = Vec::new();
        for session in self.sessions.values() {
            let mut from = session.first_seq;
            let mut run: Vec<Bytes> = Vec::new();
            let mut run_bytes = 0;
            for event in &session.events {
                if !run.is_empty() && run_bytes + event.len() as u64 > max_run_bytes {
                    let events = std::mem::take(&mut run);
                    let next = from + events.len() as u64;
                    chunks.push(SpillChunk {
                        session_id: session.id.clone(),
                        from,
                        events,
                    });
                    from = next;
                    run_bytes = 0;
                }
                run_bytes += event.len() as u64;
                run.push(event.clone());
            }
            if !run.is_empty() {
                chunks.push(SpillChunk {
                    session_id: session.id.clone(),
                    from,
                    events: run,
                });
            }
        }
        chunks
    }

    /// Replaces the `count` events from `from` in memory by a spilled run at `extent`.
    /// Refused (false) unless they are exactly the oldest events in memory, right after the
    /// last spilled run: the state may have moved on since they were taken.
    pub fn commit_spill(
        &mut self,
        session_id: &str,
        from: u64,
        count: usize,
        extent: SpillExtent,
    ) -> bool {
        let Some(session) = self.sessions.get_mut(session_id) else {
            return false;
        };
        let follows = session.spilled.back().is_none_or(|r| r.to + 1 == from);
        if count == 0 || session.first_seq != from || session.events.len() < count || !follows {
            return false;
        }
        for e in session.events.drain_front(count) {
            self.hot_bytes -= event_cost(&e);
        }
        session.first_seq = from + count as u64;
        session.spilled.push_back(SpillRun {
            from,
            to: from + count as u64 - 1,
            extent,
        });
        true
    }

    /// Puts a session's spilled events back in memory (`events` are those of all its runs, in
    /// order), e.g. to ship the state to a replica that cannot read this node's disk.
    pub fn unspill(&mut self, session_id: &str, events: Vec<Bytes>) -> Result<(), String> {
        let Some(session) = self.sessions.get_mut(session_id) else {
            return Err(format!("no session {session_id}"));
        };
        let Some(from) = session.spilled.front().map(|r| r.from) else {
            return Ok(());
        };
        if from + events.len() as u64 != session.first_seq {
            return Err(format!(
                "session {session_id}: {} spilled events read back, {} expected",
                events.len(),
                session.first_seq - from
            ));
        }
        session.spilled.clear();
        self.hot_bytes += session.prepend(events);
        Ok(())
    }

    /// Puts the events below memory back (`events` are `1..first_seq`, none spilled) and
    /// clears the session's archive mark, e.g. to ship the state to a replica whose archive
    /// is not this one.
    pub fn unarchive(&mut self, session_id: &str, events: Vec<Bytes>) -> Result<(), String> {
        let Some(session) = self.sessions.get_mut(session_id) else {
            return Err(format!("no session {session_id}"));
        };
        if !session.spilled.is_empty() {
            return Err(format!(
                "session {session_id}: its spilled runs must be read back first"
            ));
        }
        if events.len() as u64 + 1 != session.first_seq {
            return Err(format!(
                "session {session_id}: {} archived events read back, {} expected",
                events.len(),
                session.first_seq - 1
            ));
        }
        self.hot_bytes += session.prepend(events);
        session.archived_seq = 0;
        Ok(())
    }

    /// Spill segments the state refers to.
    pub fn spill_segments(&self) -> std::collections::BTreeSet<u64> {
        self.sessions
            .values()
            .flat_map(|s| s.spilled.iter())
            .map(|r| r.extent.segment)
            .collect()
    }

    /// Whether any session has spilled events.
    pub fn has_spilled(&self) -> bool {
        self.sessions.values().any(|s| !s.spilled.is_empty())
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

    /// The answer to an append when the current state already decides it for good, so the
    /// request need not be replicated: a known idempotency key (dedupe or conflict), or an
    /// `expected_seq` the session has already passed (seqs never go back). `None` means only
    /// apply can decide. Idempotency comes first, as in apply.
    pub fn settled_append(&self, session_id: &str, req: &AppendRequest) -> Option<Applied> {
        let session = self.sessions.get(session_id)?;
        if let Some(answer) = session.check_key(req.idempotency_key.as_deref(), req.fingerprint) {
            return Some(answer);
        }
        match req.expected_seq {
            Some(expected) if expected < session.last_seq => Some(Applied::ExpectedSeqConflict {
                expected,
                current: session.last_seq,
            }),
            _ => None,
        }
    }

    /// Applies a committed command. Deterministic: the same commands in the same order give
    /// the same state and answers on every replica. Idempotency is decided before
    /// `expected_seq`, so a retry of an append that already succeeded is answered as a dedupe
    /// even though its `expected_seq` is now stale.
    pub fn apply(&mut self, cmd: &Command) -> Applied {
        match cmd {
            Command::Create(c) => {
                if self.sessions.contains_key(&c.id) {
                    return Applied::SessionExists;
                }
                self.sessions.insert(c.id.clone(), Session::new(c));
                Applied::Created
            }
            Command::Append(a) => {
                let window = self.idempotency_window;
                let Some(session) = self.sessions.get_mut(&a.session_id) else {
                    return Applied::SessionNotFound;
                };
                if let Some(answer) = session.check_key(a.idempotency_key.as_deref(), a.fingerprint)
                {
                    return answer;
                }
                if let Some(expected) = a.expected_seq {
                    if expected != session.last_seq {
                        return Applied::ExpectedSeqConflict {
                            expected,
                            current: session.last_seq,
                        };
                    }
                }
                let seq = session.last_seq + 1;
                if let Some(key) = &a.idempotency_key {
                    session.remember_key(key, seq, a.fingerprint, window);
                }
                session.last_seq = seq;
                session.updated_at = session.updated_at.max(a.inserted_at);
                let frame = Bytes::from(frame_with_seq(seq, &a.body));
                self.hot_bytes += event_cost(&frame);
                session.events.push_back(frame);
                while let Some((oldest, _)) = session.key_order.front() {
                    if oldest + window > seq {
                        break;
                    }
                    if let Some((_, key)) = session.key_order.pop_front() {
                        session.keys.remove(&key);
                    }
                }
                Applied::Appended { seq }
            }
            Command::ArchiveAck(ack) => {
                let mut advanced = false;
                let mut trimmed = 0;
                for mark in &ack.marks {
                    if let Some(n) = self.apply_archive_mark(mark, ack.keep_hot) {
                        advanced = true;
                        trimmed += n;
                    }
                }
                if advanced {
                    Applied::Archived { trimmed }
                } else {
                    Applied::Ignored
                }
            }
        }
    }

    /// Advances one session's archive mark (contiguous prefix only, never past `last_seq`,
    /// never backwards) and trims memory. Returns how many events left memory, or `None` if
    /// the mark did not advance.
    fn apply_archive_mark(&mut self, mark: &ArchiveMark, keep_hot: u64) -> Option<u64> {
        let session = self.sessions.get_mut(&mark.session_id)?;
        if mark.archived_seq <= session.archived_seq || mark.archived_seq > session.last_seq {
            return None;
        }
        session.archived_seq = mark.archived_seq;
        while session
            .spilled
            .front()
            .is_some_and(|r| r.to <= mark.archived_seq)
        {
            session.spilled.pop_front();
        }
        let keep_from = mark.archived_seq.saturating_sub(keep_hot) + 1;
        let (trimmed, bytes) = session.release_memory_before(keep_from, None);
        self.hot_bytes -= bytes;
        Some(trimmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::ArchiveAckCommand;
    use proptest::prelude::*;

    fn create(state: &mut GroupState, id: &str) {
        let req = CreateRequest::parse(b"{}").unwrap();
        let cmd = CreateCommand::new(SessionId::parse(id).unwrap(), &req, Timestamp(1));
        assert_eq!(state.apply(&Command::Create(cmd)), Applied::Created);
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

    fn append_cmd(id: &str, req: &AppendRequest) -> Command {
        Command::Append(AppendCommand::new(id, req, Timestamp(2)))
    }

    fn append(state: &mut GroupState, id: &str, req: &AppendRequest) -> Applied {
        state.apply(&append_cmd(id, req))
    }

    #[test]
    fn create_twice_is_refused() {
        let mut s = GroupState::new(10);
        create(&mut s, "a");
        let req = CreateRequest::parse(b"{}").unwrap();
        let cmd = CreateCommand::new(SessionId::parse("a").unwrap(), &req, Timestamp(9));
        assert_eq!(s.apply(&Command::Create(cmd)), Applied::SessionExists);
        assert_eq!(s.session("a").unwrap().created_at, Timestamp(1));
    }

    #[test]
    fn dedupe_is_decided_before_expected_seq() {
        let mut s = GroupState::new(10);
        create(&mut s, "a");
        let first = request(r#"{"n":1}"#, Some("k"), Some(0));
        assert_eq!(append(&mut s, "a", &first), Applied::Appended { seq: 1 });
        append(&mut s, "a", &request("{}", None, None));
        assert_eq!(
            append(&mut s, "a", &first),
            Applied::Deduped {
                seq: 1,
                last_seq: 2
            }
        );
        assert_eq!(
            s.settled_append("a", &first),
            Some(Applied::Deduped {
                seq: 1,
                last_seq: 2
            })
        );
        assert!(matches!(
            append(&mut s, "a", &request(r#"{"n":2}"#, Some("k"), None)),
            Applied::IdempotencyConflict { seq: 1, .. }
        ));
        assert_eq!(
            append(&mut s, "a", &request("{}", None, Some(1))),
            Applied::ExpectedSeqConflict {
                expected: 1,
                current: 2
            }
        );
        assert_eq!(
            append(&mut s, "a", &request("{}", None, Some(7))),
            Applied::ExpectedSeqConflict {
                expected: 7,
                current: 2
            }
        );
        assert_eq!(
            append(&mut s, "x", &request("{}", None, None)),
            Applied::SessionNotFound
        );
        assert_eq!(s.session("a").unwrap().last_seq, 2);
    }

    #[test]
    fn key_maps_filled_in_step_grow_at_different_lengths() {
        let mut ids: Vec<String> = (0..64).map(|i| format!("s{i}")).collect();
        ids.sort_by_key(|id| key_map_stagger(id));
        // The larger the stagger, the earlier a map grows.
        let (later, sooner) = (ids[0].clone(), ids[63].clone());
        assert!(key_map_stagger(&later) + 32 < key_map_stagger(&sooner));
        let mut s = GroupState::new(100_000);
        create(&mut s, &later);
        create(&mut s, &sooner);
        let mut grew_at: HashMap<String, Vec<usize>> = HashMap::new();
        for n in 0..3000 {
            for id in [&later, &sooner] {
                let before = s.session(id).unwrap().keys.capacity();
                let key = format!("k{n}");
                append(&mut s, id, &request("{}", Some(&key), None));
                let session = s.session(id).unwrap();
                if session.keys.capacity() != before {
                    grew_at
                        .entry(id.clone())
                        .or_default()
                        .push(session.keys.len());
                }
            }
        }
        let (sooner_growth, later_growth) = (&grew_at[&sooner], &grew_at[&later]);
        assert!(later_growth.len() >= 8, "{later_growth:?}");
        // Past the first few tiny maps, the same growth comes at a smaller length.
        for (a, b) in sooner_growth
            .iter()
            .zip(later_growth)
            .filter(|(_, b)| **b > 64)
        {
            assert!(a < b, "{sooner_growth:?} vs {later_growth:?}");
        }
        for id in [&later, &sooner] {
            assert_eq!(s.session(id).unwrap().keys.len(), 3000, "every key is kept");
        }
    }

    #[test]
    fn settled_answers_only_what_cannot_change() {
        let mut s = GroupState::new(10);
        create(&mut s, "a");
        append(&mut s, "a", &request("{}", None, None));
        append(&mut s, "a", &request("{}", None, None));
        // Behind the session: final. Ahead of it: in-flight appends may still get there.
        assert!(matches!(
            s.settled_append("a", &request("{}", None, Some(1))),
            Some(Applied::ExpectedSeqConflict { .. })
        ));
        assert_eq!(s.settled_append("a", &request("{}", None, Some(2))), None);
        assert_eq!(s.settled_append("a", &request("{}", None, Some(5))), None);
        assert_eq!(
            s.settled_append("a", &request("{}", Some("new"), None)),
            None
        );
        assert_eq!(
            s.settled_append("missing", &request("{}", None, None)),
            None
        );
    }

    #[test]
    fn the_frame_carries_the_seq_apply_assigns() {
        let mut s = GroupState::new(10);
        create(&mut s, "a");
        let req = request(r#"{"x":[1, 2]}"#, Some("k1"), None);
        let cmd = append_cmd("a", &req);
        append(&mut s, "a", &request("{}", None, None));
        assert_eq!(s.apply(&cmd), Applied::Appended { seq: 2 });
        let frame = &s.session("a").unwrap().events_between(1, 2, 10)[0];
        let v: serde_json::Value = serde_json::from_slice(frame).unwrap();
        assert_eq!(v["seq"], 2);
        assert_eq!(v["idempotency_key"], "k1");
        assert!(std::str::from_utf8(frame)
            .unwrap()
            .contains(r#""payload":{"x":[1, 2]}"#));
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
            Applied::Deduped { seq: 3, .. }
        ));
        assert_eq!(
            append(&mut s, "a", &request("{}", Some("k0"), None)),
            Applied::Appended { seq: 6 }
        );
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
    fn a_snapshot_leaves_out_the_events_the_archive_holds() {
        let mut s = GroupState::new(100);
        create(&mut s, "a");
        for i in 0..10 {
            append(&mut s, "a", &request("{}", Some(&format!("k{i}")), None));
        }
        // Events 1..=6 archived, all ten still hot (keep_hot 10).
        assert_eq!(
            s.apply(&archive_ack("a", 6, 10)),
            Applied::Archived { trimmed: 0 }
        );
        let snapshot = s.for_snapshot();
        let copy = snapshot.session("a").unwrap();
        assert_eq!(
            (copy.archived_seq, copy.first_seq(), copy.last_seq),
            (6, 7, 10)
        );
        assert_eq!(
            copy.events_between(0, 10, 100),
            s.session("a").unwrap().events_between(6, 10, 100)
        );
        assert_eq!(copy.keys.len(), 10, "idempotency keys are kept");
        assert!(snapshot.hot_bytes() < s.hot_bytes());
        assert_eq!(
            s.session("a").unwrap().first_seq(),
            1,
            "the state itself is unchanged"
        );
        // Decoded, it answers exactly as the original for what it holds.
        let mut restored = snapshot.restored(100);
        let mut original = s.clone();
        let retry = request("{}", Some("k3"), None);
        assert_eq!(
            append(&mut restored, "a", &retry),
            append(&mut original, "a", &retry)
        );
    }

    #[test]
    fn archive_ack_trims_but_keeps_keys_and_recent_events() {
        let mut s = GroupState::new(100);
        create(&mut s, "a");
        create(&mut s, "b");
        for i in 0..10 {
            append(&mut s, "a", &request("{}", Some(&format!("k{i}")), None));
        }
        let ack = |seq, keep| {
            Command::ArchiveAck(ArchiveAckCommand {
                marks: vec![
                    ArchiveMark {
                        session_id: "a".into(),
                        archived_seq: seq,
                    },
                    ArchiveMark {
                        session_id: "b".into(),
                        archived_seq: 1,
                    },
                ],
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
        assert_eq!(s.session("b").unwrap().archived_seq, 0);
        // Idempotency keys outlive trimming.
        assert!(matches!(
            append(&mut s, "a", &request("{}", Some("k0"), None)),
            Applied::Deduped { seq: 1, .. }
        ));
        assert_eq!(
            append(&mut s, "a", &request("{}", None, None)),
            Applied::Appended { seq: 11 }
        );
    }

    #[derive(Debug, Clone)]
    struct Op {
        key: Option<u8>,
        payload: u8,
        expected: Option<u64>,
    }

    fn op() -> impl Strategy<Value = Op> {
        (
            proptest::option::of(0u8..20),
            0u8..3,
            proptest::option::of(0u64..40),
        )
            .prop_map(|(key, payload, expected)| Op {
                key,
                payload,
                expected,
            })
    }

    proptest! {
        /// Against a simple model: seqs are gapless, a key maps to one seq forever (within the
        /// window), expected_seq is honoured, a settled answer is the answer apply gives, and
        /// replaying the log gives the same state.
        #[test]
        fn matches_model_and_replays_identically(ops in proptest::collection::vec(op(), 1..200)) {
            let mut s = GroupState::new(DEFAULT_IDEMPOTENCY_WINDOW);
            create(&mut s, "a");
            let mut log = Vec::new();
            let mut model_keys: HashMap<u8, (u64, u8)> = HashMap::new();
            let mut last = 0u64;
            for Op { key, payload, expected } in ops {
                let req = request(
                    &format!(r#"{{"p":{payload}}}"#),
                    key.map(|k| format!("k{k}")).as_deref(),
                    expected,
                );
                let settled = s.settled_append("a", &req);
                let cmd = append_cmd("a", &req);
                let applied = s.apply(&cmd);
                log.push(cmd);
                if let Some(settled) = settled {
                    prop_assert_eq!(&settled, &applied);
                }
                match (key.and_then(|k| model_keys.get(&k).copied()), &applied) {
                    (Some((seq, p)), Applied::Deduped { seq: got, .. }) => {
                        prop_assert_eq!(p, payload);
                        prop_assert_eq!(seq, *got);
                    }
                    (Some((seq, p)), Applied::IdempotencyConflict { seq: got, .. }) => {
                        prop_assert_ne!(p, payload);
                        prop_assert_eq!(seq, *got);
                    }
                    (None, Applied::ExpectedSeqConflict { expected: e, current }) => {
                        prop_assert_eq!(Some(*e), expected);
                        prop_assert_ne!(*e, last);
                        prop_assert_eq!(*current, last);
                    }
                    (None, Applied::Appended { seq }) => {
                        prop_assert!(expected.is_none() || expected == Some(last));
                        prop_assert_eq!(*seq, last + 1);
                        last += 1;
                        if let Some(k) = key {
                            model_keys.insert(k, (last, payload));
                        }
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

    /// The archive acknowledgement of one session's events up to `archived_seq`.
    fn archive_ack(session_id: &str, archived_seq: u64, keep_hot: u64) -> Command {
        Command::ArchiveAck(ArchiveAckCommand {
            marks: vec![ArchiveMark {
                session_id: session_id.into(),
                archived_seq,
            }],
            keep_hot,
        })
    }

    #[test]
    fn spilled_events_leave_memory_and_come_back() {
        let mut s = GroupState::new(100);
        create(&mut s, "a");
        for _ in 0..5 {
            append(&mut s, "a", &request("{}", None, None));
        }
        let full = s.hot_bytes();
        assert!(full > 0);
        let chunks = s.take_spillable(u64::MAX);
        assert_eq!(chunks.len(), 1);
        assert_eq!((chunks[0].from, chunks[0].events.len()), (1, 5));
        let extent = SpillExtent {
            segment: 7,
            offset: 0,
            len: 1,
        };
        assert!(
            !s.commit_spill("a", 2, 4, extent),
            "not the oldest in memory"
        );
        assert!(s.commit_spill("a", 1, 3, extent));
        assert!(!s.commit_spill("a", 1, 3, extent), "already spilled");
        let session = s.session("a").unwrap();
        assert_eq!((session.first_local_seq(), session.first_seq()), (1, 4));
        assert_eq!(session.spilled_between(0, 5).len(), 1);
        assert_eq!(session.spilled_between(3, 5).len(), 0);
        assert_eq!(session.spilled_from(0, 5).map(|r| r.len()), Some(1));
        assert_eq!(session.spilled_from(1, 2).map(|r| r.len()), Some(1));
        assert_eq!(session.spilled_from(3, 5), None, "starts in memory");
        assert_eq!(session.spilled_from(2, 2), None, "nothing after the cursor");
        assert_eq!(s.spill_segments().into_iter().collect::<Vec<_>>(), vec![7]);
        assert!(s.hot_bytes() < full);
        // Shipping the state elsewhere: the spilled events go back in memory.
        let mut shipped = s.clone();
        let spilled: Vec<Bytes> = chunks[0].events[..3].to_vec();
        assert!(shipped.unspill("a", spilled[..2].to_vec()).is_err());
        shipped.unspill("a", spilled).unwrap();
        assert_eq!(shipped.hot_bytes(), full);
        assert_eq!(
            shipped.session("a").unwrap().events_between(0, 5, 10).len(),
            5
        );
        // Shipping to a replica with an archive of its own: the archived events too.
        let mut archived = shipped.clone();
        archived.apply(&archive_ack("a", 4, 1));
        let session = archived.session("a").unwrap();
        assert_eq!((session.archived_seq, session.first_seq()), (4, 4));
        let cold: Vec<Bytes> = chunks[0].events[..3].to_vec();
        assert!(archived.unarchive("a", cold[..2].to_vec()).is_err());
        assert!(archived.unarchive("b", Vec::new()).is_err());
        archived.unarchive("a", cold).unwrap();
        let session = archived.session("a").unwrap();
        assert_eq!((session.archived_seq, session.first_seq()), (0, 1));
        assert_eq!(session.events_between(0, 5, 10), chunks[0].events);
        assert_eq!(archived.hot_bytes(), full);
        assert!(
            s.clone().unarchive("a", Vec::new()).is_err(),
            "spilled runs first"
        );
        // Archiving past a run drops it; the archived events still in memory are dropped
        // (not spilled) by the next spill.
        assert_eq!(
            s.apply(&archive_ack("a", 4, 100)),
            Applied::Archived { trimmed: 0 }
        );
        assert!(s.spill_segments().is_empty());
        assert_eq!(s.session("a").unwrap().first_local_seq(), 4);
        let before = s.hot_bytes();
        assert!(s.drop_archived() > 0);
        assert_eq!(s.drop_archived(), 0);
        assert!(s.hot_bytes() < before);
        assert_eq!(s.session("a").unwrap().first_local_seq(), 5);
        let chunks = s.take_spillable(u64::MAX);
        assert_eq!((chunks[0].from, chunks[0].events.len()), (5, 1));
    }

    #[derive(Debug, Clone)]
    enum TierOp {
        Append,
        Archive { upto_percent: u8, keep_hot: u64 },
        Spill { max_run_bytes: u64 },
    }

    fn tier_op() -> impl Strategy<Value = TierOp> {
        prop_oneof![
            4 => Just(TierOp::Append),
            1 => (0u8..=100, 0u64..5).prop_map(|(upto_percent, keep_hot)| TierOp::Archive { upto_percent, keep_hot }),
            1 => (1u64..400).prop_map(|max_run_bytes| TierOp::Spill { max_run_bytes }),
        ]
    }

    proptest! {
        /// Whatever mix of appends, archive marks and spills: every event from the first one
        /// held locally to `last_seq` is in exactly one of spill or memory, in order, nothing
        /// below `archived_seq + 1` is missing from the archive's side, and the memory count
        /// matches a recount.
        #[test]
        fn tiers_always_cover_the_history(ops in proptest::collection::vec(tier_op(), 1..120)) {
            let mut s = GroupState::new(10);
            create(&mut s, "a");
            let mut disk: HashMap<u64, Vec<Bytes>> = HashMap::new();
            for op in ops {
                match op {
                    TierOp::Append => {
                        append(&mut s, "a", &request(r#"{"x":"padding"}"#, None, None));
                    }
                    TierOp::Archive { upto_percent, keep_hot } => {
                        let last = s.session("a").unwrap().last_seq;
                        s.apply(&archive_ack("a", last * u64::from(upto_percent) / 100, keep_hot));
                    }
                    TierOp::Spill { max_run_bytes } => {
                        for chunk in s.take_spillable(max_run_bytes) {
                            let segment = disk.len() as u64;
                            let extent = SpillExtent { segment, offset: 0, len: 0 };
                            prop_assert!(s.commit_spill(&chunk.session_id, chunk.from, chunk.events.len(), extent));
                            disk.insert(segment, chunk.events);
                        }
                    }
                }
                let session = s.session("a").unwrap();
                prop_assert!(session.first_local_seq() <= session.archived_seq + 1);
                let mut seq = session.first_local_seq();
                for run in session.spilled_runs() {
                    prop_assert_eq!(run.from, seq);
                    for event in &disk[&run.extent.segment] {
                        prop_assert_eq!(crate::event::frame_seq(event), Some(seq));
                        seq += 1;
                    }
                    prop_assert_eq!(run.to + 1, seq);
                }
                prop_assert_eq!(session.first_seq(), seq);
                for event in session.events_between(seq - 1, session.last_seq, usize::MAX) {
                    prop_assert_eq!(crate::event::frame_seq(&event), Some(seq));
                    seq += 1;
                }
                prop_assert_eq!(seq, session.last_seq + 1);
                prop_assert_eq!(s.hot_bytes(), s.clone().restored(10).hot_bytes());
            }
        }
    }
}
