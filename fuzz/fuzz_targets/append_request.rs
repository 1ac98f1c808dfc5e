//! `AppendRequest::parse` on arbitrary bodies: never panics, and what it accepts obeys the
//! request rules, is kept verbatim, renders into a well-formed event, and fingerprints
//! deterministically and independently of formatting.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use starcite_core::{render_event, AppendRequest, EventFields, Timestamp};

fn object(text: &str, what: &str) -> Map<String, Value> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        other => panic!("accepted {what} is not a JSON object: {text:?} -> {other:?}"),
    }
}

/// The fields of a stored event frame, read the way the archive reads them.
#[derive(serde::Deserialize)]
struct Frame<'a> {
    seq: u64,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(borrow)]
    payload: &'a RawValue,
    actor: String,
    source: Option<String>,
    #[serde(borrow)]
    metadata: &'a RawValue,
    #[serde(borrow)]
    refs: &'a RawValue,
    idempotency_key: Option<String>,
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = AppendRequest::parse(data) else {
        return;
    };
    let body = std::str::from_utf8(data).expect("an accepted body is UTF-8");

    assert!(!req.event_type.is_empty() && !req.actor.is_empty());
    assert!(req.source.as_ref().is_none_or(|s| !s.is_empty()));
    assert!(req.idempotency_key.as_ref().is_none_or(|k| !k.is_empty()));

    // Payload, metadata and refs are objects, kept as the exact text the client sent.
    let payload = object(&req.payload, "payload");
    let metadata = object(&req.metadata, "metadata");
    let refs = object(&req.refs, "refs");
    assert!(body.contains(req.payload.as_str()), "payload not verbatim");
    assert!(req.metadata == "{}" || body.contains(req.metadata.as_str()));
    assert!(req.refs == "{}" || body.contains(req.refs.as_str()));
    for key in ["to_seq", "step"] {
        assert!(
            refs.get(key).is_none_or(|v| v.as_u64().is_some()),
            "refs.{key}"
        );
    }
    for key in ["request_id", "sequence_id"] {
        assert!(refs.get(key).is_none_or(Value::is_string), "refs.{key}");
    }

    // Deterministic.
    assert_eq!(AppendRequest::parse(data).as_ref(), Ok(&req));

    // The stored event built from it is well-formed and carries the same fields.
    let frame_bytes = render_event(&EventFields {
        seq: 7,
        event_type: &req.event_type,
        payload: &req.payload,
        actor: &req.actor,
        source: req.source.as_deref(),
        metadata: &req.metadata,
        refs: &req.refs,
        idempotency_key: req.idempotency_key.as_deref(),
        inserted_at: Timestamp(1_770_562_801_123),
    });
    let frame: Frame = serde_json::from_slice(&frame_bytes).expect("rendered event is JSON");
    assert_eq!(frame.seq, 7);
    assert_eq!(frame.event_type, req.event_type);
    assert_eq!(frame.actor, req.actor);
    assert_eq!(frame.source, req.source);
    assert_eq!(frame.idempotency_key, req.idempotency_key);
    assert_eq!(frame.payload.get(), req.payload);
    assert_eq!(frame.metadata.get(), req.metadata);
    assert_eq!(frame.refs.get(), req.refs);

    // The fingerprint ignores formatting and key order: the same request written canonically
    // (keys in another order, objects re-serialised) is the same event. Skipped when
    // re-serialising does not give back the same values (float text round trips are not
    // exact in serde_json's default parser), since then it is not the same event.
    let canon = |m: &Map<String, Value>| serde_json::to_string(m).unwrap();
    let (p, m, r) = (canon(&payload), canon(&metadata), canon(&refs));
    if object(&p, "payload") == payload
        && object(&m, "metadata") == metadata
        && object(&r, "refs") == refs
    {
        let mut again = format!("{{\"refs\":{r},\"metadata\":{m},\"payload\":{p}");
        let mut string = |name: &str, v: &Option<String>| {
            if let Some(v) = v {
                again.push_str(&format!(
                    ",\"{name}\":{}",
                    serde_json::to_string(v).unwrap()
                ));
            }
        };
        string("idempotency_key", &req.idempotency_key);
        string("source", &req.source);
        string("actor", &Some(req.actor.clone()));
        string("type", &Some(req.event_type.clone()));
        if let Some(e) = req.expected_seq {
            again.push_str(&format!(",\"expected_seq\":{e}"));
        }
        again.push('}');
        let other = AppendRequest::parse(again.as_bytes()).expect("canonical form is accepted");
        assert_eq!(
            other.fingerprint, req.fingerprint,
            "fingerprint depends on formatting"
        );
        assert_eq!(other.event_type, req.event_type);
        assert_eq!(other.actor, req.actor);
        assert_eq!(other.source, req.source);
        assert_eq!(other.idempotency_key, req.idempotency_key);
        assert_eq!(other.expected_seq, req.expected_seq);
    }
});
