//! Concurrent writers and tailers over real sockets: gapless permutations, per-writer order,
//! and tails that see every seq exactly once while appends race with the replay.

mod support;

use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;
use support::{create, Server};
use tokio_tungstenite::tungstenite::Message;

async fn writer(client: reqwest::Client, url: String, writer: u64, count: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in 0..count {
        let body =
            json!({"type": "t", "actor": format!("w{writer}"), "payload": {"w": writer, "i": i}});
        let r = client.post(&url).json(&body).send().await.expect("append");
        assert_eq!(r.status(), 201);
        let ack: Value = r.json().await.expect("json");
        seqs.push(ack["seq"].as_u64().expect("seq"));
    }
    seqs
}

/// Reads `count` event frames and returns their (seq, writer, i).
async fn tail_collect(url: String, count: usize) -> Vec<(u64, u64, u64)> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("frame within 20 s")
            .expect("open")
            .expect("ok");
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).expect("json");
            out.push((
                v["seq"].as_u64().unwrap(),
                v["payload"]["w"].as_u64().unwrap(),
                v["payload"]["i"].as_u64().unwrap(),
            ));
        }
    }
    out
}

#[tokio::test]
async fn concurrent_writers_on_one_session_with_live_tails() {
    let server = Server::start(&[]).await;
    let client = reqwest::Client::new();
    create(&client, &server, "hot").await;
    let (writers, per_writer) = (8u64, 200u64);
    let total = (writers * per_writer) as usize;
    // One tail opened before any write, one opened while the writers run.
    let early = tokio::spawn(tail_collect(
        server.ws_url("/v1/sessions/hot/tail?cursor=0"),
        total,
    ));
    let url = format!("{}/v1/sessions/hot/append", server.url());
    let mut tasks = Vec::new();
    for w in 0..writers {
        tasks.push(tokio::spawn(writer(
            client.clone(),
            url.clone(),
            w,
            per_writer,
        )));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let late = tokio::spawn(tail_collect(
        server.ws_url("/v1/sessions/hot/tail?cursor=0"),
        total,
    ));
    let mut all = Vec::new();
    let mut acked = std::collections::HashMap::new();
    for (w, t) in tasks.into_iter().enumerate() {
        let seqs = t.await.expect("writer");
        assert!(
            seqs.windows(2).all(|p| p[0] < p[1]),
            "writer {w}'s order preserved"
        );
        for (i, s) in seqs.iter().enumerate() {
            acked.insert(*s, (w as u64, i as u64));
        }
        all.extend(seqs);
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=total as u64).collect::<Vec<_>>(),
        "gapless permutation"
    );
    for tail in [early, late] {
        let seen = tail.await.expect("tail");
        for (k, (seq, w, i)) in seen.iter().enumerate() {
            assert_eq!(*seq, k as u64 + 1, "each seq exactly once, in order");
            assert_eq!(
                acked[seq],
                (*w, *i),
                "the tail shows the event that was acked at that seq"
            );
        }
    }
}

#[tokio::test]
async fn many_sessions_in_parallel_stay_independent() {
    let server = Server::start(&[]).await;
    let client = reqwest::Client::new();
    let sessions = 24u64;
    for s in 0..sessions {
        create(&client, &server, &format!("p{s}")).await;
    }
    let mut tasks = Vec::new();
    for s in 0..sessions {
        let url = format!("{}/v1/sessions/p{s}/append", server.url());
        tasks.push(tokio::spawn(writer(client.clone(), url, s, 50)));
    }
    for t in tasks {
        assert_eq!(t.await.expect("writer"), (1..=50).collect::<Vec<u64>>());
    }
    for s in 0..sessions {
        let seen = tail_collect(
            server.ws_url(&format!("/v1/sessions/p{s}/tail?cursor=25")),
            25,
        )
        .await;
        assert!(
            seen.iter().all(|(_, w, _)| *w == s),
            "no event crossed sessions"
        );
        assert_eq!(seen.first().map(|e| e.0), Some(26));
    }
}
