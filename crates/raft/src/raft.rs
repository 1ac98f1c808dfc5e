//! The engine: one group's Raft state and its reactions to time, messages and proposals.

use crate::log::Log;
use crate::{Entry, HardState, Message, NodeId};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct Config {
    pub me: NodeId,
    /// Every voter of the group, this node included.
    pub voters: Vec<NodeId>,
    /// A follower that hears nothing from a leader for a random time between this and twice
    /// this starts an election (see `election_rank` for the other way); a follower that heard
    /// from its leader within this time refuses to vote for anyone else (the leader's lease).
    pub election_timeout_ms: u64,
    /// This node's turn in the group's order of succession (0 first), if the group has one.
    /// Then a follower whose leader went silent waits the election timeout plus `rank`
    /// quarters of it, plus a random part of a quarter: the members stand one after another,
    /// a quarter of the timeout apart, instead of at random times that can coincide (a split
    /// vote costs a second timeout). Every wait stays at least the election timeout.
    pub election_rank: Option<u32>,
    pub heartbeat_ms: u64,
    /// Most entries, and payload bytes, per append message (at least one entry).
    pub max_append_entries: usize,
    pub max_append_bytes: usize,
    /// Append messages with entries in flight to one follower at once.
    pub max_inflight: u32,
    /// How long a snapshot transfer may go unanswered before it is sent again.
    pub snapshot_timeout_ms: u64,
    /// Seeds the election timer jitter (deterministic tests pass their own).
    pub seed: u64,
    /// Set on a node that starts without its data (a new or wiped disk): it must not vote
    /// until a leader has brought its log up to date, or it could help elect a leader that
    /// lacks entries it had acknowledged before losing them.
    pub rejoining: bool,
}

impl Config {
    pub fn new(me: NodeId, voters: Vec<NodeId>) -> Self {
        Config {
            me,
            voters,
            election_timeout_ms: 500,
            election_rank: None,
            heartbeat_ms: 100,
            max_append_entries: 256,
            max_append_bytes: 4 * 1024 * 1024,
            max_inflight: 4,
            snapshot_timeout_ms: 10_000,
            seed: 0x5eed,
            rejoining: false,
        }
    }
}

/// What a node recovered from its disk for this group.
#[derive(Debug, Clone)]
pub struct Restored<P> {
    pub hard_state: HardState,
    /// The snapshot the state machine was restored from: (index, term) of its last entry.
    pub snapshot: (u64, u64),
    /// Log entries after the snapshot, contiguous.
    pub entries: Vec<Entry<P>>,
    /// A commit index known durable before the crash (may lag the real one).
    pub commit: u64,
}

impl<P> Default for Restored<P> {
    fn default() -> Self {
        Restored {
            hard_state: HardState::default(),
            snapshot: (0, 0),
            entries: Vec::new(),
            commit: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

/// A snapshot a follower must install before anything else from this group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInstall {
    pub index: u64,
    pub term: u64,
    pub data: bytes::Bytes,
}

/// What the driver must do after a call.
#[derive(Debug)]
pub struct Ready<P> {
    /// Persist before anything in `gated` is sent.
    pub hard_state: Option<HardState>,
    /// Append to the durable log, in order. The first may overwrite entries persisted before
    /// (a log conflict): everything from its index on is replaced.
    pub entries: Vec<Entry<P>>,
    /// Install this snapshot (state machine and durable snapshot) before sending `gated`.
    pub install: Option<SnapshotInstall>,
    /// Send now.
    pub messages: Vec<(NodeId, Message<P>)>,
    /// Send once everything handed out for persistence so far is durable.
    pub gated: Vec<(NodeId, Message<P>)>,
    /// Followers that need the latest snapshot (the log no longer reaches back to them).
    pub send_snapshot: Vec<NodeId>,
}

impl<P> Ready<P> {
    pub fn is_empty(&self) -> bool {
        self.hard_state.is_none()
            && self.entries.is_empty()
            && self.install.is_none()
            && self.messages.is_empty()
            && self.gated.is_empty()
            && self.send_snapshot.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    NotLeader(Option<NodeId>),
    /// The leader cannot vouch for its commit index right now (new in its term, lease lapsed
    /// or handing over); retry shortly.
    NotReady,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStatus {
    pub id: NodeId,
    pub matched: u64,
    /// Milliseconds since the peer last answered.
    pub silent_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub role: Role,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub last_index: u64,
    pub first_index: u64,
    /// Leader only.
    pub peers: Vec<PeerStatus>,
}

#[derive(Debug, Clone)]
struct Progress {
    matched: u64,
    next: u64,
    inflight: u32,
    last_send: u64,
    last_ack: u64,
    /// Leader clock at which the newest message this peer answered was sent.
    acked_sent_at: u64,
    snapshot_since: Option<u64>,
    /// The commit index advanced since the last append sent to this peer.
    commit_unsent: bool,
    /// Leader clock at which entries were last sent to this peer.
    entries_sent_at: u64,
}

pub struct Raft<P> {
    cfg: Config,
    /// Roughly what a payload costs to send (bounds entries per message).
    size_of: fn(&P) -> usize,
    hs: HardState,
    hs_dirty: bool,
    log: Log<P>,
    commit: u64,
    applied: u64,
    /// Highest index of this log known durable.
    persisted: u64,
    /// First index not yet handed to the driver for persistence.
    unstable_from: u64,
    role: Role,
    leader: Option<NodeId>,
    /// When this node last heard from the leader it follows.
    heard_at: Option<u64>,
    election_deadline: u64,
    votes: BTreeMap<NodeId, bool>,
    progress: BTreeMap<NodeId, Progress>,
    /// Index of the no-op this leader appended; reads wait until it commits.
    term_start: u64,
    transfer: Option<(NodeId, u64)>,
    /// While rejoining: the leader's last log index when it first reached us. The leader has
    /// every committed entry, so once our log reaches that index we hold everything we may
    /// have acknowledged before losing our data, and may vote again.
    rejoin_target: Option<u64>,
    rng: u64,
    now: u64,
    messages: Vec<(NodeId, Message<P>)>,
    gated: Vec<(NodeId, Message<P>)>,
    send_snapshot: Vec<NodeId>,
    install: Option<SnapshotInstall>,
}

impl<P: Clone> Raft<P> {
    /// `size_of` estimates a payload's size on the wire.
    pub fn new(cfg: Config, restored: Restored<P>, now: u64, size_of: fn(&P) -> usize) -> Self {
        let (snap_index, snap_term) = restored.snapshot;
        let log = Log::new(snap_index, snap_term, restored.entries);
        let last = log.last_index();
        let mut raft = Raft {
            size_of,
            hs: restored.hard_state,
            hs_dirty: false,
            commit: restored.commit.clamp(snap_index, last),
            applied: snap_index,
            persisted: last,
            unstable_from: last + 1,
            role: Role::Follower,
            leader: None,
            heard_at: None,
            election_deadline: 0,
            votes: BTreeMap::new(),
            progress: BTreeMap::new(),
            term_start: u64::MAX,
            transfer: None,
            rejoin_target: None,
            rng: cfg.seed ^ cfg.me.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            now,
            messages: Vec::new(),
            gated: Vec::new(),
            send_snapshot: Vec::new(),
            install: None,
            log,
            cfg,
        };
        if raft.cfg.rejoining && !raft.hs.rejoining {
            raft.hs.rejoining = true;
            raft.hs_dirty = true;
        }
        raft.reset_election_timer();
        raft
    }

    // ---- queries ----

    pub fn status(&self) -> Status {
        Status {
            role: self.role,
            leader: self.leader,
            term: self.hs.term,
            commit: self.commit,
            applied: self.applied,
            last_index: self.log.last_index(),
            first_index: self.log.first_index(),
            peers: self
                .progress
                .iter()
                .map(|(&id, p)| PeerStatus {
                    id,
                    matched: p.matched,
                    silent_ms: self.now.saturating_sub(p.last_ack),
                })
                .collect(),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// A leadership transfer is under way (until it succeeds or its deadline passes).
    pub fn is_transferring(&self) -> bool {
        self.role == Role::Leader && self.transfer.is_some()
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }

    pub fn term(&self) -> u64 {
        self.hs.term
    }

    pub fn commit(&self) -> u64 {
        self.commit
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn log(&self) -> &Log<P> {
        &self.log
    }

    /// Whether this node still waits for a leader before it may vote (see
    /// [`Config::rejoining`]).
    pub fn is_rejoining(&self) -> bool {
        self.hs.rejoining
    }

    /// While rejoining: the log index this node must reach before it may vote again (unknown
    /// until a leader has reached it).
    pub fn rejoin_target(&self) -> Option<u64> {
        self.rejoin_target.filter(|_| self.hs.rejoining)
    }

    /// A node that lost its data must not lead before it has caught up either: it could win
    /// with the votes of nodes that lack entries only it had.
    fn may_campaign(&self) -> bool {
        !self.hs.rejoining
    }

    fn finish_rejoining(&mut self) {
        if self.hs.rejoining {
            self.hs.rejoining = false;
            self.hs_dirty = true;
        }
    }

    fn quorum(&self) -> usize {
        self.cfg.voters.len() / 2 + 1
    }

    fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        let me = self.cfg.me;
        self.cfg.voters.iter().copied().filter(move |&v| v != me)
    }

    fn is_voter(&self, id: NodeId) -> bool {
        self.cfg.voters.contains(&id)
    }

    // ---- inputs ----

    /// Advances time: elections, heartbeats, retransmissions, lease checks.
    pub fn tick(&mut self, now: u64) {
        self.now = self.now.max(now);
        match self.role {
            Role::Leader => self.tick_leader(),
            _ => {
                if self.now >= self.election_deadline {
                    if self.may_campaign() {
                        self.start_election(true, false);
                    } else {
                        // Silent for an election timeout: as far as we know there is no
                        // leader (say so, rather than name one that may be gone).
                        self.leader = None;
                        self.reset_election_timer();
                    }
                }
            }
        }
    }

    /// Starts an election now (after a pre-vote) instead of waiting for the election timer:
    /// for a single-voter group at start, or a preferred leader at start.
    pub fn campaign(&mut self, now: u64) {
        self.now = self.now.max(now);
        if (self.role == Role::Follower || self.role == Role::PreCandidate) && self.may_campaign() {
            self.start_election(true, false);
        }
    }

    /// Proposes `payload`; on the leader returns its (index, term). The answer comes when the
    /// entry at that index is applied with that term.
    pub fn propose(&mut self, payload: P, now: u64) -> Result<(u64, u64), Option<NodeId>> {
        self.now = self.now.max(now);
        if self.role != Role::Leader || self.transfer.is_some() {
            return Err(self.leader.filter(|&l| l != self.cfg.me));
        }
        let index = self.append_local(Some(payload));
        self.broadcast_append(false);
        Ok((index, self.hs.term))
    }

    /// The driver reports that log entries up to `index` (whose entry had `term`) are durable.
    pub fn persisted(&mut self, index: u64, term: u64) {
        if self.log.term_at(index) == Some(term) && index > self.persisted {
            self.persisted = index;
            if self.role == Role::Leader {
                self.maybe_commit();
            }
        }
    }

    /// The commit index a read must wait for to see every write acknowledged so far.
    pub fn read_index(&self, now: u64) -> Result<u64, ReadError> {
        if self.role != Role::Leader {
            return Err(ReadError::NotLeader(self.leader));
        }
        if self.commit < self.term_start || self.transfer.is_some() {
            return Err(ReadError::NotReady);
        }
        if self.lease_until() > now {
            Ok(self.commit)
        } else {
            Err(ReadError::NotReady)
        }
    }

    /// Hands leadership to `to` once it has every entry.
    pub fn transfer_leadership(&mut self, to: NodeId, now: u64) {
        self.now = self.now.max(now);
        if self.role != Role::Leader || to == self.cfg.me || !self.is_voter(to) {
            return;
        }
        self.transfer = Some((to, self.now + self.cfg.election_timeout_ms));
        if self.progress.get(&to).map(|p| p.matched) == Some(self.log.last_index()) {
            self.send_now(to, Message::TimeoutNow { term: self.hs.term });
        } else {
            self.send_append(to, true);
        }
    }

    /// The committed entries not yet applied, at most `max` of them, as an inclusive index
    /// range (empty when `from > to`). Read them with [`Raft::log`], apply them, then call
    /// [`Raft::advance_applied`].
    pub fn committed_range(&self, max: usize) -> (u64, u64) {
        let to = self.commit.min(self.applied.saturating_add(max as u64));
        (self.applied + 1, to)
    }

    /// Entries up to `index` are applied.
    pub fn advance_applied(&mut self, index: u64) {
        if index > self.applied && index <= self.commit {
            self.applied = index;
        }
    }

    /// Drops from memory the applied entries nobody needs any more (every follower has them);
    /// `keep` recent ones stay, to spare a follower that falls slightly behind a snapshot.
    /// They stay in the durable log until a snapshot covers them; a follower that needs them
    /// later gets a snapshot.
    pub fn release(&mut self, keep: u64) {
        let mut upto = self.applied;
        if self.role == Role::Leader {
            for p in self.progress.values() {
                upto = upto.min(p.matched);
            }
        }
        self.log.compact(upto.saturating_sub(keep));
    }

    /// Committed entries not yet applied (at most `max`), which are now considered applied.
    pub fn take_committed(&mut self, max: usize) -> Vec<Entry<P>> {
        if self.applied >= self.commit {
            return Vec::new();
        }
        let to = self.commit.min(self.applied.saturating_add(max as u64));
        let entries = self.log.range(self.applied + 1, to);
        if let Some(last) = entries.last() {
            self.applied = last.index;
        }
        entries
    }

    /// Forgets log entries up to `index` (at most the applied index): a durable snapshot of
    /// the state machine now covers them.
    pub fn compact(&mut self, index: u64) {
        self.log.compact(index.min(self.applied));
    }

    /// Handles a message from a peer.
    pub fn step(&mut self, from: NodeId, msg: Message<P>, now: u64) {
        self.now = self.now.max(now);
        if !self.is_voter(from) || from == self.cfg.me {
            return;
        }
        let term = msg.term();
        match &msg {
            Message::Vote { pre: true, .. } => return self.on_vote(from, msg),
            Message::VoteResponse { pre: true, .. } => return self.on_vote_response(from, msg),
            _ => {}
        }
        if term > self.hs.term {
            if let Message::Vote { transfer, .. } = msg {
                if !transfer && self.in_lease() {
                    // A live leader is known: refuse without adopting the higher term, so a
                    // node that was cut off cannot depose a healthy leader.
                    self.send_now(
                        from,
                        Message::VoteResponse {
                            term: self.hs.term,
                            granted: false,
                            pre: false,
                        },
                    );
                    return;
                }
            }
            let leader = matches!(
                msg,
                Message::Append { .. }
                    | Message::Snapshot { .. }
                    | Message::TimeoutNow { .. }
                    | Message::Commit { .. }
            )
            .then_some(from);
            self.become_follower(term, leader);
        } else if term < self.hs.term {
            match msg {
                Message::Append { .. } | Message::Snapshot { .. } => {
                    // Tell the stale leader about the newer term.
                    self.send_now(
                        from,
                        Message::AppendResponse {
                            term: self.hs.term,
                            success: false,
                            match_index: 0,
                            hint: 0,
                            sent_at: 0,
                        },
                    );
                }
                Message::Vote { .. } => self.send_now(
                    from,
                    Message::VoteResponse {
                        term: self.hs.term,
                        granted: false,
                        pre: false,
                    },
                ),
                _ => {}
            }
            return;
        }
        match msg {
            Message::Append { .. } => self.on_append(from, msg),
            Message::AppendResponse { .. } => self.on_append_response(from, msg),
            Message::Vote { .. } => self.on_vote(from, msg),
            Message::VoteResponse { .. } => self.on_vote_response(from, msg),
            Message::Snapshot { .. } => self.on_snapshot(from, msg),
            Message::TimeoutNow { .. } => {
                if self.role == Role::Follower && self.may_campaign() {
                    self.start_election(false, true);
                }
            }
            Message::Commit { commit, .. } => self.on_commit(from, commit),
        }
    }

    /// A commit notice from the leader of the current term. The leader bounded `commit` by
    /// what this node acknowledged to it in this term, and entries acknowledged to a leader
    /// are only ever replaced by a later term's leader: they are the leader's. A node that
    /// did not know `from` as its leader yet acknowledged nothing to it: it only follows.
    fn on_commit(&mut self, from: NodeId, commit: u64) {
        if self.role != Role::Follower || self.leader != Some(from) {
            let term = self.hs.term;
            self.become_follower(term, Some(from));
            return;
        }
        self.heard_at = Some(self.now);
        self.reset_election_timer();
        let commit = commit.min(self.log.last_index());
        if commit > self.commit {
            self.commit = commit;
        }
    }

    /// The driver could not send `to` the snapshot it asked for (no snapshot, no connection):
    /// ask again at the next chance rather than wait for the snapshot timeout.
    pub fn snapshot_unavailable(&mut self, to: NodeId) {
        if let Some(p) = self.progress.get_mut(&to) {
            p.snapshot_since = None;
        }
    }

    /// The connection to `to` was replaced: whatever was in flight to it (entries, a
    /// snapshot) is lost. Start again from what it is known to hold, now, rather than after
    /// the retransmission or snapshot timeout.
    pub fn peer_reconnected(&mut self, to: NodeId, now: u64) {
        self.now = self.now.max(now);
        if self.role != Role::Leader {
            return;
        }
        if let Some(p) = self.progress.get_mut(&to) {
            p.snapshot_since = None;
            p.next = p.matched + 1;
            p.inflight = 0;
        }
        self.send_append(to, true);
    }

    pub fn take_ready(&mut self) -> Ready<P> {
        let entries = if self.unstable_from <= self.log.last_index() {
            let e = self.log.range(self.unstable_from, self.log.last_index());
            self.unstable_from = self.log.last_index() + 1;
            e
        } else {
            Vec::new()
        };
        Ready {
            hard_state: std::mem::take(&mut self.hs_dirty).then_some(self.hs),
            entries,
            install: self.install.take(),
            messages: std::mem::take(&mut self.messages),
            gated: std::mem::take(&mut self.gated),
            send_snapshot: std::mem::take(&mut self.send_snapshot),
        }
    }

    pub fn has_ready(&self) -> bool {
        self.hs_dirty
            || self.unstable_from <= self.log.last_index()
            || self.install.is_some()
            || !self.messages.is_empty()
            || !self.gated.is_empty()
            || !self.send_snapshot.is_empty()
    }

    // ---- internals ----

    fn next_random(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn reset_election_timer(&mut self) {
        let base = self.cfg.election_timeout_ms.max(1);
        let wait = match self.cfg.election_rank {
            Some(rank) => {
                let turn = (base / 4).max(1);
                base + turn * u64::from(rank) + self.next_random() % turn
            }
            None => base + self.next_random() % base,
        };
        self.election_deadline = self.now + wait;
    }

    /// A follower within its leader's lease refuses votes.
    fn in_lease(&self) -> bool {
        match self.role {
            Role::Leader => true,
            _ => {
                self.leader.is_some()
                    && self
                        .heard_at
                        .is_some_and(|t| self.now < t + self.cfg.election_timeout_ms)
            }
        }
    }

    fn set_hard_state(&mut self, term: u64, vote: Option<NodeId>) {
        if self.hs.term != term || self.hs.vote != vote {
            self.hs.term = term;
            self.hs.vote = vote;
            self.hs_dirty = true;
        }
    }

    fn send_now(&mut self, to: NodeId, msg: Message<P>) {
        self.messages.push((to, msg));
    }

    fn send_gated(&mut self, to: NodeId, msg: Message<P>) {
        self.gated.push((to, msg));
    }

    fn become_follower(&mut self, term: u64, leader: Option<NodeId>) {
        if term > self.hs.term {
            self.set_hard_state(term, None);
        }
        self.role = Role::Follower;
        self.leader = leader;
        if leader.is_some() {
            self.heard_at = Some(self.now);
        }
        self.progress.clear();
        self.votes.clear();
        self.transfer = None;
        self.term_start = u64::MAX;
        self.reset_election_timer();
    }

    fn start_election(&mut self, pre: bool, transfer: bool) {
        self.votes.clear();
        self.votes.insert(self.cfg.me, true);
        self.leader = None;
        self.heard_at = None;
        self.reset_election_timer();
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        if pre {
            self.role = Role::PreCandidate;
            let term = self.hs.term + 1;
            for peer in self.peers().collect::<Vec<_>>() {
                self.send_now(
                    peer,
                    Message::Vote {
                        term,
                        last_index,
                        last_term,
                        pre: true,
                        transfer: false,
                    },
                );
            }
        } else {
            self.role = Role::Candidate;
            self.progress.clear();
            self.set_hard_state(self.hs.term + 1, Some(self.cfg.me));
            let term = self.hs.term;
            for peer in self.peers().collect::<Vec<_>>() {
                // Only once our own vote is durable: a crash must not let us vote twice.
                self.send_gated(
                    peer,
                    Message::Vote {
                        term,
                        last_index,
                        last_term,
                        pre: false,
                        transfer,
                    },
                );
            }
        }
        self.check_votes();
    }

    fn check_votes(&mut self) {
        let granted = self.votes.values().filter(|&&g| g).count();
        let refused = self.votes.values().filter(|&&g| !g).count();
        if granted >= self.quorum() {
            match self.role {
                Role::PreCandidate => self.start_election(false, false),
                Role::Candidate => self.become_leader(),
                _ => {}
            }
        } else if refused >= self.quorum() {
            let term = self.hs.term;
            self.become_follower(term, None);
        }
    }

    fn become_leader(&mut self) {
        self.role = Role::Leader;
        self.leader = Some(self.cfg.me);
        self.votes.clear();
        self.transfer = None;
        let next = self.log.last_index() + 1;
        let now = self.now;
        self.progress = self
            .peers()
            .map(|p| {
                (
                    p,
                    Progress {
                        matched: 0,
                        next,
                        inflight: 0,
                        last_send: 0,
                        // A grace period before check-quorum may depose us.
                        last_ack: now,
                        acked_sent_at: 0,
                        snapshot_since: None,
                        commit_unsent: false,
                        entries_sent_at: 0,
                    },
                )
            })
            .collect();
        self.term_start = self.append_local(None);
        self.broadcast_append(true);
        self.maybe_commit();
    }

    fn append_local(&mut self, payload: Option<P>) -> u64 {
        let index = self.log.last_index() + 1;
        self.log.append(Entry {
            term: self.hs.term,
            index,
            payload,
        });
        self.unstable_from = self.unstable_from.min(index);
        index
    }

    fn broadcast_append(&mut self, even_if_empty: bool) {
        for peer in self.peers().collect::<Vec<_>>() {
            self.send_append(peer, even_if_empty);
        }
    }

    /// Sends `to` the entries it lacks (pipelined up to `max_inflight` messages). With nothing
    /// to send, sends an empty append only if `even_if_empty` (heartbeat, commit notice).
    fn send_append(&mut self, to: NodeId, even_if_empty: bool) {
        let Some(p) = self.progress.get(&to) else {
            return;
        };
        if p.snapshot_since.is_some() {
            // A snapshot is on its way; keep the follower's election timer at bay meanwhile.
            if even_if_empty {
                self.send_heartbeat(to);
            }
            return;
        }
        if p.next <= self.log.snap_index() {
            // The entries it needs are only in a snapshot now.
            if let Some(p) = self.progress.get_mut(&to) {
                p.snapshot_since = Some(self.now);
                p.last_send = self.now;
            }
            self.send_snapshot.push(to);
            return;
        }
        let has_new = p.next <= self.log.last_index();
        let (prev_index, entries) = if has_new && p.inflight < self.cfg.max_inflight {
            let entries = self.log.slice(
                p.next,
                self.cfg.max_append_entries,
                self.cfg.max_append_bytes,
                self.size_of,
            );
            (p.next - 1, entries)
        } else if even_if_empty {
            // A heartbeat checks against what the follower is known to hold, so that it never
            // disturbs the pipeline with a rejection.
            (p.matched.max(self.log.snap_index()), Vec::new())
        } else {
            return;
        };
        let Some(prev_term) = self.log.term_at(prev_index) else {
            return;
        };
        let commit = if entries.is_empty() {
            self.commit.min(prev_index)
        } else {
            self.commit
        };
        let now = self.now;
        if let Some(p) = self.progress.get_mut(&to) {
            if let Some(last) = entries.last() {
                p.next = last.index + 1;
                p.inflight += 1;
                p.entries_sent_at = now;
            }
            p.last_send = now;
            p.commit_unsent = false;
        }
        let last_index = self.log.last_index();
        self.send_now(
            to,
            Message::Append {
                term: self.hs.term,
                prev_index,
                prev_term,
                entries,
                commit,
                last_index,
                sent_at: now,
            },
        );
    }

    /// An empty append checked against what `to` is known to hold.
    fn send_heartbeat(&mut self, to: NodeId) {
        let Some(p) = self.progress.get_mut(&to) else {
            return;
        };
        let prev_index = p.matched.max(self.log.snap_index());
        let Some(prev_term) = self.log.term_at(prev_index) else {
            return;
        };
        p.last_send = self.now;
        let message = Message::Append {
            term: self.hs.term,
            prev_index,
            prev_term,
            entries: Vec::new(),
            commit: self.commit.min(prev_index),
            last_index: self.log.last_index(),
            sent_at: self.now,
        };
        self.send_now(to, message);
    }

    /// Tells `to` the commit index, as far as it acknowledged entries (never answered). It
    /// leaves `last_send` alone: heartbeats, which are answered, keep their pace.
    fn send_commit(&mut self, to: NodeId) {
        let Some(p) = self.progress.get_mut(&to) else {
            return;
        };
        p.commit_unsent = false;
        let commit = self.commit.min(p.matched);
        let term = self.hs.term;
        self.send_now(to, Message::Commit { term, commit });
    }

    fn tick_leader(&mut self) {
        let now = self.now;
        // Check quorum: a leader that has not heard from a quorum for two election timeouts
        // steps down rather than keep clients waiting on a group it cannot commit in.
        let mut heard: Vec<u64> = self.progress.values().map(|p| p.last_ack).collect();
        heard.push(now);
        heard.sort_unstable_by(|a, b| b.cmp(a));
        if heard[self.quorum() - 1] + 2 * self.cfg.election_timeout_ms < now {
            let term = self.hs.term;
            self.become_follower(term, None);
            return;
        }
        if let Some((_, deadline)) = self.transfer {
            if now >= deadline {
                self.transfer = None;
            }
        }
        let peers: Vec<NodeId> = self.peers().collect();
        for peer in peers {
            let Some(p) = self.progress.get_mut(&peer) else {
                continue;
            };
            if let Some(since) = p.snapshot_since {
                if now >= since + self.cfg.snapshot_timeout_ms {
                    p.snapshot_since = None;
                }
            }
            // Nothing heard for a while with entries outstanding: they may be lost; resend
            // from what the follower is known to hold.
            if p.next > p.matched + 1
                && now >= p.last_ack + 2 * self.cfg.heartbeat_ms
                && now >= p.last_send + self.cfg.heartbeat_ms
            {
                p.next = p.matched + 1;
                p.inflight = 0;
            }
            let idle = now >= p.last_send + self.cfg.heartbeat_ms;
            let commit_notice = p.commit_unsent && p.inflight == 0;
            if idle || (commit_notice && p.next <= self.log.last_index()) {
                // A heartbeat (answered: it keeps the lease and finds lost entries), or
                // entries waiting to go, which carry the commit index.
                self.send_append(peer, true);
            } else if commit_notice {
                self.send_commit(peer);
            }
        }
    }

    fn lease_until(&self) -> u64 {
        if self.cfg.voters.len() == 1 {
            return u64::MAX;
        }
        let mut sent: Vec<u64> = self.progress.values().map(|p| p.acked_sent_at).collect();
        sent.push(self.now);
        sent.sort_unstable_by(|a, b| b.cmp(a));
        let basis = sent[self.quorum() - 1];
        if basis == 0 {
            return 0;
        }
        // A margin for clocks that tick at slightly different rates.
        basis + self.cfg.election_timeout_ms * 9 / 10
    }

    fn maybe_commit(&mut self) {
        let mut matched: Vec<u64> = self.progress.values().map(|p| p.matched).collect();
        matched.push(self.persisted);
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let candidate = matched[self.quorum() - 1];
        // Only entries of the current term are committed by counting replicas (Raft §5.4.2);
        // earlier ones commit with them.
        if candidate > self.commit && self.log.term_at(candidate) == Some(self.hs.term) {
            self.commit = candidate;
            // Followers learn the new commit index with the next append; idle ones at the
            // next tick (one message for many commits under load, not one per commit).
            for p in self.progress.values_mut() {
                p.commit_unsent = true;
            }
        }
    }

    fn on_append(&mut self, from: NodeId, msg: Message<P>) {
        let Message::Append {
            term,
            prev_index,
            prev_term,
            entries,
            commit,
            last_index: leader_last,
            sent_at,
        } = msg
        else {
            return;
        };
        if self.role != Role::Follower || self.leader != Some(from) {
            self.become_follower(term, Some(from));
        }
        if self.hs.rejoining && self.rejoin_target.is_none() {
            self.rejoin_target = Some(leader_last);
        }
        self.heard_at = Some(self.now);
        self.reset_election_timer();
        let reject = |hint: u64| Message::AppendResponse {
            term,
            success: false,
            match_index: 0,
            hint,
            sent_at,
        };
        // Entries up to our commit index are committed, hence identical to the leader's: skip
        // them (they may be compacted here already).
        let mut prev_index = prev_index;
        let mut prev_term = prev_term;
        let mut entries = entries;
        if prev_index < self.commit {
            let skip = (self.commit - prev_index) as usize;
            if skip >= entries.len() {
                let matched = prev_index + entries.len() as u64;
                self.send_gated(
                    from,
                    Message::AppendResponse {
                        term,
                        success: true,
                        match_index: matched,
                        hint: 0,
                        sent_at,
                    },
                );
                return;
            }
            entries.drain(..skip);
            prev_index = self.commit;
            prev_term = match self.log.term_at(prev_index) {
                Some(t) => t,
                None => return,
            };
        }
        match self.log.term_at(prev_index) {
            Some(t) if t == prev_term => {}
            Some(t) => {
                // Conflict: skip back over the whole conflicting term at once.
                let mut hint = prev_index - 1;
                while hint > self.commit && self.log.term_at(hint) == Some(t) {
                    hint -= 1;
                }
                self.send_now(from, reject(hint));
                return;
            }
            None => {
                let hint = self.log.last_index().min(prev_index.saturating_sub(1));
                self.send_now(from, reject(hint));
                return;
            }
        }
        let last_new = prev_index + entries.len() as u64;
        for entry in entries {
            match self.log.term_at(entry.index) {
                Some(t) if t == entry.term => {}
                Some(_) => {
                    // Committed entries never conflict; anything else is replaced.
                    if entry.index <= self.commit {
                        return;
                    }
                    self.log.truncate_from(entry.index);
                    self.persisted = self.persisted.min(entry.index - 1);
                    self.unstable_from = self.unstable_from.min(entry.index);
                    self.log.append(entry);
                }
                None => {
                    self.unstable_from = self.unstable_from.min(entry.index);
                    self.log.append(entry);
                }
            }
        }
        let new_commit = commit.min(last_new);
        if new_commit > self.commit {
            self.commit = new_commit;
        }
        if self.rejoin_target.is_some_and(|target| last_new >= target) {
            self.finish_rejoining();
        }
        self.send_gated(
            from,
            Message::AppendResponse {
                term,
                success: true,
                match_index: last_new,
                // On success the hint is where this log ends, so the leader can tell that
                // entries it sent never arrived.
                hint: self.log.last_index(),
                sent_at,
            },
        );
    }

    fn on_snapshot(&mut self, from: NodeId, msg: Message<P>) {
        let Message::Snapshot {
            term,
            index,
            snapshot_term,
            data,
            sent_at,
        } = msg
        else {
            return;
        };
        if self.role != Role::Follower || self.leader != Some(from) {
            self.become_follower(term, Some(from));
        }
        self.heard_at = Some(self.now);
        self.reset_election_timer();
        if index > self.commit {
            self.log.restore(index, snapshot_term);
            self.commit = index;
            self.applied = index;
            self.persisted = self.persisted.max(index).min(self.log.last_index());
            self.unstable_from = self
                .unstable_from
                .max(index + 1)
                .min(self.log.last_index() + 1);
            self.install = Some(SnapshotInstall {
                index,
                term: snapshot_term,
                data,
            });
            if self.rejoin_target.is_some_and(|t| index >= t) {
                self.finish_rejoining();
            }
        }
        let matched = index.max(self.commit.min(self.log.last_index()));
        self.send_gated(
            from,
            Message::AppendResponse {
                term,
                success: true,
                match_index: matched,
                hint: 0,
                sent_at,
            },
        );
    }

    fn on_append_response(&mut self, from: NodeId, msg: Message<P>) {
        let Message::AppendResponse {
            success,
            match_index,
            hint,
            sent_at,
            ..
        } = msg
        else {
            return;
        };
        if self.role != Role::Leader {
            return;
        }
        let now = self.now;
        let last_index = self.log.last_index();
        let Some(p) = self.progress.get_mut(&from) else {
            return;
        };
        p.last_ack = now;
        p.acked_sent_at = p.acked_sent_at.max(sent_at);
        if success {
            if match_index > p.matched {
                p.matched = match_index.min(last_index);
            }
            if p.next <= p.matched {
                p.next = p.matched + 1;
            }
            p.inflight = p.inflight.saturating_sub(1);
            // Answered a message sent after the last entries went out, the follower's log
            // still ends before them: they were lost (a follower drops what arrives while it
            // is starting). Send them again now; in an idle group no new entry would ever
            // expose the gap, and a rejoining follower would never catch up and vote.
            if p.snapshot_since.is_none()
                && sent_at > p.entries_sent_at
                && hint + 1 < p.next
                && p.next > p.matched + 1
            {
                p.next = p.matched.max(hint) + 1;
                p.inflight = 0;
            }
            // In snapshot state, any success to a message sent after the snapshot was asked
            // for means the follower now holds at least that much: carry on from there. (If
            // this log was compacted again meanwhile, `send_append` asks for a newer
            // snapshot at once instead of waiting out the snapshot timeout.)
            if p.snapshot_since.is_some_and(|since| sent_at >= since) {
                p.snapshot_since = None;
                p.next = p.matched + 1;
                p.inflight = 0;
            }
            self.maybe_commit();
            if let Some((target, _)) = self.transfer {
                if target == from
                    && self.progress.get(&from).map(|p| p.matched) == Some(self.log.last_index())
                {
                    let term = self.hs.term;
                    self.send_now(from, Message::TimeoutNow { term });
                }
            }
            self.send_append(from, false);
        } else {
            if p.snapshot_since.is_some() {
                return;
            }
            // A follower that now lacks entries it had acknowledged lost its disk (a wiped
            // node rejoining): start over from what it has. `matched` only feeds future
            // commits, so lowering it is safe.
            if hint < p.matched {
                p.matched = hint;
            }
            // Try again from where the follower says its log may match.
            p.next = (hint + 1).clamp(p.matched + 1, p.next.max(p.matched + 1));
            p.inflight = 0;
            self.send_append(from, true);
        }
    }

    fn on_vote(&mut self, from: NodeId, msg: Message<P>) {
        let Message::Vote {
            term,
            last_index,
            last_term,
            pre,
            transfer,
        } = msg
        else {
            return;
        };
        let log_ok = (last_term, last_index) >= (self.log.last_term(), self.log.last_index());
        // A rejoining node may have acknowledged entries it no longer has: its vote could
        // elect a leader that lacks them.
        let may_vote = !self.hs.rejoining;
        if pre {
            let granted = term > self.hs.term && log_ok && may_vote && !self.in_lease();
            self.send_now(
                from,
                Message::VoteResponse {
                    term: if granted { term } else { self.hs.term },
                    granted,
                    pre: true,
                },
            );
            return;
        }
        // Here term == our term (higher terms were adopted in `step`).
        let free = self.hs.vote.is_none() || self.hs.vote == Some(from);
        let lease_ok = transfer || !self.in_lease() || self.hs.vote == Some(from);
        let granted = free && log_ok && may_vote && lease_ok && self.role != Role::Leader;
        if granted {
            self.set_hard_state(term, Some(from));
            self.reset_election_timer();
        }
        self.send_gated(
            from,
            Message::VoteResponse {
                term: self.hs.term,
                granted,
                pre: false,
            },
        );
    }

    fn on_vote_response(&mut self, from: NodeId, msg: Message<P>) {
        let Message::VoteResponse { term, granted, pre } = msg else {
            return;
        };
        if pre {
            if self.role != Role::PreCandidate {
                return;
            }
            if !granted && term > self.hs.term {
                // The voter is already in (at least) the term we would campaign in: catch up
                // with it, and campaign above it next time.
                self.become_follower(term, None);
            } else if granted && term == self.hs.term + 1 {
                self.votes.insert(from, true);
                self.check_votes();
            } else if !granted {
                self.votes.insert(from, false);
                self.check_votes();
            }
            return;
        }
        if self.role == Role::Candidate && term == self.hs.term {
            self.votes.insert(from, granted);
            self.check_votes();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(term: u64, index: u64) -> Entry<u32> {
        Entry {
            term,
            index,
            payload: Some(index as u32),
        }
    }

    fn node(
        me: NodeId,
        voters: &[NodeId],
        term: u64,
        entries: Vec<Entry<u32>>,
        commit: u64,
    ) -> Raft<u32> {
        let mut cfg = Config::new(me, voters.to_vec());
        cfg.election_timeout_ms = 100;
        cfg.heartbeat_ms = 20;
        Raft::new(
            cfg,
            Restored {
                hard_state: HardState {
                    term,
                    vote: None,
                    rejoining: false,
                },
                snapshot: (0, 0),
                entries,
                commit,
            },
            0,
            |_| 16,
        )
    }

    /// Delivers every message between the nodes until none is left, persisting at once.
    fn settle(nodes: &mut BTreeMap<NodeId, Raft<u32>>, now: u64) {
        settle_losing(nodes, now, |_, _| false);
    }

    /// As [`settle`], except that the messages for which `lost(to, message)` holds are lost.
    fn settle_losing(
        nodes: &mut BTreeMap<NodeId, Raft<u32>>,
        now: u64,
        lost: impl Fn(NodeId, &Message<u32>) -> bool,
    ) {
        for _ in 0..100 {
            let mut out = Vec::new();
            for (&id, r) in nodes.iter_mut() {
                let ready = r.take_ready();
                if let Some(last) = ready.entries.last() {
                    r.persisted(last.index, last.term);
                }
                for (to, m) in ready.messages.into_iter().chain(ready.gated) {
                    if !lost(to, &m) {
                        out.push((id, to, m));
                    }
                }
            }
            if out.is_empty() {
                return;
            }
            for (from, to, m) in out {
                if let Some(r) = nodes.get_mut(&to) {
                    r.step(from, m, now);
                }
            }
        }
    }

    /// Fresh nodes `voters` with node 1 elected leader (at time 1).
    fn elected(voters: &[NodeId]) -> BTreeMap<NodeId, Raft<u32>> {
        let mut nodes: BTreeMap<NodeId, Raft<u32>> = voters
            .iter()
            .map(|&id| (id, node(id, voters, 0, vec![], 0)))
            .collect();
        nodes.get_mut(&1).unwrap().campaign(0);
        settle(&mut nodes, 1);
        nodes
    }

    fn leaders(nodes: &BTreeMap<NodeId, Raft<u32>>) -> Vec<NodeId> {
        nodes
            .iter()
            .filter(|(_, r)| r.is_leader())
            .map(|(&id, _)| id)
            .collect()
    }

    /// A fresh node (timeout 100, heartbeat 20) with its turn in an order of succession.
    fn ranked(me: NodeId, voters: &[NodeId], rank: u32) -> Raft<u32> {
        let mut r = node(me, voters, 0, vec![], 0);
        r.cfg.election_rank = Some(rank);
        r.reset_election_timer();
        r
    }

    #[test]
    fn with_an_order_of_succession_the_next_in_turn_takes_over_alone() {
        let voters = [1, 2, 3];
        // Node 3 is next after the leader, node 2 last.
        let rank = |id| match id {
            1 => 0,
            3 => 1,
            _ => 2,
        };
        let mut nodes: BTreeMap<NodeId, Raft<u32>> = voters
            .iter()
            .map(|&id| (id, ranked(id, &voters, rank(id))))
            .collect();
        nodes.get_mut(&1).unwrap().campaign(0);
        settle(&mut nodes, 1);
        assert_eq!(leaders(&nodes), vec![1]);
        let term = nodes[&1].term();
        // The leader goes silent at time 1; time passes in small steps for the others.
        nodes.remove(&1);
        let mut took_over = None;
        for now in (2..=400).step_by(2) {
            for r in nodes.values_mut() {
                r.tick(now);
            }
            settle(&mut nodes, now);
            if let Some(&leader) = leaders(&nodes).first() {
                took_over = Some((leader, now));
                break;
            }
        }
        let (leader, at) = took_over.expect("someone took over");
        assert_eq!(leader, 3, "the next in turn stands first");
        // Its wait: the timeout plus one quarter, plus less than a quarter.
        assert!((126..=152).contains(&at), "took over at {at}");
        assert_eq!(nodes[&3].term(), term + 1, "one election, no split vote");
        assert_eq!(nodes[&2].term(), term + 1);
    }

    #[test]
    fn an_order_of_succession_never_shortens_the_wait_below_the_timeout() {
        for rank in 0..3 {
            let mut r = ranked(1, &[1, 2, 3], rank);
            for _ in 0..200 {
                r.reset_election_timer();
                let wait = r.election_deadline - r.now;
                let first = 100 + 25 * u64::from(rank);
                assert!((first..first + 25).contains(&wait), "rank {rank}: {wait}");
            }
        }
    }

    #[test]
    fn an_old_term_entry_is_not_committed_by_counting_replicas() {
        // Raft's figure 8: the new leader holds index 2 from term 2 and gets it onto a
        // majority; it must still not count that entry as committed until an entry of its own
        // term is on a majority.
        let voters = [1, 2, 3, 4, 5];
        let mut leader = node(1, &voters, 3, vec![e(1, 1), e(2, 2)], 1);
        leader.campaign(0);
        let ready = leader.take_ready();
        assert_eq!(leader.role(), Role::PreCandidate);
        drop(ready);
        for v in [2, 3] {
            leader.step(
                v,
                Message::VoteResponse {
                    term: 4,
                    granted: true,
                    pre: true,
                },
                1,
            );
        }
        assert_eq!(leader.role(), Role::Candidate);
        for v in [2, 3] {
            leader.step(
                v,
                Message::VoteResponse {
                    term: 4,
                    granted: true,
                    pre: false,
                },
                2,
            );
        }
        assert!(leader.is_leader());
        let _ = leader.take_ready();
        leader.persisted(3, 4);
        // Followers 2 and 3 acknowledge index 2 only (the term-4 no-op not yet).
        for f in [2, 3] {
            leader.step(
                f,
                Message::AppendResponse {
                    term: 4,
                    success: true,
                    match_index: 2,
                    hint: 0,
                    sent_at: 2,
                },
                3,
            );
        }
        assert_eq!(
            leader.commit(),
            1,
            "index 2 (term 2) must not commit by counting"
        );
        leader.step(
            2,
            Message::AppendResponse {
                term: 4,
                success: true,
                match_index: 3,
                hint: 0,
                sent_at: 3,
            },
            4,
        );
        assert_eq!(leader.commit(), 1);
        leader.step(
            3,
            Message::AppendResponse {
                term: 4,
                success: true,
                match_index: 3,
                hint: 0,
                sent_at: 3,
            },
            4,
        );
        assert_eq!(
            leader.commit(),
            3,
            "the term-4 entry on a majority commits both"
        );
    }

    #[test]
    fn a_follower_that_hears_its_leader_refuses_other_candidates() {
        let voters = [1, 2, 3];
        let mut nodes = elected(&voters);
        assert_eq!(leaders(&nodes), vec![1]);
        let term = nodes[&1].term();
        // Node 3 was cut off and campaigns: the others still hear node 1 and refuse, both the
        // pre-vote and a forced vote, without adopting its term.
        let n3 = nodes.get_mut(&3).unwrap();
        n3.campaign(10);
        let ready = n3.take_ready();
        for (to, m) in ready.messages {
            nodes.get_mut(&to).unwrap().step(3, m, 10);
        }
        let forced = Message::Vote {
            term: term + 5,
            last_index: 9,
            last_term: 9,
            pre: false,
            transfer: false,
        };
        nodes.get_mut(&2).unwrap().step(3, forced, 10);
        assert_eq!(nodes[&2].term(), term);
        assert!(nodes[&1].is_leader());
        let replies = nodes.get_mut(&2).unwrap().take_ready();
        assert!(replies
            .messages
            .iter()
            .chain(replies.gated.iter())
            .all(|(_, m)| !matches!(m, Message::VoteResponse { granted: true, .. })));
    }

    #[test]
    fn leadership_moves_on_request() {
        let voters = [1, 2, 3];
        let mut nodes = elected(&voters);
        nodes.get_mut(&1).unwrap().propose(7, 2).unwrap();
        settle(&mut nodes, 2);
        nodes.get_mut(&1).unwrap().transfer_leadership(3, 3);
        assert!(
            nodes.get_mut(&1).unwrap().propose(8, 3).is_err(),
            "no writes while handing over"
        );
        settle(&mut nodes, 4);
        assert_eq!(leaders(&nodes), vec![3]);
        assert!(nodes.get_mut(&3).unwrap().propose(9, 5).is_ok());
    }

    #[test]
    fn reads_wait_for_the_term_and_the_lease() {
        let voters = [1, 2, 3];
        let mut nodes: BTreeMap<NodeId, Raft<u32>> = voters
            .iter()
            .map(|&id| (id, node(id, &voters, 0, vec![], 0)))
            .collect();
        nodes.get_mut(&1).unwrap().campaign(0);
        assert_eq!(nodes[&1].read_index(0), Err(ReadError::NotLeader(None)));
        settle(&mut nodes, 10);
        let commit = nodes[&1].commit();
        assert_eq!(nodes[&1].read_index(10), Ok(commit));
        // Without acknowledgements for longer than the lease, the leader cannot vouch.
        assert_eq!(nodes[&1].read_index(500), Err(ReadError::NotReady));
        assert_eq!(nodes[&2].read_index(10), Err(ReadError::NotLeader(Some(1))));
    }

    #[test]
    fn a_rejoining_node_does_not_vote_until_caught_up() {
        let voters = [1, 2, 3];
        let mut fresh = Config::new(3, voters.to_vec());
        fresh.rejoining = true;
        let mut n3 = Raft::<u32>::new(fresh, Restored::default(), 0, |_| 16);
        let vote = |last_index| Message::Vote {
            term: 5,
            last_index,
            last_term: 4,
            pre: false,
            transfer: false,
        };
        n3.step(2, vote(10), 1_000);
        let r = n3.take_ready();
        assert!(
            r.hard_state.is_some_and(|hs| hs.rejoining),
            "remembered across restarts"
        );
        assert!(r
            .gated
            .iter()
            .all(|(_, m)| matches!(m, Message::VoteResponse { granted: false, .. })));
        // Nor does it campaign.
        n3.tick(10_000);
        assert_eq!(n3.role(), Role::Follower);
        assert!(n3.take_ready().messages.is_empty());
        // Caught up to the leader's commit index: votes again.
        n3.step(
            1,
            Message::Append {
                term: 6,
                prev_index: 0,
                prev_term: 0,
                entries: vec![e(6, 1), e(6, 2)],
                commit: 2,
                last_index: 2,
                sent_at: 0,
            },
            2_000,
        );
        assert!(!n3.is_rejoining());
    }

    #[test]
    fn a_follower_behind_a_compacted_log_gets_a_snapshot() {
        let voters = [1, 2];
        let mut nodes = elected(&voters);
        for i in 0..10 {
            nodes.get_mut(&1).unwrap().propose(i, 2).unwrap();
        }
        settle(&mut nodes, 2);
        let l = nodes.get_mut(&1).unwrap();
        let _ = l.take_committed(usize::MAX);
        l.compact(l.applied());
        // A new, empty follower.
        let mut cfg = Config::new(2, voters.to_vec());
        cfg.election_timeout_ms = 100;
        let mut fresh = Raft::<u32>::new(cfg, Restored::default(), 0, |_| 16);
        let term = nodes[&1].term();
        fresh.step(
            1,
            Message::Append {
                term,
                prev_index: 11,
                prev_term: term,
                entries: vec![],
                commit: 11,
                last_index: 11,
                sent_at: 3,
            },
            3,
        );
        let r = fresh.take_ready();
        let (_, reject) = r.messages.into_iter().next().unwrap();
        let l = nodes.get_mut(&1).unwrap();
        l.step(2, reject, 4);
        let r = l.take_ready();
        assert_eq!(r.send_snapshot, vec![2]);
        let snap = Message::Snapshot {
            term,
            index: 11,
            snapshot_term: term,
            data: bytes::Bytes::from_static(b"s"),
            sent_at: 4,
        };
        fresh.step(1, snap, 5);
        let r = fresh.take_ready();
        assert_eq!(r.install.as_ref().map(|i| i.index), Some(11));
        assert_eq!(fresh.commit(), 11);
        assert_eq!(fresh.applied(), 11);
    }

    /// A leader whose follower needs a snapshot: node 1 leads 1, 2 and 3, has compacted its
    /// log up to index 11, and node 2 has lost its data: the leader has just asked the driver
    /// to send node 2 a snapshot (at time 4).
    fn leader_sending_a_snapshot() -> Raft<u32> {
        let voters = [1, 2, 3];
        let mut nodes = elected(&voters);
        let mut l = nodes.remove(&1).unwrap();
        for i in 0..10 {
            l.propose(i, 2).unwrap();
        }
        let _ = l.take_ready();
        let term = l.term();
        l.persisted(11, term);
        for f in [2, 3] {
            l.step(f, ack(term, 11, 2), 3);
        }
        let _ = l.take_committed(usize::MAX);
        l.compact(l.applied());
        assert_eq!(l.log().snap_index(), 11);
        let _ = l.take_ready();
        l.step(
            2,
            Message::AppendResponse {
                term,
                success: false,
                match_index: 0,
                hint: 0,
                sent_at: 3,
            },
            4,
        );
        assert_eq!(l.take_ready().send_snapshot, vec![2]);
        l
    }

    fn ack(term: u64, match_index: u64, sent_at: u64) -> Message<u32> {
        Message::AppendResponse {
            term,
            success: true,
            match_index,
            hint: 0,
            sent_at,
        }
    }

    #[test]
    fn a_snapshot_overtaken_by_compaction_is_followed_by_a_newer_one_at_once() {
        let mut l = leader_sending_a_snapshot();
        let term = l.term();
        // While the snapshot (of index 11) travels, the log grows and is compacted again.
        l.propose(99, 5).unwrap();
        let _ = l.take_ready();
        l.persisted(12, term);
        l.step(3, ack(term, 12, 5), 6);
        let _ = l.take_committed(usize::MAX);
        l.compact(l.applied());
        assert_eq!(l.log().snap_index(), 12);
        let _ = l.take_ready();
        // Node 2 installs the snapshot it was sent and says so.
        l.step(2, ack(term, 11, 5), 7);
        assert_eq!(
            l.take_ready().send_snapshot,
            vec![2],
            "a newer snapshot now, not after the snapshot timeout"
        );
    }

    #[test]
    fn a_reconnected_follower_gets_its_snapshot_again_without_waiting() {
        let mut l = leader_sending_a_snapshot();
        l.tick(50);
        assert!(l.take_ready().send_snapshot.is_empty(), "still waiting");
        // The connection drops (the follower restarts) with the snapshot in flight.
        l.peer_reconnected(2, 60);
        assert_eq!(l.take_ready().send_snapshot, vec![2]);
    }

    /// Runs the nodes' clocks from `from` to `to` (ms), delivering every message at once,
    /// except that appends carrying entries to `lose_entries_to` are lost.
    fn run_losing_entries(
        nodes: &mut BTreeMap<NodeId, Raft<u32>>,
        from: u64,
        to: u64,
        lose_entries_to: Option<NodeId>,
    ) {
        for now in (from..to).step_by(5) {
            for r in nodes.values_mut() {
                r.tick(now);
            }
            settle_losing(nodes, now, |dest, m| {
                Some(dest) == lose_entries_to
                    && matches!(m, Message::Append { entries, .. } if !entries.is_empty())
            });
        }
    }

    #[test]
    fn entries_lost_on_the_way_to_a_follower_are_sent_again_in_an_idle_group() {
        let voters = [1, 2, 3];
        let mut nodes = elected(&voters);
        settle(&mut nodes, 2);
        let last = nodes[&1].log().last_index();
        // Node 3 loses its disk and comes back empty, rejoining (it may not vote).
        let mut fresh = Config::new(3, voters.to_vec());
        fresh.election_timeout_ms = 100;
        fresh.heartbeat_ms = 20;
        fresh.rejoining = true;
        nodes.insert(3, Raft::new(fresh, Restored::default(), 0, |_| 16));
        // Leadership moves to node 2 while every entry sent to node 3 is lost but heartbeats
        // arrive and are answered (as when node 3 drops what comes while it is starting):
        // the new leader knows nothing of node 3 (matched 0), and heartbeats checked against
        // index 0 all succeed.
        nodes.get_mut(&1).unwrap().transfer_leadership(2, 10);
        run_losing_entries(&mut nodes, 10, 500, Some(3));
        assert_eq!(leaders(&nodes), vec![2]);
        assert_eq!(
            nodes[&2].commit(),
            last + 1,
            "the new term's entry, on nodes 1 and 2"
        );
        assert_eq!(nodes[&3].log().last_index(), 0);
        // Nothing new is proposed, nothing is lost any more: only heartbeats go out.
        run_losing_entries(&mut nodes, 500, 3_000, None);
        let n3 = &nodes[&3];
        assert_eq!(
            n3.log().last_index(),
            last + 1,
            "node 3 got the lost entries"
        );
        assert!(!n3.is_rejoining(), "and may vote again");
    }

    #[test]
    fn followers_learn_the_commit_index_from_a_notice_they_do_not_answer() {
        let voters = [1, 2, 3];
        let mut nodes = elected(&voters);
        settle(&mut nodes, 2);
        let (index, _) = nodes.get_mut(&1).unwrap().propose(7, 3).unwrap();
        settle(&mut nodes, 3);
        assert_eq!(nodes[&1].commit(), index);
        // The entry went out with the commit index from before it.
        assert!(nodes[&2].commit() < index && nodes[&3].commit() < index);
        // At its next tick the leader sends each follower a commit notice, not an append.
        let leader = nodes.get_mut(&1).unwrap();
        leader.tick(13);
        let ready = leader.take_ready();
        let mut notices = Vec::new();
        for (to, m) in ready.messages.into_iter().chain(ready.gated) {
            match m {
                Message::Commit { commit, .. } => notices.push((to, commit)),
                other => panic!("expected only commit notices, got {other:?}"),
            }
        }
        notices.sort_unstable();
        assert_eq!(notices, vec![(2, index), (3, index)]);
        for (to, commit) in notices {
            let follower = nodes.get_mut(&to).unwrap();
            let term = follower.term();
            follower.step(1, Message::Commit { term, commit }, 13);
            assert_eq!(follower.commit(), index);
            let ready = follower.take_ready();
            assert!(
                ready.messages.is_empty() && ready.gated.is_empty(),
                "a notice is not answered"
            );
        }
        // A notice never takes a follower's commit index past its own log, nor does one from a
        // node it does not follow in this term.
        for (follower, from) in [(2, 1), (3, 2)] {
            let follower = nodes.get_mut(&follower).unwrap();
            let term = follower.term();
            let notice = Message::Commit {
                term,
                commit: index + 10,
            };
            follower.step(from, notice, 14);
            assert_eq!(follower.commit(), index);
        }
    }
}
