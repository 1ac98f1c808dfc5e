//! Embedded SQLite backend: the archive of the default, no-external-service deployment.
//! WAL journal with `synchronous=FULL`, so an archived batch is on disk before memory is
//! trimmed.

use crate::{
    check_frame_seq, max_seq_per_session, ArchiveError, ArchivedEvent, ArchivedSession, InsertStats,
};
use bytes::Bytes;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};
use std::path::Path;
use std::time::Duration;

/// Rows per INSERT statement (3 bound values each, well under SQLite's variable limit).
const ROWS_PER_STATEMENT: usize = 2000;

const MIGRATIONS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS sessions (
        id TEXT PRIMARY KEY,
        title TEXT,
        metadata TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        archived_seq INTEGER NOT NULL DEFAULT 0
    )",
    // Only (session, seq, frame) is written: the embedded archive costs one small row per
    // event. `events` is a view with a column for every field, computed from the frame.
    "CREATE TABLE IF NOT EXISTS event_frames (
        session_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        frame TEXT NOT NULL
    )",
    "CREATE UNIQUE INDEX IF NOT EXISTS event_frames_session_seq ON event_frames (session_id, seq)",
    "CREATE VIEW IF NOT EXISTS events AS SELECT
        session_id,
        seq,
        json_extract(frame, '$.type') AS type,
        json_extract(frame, '$.payload') AS payload,
        json_extract(frame, '$.actor') AS actor,
        json_extract(frame, '$.source') AS source,
        json_extract(frame, '$.metadata') AS metadata,
        json_extract(frame, '$.refs') AS refs,
        json_extract(frame, '$.idempotency_key') AS idempotency_key,
        json_extract(frame, '$.inserted_at') AS inserted_at,
        frame
     FROM event_frames",
];

pub struct SqliteArchive {
    pool: SqlitePool,
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
            .pragma("wal_autocheckpoint", "8192");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        for statement in MIGRATIONS {
            sqlx::query(statement).execute(&pool).await?;
        }
        Ok(SqliteArchive { pool })
    }

    pub async fn upsert_sessions(&self, sessions: &[ArchivedSession]) -> Result<(), ArchiveError> {
        let mut tx = self.pool.begin().await?;
        for chunk in sessions.chunks(ROWS_PER_STATEMENT) {
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
        let mut tx = self.pool.begin().await?;
        for chunk in events.chunks(ROWS_PER_STATEMENT) {
            let mut parsed = Vec::with_capacity(chunk.len());
            for event in chunk {
                let frame = std::str::from_utf8(&event.frame)
                    .map_err(|e| ArchiveError::BadFrame(e.to_string()))?;
                check_frame_seq(event)?;
                stats.bytes_attempted += frame.len() as u64;
                parsed.push((event, frame));
            }
            let mut q: QueryBuilder<Sqlite> =
                QueryBuilder::new("INSERT OR IGNORE INTO event_frames (session_id, seq, frame) ");
            q.push_values(&parsed, |mut row, (event, frame)| {
                row.push_bind(&event.session_id)
                    .push_bind(event.seq as i64)
                    .push_bind(*frame);
            });
            let inserted = q.build().execute(&mut *tx).await?.rows_affected();
            let chunk_bytes: u64 = parsed.iter().map(|(_, f)| f.len() as u64).sum();
            stats.inserted += inserted;
            // Exact when all or none of the chunk is new (every batch but a partly re-sent
            // one); a partly re-sent chunk is counted pro rata.
            stats.bytes_inserted += if inserted == parsed.len() as u64 {
                chunk_bytes
            } else {
                chunk_bytes * inserted / parsed.len().max(1) as u64
            };
        }
        // One statement advances every session's archive mark in this batch.
        let marks = max_seq_per_session(events);
        for chunk in marks.chunks(ROWS_PER_STATEMENT) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "UPDATE sessions SET archived_seq = max(sessions.archived_seq, v.column2) FROM (",
            );
            q.push_values(chunk, |mut row, (id, max)| {
                row.push_bind(id).push_bind(*max);
            });
            q.push(") AS v WHERE sessions.id = v.column1");
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(stats)
    }

    pub async fn read_events(
        &self,
        session_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Bytes>, ArchiveError> {
        let rows = sqlx::query(
            "SELECT frame FROM event_frames WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(session_id)
        .bind(after_seq as i64)
        .bind(limit.min(i64::MAX as usize) as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                r.try_get::<String, _>("frame")
                    .map(Bytes::from)
                    .map_err(Into::into)
            })
            .collect()
    }

    pub async fn contiguous_seq(&self, session_id: &str) -> Result<u64, ArchiveError> {
        let row = sqlx::query(
            "SELECT coalesce(min(e.seq), 0) AS s FROM event_frames e
             WHERE e.session_id = ?1
               AND NOT EXISTS (SELECT 1 FROM event_frames n WHERE n.session_id = e.session_id AND n.seq = e.seq + 1)
               AND EXISTS (SELECT 1 FROM event_frames o WHERE o.session_id = ?1 AND o.seq = 1)",
        )
        .bind(session_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>("s")? as u64)
    }

    pub async fn archived_seq(&self, session_id: &str) -> Result<u64, ArchiveError> {
        let row = sqlx::query("SELECT archived_seq FROM sessions WHERE id = ?")
            .bind(session_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => r.try_get::<i64, _>("archived_seq")? as u64,
            None => 0,
        })
    }

    pub async fn health(&self) -> Result<(), ArchiveError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
