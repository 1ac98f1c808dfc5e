//! Postgres backend: one `INSERT … SELECT FROM UNNEST(…) ON CONFLICT DO NOTHING` per batch.

use crate::{
    frame_fields, jsonb_text, max_seq_per_session, ArchiveError, ArchivedEvent, ArchivedSession,
    InsertStats,
};
use bytes::Bytes;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row;
use std::time::Duration;

const MIGRATIONS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS sessions (
        id text PRIMARY KEY,
        title text,
        metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
        created_at timestamptz NOT NULL,
        archived_seq bigint NOT NULL DEFAULT 0
    )",
    "CREATE TABLE IF NOT EXISTS events (
        session_id text NOT NULL,
        seq bigint NOT NULL,
        type text NOT NULL,
        payload jsonb NOT NULL,
        actor text NOT NULL,
        source text,
        metadata jsonb NOT NULL,
        refs jsonb NOT NULL,
        idempotency_key text,
        inserted_at timestamptz NOT NULL,
        frame text NOT NULL,
        PRIMARY KEY (session_id, seq)
    )",
];

pub struct PgArchive {
    pool: PgPool,
}

impl PgArchive {
    pub async fn connect(url: &str, pool_size: u32) -> Result<Self, ArchiveError> {
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(1))
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy(url)?;
        let archive = PgArchive { pool };
        archive.migrate().await?;
        Ok(archive)
    }

    async fn migrate(&self) -> Result<(), ArchiveError> {
        let mut tx = self.pool.begin().await?;
        // Serialise concurrent start-ups of several nodes on one database.
        sqlx::query("SELECT pg_advisory_xact_lock(7465636974)")
            .execute(&mut *tx)
            .await?;
        for statement in MIGRATIONS {
            sqlx::query(statement).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn upsert_sessions(&self, sessions: &[ArchivedSession]) -> Result<(), ArchiveError> {
        let ids: Vec<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
        let titles: Vec<Option<&str>> = sessions.iter().map(|s| s.title.as_deref()).collect();
        let metadata: Vec<String> = sessions.iter().map(|s| jsonb_text(&s.metadata)).collect();
        let created: Vec<i64> = sessions.iter().map(|s| s.created_at_millis).collect();
        sqlx::query(
            "INSERT INTO sessions (id, title, metadata, created_at)
             SELECT id, title, metadata::jsonb, to_timestamp(created_ms / 1000.0)
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[]) AS u(id, title, metadata, created_ms)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&ids)
        .bind(&titles)
        .bind(&metadata)
        .bind(&created)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn insert_events(
        &self,
        events: &[ArchivedEvent],
    ) -> Result<InsertStats, ArchiveError> {
        let n = events.len();
        let mut session_ids = Vec::with_capacity(n);
        let mut seqs = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut actors = Vec::with_capacity(n);
        let mut sources = Vec::with_capacity(n);
        let mut metadata = Vec::with_capacity(n);
        let mut refs = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        let mut inserted_at = Vec::with_capacity(n);
        let mut frames = Vec::with_capacity(n);
        let mut bytes_attempted = 0u64;
        for event in events {
            let f = frame_fields(event)?;
            session_ids.push(event.session_id.as_str());
            seqs.push(event.seq as i64);
            types.push(f.event_type);
            payloads.push(jsonb_text(f.payload.get()));
            actors.push(f.actor);
            sources.push(f.source);
            metadata.push(jsonb_text(f.metadata.get()));
            refs.push(jsonb_text(f.refs.get()));
            keys.push(f.idempotency_key);
            inserted_at.push(f.inserted_at);
            let frame = std::str::from_utf8(&event.frame)
                .map_err(|e| ArchiveError::BadFrame(e.to_string()))?;
            bytes_attempted += frame.len() as u64;
            frames.push(frame);
        }
        let marks = max_seq_per_session(events);
        let mark_ids: Vec<&str> = marks.iter().map(|(id, _)| id.as_str()).collect();
        let mark_seqs: Vec<i64> = marks.iter().map(|(_, s)| *s).collect();
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "WITH ins AS (
                INSERT INTO events (session_id, seq, type, payload, actor, source, metadata, refs,
                                    idempotency_key, inserted_at, frame)
                SELECT s, q, t, p::jsonb, a, src, m::jsonb, r::jsonb, k, ts::timestamptz, f
                FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[],
                            $7::text[], $8::text[], $9::text[], $10::text[], $11::text[])
                     AS u(s, q, t, p, a, src, m, r, k, ts, f)
                ON CONFLICT (session_id, seq) DO NOTHING
                RETURNING octet_length(frame) AS n
             )
             SELECT count(*)::int8 AS rows, coalesce(sum(n), 0)::int8 AS bytes FROM ins",
        )
        .bind(&session_ids)
        .bind(&seqs)
        .bind(&types)
        .bind(&payloads)
        .bind(&actors)
        .bind(&sources)
        .bind(&metadata)
        .bind(&refs)
        .bind(&keys)
        .bind(&inserted_at)
        .bind(&frames)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE sessions AS s SET archived_seq = GREATEST(s.archived_seq, u.m)
             FROM UNNEST($1::text[], $2::int8[]) AS u(id, m) WHERE s.id = u.id",
        )
        .bind(&mark_ids)
        .bind(&mark_seqs)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let inserted: i64 = row.try_get("rows")?;
        let bytes_inserted: i64 = row.try_get("bytes")?;
        Ok(InsertStats {
            attempted: n as u64,
            inserted: inserted as u64,
            bytes_attempted,
            bytes_inserted: bytes_inserted as u64,
        })
    }

    pub async fn read_events(
        &self,
        session_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Bytes>, ArchiveError> {
        let rows = sqlx::query(
            "SELECT frame FROM events WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
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
        // The first seq whose successor is missing; rows are dense from 1 up to it.
        let row = sqlx::query(
            "SELECT coalesce(min(e.seq), 0)::int8 AS s FROM events e
             WHERE e.session_id = $1
               AND NOT EXISTS (SELECT 1 FROM events n WHERE n.session_id = e.session_id AND n.seq = e.seq + 1)
               AND EXISTS (SELECT 1 FROM events o WHERE o.session_id = $1 AND o.seq = 1)",
        )
        .bind(session_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>("s")? as u64)
    }

    pub async fn archived_seq(&self, session_id: &str) -> Result<u64, ArchiveError> {
        let row = sqlx::query("SELECT archived_seq FROM sessions WHERE id = $1")
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
