//! Messages between nodes: every group's Raft traffic and the client requests a node hands to
//! a group's leader (or, for groups it does not replicate, to a replica).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use starcite_core::{AppendRequest, Applied, Command, CreateCommand, SessionId};

pub type RaftMessage = starcite_raft::Message<Command>;
pub type RaftEntry = starcite_raft::Entry<Command>;

/// Roughly what a command costs to replicate (it bounds the entries per message).
pub fn command_size(command: &Command) -> usize {
    match command {
        Command::Append(a) => a.body.len() + a.session_id.len() + 48,
        Command::Create(c) => c.metadata.len() + c.id.len() + 48,
        Command::ArchiveAck(a) => a.marks.len() * 48 + 16,
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Client {
        group: u32,
        op: Box<ClientOp>,
    },
    /// Whether the asked node holds any data (a new node uses the answers to tell a new
    /// cluster from one it is rejoining).
    HasData,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    Client(ClientReply),
    HasData(bool),
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
    /// One-way: a group's Raft message (answers are messages of their own).
    Raft {
        group: u32,
        message: RaftMessage,
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
    use starcite_core::{AppendCommand, Timestamp};
    use starcite_raft::{Entry, Message};

    #[test]
    fn frames_round_trip() {
        let req = AppendRequest::parse(br#"{"type":"t","actor":"a","payload":{"k":[1,2]}}"#)
            .expect("valid");
        let entry = Entry {
            term: 3,
            index: 41,
            payload: Some(Command::Append(AppendCommand::new(
                "s1",
                &req,
                Timestamp(5),
            ))),
        };
        let frame = Frame::Raft {
            group: 2,
            message: Message::Append {
                term: 3,
                prev_index: 40,
                prev_term: 3,
                entries: vec![entry.clone()],
                commit: 39,
                last_index: 41,
                sent_at: 77,
            },
        };
        let bytes = frame.encode().unwrap();
        let Frame::Raft {
            group: 2,
            message: Message::Append { entries, .. },
        } = Frame::decode(&bytes).unwrap()
        else {
            panic!("wrong frame")
        };
        assert_eq!(entries, vec![entry]);

        let op = Frame::Request {
            id: 1,
            request: Request::Client {
                group: 0,
                op: Box::new(ClientOp::Append {
                    session_id: "s1".into(),
                    request: req.clone(),
                }),
            },
        };
        let Frame::Request {
            request: Request::Client { op, .. },
            ..
        } = Frame::decode(&op.encode().unwrap()).unwrap()
        else {
            panic!("wrong frame")
        };
        let ClientOp::Append { request, .. } = *op else {
            panic!("wrong op")
        };
        assert_eq!(request, req);
    }
}
