//! One conformance suite, run against both archive backends: a real PostgreSQL and a real
//! SQLite file.

mod support;

use bytes::Bytes;
use sqlx::Row;
use starcite_archive::{Archive, ArchivedEvent, ArchivedSession};
use starcite_core::{render_event, EventFields, Timestamp};

fn frame(seq: u64, payload: &str, key: Option<&str>, source: Option<&str>) -> Bytes {
    Bytes::from(render_event(&EventFields {
        seq,
        event_type: "content",
        payload,
        actor: "agent:test",
        source,
        metadata: r#"{"m": 1}"#,
        refs: r#"{"to_seq": 1}"#,
        idempotency_key: key,
        inserted_at: Timestamp(1_770_562_801_123 + seq as i64),
    }))
}

fn events(session: &str, seqs: impl IntoIterator<Item = u64>) -> Vec<ArchivedEvent> {
    seqs.into_iter()
        .map(|seq| ArchivedEvent {
            session_id: session.to_owned(),
            seq,
            frame: frame(seq, &format!(r#"{{"n": {seq}}}"#), None, None),
        })
        .collect()
}

fn seqs_of(frames: &[Bytes]) -> Vec<u64> {
    frames
        .iter()
        .map(|f| {
            serde_json::from_slice::<serde_json::Value>(f).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

fn session(id: &str) -> ArchivedSession {
    ArchivedSession {
        id: id.to_owned(),
        title: Some("T".into()),
        metadata: r#"{"tenant":"acme"}"#.into(),
        created_at_millis: 1_770_562_801_123,
    }
}

/// JSON that a re-serialisation would change: spacing, number forms, escapes.
const ODD_PAYLOAD: &str =
    r#"{"b": 1,  "a": [1, 2.50, 1e3, 12345678901234567890], "u": "\u00e9 ✓ \"q\" \n \u0000"}"#;

/// The backend-independent part of the suite.
async fn conformance(archive: &Archive) {
    archive.health().await.expect("healthy");
    archive
        .upsert_sessions(&[session("a"), session("b")])
        .await
        .expect("sessions");
    archive
        .upsert_sessions(&[session("a")])
        .await
        .expect("upsert twice is fine");

    // Idempotent inserts.
    let batch = events("a", 1..=3);
    let stats = archive.insert_events(&batch).await.expect("insert");
    assert_eq!((stats.attempted, stats.inserted), (3, 3));
    assert_eq!(stats.bytes_attempted, stats.bytes_inserted);
    let again = archive.insert_events(&batch).await.expect("re-insert");
    assert_eq!(
        (again.attempted, again.inserted, again.bytes_inserted),
        (3, 0, 0)
    );
    assert_eq!(archive.archived_seq("a").await.unwrap(), 3);

    // Byte-exact frames, odd JSON included.
    let odd = ODD_PAYLOAD;
    let special = ArchivedEvent {
        session_id: "a".into(),
        seq: 4,
        frame: frame(4, odd, Some("key-4"), Some("agent")),
    };
    archive
        .insert_events(std::slice::from_ref(&special))
        .await
        .expect("odd payload archived");
    let read = archive.read_events("a", 0, 100).await.expect("read");
    assert_eq!(read.len(), 4);
    assert_eq!(read[3], special.frame, "returned byte-for-byte");
    assert_eq!(read[0], batch[0].frame);

    // Pagination.
    archive.insert_events(&events("a", 5..=20)).await.unwrap();
    let page = archive.read_events("a", 5, 10).await.unwrap();
    assert_eq!(seqs_of(&page), (6..=15).collect::<Vec<_>>());
    assert!(archive.read_events("a", 20, 10).await.unwrap().is_empty());
    assert!(archive
        .read_events("nobody", 0, 10)
        .await
        .unwrap()
        .is_empty());

    // A re-sent batch overlapping what is stored adds only what is new, in order.
    archive.upsert_sessions(&[session("p")]).await.unwrap();
    archive.insert_events(&events("p", 1..=3)).await.unwrap();
    archive.insert_events(&events("p", 7..=9)).await.unwrap();
    let stats = archive.insert_events(&events("p", 2..=600)).await.unwrap();
    assert_eq!((stats.attempted, stats.inserted), (599, 594));
    let all = archive.read_events("p", 0, 1000).await.unwrap();
    assert_eq!(seqs_of(&all), (1..=600).collect::<Vec<_>>());
    assert_eq!(all[7], events("p", [8])[0].frame, "the first copy stays");
    assert_eq!(
        seqs_of(&archive.read_events("p", 300, 5).await.unwrap()),
        (301..=305).collect::<Vec<_>>()
    );
    assert_eq!(archive.contiguous_seq("p").await.unwrap(), 600);

    // Holes: the contiguous prefix stops at the first missing seq.
    archive
        .insert_events(&events("b", [1, 2, 3, 5]))
        .await
        .unwrap();
    assert_eq!(archive.contiguous_seq("b").await.unwrap(), 3);
    archive.insert_events(&events("b", [4])).await.unwrap();
    assert_eq!(archive.contiguous_seq("b").await.unwrap(), 5);
    assert_eq!(archive.contiguous_seq("nobody").await.unwrap(), 0);
    archive.upsert_sessions(&[session("c")]).await.unwrap();
    archive.insert_events(&events("c", [2, 3])).await.unwrap();
    assert_eq!(
        archive.contiguous_seq("c").await.unwrap(),
        0,
        "seq 1 missing"
    );

    // A large batch in one call.
    archive.upsert_sessions(&[session("big")]).await.unwrap();
    let big = events("big", 1..=20_000);
    let stats = archive.insert_events(&big).await.expect("large batch");
    assert_eq!(stats.inserted, 20_000);
    assert_eq!(archive.contiguous_seq("big").await.unwrap(), 20_000);
    assert_eq!(archive.archived_seq("big").await.unwrap(), 20_000);
    let tail = archive.read_events("big", 19_990, 100).await.unwrap();
    assert_eq!(tail.len(), 10);
    assert_eq!(tail[9], big[19_999].frame);

    // One batch across many sessions (more than one statement's worth), some of them partly
    // stored already: each session gets exactly its missing seqs.
    let ids: Vec<String> = (0..1_500).map(|i| format!("m{i}")).collect();
    let headers: Vec<ArchivedSession> = ids.iter().map(|id| session(id)).collect();
    archive.upsert_sessions(&headers).await.unwrap();
    let mut partly = Vec::new();
    for id in ids.iter().step_by(3) {
        partly.extend(events(id, [2, 4]));
    }
    archive.insert_events(&partly).await.unwrap();
    let mut wide = Vec::new();
    for id in &ids {
        wide.extend(events(id, 1..=5));
    }
    let stats = archive.insert_events(&wide).await.expect("wide batch");
    assert_eq!(stats.attempted, 7_500);
    assert_eq!(stats.inserted, 7_500 - 2 * 500);
    for id in [&ids[0], &ids[1], &ids[1_497], &ids[1_499]] {
        let read = archive.read_events(id, 0, 10).await.unwrap();
        assert_eq!(seqs_of(&read), vec![1, 2, 3, 4, 5], "{id}");
        assert_eq!(archive.contiguous_seq(id).await.unwrap(), 5, "{id}");
        assert_eq!(archive.archived_seq(id).await.unwrap(), 5, "{id}");
    }

    // A frame filed under the wrong seq is refused, not stored.
    let wrong = ArchivedEvent {
        session_id: "a".into(),
        seq: 99,
        frame: frame(98, "{}", None, None),
    };
    assert!(archive.insert_events(&[wrong]).await.is_err());
}

#[tokio::test]
async fn sqlite_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("archive.sqlite3");
    let archive = Archive::open_sqlite(&path).await.expect("open sqlite");
    assert_eq!(archive.kind(), "sqlite");
    conformance(&archive).await;
    drop(archive);

    // Every field has its own column.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let row = sqlx::query("SELECT * FROM events WHERE session_id = 'a' AND seq = 4")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(row.get::<String, _>("type"), "content");
    assert_eq!(row.get::<String, _>("actor"), "agent:test");
    assert_eq!(
        row.get::<Option<String>, _>("source").as_deref(),
        Some("agent")
    );
    assert_eq!(
        row.get::<Option<String>, _>("idempotency_key").as_deref(),
        Some("key-4")
    );
    assert_eq!(row.get::<String, _>("metadata"), r#"{"m":1}"#);
    assert_eq!(row.get::<String, _>("refs"), r#"{"to_seq":1}"#);
    assert_eq!(
        row.get::<String, _>("inserted_at"),
        "2026-02-08T15:00:01.127Z"
    );
    let odd_frame = frame(4, ODD_PAYLOAD, Some("key-4"), Some("agent"));
    assert_eq!(
        row.get::<String, _>("frame").as_bytes(),
        &odd_frame[..],
        "view frame is byte-exact"
    );
    let sessions = sqlx::query("SELECT * FROM sessions WHERE id = 'a'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        sessions.get::<String, _>("created_at"),
        "2026-02-08T15:00:01.123Z"
    );
    assert_eq!(sessions.get::<i64, _>("archived_seq"), 20);
    let history: Vec<i64> =
        sqlx::query("SELECT seq FROM events WHERE session_id = 'a' ORDER BY seq")
            .fetch_all(&pool)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    assert_eq!(history, (1..=20).collect::<Vec<_>>());
}

#[tokio::test]
async fn postgres_backend_conforms() {
    let pg = support::Postgres::start().await;
    let archive = Archive::connect_postgres(&pg.url, 4)
        .await
        .expect("connect postgres");
    assert_eq!(archive.kind(), "postgres");
    conformance(&archive).await;
    // Migrations are idempotent: a second node (or a restart) connects fine.
    Archive::connect_postgres(&pg.url, 2)
        .await
        .expect("migrate twice");

    let pool = sqlx::PgPool::connect(&pg.url).await.unwrap();
    let rows = sqlx::query("SELECT * FROM events WHERE session_id = $1 ORDER BY seq")
        .bind("a")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), 20, "full history, once each");
    let seqs: Vec<i64> = rows.iter().map(|r| r.get("seq")).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    let row = &rows[3];
    assert_eq!(row.get::<String, _>("type"), "content");
    assert_eq!(
        row.get::<Option<String>, _>("source").as_deref(),
        Some("agent")
    );
    assert_eq!(
        row.get::<Option<String>, _>("idempotency_key").as_deref(),
        Some("key-4")
    );
    let typed = sqlx::query(
        "SELECT payload->>'b' AS b, jsonb_typeof(payload) AS kind, metadata->>'m' AS m,
                refs->>'to_seq' AS to_seq, to_char(inserted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS') AS ts
         FROM events WHERE session_id = 'a' AND seq = 4",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(typed.get::<String, _>("kind"), "object", "payload is jsonb");
    assert_eq!(typed.get::<String, _>("b"), "1");
    assert_eq!(typed.get::<String, _>("m"), "1");
    assert_eq!(typed.get::<String, _>("to_seq"), "1");
    assert_eq!(typed.get::<String, _>("ts"), "2026-02-08T15:00:01.127");
    let s = sqlx::query(
        "SELECT title, metadata->>'tenant' AS tenant, archived_seq FROM sessions WHERE id = 'a'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(s.get::<Option<String>, _>("title").as_deref(), Some("T"));
    assert_eq!(s.get::<String, _>("tenant"), "acme");
    assert_eq!(s.get::<i64, _>("archived_seq"), 20);
}

#[tokio::test]
async fn postgres_outage_fails_fast_and_recovers() {
    let pg = support::Postgres::start().await;
    if !pg.can_stop() {
        // With an external DATABASE_URL the test cannot stop the server; the throwaway-cluster
        // path (the default in CI) runs it.
        eprintln!("DATABASE_URL is set: outage test runs against the throwaway cluster only");
        return;
    }
    let archive = Archive::connect_postgres(&pg.url, 2)
        .await
        .expect("connect");
    archive.upsert_sessions(&[session("o")]).await.unwrap();
    archive.insert_events(&events("o", 1..=10)).await.unwrap();
    pg.stop();
    let started = std::time::Instant::now();
    let err = archive.insert_events(&events("o", 11..=20)).await;
    assert!(err.is_err(), "insert must fail while Postgres is down");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "fails fast, no hang"
    );
    pg.restart();
    let mut stats = None;
    for _ in 0..50 {
        match archive.insert_events(&events("o", 11..=20)).await {
            Ok(s) => {
                stats = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    }
    let stats = stats.expect("inserts work again after Postgres returns");
    assert_eq!(stats.inserted, 10);
    assert_eq!(archive.contiguous_seq("o").await.unwrap(), 20);
}

#[tokio::test]
async fn sqlite_file_of_the_first_layout_is_converted_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("archive.sqlite3");
    {
        // The first layout: one row per event.
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        for statement in [
            "CREATE TABLE sessions (id TEXT PRIMARY KEY, title TEXT, metadata TEXT NOT NULL DEFAULT '{}',
                created_at TEXT NOT NULL, archived_seq INTEGER NOT NULL DEFAULT 0)",
            "CREATE TABLE event_frames (session_id TEXT NOT NULL, seq INTEGER NOT NULL, frame TEXT NOT NULL)",
            "CREATE UNIQUE INDEX event_frames_session_seq ON event_frames (session_id, seq)",
            "CREATE VIEW events AS SELECT session_id, seq, frame FROM event_frames",
            "INSERT INTO sessions (id, created_at, archived_seq) VALUES ('a', '2026-01-01T00:00:00.000Z', 300), ('b', '2026-01-01T00:00:00.000Z', 2)",
        ] {
            sqlx::query(statement).execute(&pool).await.unwrap();
        }
        // Interleaved as the archiver wrote them: both sessions, a hole in b.
        let mut rows = events("a", 1..=300);
        rows.extend(events("b", [1, 2, 4]));
        rows.sort_by_key(|e| (e.seq, e.session_id.clone()));
        for e in &rows {
            sqlx::query("INSERT INTO event_frames (session_id, seq, frame) VALUES (?, ?, ?)")
                .bind(&e.session_id)
                .bind(e.seq as i64)
                .bind(std::str::from_utf8(&e.frame).unwrap())
                .execute(&pool)
                .await
                .unwrap();
        }
        pool.close().await;
    }

    let archive = Archive::open_sqlite(&path).await.expect("converted");
    let a = archive.read_events("a", 0, 1000).await.unwrap();
    assert_eq!(
        a,
        events("a", 1..=300)
            .into_iter()
            .map(|e| e.frame)
            .collect::<Vec<_>>()
    );
    assert_eq!(archive.contiguous_seq("a").await.unwrap(), 300);
    assert_eq!(archive.contiguous_seq("b").await.unwrap(), 2);
    assert_eq!(archive.archived_seq("a").await.unwrap(), 300);
    assert_eq!(
        seqs_of(&archive.read_events("b", 0, 10).await.unwrap()),
        vec![1, 2, 4]
    );
    // Appending after the conversion continues the same history.
    let stats = archive.insert_events(&events("b", 2..=5)).await.unwrap();
    assert_eq!(stats.inserted, 2);
    assert_eq!(archive.contiguous_seq("b").await.unwrap(), 5);
    drop(archive);

    // Opening again is a no-op; the old table is gone and the view shows every event.
    let archive = Archive::open_sqlite(&path).await.expect("reopened");
    assert_eq!(archive.contiguous_seq("a").await.unwrap(), 300);
    drop(archive);
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let old: Option<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE name = 'event_frames'")
            .fetch_optional(&pool)
            .await
            .unwrap();
    assert_eq!(old, None);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 305);
}

#[tokio::test]
async fn sqlite_file_of_a_newer_layout_is_refused_not_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("archive.sqlite3");
    drop(Archive::open_sqlite(&path).await.expect("new file"));
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("PRAGMA user_version = 99")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let err = Archive::open_sqlite(&path).await.err().expect("refused");
    assert!(
        matches!(
            err,
            starcite_archive::ArchiveError::NewerLayout { found: 99, .. }
        ),
        "{err}"
    );
}
