use starcite_storage::StorageError;

/// Everything a node operation can answer besides success. The server maps each variant to a
/// wire error code in one place.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("session {0} not found")]
    SessionNotFound(String),
    #[error("session {0} already exists")]
    SessionExists(String),
    #[error("expected seq {expected}, current seq is {current}")]
    ExpectedSeqConflict { expected: u64, current: u64 },
    #[error("idempotency key {key:?} was already used for a different event (seq {seq})")]
    IdempotencyConflict { key: String, seq: u64 },
    #[error("{0}")]
    Unavailable(String),
    /// The requested events left memory after being archived; read them from the archive.
    #[error("events below seq {first_hot} of session {session_id} are only in the archive")]
    Trimmed { session_id: String, first_hot: u64 },
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Startup(String),
}
