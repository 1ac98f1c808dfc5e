//! The cold tier. Committed events are copied, write-behind, into an archive keyed by
//! `(session_id, seq)`: Postgres when a URL is configured, otherwise an embedded SQLite file in
//! the data directory, behind one interface. Inserts are idempotent, so re-sending a batch
//! (after a failure, or from a new leader) never duplicates a row.
//!
//! Every row keeps the event's exact wire frame next to its per-field columns, so a replay from
//! the archive is byte-for-byte the replay from memory.

mod archiver;
mod chunk;

/// The flush-duration histogram's name, for callers that configure its buckets.
pub const FLUSH_DURATION_METRIC: &str = archiver::FLUSH_DURATION;
mod postgres;
mod sqlite;

pub use archiver::{
    describe_metrics, record_lag, run as run_archiver, stopped, ArchiverConfig, BATCH_EVENTS,
};

use bytes::Bytes;
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stored event frame is not valid: {0}")]
    BadFrame(String),
    #[error("the archive file has layout {found}, newer than this build's {known}; run a newer starcite")]
    NewerLayout { found: i64, known: i64 },
    #[error("the node is stopping")]
    NodeStopping,
}

/// A session header as the archive stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedSession {
    pub id: String,
    pub title: Option<String>,
    /// JSON object text.
    pub metadata: String,
    pub created_at_millis: i64,
}

/// One event: its session, seq and exact wire frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedEvent {
    pub session_id: String,
    pub seq: u64,
    pub frame: Bytes,
}

/// What one insert did: rows sent, rows newly stored (re-sent rows are not counted), bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InsertStats {
    pub attempted: u64,
    pub inserted: u64,
    pub bytes_attempted: u64,
    pub bytes_inserted: u64,
}

/// The fields of a frame, for the per-field columns.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct FrameFields<'a> {
    pub seq: u64,
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(borrow)]
    pub payload: &'a serde_json::value::RawValue,
    pub actor: String,
    pub source: Option<String>,
    #[serde(borrow)]
    pub metadata: &'a serde_json::value::RawValue,
    #[serde(borrow)]
    pub refs: &'a serde_json::value::RawValue,
    pub idempotency_key: Option<String>,
    pub inserted_at: String,
}

pub(crate) fn frame_fields(event: &ArchivedEvent) -> Result<FrameFields<'_>, ArchiveError> {
    let fields: FrameFields<'_> = serde_json::from_slice(&event.frame).map_err(|e| {
        ArchiveError::BadFrame(format!("{} seq {}: {e}", event.session_id, event.seq))
    })?;
    if fields.seq != event.seq {
        return Err(ArchiveError::BadFrame(format!(
            "{} frame says seq {} but was filed as {}",
            event.session_id, fields.seq, event.seq
        )));
    }
    Ok(fields)
}

/// Checks the seq at the start of the frame (`{"seq":N,…`) against the one it is filed under,
/// without parsing the whole frame.
pub(crate) fn check_frame_seq(event: &ArchivedEvent) -> Result<(), ArchiveError> {
    let seq = starcite_core::frame_seq(&event.frame);
    if seq != Some(event.seq) {
        return Err(ArchiveError::BadFrame(format!(
            "{} frame filed as seq {} does not start with that seq",
            event.session_id, event.seq
        )));
    }
    Ok(())
}

/// JSON text for a `jsonb` column. Postgres `jsonb` cannot hold the NUL character, which JSON
/// allows as `\u0000`; the per-field copy gets U+FFFD instead (the exact text stays in
/// `frame`), so one such event cannot block the archive forever.
pub(crate) fn jsonb_text(raw: &str) -> String {
    if raw.contains("\\u0000") {
        raw.replace("\\u0000", "\\ufffd")
    } else {
        raw.to_owned()
    }
}

/// A node of a cluster without a shared Postgres reads what it archived back from its own
/// embedded file.
impl starcite_cluster::ArchiveReader for Archive {
    fn read_events<'a>(
        &'a self,
        session_id: &'a str,
        after: u64,
        limit: usize,
    ) -> futures_util::future::BoxFuture<'a, Result<Vec<Bytes>, String>> {
        Box::pin(async move {
            Archive::read_events(self, session_id, after, limit)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

pub enum Archive {
    Postgres(postgres::PgArchive),
    Sqlite(sqlite::SqliteArchive),
}

impl Archive {
    /// Connects to Postgres and runs the schema migrations.
    pub async fn connect_postgres(url: &str, pool_size: u32) -> Result<Archive, ArchiveError> {
        Ok(Archive::Postgres(
            postgres::PgArchive::connect(url, pool_size).await?,
        ))
    }

    /// Opens (creating) the embedded archive file and runs the schema migrations.
    pub async fn open_sqlite(path: &Path) -> Result<Archive, ArchiveError> {
        Ok(Archive::Sqlite(sqlite::SqliteArchive::open(path).await?))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Archive::Postgres(_) => "postgres",
            Archive::Sqlite(_) => "sqlite",
        }
    }

    /// Inserts session headers that are not there yet.
    pub async fn upsert_sessions(&self, sessions: &[ArchivedSession]) -> Result<(), ArchiveError> {
        if sessions.is_empty() {
            return Ok(());
        }
        match self {
            Archive::Postgres(a) => a.upsert_sessions(sessions).await,
            Archive::Sqlite(a) => a.upsert_sessions(sessions).await,
        }
    }

    /// Inserts events idempotently in one transaction and advances each session's
    /// `archived_seq` to the highest seq sent for it. Callers send contiguous runs that start
    /// right after the session's archive mark, so the mark only ever covers a prefix.
    pub async fn insert_events(
        &self,
        events: &[ArchivedEvent],
    ) -> Result<InsertStats, ArchiveError> {
        if events.is_empty() {
            return Ok(InsertStats::default());
        }
        match self {
            Archive::Postgres(a) => a.insert_events(events).await,
            Archive::Sqlite(a) => a.insert_events(events).await,
        }
    }

    /// Frames with `seq > after_seq`, ascending, at most `limit`, exactly as inserted.
    pub async fn read_events(
        &self,
        session_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Bytes>, ArchiveError> {
        match self {
            Archive::Postgres(a) => a.read_events(session_id, after_seq, limit).await,
            Archive::Sqlite(a) => a.read_events(session_id, after_seq, limit).await,
        }
    }

    /// The highest `s` such that events `1..=s` of the session are all present (0 if none),
    /// computed from the rows themselves, holes included.
    pub async fn contiguous_seq(&self, session_id: &str) -> Result<u64, ArchiveError> {
        match self {
            Archive::Postgres(a) => a.contiguous_seq(session_id).await,
            Archive::Sqlite(a) => a.contiguous_seq(session_id).await,
        }
    }

    /// The session's recorded archive mark.
    pub async fn archived_seq(&self, session_id: &str) -> Result<u64, ArchiveError> {
        match self {
            Archive::Postgres(a) => a.archived_seq(session_id).await,
            Archive::Sqlite(a) => a.archived_seq(session_id).await,
        }
    }

    pub async fn health(&self) -> Result<(), ArchiveError> {
        match self {
            Archive::Postgres(a) => a.health().await,
            Archive::Sqlite(a) => a.health().await,
        }
    }
}

/// The highest seq per session in a batch.
pub(crate) fn max_seq_per_session(events: &[ArchivedEvent]) -> Vec<(String, i64)> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut out: Vec<(String, i64)> = Vec::new();
    for e in events {
        match index.get(e.session_id.as_str()) {
            Some(&i) => out[i].1 = out[i].1.max(e.seq as i64),
            None => {
                index.insert(&e.session_id, out.len());
                out.push((e.session_id.clone(), e.seq as i64));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(session: &str, seq: u64) -> ArchivedEvent {
        ArchivedEvent {
            session_id: session.to_owned(),
            seq,
            frame: Bytes::new(),
        }
    }

    #[test]
    fn marks_are_the_highest_seq_of_each_session_in_first_seen_order() {
        let events = [
            event("b", 4),
            event("a", 1),
            event("b", 5),
            event("a", 2),
            event("c", 9),
            event("b", 3),
        ];
        assert_eq!(
            max_seq_per_session(&events),
            vec![
                ("b".to_owned(), 5),
                ("a".to_owned(), 2),
                ("c".to_owned(), 9)
            ]
        );
    }
}
