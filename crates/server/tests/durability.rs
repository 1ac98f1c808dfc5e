//! What is on disk after a crash: acknowledged events survive `kill -9`, a torn write at the
//! end of the log is cut off, and damage in the middle of the log stops the node from serving
//! wrong data.

mod support;

use std::time::Duration;
use support::{all_events, append, create, Server};

fn segments(server: &Server) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(server.data_dir().join("log"))
        .expect("log dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("wal-"))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn kill_9_under_concurrent_load_keeps_every_acknowledged_event_gapless() {
    let mut server = Server::start(&[]).await;
    let client = reqwest::Client::new();
    for s in 0..4 {
        create(&client, &server, &format!("s{s}")).await;
    }
    let mut writers = Vec::new();
    for w in 0..16u64 {
        let client = client.clone();
        let url = server.url();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..100_000u64 {
                let session = format!("s{}", (w + i) % 4);
                let key = format!("w{w}-{i}");
                let body = serde_json::json!({"type": "t", "actor": "a", "payload": {"w": w, "i": i}, "idempotency_key": key});
                match client.post(format!("{url}/v1/sessions/{session}/append")).json(&body).send().await {
                    Ok(r) if r.status() == 201 => match r.json::<serde_json::Value>().await {
                        Ok(v) => acked.push((session, v["seq"].as_u64().expect("seq"), key, body)),
                        Err(_) => break,
                    },
                    _ => break,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    server.kill9();
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.expect("writer"));
    }
    assert!(
        acked.len() > 50,
        "load ran before the kill ({} acked)",
        acked.len()
    );
    server.restart().await;
    for s in 0..4 {
        let id = format!("s{s}");
        let events = all_events(&client, &server, &id).await;
        for (i, e) in events.iter().enumerate() {
            assert_eq!(
                e["seq"].as_u64(),
                Some(i as u64 + 1),
                "gapless after recovery"
            );
        }
        for (session, seq, key, body) in acked.iter().filter(|a| a.0 == id) {
            let stored = &events[(*seq - 1) as usize];
            assert_eq!(
                &stored["idempotency_key"], key,
                "acked seq {seq} holds its own event"
            );
            assert_eq!(stored["payload"], body["payload"]);
            // The retry after the crash is answered from the recovered idempotency window.
            let r: serde_json::Value = client
                .post(format!("{}/v1/sessions/{session}/append", server.url()))
                .json(body)
                .send()
                .await
                .expect("retry")
                .json()
                .await
                .expect("json");
            assert_eq!(r["deduped"], true);
            assert_eq!(r["seq"].as_u64(), Some(*seq));
        }
    }
}

#[tokio::test]
async fn a_torn_write_at_the_end_of_the_log_is_cut_off() {
    let mut server = Server::start(&[]).await;
    let client = reqwest::Client::new();
    create(&client, &server, "t").await;
    for i in 0..20 {
        append(&client, &server, "t", serde_json::json!({"i": i})).await;
    }
    server.kill9();
    let last = segments(&server).pop().expect("a segment");
    let mut bytes = std::fs::read(&last).expect("read");
    bytes.extend_from_slice(&[0x40, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, b'{', b'"']); // half a record
    std::fs::write(&last, &bytes).expect("write");
    server.restart().await;
    let events = all_events(&client, &server, "t").await;
    assert_eq!(events.len(), 20);
    assert_eq!(
        append(&client, &server, "t", serde_json::json!({"after": true})).await,
        21
    );
}

#[tokio::test]
async fn damage_in_the_middle_of_the_log_refuses_to_start() {
    let mut server = Server::start(&[]).await;
    let client = reqwest::Client::new();
    create(&client, &server, "d").await;
    for i in 0..20 {
        append(
            &client,
            &server,
            "d",
            serde_json::json!({"i": i, "text": "some payload text"}),
        )
        .await;
    }
    server.kill9();
    let last = segments(&server).pop().expect("a segment");
    let mut bytes = std::fs::read(&last).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&last, &bytes).expect("write");
    let output = std::process::Command::new(support::binary())
        .arg("serve")
        .env("PORT", support::free_port().to_string())
        .env("STARCITE_RAFT_DATA_DIR", server.data_dir())
        .env("STARCITE_RAFT_GROUPS", "16")
        .output()
        .expect("runs");
    assert!(!output.status.success(), "must not serve a damaged log");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("corrupt log segment"),
        "clear message: {stderr}"
    );
}
