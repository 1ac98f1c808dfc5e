//! Raft for one group, as a pure state machine: no threads, no clock, no disk, no network.
//!
//! The caller (the driver) feeds it time ([`Raft::tick`]), messages from peers
//! ([`Raft::step`]), client proposals ([`Raft::propose`]) and durability notices
//! ([`Raft::persisted`]); after each call it takes a [`Ready`]: what to persist, what to send
//! now, what to send only once everything handed out for persistence is durable, and which
//! committed entries to apply. Because nothing here does I/O, a node can drive hundreds of
//! groups with shared threads, one log and one connection per peer, and a test can drive a
//! whole cluster deterministically from a seed.
//!
//! Membership is static (the voters are fixed at start). Implemented: elections with pre-vote,
//! leader leases (followers refuse votes while they hear from a live leader, so a leader with
//! a quorum of recent acks can serve linearizable reads), pipelined replication with
//! consistency checks and fast back-off, commit of current-term entries by quorum, snapshots
//! for followers that fell behind a compacted log, leadership transfer, and check-quorum
//! step-down.

mod log;
mod raft;

pub use log::Log;
pub use raft::{
    Config, PeerStatus, Raft, ReadError, Ready, Restored, Role, SnapshotInstall, Status,
};

use serde::{Deserialize, Serialize};

pub type NodeId = u64;

/// A log entry. `payload` is `None` for the no-op a new leader appends to commit its term.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry<P> {
    pub term: u64,
    pub index: u64,
    pub payload: Option<P>,
}

/// What must survive a crash besides the log: the current term, this node's vote in it, and
/// whether it is still catching up after starting without its data (see
/// [`Config::rejoining`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    pub term: u64,
    pub vote: Option<NodeId>,
    pub rejoining: bool,
}

/// Messages between the replicas of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message<P> {
    /// Replication and heartbeat. `sent_at` is the leader's clock, echoed back for its lease;
    /// `last_index` is the leader's last log index (a rejoining follower catches up to it).
    Append {
        term: u64,
        prev_index: u64,
        prev_term: u64,
        entries: Vec<Entry<P>>,
        commit: u64,
        last_index: u64,
        sent_at: u64,
    },
    /// `match_index`: on success, the follower's log equals the leader's up to here (and it is
    /// durable). On failure, `hint` is where the leader should try next (`hint + 1`).
    AppendResponse {
        term: u64,
        success: bool,
        match_index: u64,
        hint: u64,
        sent_at: u64,
    },
    /// `pre`: a pre-vote (would you vote for me?), which changes nothing on the voter.
    /// `transfer`: the election was asked for by the current leader (it overrides leases).
    Vote {
        term: u64,
        last_index: u64,
        last_term: u64,
        pre: bool,
        transfer: bool,
    },
    VoteResponse {
        term: u64,
        granted: bool,
        pre: bool,
    },
    /// The state as of `index` (whose entry had `snapshot_term`), for a follower the leader's
    /// log no longer reaches.
    Snapshot {
        term: u64,
        index: u64,
        snapshot_term: u64,
        data: bytes::Bytes,
        sent_at: u64,
    },
    /// Start an election now: the leader hands leadership over.
    TimeoutNow {
        term: u64,
    },
    /// Entries up to `commit` are committed (the leader bounds it by what this follower
    /// acknowledged in `term`, so no log check is needed). Not answered: it tells a follower
    /// that is up to date what it may apply, where an empty append would cost an answer.
    Commit {
        term: u64,
        commit: u64,
    },
}

impl<P> Message<P> {
    pub fn term(&self) -> u64 {
        match self {
            Message::Append { term, .. }
            | Message::AppendResponse { term, .. }
            | Message::Vote { term, .. }
            | Message::VoteResponse { term, .. }
            | Message::Snapshot { term, .. }
            | Message::TimeoutNow { term }
            | Message::Commit { term, .. } => *term,
        }
    }
}
