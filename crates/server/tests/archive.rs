//! The cold tier end to end: events flow to the archive (embedded SQLite or a real Postgres),
//! memory is trimmed, and tails and pages still return every event once, in order, across
//! tiers — also after a restart and through a Postgres outage.

mod support;

#[path = "../../archive/tests/support/mod.rs"]
mod pg;

use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;
use support::{all_events, create, metric, ws_events, Server};
use tokio_tungstenite::tungstenite::Message;

const FAST_ARCHIVE: [(&str, &str); 2] = [
    ("STARCITE_ARCHIVE_FLUSH_INTERVAL_MS", "100"),
    ("STARCITE_TAIL_KEEP", "10"),
];

async fn append_n(
    client: &reqwest::Client,
    server: &Server,
    id: &str,
    from: u64,
    to: u64,
) -> Vec<String> {
    let mut frames = Vec::new();
    for i in from..=to {
        let body = json!({"type": "t", "actor": "a", "payload": {"i": i, "pad": "x".repeat(50)}, "idempotency_key": format!("k{i}")});
        let r = client
            .post(format!("{}/v1/sessions/{id}/append", server.url()))
            .json(&body)
            .send()
            .await
            .expect("append");
        assert_eq!(r.status(), 201);
        let ack: Value = r.json().await.expect("json");
        assert_eq!(ack["seq"].as_u64(), Some(i));
        frames.push(body.to_string());
    }
    frames
}

/// Waits until the archive holds every durable event.
async fn wait_archived(server: &Server) {
    wait_metric(
        server,
        "starcite_archive_pending_rows",
        |v| v == 0.0,
        Duration::from_secs(60),
    )
    .await;
}

async fn wait_metric(server: &Server, name: &str, ok: impl Fn(f64) -> bool, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let v = metric(server, name).await;
        if ok(v) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} = {v} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_contiguous(events: &[Value], from: u64) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            e["seq"].as_u64(),
            Some(from + i as u64),
            "no gap, no duplicate"
        );
        assert_eq!(e["payload"]["i"].as_u64(), Some(from + i as u64));
    }
}

async fn tiers_round_trip(mut server: Server) -> Server {
    let client = reqwest::Client::new();
    create(&client, &server, "cold").await;
    append_n(&client, &server, "cold", 1, 300).await;
    wait_archived(&server).await;
    wait_metric(
        &server,
        "starcite_archive_trimmed_total",
        |v| v >= 290.0,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        metric(&server, "starcite_archive_inserted_total").await,
        300.0
    );

    let tail = ws_events(&server, "cold", 0, 300).await;
    assert_contiguous(&tail, 1);
    assert_contiguous(&all_events(&client, &server, "cold").await, 1);
    assert_contiguous(&ws_events(&server, "cold", 150, 150).await, 151);

    // Idempotency keys outlive trimming.
    let retry = json!({"type": "t", "actor": "a", "payload": {"i": 1, "pad": "x".repeat(50)}, "idempotency_key": "k1"});
    let r: Value = client
        .post(format!("{}/v1/sessions/cold/append", server.url()))
        .json(&retry)
        .send()
        .await
        .expect("retry")
        .json()
        .await
        .expect("json");
    assert_eq!(
        (r["seq"].as_u64(), r["deduped"].as_bool()),
        (Some(1), Some(true))
    );

    // After a crash the archive marks come back from the log; replay still spans both tiers.
    server.restart().await;
    assert_contiguous(&ws_events(&server, "cold", 0, 300).await, 1);
    append_n(&client, &server, "cold", 301, 310).await;
    let all = ws_events(&server, "cold", 0, 310).await;
    assert_contiguous(&all, 1);
    wait_archived(&server).await;
    server
}

#[tokio::test]
async fn sqlite_archive_serves_replay_across_tiers() {
    let server = Server::start(&FAST_ARCHIVE).await;
    let server = tiers_round_trip(server).await;
    assert!(server.dir().join("data/archive.sqlite3").exists());
}

#[tokio::test]
async fn postgres_archive_holds_the_full_history() {
    let pg = pg::Postgres::start().await;
    let mut env = FAST_ARCHIVE.to_vec();
    env.push(("DATABASE_URL", pg.url.as_str()));
    let server = Server::start(&env).await;
    let _server = tiers_round_trip(server).await;
    let pool = sqlx::PgPool::connect(&pg.url).await.expect("connect");
    let rows: Vec<(i64, Value)> = sqlx::query_as(
        "SELECT seq, payload::text::jsonb FROM events WHERE session_id = $1 ORDER BY seq",
    )
    .bind("cold")
    .fetch_all(&pool)
    .await
    .map(|rows: Vec<(i64, sqlx::types::Json<Value>)>| {
        rows.into_iter().map(|(s, j)| (s, j.0)).collect()
    })
    .expect("select");
    assert_eq!(rows.len(), 310, "every event once");
    for (i, (seq, payload)) in rows.iter().enumerate() {
        assert_eq!(*seq, i as i64 + 1);
        assert_eq!(payload["i"].as_i64(), Some(i as i64 + 1));
    }
}

#[tokio::test]
async fn postgres_outage_keeps_appends_working_and_catches_up_exactly_once() {
    let pg = pg::Postgres::start().await;
    if !pg.can_stop() {
        eprintln!(
            "DATABASE_URL is set: the outage test needs the throwaway cluster and runs there"
        );
        return;
    }
    let mut env = FAST_ARCHIVE.to_vec();
    env.push(("DATABASE_URL", pg.url.as_str()));
    let server = Server::start(&env).await;
    let client = reqwest::Client::new();
    create(&client, &server, "o").await;
    append_n(&client, &server, "o", 1, 50).await;
    wait_archived(&server).await;

    pg.stop();
    // Appends, and tails of what memory holds, keep working while the archive is down.
    append_n(&client, &server, "o", 51, 250).await;
    assert_contiguous(&ws_events(&server, "o", 40, 210).await, 41);
    // A replay that needs the archive waits for it instead of failing or skipping.
    let url = server.ws_url("/v1/sessions/o/tail?cursor=0");
    let waiting = tokio::spawn(async move {
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
        let mut seqs = Vec::new();
        while seqs.len() < 250 {
            match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).expect("json");
                    seqs.push(v["seq"].as_u64().expect("seq"));
                }
                Ok(Some(Ok(Message::Close(f)))) => panic!("closed: {f:?}"),
                Ok(Some(Ok(_))) => {}
                other => panic!("tail failed: {other:?}"),
            }
        }
        seqs
    });
    wait_metric(
        &server,
        "starcite_archive_failures_total",
        |v| v >= 1.0,
        Duration::from_secs(20),
    )
    .await;
    assert!(
        metric(&server, "starcite_archive_pending_rows").await >= 150.0,
        "the lag is visible"
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "nothing can be sent before the archive is back"
    );

    pg.restart();
    assert_eq!(
        waiting.await.expect("tail"),
        (1..=250).collect::<Vec<u64>>()
    );
    wait_archived(&server).await;
    let pool = sqlx::PgPool::connect(&pg.url).await.expect("connect");
    let (count, distinct, max): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT seq), max(seq) FROM events WHERE session_id = 'o'",
    )
    .fetch_one(&pool)
    .await
    .expect("counts");
    assert_eq!(
        (count, distinct, max),
        (250, 250, 250),
        "every event archived exactly once"
    );
    assert_contiguous(&ws_events(&server, "o", 0, 250).await, 1);
}
