//! One way to read a session's events, whichever tier holds them: memory for recent events,
//! the archive for events that left memory. Every read checks that it got exactly the seqs it
//! asked for, so a hole in a tier is an error, never a silent skip.

use crate::error::ApiError;
use bytes::Bytes;
use starcite_archive::Archive;
use starcite_cluster::{read_archived, ArchiveReadError, Node, NodeError};
use std::sync::{Arc, OnceLock};

#[derive(Clone)]
pub struct EventReader {
    pub node: Arc<Node>,
    /// Set once the archive is connected (it may come up after the node).
    pub archive: Arc<OnceLock<Arc<Archive>>>,
}

/// Why a read failed. `ArchiveDown` is transient (a tail waits and retries); the others are
/// answers.
#[derive(Debug)]
pub enum ReadError {
    /// The archive could not be reached; the events exist and can be read later.
    ArchiveDown(String),
    /// The events should be in the archive and are not: a hole that must not be skipped.
    Missing(String),
    Api(ApiError),
}

impl From<ReadError> for ApiError {
    fn from(err: ReadError) -> ApiError {
        match err {
            ReadError::ArchiveDown(m) | ReadError::Missing(m) => ApiError::unavailable(m),
            ReadError::Api(e) => e,
        }
    }
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::ArchiveDown(m) | ReadError::Missing(m) => f.write_str(m),
            ReadError::Api(e) => f.write_str(&e.message),
        }
    }
}

impl EventReader {
    /// Up to `limit` events with `seq > after`, oldest first, contiguous from `after + 1`,
    /// filled across tiers (an archive part is followed by the memory part in one call).
    pub async fn read(
        &self,
        session_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Bytes>, ReadError> {
        let mut out = self.read_one_tier(session_id, after, limit).await?;
        while !out.is_empty() && out.len() < limit {
            let next_after = after + out.len() as u64;
            let more = self
                .read_one_tier(session_id, next_after, limit - out.len())
                .await?;
            if more.is_empty() {
                break;
            }
            out.extend(more);
        }
        Ok(out)
    }

    async fn read_one_tier(
        &self,
        session_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Bytes>, ReadError> {
        match self.node.read_events(session_id, after, limit).await {
            Ok(events) => Ok(events),
            Err(NodeError::Trimmed { first_hot, .. }) => {
                let archive = self.archive.get().ok_or_else(|| {
                    ReadError::ArchiveDown(format!(
                        "events {}..{} are only in the archive, which is not connected yet",
                        after + 1,
                        first_hot - 1
                    ))
                })?;
                read_archived(archive.as_ref(), session_id, after, first_hot, limit)
                    .await
                    .map_err(|e| match e {
                        ArchiveReadError::Down(_) => ReadError::ArchiveDown(e.to_string()),
                        ArchiveReadError::Missing { .. } => ReadError::Missing(e.to_string()),
                    })
            }
            Err(e) => Err(ReadError::Api(e.into())),
        }
    }
}
