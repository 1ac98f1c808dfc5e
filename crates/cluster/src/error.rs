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
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Startup(String),
}
