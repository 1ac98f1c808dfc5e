//! The wire contract, rule by rule, against a real server process.

mod support;

use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;
use support::Server;
use tokio_tungstenite::tungstenite::Message;

struct Api {
    server: Server,
    client: reqwest::Client,
}

impl Api {
    async fn start(env: &[(&str, &str)]) -> Api {
        Api {
            server: Server::start(env).await,
            client: reqwest::Client::new(),
        }
    }

    async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.server.url()))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.post_raw(path, body.to_string()).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(format!("{}{path}", self.server.url()))
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn create(&self, id: &str) {
        let (status, body) = self.post("/v1/sessions", json!({"id": id})).await;
        assert_eq!(status, 201, "{body}");
    }

    async fn append(&self, id: &str, body: Value) -> (u16, Value) {
        self.post(&format!("/v1/sessions/{id}/append"), body).await
    }
}

fn event(text: &str) -> Value {
    json!({"type": "content", "payload": {"text": text}, "actor": "agent:test"})
}

/// Every error has the contract's shape and the expected code.
fn assert_error(got: (u16, Value), status: u16, code: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["error"], code, "{}", got.1);
    assert!(got.1["message"].is_string(), "{}", got.1);
    assert_eq!(
        got.1.as_object().map(|o| o.len()),
        Some(2),
        "only error and message: {}",
        got.1
    );
}

fn is_rfc3339_utc(s: &str) -> bool {
    s.len() == 24
        && s.ends_with('Z')
        && s.as_bytes()[4] == b'-'
        && s.as_bytes()[10] == b'T'
        && s.as_bytes()[19] == b'.'
}

#[tokio::test]
async fn create_rules() {
    let api = Api::start(&[]).await;
    let (status, body) = api
        .post(
            "/v1/sessions",
            json!({"id": "ses_demo", "title": "Draft", "metadata": {"tenant_id": "acme"}}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(body["id"], "ses_demo");
    assert_eq!(body["title"], "Draft");
    assert_eq!(body["metadata"], json!({"tenant_id": "acme"}));
    assert_eq!(body["last_seq"], 0);
    assert!(
        is_rfc3339_utc(body["created_at"].as_str().unwrap()),
        "{body}"
    );
    assert!(
        is_rfc3339_utc(body["updated_at"].as_str().unwrap()),
        "{body}"
    );

    // Generated ids: ses_ + 22 URL-safe base64 characters; every field optional.
    for body in ["{}", ""] {
        let (status, created) = api.post_raw("/v1/sessions", body).await;
        assert_eq!(status, 201);
        let id = created["id"].as_str().unwrap();
        assert!(id.starts_with("ses_") && id.len() == 26, "{id}");
        assert!(id[4..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(created["metadata"], json!({}));
    }

    assert_error(
        api.post("/v1/sessions", json!({"id": "ses_demo"})).await,
        409,
        "session_exists",
    );
    let longest = "a".repeat(256);
    assert_eq!(
        api.post("/v1/sessions", json!({"id": longest})).await.0,
        201
    );
    assert_eq!(
        api.post("/v1/sessions", json!({"id": "A-z_0.9:x@y", "title": ""}))
            .await
            .0,
        201
    );
    for bad in [
        json!("a".repeat(257)),
        json!(""),
        json!("has space"),
        json!("slash/y"),
        json!("é"),
        json!(5),
    ] {
        assert_error(
            api.post("/v1/sessions", json!({"id": bad})).await,
            400,
            "invalid_session",
        );
    }
    assert_error(
        api.post("/v1/sessions", json!({"title": 5})).await,
        400,
        "invalid_session",
    );
    assert_error(
        api.post("/v1/sessions", json!({"metadata": [1]})).await,
        400,
        "invalid_session",
    );
    assert_error(
        api.post("/v1/sessions", json!([1])).await,
        400,
        "invalid_session",
    );
    assert_error(
        api.post_raw("/v1/sessions", "{\"id\":").await,
        400,
        "invalid_json",
    );

    let (status, got) = api.get("/v1/sessions/ses_demo").await;
    assert_eq!(status, 200);
    assert_eq!(got["title"], "Draft");
    assert_error(api.get("/v1/sessions/nope").await, 404, "session_not_found");
}

#[tokio::test]
async fn append_rules_and_error_codes() {
    let api = Api::start(&[]).await;
    api.create("s").await;
    let (status, ack) = api.append("s", event("one")).await;
    assert_eq!(
        (status, ack.clone()),
        (201, json!({"seq": 1, "last_seq": 1, "deduped": false}))
    );

    let full = json!({
        "type": "state", "payload": {"state": "running"}, "actor": "agent:researcher",
        "source": "agent", "metadata": {"m": 1}, "refs": {"to_seq": 1, "step": 0, "request_id": "r", "sequence_id": "q"},
        "idempotency_key": "run_123-step_8", "expected_seq": 1
    });
    assert_eq!(
        api.append("s", full).await,
        (201, json!({"seq": 2, "last_seq": 2, "deduped": false}))
    );

    let bad_events = [
        json!({"payload": {}, "actor": "a"}),
        json!({"type": "", "payload": {}, "actor": "a"}),
        json!({"type": 5, "payload": {}, "actor": "a"}),
        json!({"type": "t", "actor": "a"}),
        json!({"type": "t", "payload": [1], "actor": "a"}),
        json!({"type": "t", "payload": "text", "actor": "a"}),
        json!({"type": "t", "payload": {}}),
        json!({"type": "t", "payload": {}, "actor": ""}),
        json!({"type": "t", "payload": {}, "actor": "a", "source": ""}),
        json!({"type": "t", "payload": {}, "actor": "a", "source": 1}),
        json!({"type": "t", "payload": {}, "actor": "a", "metadata": "x"}),
        json!({"type": "t", "payload": {}, "actor": "a", "refs": []}),
        json!({"type": "t", "payload": {}, "actor": "a", "refs": {"to_seq": -1}}),
        json!({"type": "t", "payload": {}, "actor": "a", "refs": {"step": "1"}}),
        json!({"type": "t", "payload": {}, "actor": "a", "refs": {"request_id": 1}}),
        json!({"type": "t", "payload": {}, "actor": "a", "refs": {"sequence_id": false}}),
        json!({"type": "t", "payload": {}, "actor": "a", "idempotency_key": ""}),
        json!({"type": "t", "payload": {}, "actor": "a", "idempotency_key": 7}),
        json!({"type": "t", "payload": {}, "actor": "a", "expected_seq": -1}),
        json!({"type": "t", "payload": {}, "actor": "a", "expected_seq": 1.5}),
        json!({"type": "t", "payload": {}, "actor": "a", "expected_seq": "2"}),
        json!([1, 2]),
    ];
    for bad in bad_events {
        assert_error(api.append("s", bad.clone()).await, 400, "invalid_event");
    }
    for malformed in ["{", "{\"type\":\"t\",}", "not json", "", "{\"a\":1}{"] {
        assert_error(
            api.post_raw("/v1/sessions/s/append", malformed).await,
            400,
            "invalid_json",
        );
    }
    // Invalid UTF-8: raw, and inside a string value.
    for bytes in [
        vec![0xff, 0xfe, 0xfd],
        b"{\"type\":\"t\",\"actor\":\"a\",\"payload\":{\"x\":\"\xc3\x28\"}}".to_vec(),
    ] {
        assert_error(
            api.post_raw("/v1/sessions/s/append", bytes).await,
            400,
            "invalid_json",
        );
    }
    let deep = format!(
        "{{\"type\":\"t\",\"actor\":\"a\",\"payload\":{{\"x\":{}{}}}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert_error(
        api.post_raw("/v1/sessions/s/append", deep).await,
        400,
        "invalid_json",
    );
    assert_error(
        api.append("nope", event("x")).await,
        404,
        "session_not_found",
    );
    // Nothing above was appended.
    let (_, session) = api.get("/v1/sessions/s").await;
    assert_eq!(session["last_seq"], 2);
    assert_eq!(api.get("/health/ready").await.0, 200, "still healthy");
}

#[tokio::test]
async fn idempotency_then_expected_seq() {
    let api = Api::start(&[]).await;
    api.create("s").await;
    let mut first = event("hello");
    first["idempotency_key"] = json!("k1");
    first["expected_seq"] = json!(0);
    assert_eq!(api.append("s", first.clone()).await.1["seq"], 1);
    assert_eq!(api.append("s", event("other")).await.1["seq"], 2);
    // Same key, same event: deduped with the original seq, even though expected_seq is stale.
    assert_eq!(
        api.append("s", first.clone()).await,
        (201, json!({"seq": 1, "last_seq": 2, "deduped": true}))
    );
    // Key order and whitespace do not make a different event.
    let reordered = r#"{ "idempotency_key":"k1", "actor":"agent:test", "payload": {"text":"hello"}, "type":"content" }"#;
    assert_eq!(
        api.post_raw("/v1/sessions/s/append", reordered).await.1["deduped"],
        true
    );
    let mut different = event("changed");
    different["idempotency_key"] = json!("k1");
    assert_error(
        api.append("s", different).await,
        409,
        "idempotency_conflict",
    );
    let mut with_source = event("hello");
    with_source["idempotency_key"] = json!("k1");
    with_source["source"] = json!("agent");
    assert_error(
        api.append("s", with_source).await,
        409,
        "idempotency_conflict",
    );
    let mut stale = event("late");
    stale["expected_seq"] = json!(1);
    assert_error(api.append("s", stale).await, 409, "expected_seq_conflict");
    let mut ok = event("now");
    ok["expected_seq"] = json!(2);
    assert_eq!(api.append("s", ok).await.1["seq"], 3);
    assert_eq!(api.get("/v1/sessions/s").await.1["last_seq"], 3);
}

#[tokio::test]
async fn idempotency_window_is_configurable() {
    let api = Api::start(&[("STARCITE_IDEMPOTENCY_WINDOW", "3")]).await;
    api.create("s").await;
    for i in 0..5 {
        let mut e = event("x");
        e["idempotency_key"] = json!(format!("k{i}"));
        api.append("s", e).await;
    }
    let mut recent = event("x");
    recent["idempotency_key"] = json!("k2");
    assert_eq!(api.append("s", recent).await.1["deduped"], true);
    let mut forgotten = event("x");
    forgotten["idempotency_key"] = json!("k0");
    assert_eq!(
        api.append("s", forgotten).await.1,
        json!({"seq": 6, "last_seq": 6, "deduped": false})
    );
}

#[tokio::test]
async fn body_limit_is_413() {
    let api = Api::start(&[("STARCITE_MAX_BODY_BYTES", "1024")]).await;
    api.create("s").await;
    assert_eq!(api.append("s", event(&"x".repeat(900))).await.0, 201);
    assert_error(
        api.append("s", event(&"x".repeat(2000))).await,
        413,
        "payload_too_large",
    );
    // Without a content-length (chunked) the limit still holds.
    let chunks = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(format!(
        "{{\"type\":\"t\",\"actor\":\"a\",\"payload\":{{\"x\":\"{}\"}}}}",
        "y".repeat(5000)
    ))]);
    let r = api
        .client
        .post(format!("{}/v1/sessions/s/append", api.server.url()))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 413);
    assert_eq!(api.get("/v1/sessions/s").await.1["last_seq"], 1);
}

#[tokio::test]
async fn default_body_limit_is_one_mebibyte() {
    let api = Api::start(&[]).await;
    api.create("s").await;
    assert_eq!(
        api.append("s", event(&"x".repeat(1000 * 1000))).await.0,
        201
    );
    // The server reads what the client is still sending before it answers, so the client
    // gets the 413 rather than a reset connection (this raced before); several times over.
    for _ in 0..10 {
        assert_error(
            api.append("s", event(&"x".repeat(1024 * 1024))).await,
            413,
            "payload_too_large",
        );
    }
}

async fn ws_read(
    ws: &mut (impl futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
              + Unpin),
) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("frame within 10 s")
            .expect("open")
            .expect("ok");
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).expect("json frame"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn tail_replays_then_streams_with_exact_frames() {
    let api = Api::start(&[]).await;
    api.create("s").await;
    let payload_text =
        r#"{"b": 1,  "a": [1, 2.50, 1e3, 12345678901234567890], "u": "\u00e9 ✓ \"q\" \n"}"#;
    let body = format!(
        r#"{{"type":"state","payload":{payload_text},"actor":"agent:researcher","source":"agent","idempotency_key":"run_123-step_8"}}"#
    );
    assert_eq!(api.post_raw("/v1/sessions/s/append", body).await.0, 201);
    api.append("s", event("two")).await;

    let (mut ws, _) =
        tokio_tungstenite::connect_async(api.server.ws_url("/v1/sessions/s/tail?cursor=0"))
            .await
            .expect("ws");
    let raw = loop {
        match ws.next().await.expect("frame").expect("ok") {
            Message::Text(t) => break t.to_string(),
            _ => continue,
        }
    };
    assert!(
        raw.contains(&format!("\"payload\":{payload_text}")),
        "payload byte-for-byte: {raw}"
    );
    let first: Value = serde_json::from_str(&raw).unwrap();
    let keys: Vec<&str> = first
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = vec![
        "seq",
        "type",
        "payload",
        "actor",
        "source",
        "metadata",
        "refs",
        "idempotency_key",
        "inserted_at",
    ];
    expected.sort_unstable();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, expected);
    assert_eq!(first["seq"], 1);
    assert_eq!(first["type"], "state");
    assert_eq!(first["source"], "agent");
    assert_eq!(first["metadata"], json!({}));
    assert_eq!(first["refs"], json!({}));
    assert_eq!(first["idempotency_key"], "run_123-step_8");
    assert!(is_rfc3339_utc(first["inserted_at"].as_str().unwrap()));
    assert_eq!(ws_read(&mut ws).await["seq"], 2);
    // Live: appended after the tail caught up.
    api.append("s", event("three")).await;
    let live = ws_read(&mut ws).await;
    assert_eq!(live["seq"], 3);
    assert_eq!(live["payload"]["text"], "three");
    assert!(live["source"].is_null() && live["idempotency_key"].is_null());
    // Inbound frames are ignored, pings answered.
    ws.send(Message::Text("hello?".into())).await.expect("send");
    ws.send(Message::Ping(vec![1, 2, 3].into()))
        .await
        .expect("ping");
    let pong = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await.expect("frame").expect("ok") {
                Message::Pong(p) => return p,
                _ => continue,
            }
        }
    })
    .await
    .expect("pong");
    assert_eq!(&pong[..], &[1, 2, 3]);
    api.append("s", event("four")).await;
    assert_eq!(ws_read(&mut ws).await["seq"], 4);

    // From a cursor: only later events.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(api.server.ws_url("/v1/sessions/s/tail?cursor=3"))
            .await
            .expect("ws");
    assert_eq!(ws_read(&mut ws).await["seq"], 4);
}

use futures_util::SinkExt;

#[tokio::test]
async fn tail_errors_before_upgrade() {
    let api = Api::start(&[]).await;
    api.create("s").await;
    for bad in ["-1", "abc", "1.5", "", "99999999999999999999999"] {
        assert_error(
            api.get(&format!("/v1/sessions/s/tail?cursor={bad}")).await,
            400,
            "invalid_cursor",
        );
    }
    assert_error(
        api.get("/v1/sessions/s/tail").await,
        400,
        "invalid_websocket_upgrade",
    );
    assert_error(
        api.get("/v1/sessions/s/tail?cursor=0").await,
        400,
        "invalid_websocket_upgrade",
    );
    assert_error(
        api.get("/v1/sessions/nope/tail").await,
        404,
        "session_not_found",
    );
    match tokio_tungstenite::connect_async(api.server.ws_url("/v1/sessions/nope/tail")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 404)
        }
        other => panic!("expected a 404 before upgrade, got {other:?}"),
    }
    match tokio_tungstenite::connect_async(api.server.ws_url("/v1/sessions/s/tail?cursor=x")).await
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 400)
        }
        other => panic!("expected a 400 before upgrade, got {other:?}"),
    }
}

#[tokio::test]
async fn events_page_and_other_routes() {
    let api = Api::start(&[]).await;
    api.create("s").await;
    for i in 0..5 {
        api.append("s", event(&format!("e{i}"))).await;
    }
    let (status, page) = api.get("/v1/sessions/s/events?cursor=1&limit=2").await;
    assert_eq!(status, 200);
    let seqs: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![2, 3]);
    assert_eq!(page["next_cursor"], 3);
    let (_, page) = api.get("/v1/sessions/s/events").await;
    assert_eq!(page["events"].as_array().unwrap().len(), 5);
    let (_, page) = api.get("/v1/sessions/s/events?cursor=5").await;
    assert_eq!(page, json!({"events": [], "next_cursor": 5}));
    for bad in ["0", "1001", "x", "-1"] {
        assert_error(
            api.get(&format!("/v1/sessions/s/events?limit={bad}")).await,
            400,
            "invalid_limit",
        );
    }
    assert_error(
        api.get("/v1/sessions/s/events?cursor=x").await,
        400,
        "invalid_cursor",
    );
    assert_error(
        api.get("/v1/sessions/nope/events").await,
        404,
        "session_not_found",
    );
    assert_error(api.get("/nope").await, 404, "not_found");
    assert_error(
        api.get("/v1/sessions/s/append/extra").await,
        404,
        "not_found",
    );
    assert_eq!(
        api.get("/health/live").await,
        (200, json!({"status": "ok"}))
    );
    assert_eq!(
        api.get("/health/ready").await,
        (200, json!({"status": "ok"}))
    );
    let (status, doc) = api.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["paths"]["/v1/sessions/{id}/append"]["post"].is_object());
}

#[tokio::test]
async fn metrics_expose_contract_names_with_buckets() {
    let api = Api::start(&[]).await;
    api.create("s").await;
    api.append("s", event("x")).await;
    let text = reqwest::get(format!("{}/metrics", api.server.url()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(text.contains("starcite_events_append_total 1"), "{text}");
    for name in [
        "starcite_events_payload_bytes_bucket{",
        "starcite_append_latency_seconds_bucket{le=\"0.001\"}",
        "starcite_http_requests_total{",
        "starcite_http_request_duration_seconds_bucket{",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
}
