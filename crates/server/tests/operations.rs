//! Operating the real binary: graceful shutdown, slow consumers, connection limits, slow
//! clients, the CLI client and the SSE tail.

mod support;

use futures_util::StreamExt;
use std::time::Duration;
use support::{append, create, Server};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

async fn next_message<S>(ws: &mut S) -> Message
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("a frame within 10 s")
        .expect("stream not ended")
        .expect("frame ok")
}

fn seq_of(msg: &Message) -> u64 {
    match msg {
        Message::Text(t) => {
            let v: serde_json::Value = serde_json::from_str(t).expect("event json");
            v["seq"].as_u64().expect("seq")
        }
        other => panic!("expected an event frame, got {other:?}"),
    }
}

#[tokio::test]
async fn sigterm_closes_tails_with_1001_and_their_cursor_then_exits_zero() {
    let mut server = Server::start(&[]).await;
    let client = reqwest::Client::new();
    create(&client, &server, "s").await;
    for i in 0..3 {
        append(&client, &server, "s", serde_json::json!({"i": i})).await;
    }
    let (mut ws, _) =
        tokio_tungstenite::connect_async(server.ws_url("/v1/sessions/s/tail?cursor=0"))
            .await
            .expect("ws connects");
    for expected in 1..=3 {
        assert_eq!(seq_of(&next_message(&mut ws).await), expected);
    }
    server.signal("TERM");
    loop {
        match next_message(&mut ws).await {
            Message::Close(Some(frame)) => {
                assert_eq!(frame.code, CloseCode::Away, "close code 1001");
                assert!(
                    frame.reason.contains("last delivered seq 3"),
                    "{}",
                    frame.reason
                );
                break;
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected close, got {other:?}"),
        }
    }
    assert_eq!(server.wait_exit(Duration::from_secs(15)).await, Some(0));
}

#[tokio::test]
async fn sigterm_during_appends_loses_no_acknowledged_event() {
    let mut server = Server::start(&[]).await;
    let client = reqwest::Client::new();
    create(&client, &server, "s").await;
    let url = format!("{}/v1/sessions/s/append", server.url());
    let mut writers = Vec::new();
    for w in 0..8 {
        let client = client.clone();
        let url = url.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..10_000 {
                let body =
                    serde_json::json!({"type": "t", "actor": "a", "payload": {"w": w, "i": i}});
                match client.post(&url).json(&body).send().await {
                    Ok(r) if r.status() == 201 => {
                        let v: serde_json::Value = match r.json().await {
                            Ok(v) => v,
                            Err(_) => break,
                        };
                        acked.push(v["seq"].as_u64().expect("seq"));
                    }
                    _ => break,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.signal("TERM");
    assert_eq!(server.wait_exit(Duration::from_secs(15)).await, Some(0));
    let mut acked: Vec<u64> = Vec::new();
    for w in writers {
        acked.extend(w.await.expect("writer"));
    }
    assert!(
        !acked.is_empty(),
        "some appends were acknowledged before shutdown"
    );
    server.restart().await;
    let page: serde_json::Value = client
        .get(format!("{}/v1/sessions/s", server.url()))
        .send()
        .await
        .expect("get session")
        .json()
        .await
        .expect("json");
    let last_seq = page["last_seq"].as_u64().expect("last_seq");
    let max_acked = *acked.iter().max().expect("acked");
    assert!(
        last_seq >= max_acked,
        "acked {max_acked} but recovered only {last_seq}"
    );
    acked.sort_unstable();
    acked.dedup();
    assert!(acked.iter().all(|&s| s >= 1 && s <= last_seq));
}

#[tokio::test]
async fn a_consumer_that_cannot_keep_up_is_closed_with_1013_and_its_cursor() {
    let server = Server::start(&[("STARCITE_TAIL_SEND_TIMEOUT_MS", "300")]).await;
    let client = reqwest::Client::new();
    create(&client, &server, "s").await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(server.ws_url("/v1/sessions/s/tail?cursor=0"))
            .await
            .expect("ws connects");
    // Fill the socket buffers on both sides while the client reads nothing: ~40 MB.
    let big = "x".repeat(16 * 1024);
    let url = format!("{}/v1/sessions/s/append", server.url());
    let mut tasks = Vec::new();
    for w in 0..4 {
        let client = client.clone();
        let url = url.clone();
        let big = big.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..640 {
                let body = serde_json::json!({"type": "t", "actor": "a", "payload": {"w": w, "i": i, "pad": big}});
                let r = client.post(&url).json(&body).send().await.expect("append");
                assert_eq!(r.status(), 201);
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut received = 0u64;
    let reason = loop {
        match next_message(&mut ws).await {
            Message::Text(t) => {
                received += 1;
                let v: serde_json::Value = serde_json::from_str(&t).expect("json");
                assert_eq!(
                    v["seq"].as_u64(),
                    Some(received),
                    "frames are contiguous from 1"
                );
            }
            Message::Close(Some(frame)) => {
                assert_eq!(u16::from(frame.code), 1013, "{frame:?}");
                break frame.reason.to_string();
            }
            Message::Close(None) => panic!("close without a code"),
            _ => {}
        }
    };
    assert!(
        received < 2560,
        "the slow client was cut off before the end"
    );
    assert_eq!(
        reason,
        format!("slow consumer; last delivered seq {received}"),
        "the reason names exactly the last seq the client received"
    );
    // The server is fine and the client can resume from its cursor.
    let (mut ws, _) = tokio_tungstenite::connect_async(
        server.ws_url(&format!("/v1/sessions/s/tail?cursor={received}")),
    )
    .await
    .expect("reconnect");
    assert_eq!(seq_of(&next_message(&mut ws).await), received + 1);
}

/// A client that floods its tail with frames (they are ignored) still gets every event, in
/// order; a frame over the inbound limit (64 KiB) ends that connection, not the server.
#[tokio::test]
async fn websocket_frame_floods_are_ignored_and_oversized_frames_end_the_tail() {
    use futures_util::SinkExt;
    let server = Server::start(&[]).await;
    let client = reqwest::Client::new();
    create(&client, &server, "flood").await;
    for i in 0..3 {
        append(&client, &server, "flood", serde_json::json!({"i": i})).await;
    }
    let (ws, _) = tokio_tungstenite::connect_async(server.ws_url("/v1/sessions/flood/tail"))
        .await
        .expect("ws");
    let (mut sink, mut stream) = ws.split();
    let flood = tokio::spawn(async move {
        for i in 0..20_000u32 {
            let frame = if i % 2 == 0 {
                Message::Text(format!("noise {i}").into())
            } else {
                Message::Binary(vec![7u8; 1024].into())
            };
            sink.send(frame).await.expect("flood frame");
        }
        sink
    });
    for i in 3..6 {
        append(&client, &server, "flood", serde_json::json!({"i": i})).await;
    }
    for expected in 1..=6 {
        assert_eq!(seq_of(&next_message(&mut stream).await), expected);
    }
    let mut sink = flood.await.expect("flood task");
    // Over the limit: the server drops this connection.
    let _ = sink
        .send(Message::Binary(vec![0u8; 1024 * 1024].into()))
        .await;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "an oversized frame must end the connection");
    let health = reqwest::get(format!("{}/health/ready", server.url()))
        .await
        .expect("health");
    assert_eq!(health.status(), 200, "the server stays healthy");
    append(&client, &server, "flood", serde_json::json!({"i": 6})).await;
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_with_503() {
    let server = Server::start(&[("STARCITE_MAX_CONNECTIONS", "4")]).await;
    // Let the readiness check's connection close so that exactly our four hold the slots.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(
            tokio::net::TcpStream::connect(("127.0.0.1", server.port))
                .await
                .expect("connect"),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
        .await
        .expect("connect");
    let mut answer = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut extra, &mut answer),
    )
    .await
    .expect("refusal within 5 s")
    .expect("read");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("\"error\":\"unavailable\""), "{text}");
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = reqwest::get(format!("{}/health/live", server.url()))
        .await
        .expect("live");
    assert_eq!(r.status(), 200, "slots are released when connections close");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let server = Server::start(&[("STARCITE_HEADER_READ_TIMEOUT_MS", "500")]).await;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut stream, b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let started = std::time::Instant::now();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut buf),
    )
    .await
    .expect("the server closes the connection");
    assert!(started.elapsed() < Duration::from_secs(3));
    let r = reqwest::get(format!("{}/health/live", server.url()))
        .await
        .expect("live");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn sse_tail_replays_follows_and_resumes_from_last_event_id() {
    let server = Server::start(&[]).await;
    let client = reqwest::Client::new();
    create(&client, &server, "s").await;
    for i in 0..3 {
        append(
            &client,
            &server,
            "s",
            serde_json::json!({"i": i, "text": "line one\nline two"}),
        )
        .await;
    }
    let response = client
        .get(format!("{}/v1/sessions/s/tail", server.url()))
        .header("accept", "text/event-stream")
        .header("last-event-id", "1")
        .send()
        .await
        .expect("sse");
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    let mut writer_done = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("data within 10 s")
            .expect("stream open")
            .expect("chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
        if !writer_done && text.contains("id: 3\n") {
            append(&client, &server, "s", serde_json::json!({"live": true})).await;
            writer_done = true;
        }
        if text.contains("id: 4\n") && text.ends_with("\n\n") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
    }
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    assert_eq!(
        ids,
        vec!["2", "3", "4"],
        "resumed after Last-Event-ID 1, then live: {text}"
    );
    for message in text.split("\n\n").filter(|m| m.contains("data:")) {
        let data: Vec<&str> = message
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        let event: serde_json::Value = serde_json::from_str(&data.join("\n")).expect("event json");
        assert!(event["seq"].as_u64().is_some());
    }
    // An explicit cursor wins over Last-Event-ID; a bad Last-Event-ID is a contract error.
    let r = client
        .get(format!("{}/v1/sessions/s/tail", server.url()))
        .header("accept", "text/event-stream")
        .header("last-event-id", "nope")
        .send()
        .await
        .expect("sse");
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["error"], "invalid_cursor");
}

fn cli(server: &Server, args: &[&str]) -> std::process::Output {
    std::process::Command::new(support::binary())
        .args(args)
        .env("STARCITE_URL", server.url())
        .output()
        .expect("cli runs")
}

#[tokio::test]
async fn cli_create_append_tail_round_trip_and_errors() {
    let server = Server::start(&[]).await;
    let out = cli(
        &server,
        &[
            "create",
            "--id",
            "cli",
            "--title",
            "t",
            "--metadata",
            r#"{"a":1}"#,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let session: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(session["id"], "cli");
    for i in 0..2 {
        let payload = format!(r#"{{"n": {i}}}"#);
        let out = cli(
            &server,
            &[
                "append",
                "cli",
                "--type",
                "content",
                "--actor",
                "user:1",
                "--payload",
                &payload,
                "--idempotency-key",
                &format!("k{i}"),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ack: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(ack["seq"], i + 1);
    }
    let out = cli(&server, &["tail", "cli", "--no-follow"]);
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["payload"]["n"], 1);

    let out = cli(&server, &["create", "--id", "cli"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("session_exists"));
    let out = cli(
        &server,
        &[
            "append",
            "cli",
            "--type",
            "t",
            "--actor",
            "a",
            "--payload",
            "[1]",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "usage error");
    let out = std::process::Command::new(support::binary())
        .args([
            "create",
            "--url",
            &format!("http://127.0.0.1:{}", support::free_port()),
        ])
        .output()
        .expect("cli runs");
    assert_eq!(out.status.code(), Some(3), "unreachable server");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

#[tokio::test]
async fn cli_tail_follows_and_resumes_after_a_server_restart() {
    let mut server = Server::start(&[]).await;
    let client = reqwest::Client::new();
    create(&client, &server, "f").await;
    append(&client, &server, "f", serde_json::json!({"n": 1})).await;
    let out_path = server.dir().join("tail.out");
    let out_file = std::fs::File::create(&out_path).expect("out file");
    let mut tail = std::process::Command::new(support::binary())
        .args(["tail", "f"])
        .env("STARCITE_URL", server.url())
        .stdout(out_file)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tail starts");
    let read_seqs = || -> Vec<u64> {
        std::fs::read_to_string(&out_path)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).expect("json")["seq"]
                    .as_u64()
                    .expect("seq")
            })
            .collect()
    };
    let wait_for = |n: usize| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if read_seqs().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    wait_for(1).await;
    append(&client, &server, "f", serde_json::json!({"n": 2})).await;
    wait_for(2).await;
    server.restart().await;
    append(&client, &server, "f", serde_json::json!({"n": 3})).await;
    append(&client, &server, "f", serde_json::json!({"n": 4})).await;
    wait_for(4).await;
    let _ = tail.kill();
    let _ = tail.wait();
    assert_eq!(
        read_seqs(),
        vec![1, 2, 3, 4],
        "every event once, in order, across the restart"
    );
}

#[tokio::test]
async fn every_contract_metric_name_is_exposed() {
    let server = Server::start(&[]).await;
    let text = support::metrics_text(&server).await;
    for name in [
        "starcite_events_append_total",
        "starcite_events_payload_bytes",
        "starcite_archive_pending_rows",
        "starcite_archive_pending_sessions",
        "starcite_archive_flush_duration_ms",
        "starcite_archive_attempted_total",
        "starcite_archive_inserted_total",
        "starcite_archive_bytes_attempted_total",
        "starcite_archive_bytes_inserted_total",
        "starcite_archive_lag",
        "starcite_archive_tail_size",
        "starcite_archive_trimmed_total",
        "starcite_append_latency_seconds",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("# TYPE ") && l.split_whitespace().nth(2) == Some(name)),
            "{name} missing from /metrics:\n{text}"
        );
    }
}

/// Huge pages made every allocator page fault zero 2 MiB on the request path (a few per
/// cent of the server's CPU under append load).
#[tokio::test]
async fn the_server_turns_transparent_huge_pages_off() {
    let server = Server::start(&[]).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid()))
        .expect("the server's /proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("THP_enabled:"))
        .expect("this kernel reports THP_enabled in /proc/<pid>/status");
    assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
}

#[tokio::test]
async fn request_ids_are_echoed_and_logs_can_be_json() {
    let server = Server::start(&[
        ("STARCITE_LOG_FORMAT", "json"),
        ("RUST_LOG", "info,starcite=debug"),
    ])
    .await;
    let client = reqwest::Client::new();
    let given = client
        .get(format!("{}/health/live", server.url()))
        .header("x-request-id", "trace-abc-123")
        .send()
        .await
        .expect("live");
    assert_eq!(given.headers()["x-request-id"], "trace-abc-123");
    let generated = client
        .get(format!("{}/nope", server.url()))
        .send()
        .await
        .expect("404");
    let id = generated.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(!id.is_empty());
    let other = client
        .get(format!("{}/nope", server.url()))
        .send()
        .await
        .expect("404");
    assert_ne!(
        other.headers()["x-request-id"].to_str().unwrap(),
        id,
        "ids are unique"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = server.log();
    let json_lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect();
    assert!(
        json_lines
            .iter()
            .any(|l| l.to_string().contains("trace-abc-123")),
        "the request id appears in the request's log line:\n{log}"
    );
}
