//! Commands are what the replicated log stores and what apply consumes. Everything
//! non-deterministic (timestamps, generated ids) is decided by the leader before a command is
//! proposed; everything that depends on the state (the seq, dedupe, `expected_seq`) is decided
//! by apply, against the state every replica reaches in the same order.

use crate::time::Timestamp;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Create(CreateCommand),
    Append(AppendCommand),
    ArchiveAck(ArchiveAckCommand),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateCommand {
    pub id: String,
    pub title: Option<String>,
    /// JSON text of the metadata object.
    pub metadata: String,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendCommand {
    pub session_id: String,
    pub idempotency_key: Option<String>,
    pub fingerprint: u128,
    pub expected_seq: Option<u64>,
    pub inserted_at: Timestamp,
    /// The rendered event frame without its seq (see [`crate::event::render_event_body`]);
    /// apply puts the seq it assigns in front.
    pub body: Bytes,
}

/// Events `1..=archived_seq` of each listed session are in the cold archive. Replicas record
/// it and drop from memory all but the newest `keep_hot` archived events. The leader puts its
/// `keep_hot` setting in the command so that every replica trims identically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveAckCommand {
    pub marks: Vec<ArchiveMark>,
    pub keep_hot: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveMark {
    pub session_id: String,
    pub archived_seq: u64,
}

/// A one-line summary for logs (never the payload).
impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Create(c) => write!(f, "create {}", c.id),
            Command::Append(a) => write!(f, "append to {}", a.session_id),
            Command::ArchiveAck(a) => write!(f, "archive marks for {} sessions", a.marks.len()),
        }
    }
}
