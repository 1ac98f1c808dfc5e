//! Messages between nodes: every group's Raft traffic and the client requests a node hands to
//! a group's leader (or, for groups it does not replicate, to a replica).

use crate::types::{SnapshotData, SnapshotMeta, TypeConfig, Vote};
use bytes::Bytes;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use starcite_core::{AppendRequest, Applied, CreateCommand, SessionId};

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Raft { group: u32, rpc: RaftRequest },
    Client { group: u32, op: ClientOp },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<TypeConfig>),
    PreVote(VoteRequest<TypeConfig>),
    Snapshot {
        vote: Vote,
        meta: SnapshotMeta,
        data: SnapshotData,
    },
    TransferLeader(TransferLeaderRequest<TypeConfig>),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    Append(AppendEntriesResponse<TypeConfig>),
    Vote(VoteResponse<TypeConfig>),
    Snapshot(SnapshotResponse<TypeConfig>),
    TransferLeader(TransferLeaderResponse<TypeConfig>),
    Client(ClientReply),
}

/// A client operation for a group, handed to a node that can execute it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ClientOp {
    Create {
        id: SessionId,
        title: Option<String>,
        metadata: String,
    },
    Append {
        session_id: String,
        request: AppendRequest,
    },
    /// The index a replica must have applied to answer a read that follows every write
    /// acknowledged so far (the leader's commit index, leadership confirmed).
    ReadIndex,
    /// For nodes that do not replicate the group: reads served by a replica.
    Session { session_id: String },
    ReadEvents {
        session_id: String,
        after: u64,
        limit: u32,
    },
    /// Answers once the session's applied seq exceeds `after`, or after `wait_ms`.
    WaitBeyond {
        session_id: String,
        after: u64,
        wait_ms: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ClientReply {
    /// The create as committed (the leader stamped its time).
    Created(CreateCommand),
    Applied(Applied),
    ReadIndex(u64),
    Session(SessionWire),
    Events(Vec<Bytes>),
    /// Events below `first_hot` are only in the archive.
    Trimmed {
        first_hot: u64,
    },
    Visible(u64),
    NotFound,
    /// This node cannot execute the operation; nothing was done. Try `leader` if known.
    NotLeader(Option<u64>),
    /// The outcome is unknown or the group cannot serve now; the client may retry.
    Unavailable(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionWire {
    pub id: String,
    pub title: Option<String>,
    pub metadata: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_seq: u64,
}

impl From<starcite_core::SessionView> for SessionWire {
    fn from(v: starcite_core::SessionView) -> Self {
        SessionWire {
            id: v.id,
            title: v.title,
            metadata: v.metadata,
            created_at: v.created_at.millis(),
            updated_at: v.updated_at.millis(),
            last_seq: v.last_seq,
        }
    }
}

impl From<SessionWire> for starcite_core::SessionView {
    fn from(w: SessionWire) -> Self {
        starcite_core::SessionView {
            id: w.id,
            title: w.title,
            metadata: w.metadata,
            created_at: starcite_core::Timestamp(w.created_at),
            updated_at: starcite_core::Timestamp(w.updated_at),
            last_seq: w.last_seq,
        }
    }
}

/// What goes over a peer connection.
#[derive(Debug, Serialize, Deserialize)]
pub enum Frame {
    /// First frame of a connection, from the dialing node.
    Hello {
        cluster: u64,
        from: u64,
    },
    Request {
        id: u64,
        request: Request,
    },
    Response {
        id: u64,
        result: Result<Response, String>,
    },
}

impl Frame {
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_allocvec(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Frame, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Entry, LogId};
    use openraft::vote::RaftLeaderId;
    use openraft::EntryPayload;
    use starcite_core::{AppendCommand, Command, Timestamp};

    /// openraft's messages survive postcard (a positional format) intact.
    #[test]
    fn raft_messages_round_trip() {
        let leader = openraft::impls::leader_id_adv::LeaderId::new(3, 7);
        let log_id = LogId::new(leader.to_committed(), 41);
        let req = AppendRequest::parse(br#"{"type":"t","actor":"a","payload":{"k":[1,2]}}"#)
            .expect("valid");
        let entry = Entry {
            log_id,
            payload: EntryPayload::Normal(Command::Append(AppendCommand::new(
                "s1",
                &req,
                Timestamp(5),
            ))),
        };
        let frame = Frame::Request {
            id: 9,
            request: Request::Raft {
                group: 2,
                rpc: RaftRequest::Append(AppendEntriesRequest {
                    vote: Vote::new_committed(3, 7),
                    prev_log_id: Some(log_id),
                    entries: vec![entry.clone()],
                    leader_commit: Some(log_id),
                }),
            },
        };
        let bytes = frame.encode().unwrap();
        let Frame::Request {
            id: 9,
            request:
                Request::Raft {
                    group: 2,
                    rpc: RaftRequest::Append(back),
                },
        } = Frame::decode(&bytes).unwrap()
        else {
            panic!("wrong frame")
        };
        assert_eq!(back.entries, vec![entry]);
        assert_eq!(back.leader_commit, Some(log_id));
        assert_eq!(back.vote, Vote::new_committed(3, 7));

        let op = Frame::Request {
            id: 1,
            request: Request::Client {
                group: 0,
                op: ClientOp::Append {
                    session_id: "s1".into(),
                    request: req.clone(),
                },
            },
        };
        let Frame::Request {
            request:
                Request::Client {
                    op: ClientOp::Append { request, .. },
                    ..
                },
            ..
        } = Frame::decode(&op.encode().unwrap()).unwrap()
        else {
            panic!("wrong frame")
        };
        assert_eq!(request, req);
    }
}
