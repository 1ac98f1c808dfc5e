//! Embedded SQLite backend: the archive of the default, no-external-service deployment.
//! WAL journal with `synchronous=FULL`, so an archived batch is on disk before memory is
//! trimmed. Events are stored a chunk of consecutive events per row (see [`crate::chunk`]);
//! the `events` view shows one row per event with a column for every field.

use crate::chunk;
use crate::{check_frame_seq, ArchiveError, ArchivedEvent, ArchivedSession, InsertStats};
use bytes::Bytes;
use futures_util::TryStreamExt;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use std::path::Path;
use std::time::Duration;

/// Frame bytes per archive transaction at most. Each commit lands on the disk in one go (the
/// WAL's write and fsync, then the checkpoint's copy and fsync), and every fsync of the node's
/// log on the same disk waits behind it: 2 MiB took ~8 ms on the benchmark machine's disk,
/// 256 KiB under 1 ms (docs/benchmarks.md).
const COMMIT_BYTES: usize = 256 * 1024;

/// Checkpoint as soon as the WAL holds about one commit, so the copy into the database file is
/// as small a burst as the commit (SQLite's default, 1000 pages, is a 4 MiB one).
const CHECKPOINT_PAGES: usize = COMMIT_BYTES / 4096;

/// Bound values per multi-row statement, well under SQLite's limit (32,766).
const VALUES_PER_STATEMENT: usize = 5_000;

/// Rows per multi-row statement whose rows bind `values_per_row` values each.
const fn rows_per_statement(values_per_row: usize) -> usize {
    VALUES_PER_STATEMENT / values_per_row
}

/// `PRAGMA user_version` of the current layout; 0 is a new file or the first layout (one row
/// per event in `event_frames`), which opening converts.
const LAYOUT_VERSION: i64 = 1;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS sessions (
        id TEXT PRIMARY KEY,
        title TEXT,
        metadata TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        archived_seq INTEGER NOT NULL DEFAULT 0
    )",
    // Events `first_seq..=last_seq` of a session: `frames` is the JSON array of their exact
    // frames, `starts` the byte offset of each frame in it plus the end (crate::chunk).
    "CREATE TABLE IF NOT EXISTS event_chunks (
        session_id TEXT NOT NULL,
        first_seq INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        frames TEXT NOT NULL,
        starts TEXT NOT NULL
    )",
    "CREATE UNIQUE INDEX IF NOT EXISTS event_chunks_session_seqs
        ON event_chunks (session_id, first_seq, last_seq)",
    // One row per event, a column for every field, `frame` byte-exact.
    "DROP VIEW IF EXISTS events",
    "CREATE VIEW events AS SELECT
        c.session_id AS session_id,
        c.first_seq + j.key AS seq,
        json_extract(j.value, '$.type') AS type,
        json_extract(j.value, '$.payload') AS payload,
        json_extract(j.value, '$.actor') AS actor,
        json_extract(j.value, '$.source') AS source,
        json_extract(j.value, '$.metadata') AS metadata,
        json_extract(j.value, '$.refs') AS refs,
        json_extract(j.value, '$.idempotency_key') AS idempotency_key,
        json_extract(j.value, '$.inserted_at') AS inserted_at,
        CAST(substr(CAST(c.frames AS BLOB),
                    json_extract(c.starts, '$[' || j.key || ']') + 1,
                    json_extract(c.starts, '$[' || (j.key + 1) || ']') - 1
                        - json_extract(c.starts, '$[' || j.key || ']')) AS TEXT) AS frame
     FROM event_chunks c, json_each(c.frames) j",
];

/// For each run `[session, first, last]` of the JSON array `?1` (by its position, `run`), the
/// chunks that may hold seqs in `first..=last`, ascending. A chunk holds at most `?2` events,
/// so only chunks starting after `first - ?2` can reach `first`: the index does the search.
const OVERLAPPING: &str = "SELECT r.key AS run, c.first_seq AS first_seq, c.last_seq AS last_seq
     FROM json_each(?1) AS r CROSS JOIN event_chunks AS c
     WHERE c.session_id = r.value ->> 0
       AND c.first_seq > (r.value ->> 1) - ?2
       AND c.first_seq <= r.value ->> 2
       AND c.last_seq >= r.value ->> 1
     ORDER BY r.key, c.first_seq";

/// Writes and reads go through separate pools. The writer's one connection is opened by
/// whoever opens the archive (the archiver's low-priority thread), and its SQLite thread
/// inherits that thread's CPU priority; readers' connections are opened lazily by whoever
/// reads first (a request path thread), so a tail reading archived events never waits at
/// the archiver's priority. WAL mode lets reads run beside the writer.
pub struct SqliteArchive {
    writer: SqlitePool,
    reader: SqlitePool,
}

fn rfc3339_millis(millis: i64) -> String {
    // Reuse SQLite's own formatting so the column reads like the frame's timestamps.
    let secs = millis.div_euclid(1000);
    let ms = millis.rem_euclid(1000);
    format!("{secs}.{ms:03}")
}

impl SqliteArchive {
    pub async fn open(path: &Path) -> Result<Self, ArchiveError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .pragma("cache_size", "-65536")
            .pragma("wal_autocheckpoint", CHECKPOINT_PAGES.to_string());
        // One writer: the archiver sends one batch at a time, and SQLite takes one at a time.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        let archive = SqliteArchive { writer, reader };
        archive.migrate().await?;
        Ok(archive)
    }

    /// Creates the tables, converting a file of the first layout (one row per event) in the
    /// same transaction, so an interrupted conversion leaves the old layout intact.
    async fn migrate(&self) -> Result<(), ArchiveError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *tx)
            .await?;
        if version > LAYOUT_VERSION {
            return Err(ArchiveError::NewerLayout {
                found: version,
                known: LAYOUT_VERSION,
            });
        }
        for statement in SCHEMA {
            sqlx::query(statement).execute(&mut *tx).await?;
        }
        let first_layout: Option<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'event_frames'",
        )
        .fetch_optional(&mut *tx)
        .await?;
        if first_layout.is_some() {
            let converted = convert_first_layout(&mut tx).await?;
            tracing::info!(events = converted, "archive converted to chunked rows");
            sqlx::query("DROP TABLE event_frames")
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(&format!("PRAGMA user_version = {LAYOUT_VERSION}"))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn upsert_sessions(&self, sessions: &[ArchivedSession]) -> Result<(), ArchiveError> {
        let mut tx = self.writer.begin().await?;
        for chunk in sessions.chunks(rows_per_statement(4)) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT OR IGNORE INTO sessions (id, title, metadata, created_at) ",
            );
            q.push_values(chunk, |mut row, s| {
                row.push_bind(&s.id)
                    .push_bind(&s.title)
                    .push_bind(&s.metadata)
                    .push("strftime('%Y-%m-%dT%H:%M:%fZ', ")
                    .push_bind_unseparated(rfc3339_millis(s.created_at_millis))
                    .push_unseparated(", 'unixepoch')");
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn insert_events(
        &self,
        events: &[ArchivedEvent],
    ) -> Result<InsertStats, ArchiveError> {
        let mut stats = InsertStats {
            attempted: events.len() as u64,
            ..Default::default()
        };
        let mut parsed = Vec::with_capacity(events.len());
        for event in events {
            let frame = std::str::from_utf8(&event.frame)
                .map_err(|e| ArchiveError::BadFrame(e.to_string()))?;
            check_frame_seq(event)?;
            stats.bytes_attempted += frame.len() as u64;
            parsed.push((event.session_id.as_str(), event.seq, frame));
        }
        // A batch is stored in parts of at most `COMMIT_BYTES`, each its own transaction:
        // what a commit (and the checkpoint after it) writes reaches the disk as one burst,
        // and a node's log shares that disk. Parts already stored when a later one fails are
        // found and skipped when the batch is sent again.
        for part in chunk::commits(chunk::runs(parsed), COMMIT_BYTES) {
            // Immediate: the transaction reads what is stored before it writes, and no other
            // writer may slip in between.
            let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
            let (rows, bytes) = insert_runs(&mut tx, &part).await?;
            stats.inserted += rows;
            stats.bytes_inserted += bytes;
            // One statement advances every session's archive mark in this part.
            let marks = chunk::last_seqs(&part);
            for batch in marks.chunks(rows_per_statement(2)) {
                let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                    "UPDATE sessions SET archived_seq = max(sessions.archived_seq, v.column2) FROM (",
                );
                q.push_values(batch, |mut row, (id, max)| {
                    row.push_bind(*id).push_bind(seq_param(*max));
                });
                q.push(") AS v WHERE sessions.id = v.column1");
                q.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
        Ok(stats)
    }

    pub async fn read_events(
        &self,
        session_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Bytes>, ArchiveError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let mut rows = sqlx::query(
            "SELECT first_seq, frames, starts FROM event_chunks
             WHERE session_id = ?1 AND first_seq > ?2 - ?3 AND last_seq > ?2
             ORDER BY first_seq",
        )
        .bind(session_id)
        .bind(seq_param(after_seq))
        .bind(chunk::MAX_EVENTS as i64)
        .fetch(&self.reader);
        while let Some(row) = rows.try_next().await? {
            let first_seq = row.try_get::<i64, _>("first_seq")? as u64;
            let text = Bytes::from(row.try_get::<String, _>("frames")?);
            let starts: &str = row.try_get("starts")?;
            let frames = chunk::decode(text, starts).map_err(|e| {
                ArchiveError::BadFrame(format!("{session_id} chunk at seq {first_seq}: {e}"))
            })?;
            let skip = after_seq.saturating_sub(first_seq.saturating_sub(1)) as usize;
            for frame in frames.into_iter().skip(skip) {
                out.push(frame);
                if out.len() == limit {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    pub async fn contiguous_seq(&self, session_id: &str) -> Result<u64, ArchiveError> {
        let mut rows = sqlx::query(
            "SELECT first_seq, last_seq FROM event_chunks WHERE session_id = ? ORDER BY first_seq",
        )
        .bind(session_id)
        .fetch(&self.reader);
        let mut next = 1u64;
        while let Some(row) = rows.try_next().await? {
            let first = row.try_get::<i64, _>("first_seq")? as u64;
            if first > next {
                break;
            }
            next = next.max(row.try_get::<i64, _>("last_seq")? as u64 + 1);
        }
        Ok(next - 1)
    }

    pub async fn archived_seq(&self, session_id: &str) -> Result<u64, ArchiveError> {
        let row = sqlx::query("SELECT archived_seq FROM sessions WHERE id = ?")
            .bind(session_id)
            .fetch_optional(&self.reader)
            .await?;
        Ok(match row {
            Some(r) => r.try_get::<i64, _>("archived_seq")? as u64,
            None => 0,
        })
    }

    pub async fn health(&self) -> Result<(), ArchiveError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }
}

/// Seqs fit SQLite's signed 64-bit integers (they count events).
fn seq_param(seq: u64) -> i64 {
    seq.min(i64::MAX as u64) as i64
}

/// Stores the parts of `runs` not stored yet, in chunks. Returns (events, bytes) newly
/// stored. A few statements for the whole batch, whatever the number of sessions in it: every
/// statement is a round trip to the connection's thread, and one per session was most of the
/// archive's cost when a flush spans hundreds of sessions.
async fn insert_runs(
    tx: &mut SqliteConnection,
    runs: &[chunk::Run<'_>],
) -> Result<(u64, u64), ArchiveError> {
    if runs.is_empty() {
        return Ok((0, 0));
    }
    let stored = stored_ranges(tx, runs).await?;
    let mut pieces: Vec<(&str, u64, u64, chunk::Encoded)> = Vec::new();
    let (mut rows, mut bytes) = (0u64, 0u64);
    for (run, stored) in runs.iter().zip(&stored) {
        let (first, last) = (run.first_seq, run.last_seq());
        for (a, b) in chunk::uncovered(first, last, stored) {
            let frames = &run.frames[(a - first) as usize..=(b - first) as usize];
            for piece in chunk::split(frames) {
                let part = &frames[piece.clone()];
                rows += part.len() as u64;
                bytes += part.iter().map(|f| f.len() as u64).sum::<u64>();
                pieces.push((
                    run.session_id,
                    a + piece.start as u64,
                    a + piece.end as u64 - 1,
                    chunk::encode(part),
                ));
            }
        }
    }
    for batch in pieces.chunks(rows_per_statement(5)) {
        // `OR IGNORE`: nothing here can conflict (the overlap query above ran in this
        // transaction), and a statement that cannot abort needs no statement journal, which
        // otherwise copies every page the insert touches before changing it.
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT OR IGNORE INTO event_chunks (session_id, first_seq, last_seq, frames, starts) ",
        );
        q.push_values(batch, |mut row, (session_id, first, last, encoded)| {
            row.push_bind(*session_id)
                .push_bind(seq_param(*first))
                .push_bind(seq_param(*last))
                .push_bind(encoded.frames.as_str())
                .push_bind(encoded.starts.as_str());
        });
        // The row count varies per batch: not worth a place in the statement cache.
        q.build().persistent(false).execute(&mut *tx).await?;
    }
    Ok((rows, bytes))
}

/// For each run, the (ascending) seq ranges of the chunks already stored that overlap it, in
/// one query: the runs go in as a JSON array of `[session, first, last]`.
async fn stored_ranges(
    tx: &mut SqliteConnection,
    runs: &[chunk::Run<'_>],
) -> Result<Vec<Vec<(u64, u64)>>, ArchiveError> {
    use serde_json::Value;
    let keys = Value::Array(
        runs.iter()
            .map(|r| {
                Value::Array(vec![
                    r.session_id.into(),
                    seq_param(r.first_seq).into(),
                    seq_param(r.last_seq()).into(),
                ])
            })
            .collect(),
    )
    .to_string();
    let mut stored = vec![Vec::new(); runs.len()];
    let mut rows = sqlx::query(OVERLAPPING)
        .bind(keys)
        .bind(chunk::MAX_EVENTS as i64)
        .fetch(&mut *tx);
    while let Some(row) = rows.try_next().await? {
        let run = row.try_get::<i64, _>("run")? as usize;
        let range = (
            row.try_get::<i64, _>("first_seq")? as u64,
            row.try_get::<i64, _>("last_seq")? as u64,
        );
        match stored.get_mut(run) {
            Some(ranges) => ranges.push(range),
            None => {
                return Err(sqlx::Error::Protocol(format!(
                    "overlap lookup named run {run} of {}",
                    runs.len()
                ))
                .into())
            }
        }
    }
    Ok(stored)
}

/// Moves the rows of the first layout's `event_frames` into chunks, a page at a time.
/// Returns how many events it moved.
async fn convert_first_layout(tx: &mut SqliteConnection) -> Result<u64, ArchiveError> {
    const PAGE: i64 = 10_000;
    let mut moved = 0u64;
    let mut rowid = 0i64;
    loop {
        let rows = sqlx::query(
            "SELECT rowid, session_id, seq, frame FROM event_frames WHERE rowid > ?
             ORDER BY rowid LIMIT ?",
        )
        .bind(rowid)
        .bind(PAGE)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last() else {
            return Ok(moved);
        };
        rowid = last.try_get("rowid")?;
        let mut page = Vec::with_capacity(rows.len());
        for r in &rows {
            let session_id: &str = r.try_get("session_id")?;
            let seq = r.try_get::<i64, _>("seq")? as u64;
            let frame: &str = r.try_get("frame")?;
            page.push((session_id, seq, frame));
        }
        moved += insert_runs(tx, &chunk::runs(page)).await?.0;
    }
}
