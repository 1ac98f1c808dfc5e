//! Commands are what the log stores and what apply consumes. Everything non-deterministic
//! (timestamps, generated ids, the chosen seq) is decided before a command is proposed.

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
    /// The seq the leader assigned; apply refuses the command unless it is `last_seq + 1`.
    pub seq: u64,
    pub idempotency_key: Option<String>,
    pub fingerprint: u128,
    pub inserted_at: Timestamp,
    /// The rendered event frame (see [`crate::event::render_event`]).
    pub event: Bytes,
}

/// Events `1..=archived_seq` of the session are in the cold archive. Replicas record it and
/// drop from memory all but the newest `keep_hot` archived events. The leader puts its
/// `keep_hot` setting in the command so that every replica trims identically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveAckCommand {
    pub session_id: String,
    pub archived_seq: u64,
    pub keep_hot: u64,
}

impl Command {
    pub fn session_id(&self) -> &str {
        match self {
            Command::Create(c) => &c.id,
            Command::Append(a) => &a.session_id,
            Command::ArchiveAck(a) => &a.session_id,
        }
    }
}
