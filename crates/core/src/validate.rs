//! Parsing and validation of request bodies, done once at the boundary. Payload, metadata and
//! refs are kept as the exact JSON text the client sent so that they are stored and returned
//! byte-for-byte; a canonical form is derived only to compare events for idempotency.

use crate::ids::{SessionId, SessionIdError};
use serde_json::value::RawValue;
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashMap;
use xxhash_rust::xxh3::Xxh3;

/// Why a request body was refused. `Json` maps to `invalid_json`, the others to the
/// endpoint's own code (`invalid_event` or `invalid_session`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("{0}")]
    Field(String),
    #[error("{0}")]
    SessionId(#[from] SessionIdError),
}

/// The top-level fields of a body, each borrowing its exact text from the body: one parse,
/// no copy of the values.
type Fields<'a> = HashMap<Cow<'a, str>, &'a RawValue>;

fn parse_object(body: &[u8]) -> Result<Fields<'_>, ValidationError> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        // Well-formed JSON of the wrong shape (an array, a string…) is a rule violation.
        serde_json::error::Category::Data => {
            ValidationError::Field("request body must be a JSON object".into())
        }
        _ => ValidationError::Json(e.to_string()),
    })
}

/// Present and not `null`.
fn present<'a>(fields: &Fields<'a>, name: &str) -> Option<&'a RawValue> {
    fields.get(name).copied().filter(|v| v.get() != "null")
}

fn string_field(fields: &Fields, name: &str) -> Result<Option<String>, ValidationError> {
    match present(fields, name) {
        None => Ok(None),
        Some(raw) => serde_json::from_str::<String>(raw.get())
            .map(Some)
            .map_err(|_| ValidationError::Field(format!("`{name}` must be a string"))),
    }
}

fn non_empty_string(fields: &Fields, name: &str) -> Result<Option<String>, ValidationError> {
    match string_field(fields, name)? {
        Some(s) if s.is_empty() => Err(ValidationError::Field(format!(
            "`{name}` must be a non-empty string"
        ))),
        other => Ok(other),
    }
}

fn required_string(fields: &Fields, name: &str) -> Result<String, ValidationError> {
    non_empty_string(fields, name)?
        .ok_or_else(|| ValidationError::Field(format!("`{name}` is required")))
}

/// A JSON object kept as its original text, plus its parsed form for canonical comparison.
fn object_field(fields: &Fields, name: &str) -> Result<Option<(String, Value)>, ValidationError> {
    let Some(raw) = present(fields, name) else {
        return Ok(None);
    };
    if !raw.get().starts_with('{') {
        return Err(ValidationError::Field(format!(
            "`{name}` must be a JSON object"
        )));
    }
    // Parsed one level down, as it will sit inside the stored event, so serde_json's nesting
    // limit (128 levels) refuses here anything an event reader with default limits could not
    // read back, instead of storing it.
    #[derive(serde::Deserialize)]
    struct Nested {
        v: Value,
    }
    let nested: Nested = serde_json::from_str(&format!("{{\"v\":{}}}", raw.get()))
        .map_err(|e| ValidationError::Json(format!("`{name}`: {e}")))?;
    Ok(Some((raw.get().to_owned(), nested.v)))
}

/// `POST /v1/sessions` body.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CreateRequest {
    pub id: Option<SessionId>,
    pub title: Option<String>,
    /// Exact JSON text of the metadata object (`{}` when omitted).
    pub metadata: String,
}

impl CreateRequest {
    /// An empty body is a valid create request (every field is optional).
    pub fn parse(body: &[u8]) -> Result<Self, ValidationError> {
        if body.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(CreateRequest {
                id: None,
                title: None,
                metadata: "{}".into(),
            });
        }
        let fields = parse_object(body)?;
        let id = match string_field(&fields, "id")? {
            Some(raw) => Some(SessionId::parse(&raw)?),
            None if fields.contains_key("id") => {
                return Err(ValidationError::Field("`id` must be a string".into()))
            }
            None => None,
        };
        let title = string_field(&fields, "title")?;
        let metadata = object_field(&fields, "metadata")?
            .map(|(raw, _)| raw)
            .unwrap_or_else(|| "{}".into());
        Ok(CreateRequest {
            id,
            title,
            metadata,
        })
    }
}

/// `POST /v1/sessions/:id/append` body, validated. Serialisable so that a node can hand a
/// validated request to the group's leader.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AppendRequest {
    pub event_type: String,
    pub actor: String,
    pub source: Option<String>,
    /// Exact JSON text of the payload object.
    pub payload: String,
    /// Exact JSON text of the metadata object (`{}` when omitted).
    pub metadata: String,
    /// Exact JSON text of the refs object (`{}` when omitted).
    pub refs: String,
    pub idempotency_key: Option<String>,
    pub expected_seq: Option<u64>,
    /// Hash of the canonical form of (type, payload, actor, source, metadata, refs): two
    /// requests with the same idempotency key are "the same event" iff these are equal.
    pub fingerprint: u128,
}

impl AppendRequest {
    pub fn parse(body: &[u8]) -> Result<Self, ValidationError> {
        let fields = parse_object(body)?;
        let event_type = required_string(&fields, "type")?;
        let actor = required_string(&fields, "actor")?;
        let source = non_empty_string(&fields, "source")?;
        let (payload, payload_value) = object_field(&fields, "payload")?
            .ok_or_else(|| ValidationError::Field("`payload` is required".into()))?;
        let (metadata, metadata_value) = object_field(&fields, "metadata")?
            .unwrap_or_else(|| ("{}".into(), Value::Object(Default::default())));
        let (refs, refs_value) = object_field(&fields, "refs")?
            .unwrap_or_else(|| ("{}".into(), Value::Object(Default::default())));
        validate_refs(&refs_value)?;
        let idempotency_key = non_empty_string(&fields, "idempotency_key")?;
        let expected_seq = match present(&fields, "expected_seq") {
            None => None,
            Some(raw) => Some(serde_json::from_str::<u64>(raw.get()).map_err(|_| {
                ValidationError::Field("`expected_seq` must be a non-negative integer".into())
            })?),
        };
        let fingerprint = fingerprint(
            &event_type,
            &payload_value,
            &actor,
            source.as_deref(),
            &metadata_value,
            &refs_value,
        );
        Ok(AppendRequest {
            event_type,
            actor,
            source,
            payload,
            metadata,
            refs,
            idempotency_key,
            expected_seq,
            fingerprint,
        })
    }
}

fn validate_refs(refs: &Value) -> Result<(), ValidationError> {
    let Value::Object(map) = refs else {
        return Ok(());
    };
    for key in ["to_seq", "step"] {
        if let Some(v) = map.get(key) {
            if v.as_u64().is_none() {
                return Err(ValidationError::Field(format!(
                    "`refs.{key}` must be a non-negative integer"
                )));
            }
        }
    }
    for key in ["request_id", "sequence_id"] {
        if let Some(v) = map.get(key) {
            if !v.is_string() {
                return Err(ValidationError::Field(format!(
                    "`refs.{key}` must be a string"
                )));
            }
        }
    }
    Ok(())
}

/// Canonical hash: parsed values re-serialised (object keys sorted, whitespace dropped), each
/// part length-prefixed so that field boundaries cannot be confused.
fn fingerprint(
    event_type: &str,
    payload: &Value,
    actor: &str,
    source: Option<&str>,
    metadata: &Value,
    refs: &Value,
) -> u128 {
    let mut hasher = Xxh3::new();
    let mut buf = Vec::with_capacity(256);
    let part = |hasher: &mut Xxh3, bytes: &[u8]| {
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    let mut json_part = |hasher: &mut Xxh3, value: &Value| {
        buf.clear();
        // Serialising a Value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut buf, value);
        part(hasher, &buf);
    };
    part(&mut hasher, event_type.as_bytes());
    json_part(&mut hasher, payload);
    part(&mut hasher, actor.as_bytes());
    match source {
        Some(s) => {
            part(&mut hasher, b"some");
            part(&mut hasher, s.as_bytes())
        }
        None => part(&mut hasher, b"none"),
    }
    json_part(&mut hasher, metadata);
    json_part(&mut hasher, refs);
    hasher.digest128()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any byte string gets an answer, never a panic; accepted payloads are objects kept
        /// verbatim.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(req) = AppendRequest::parse(&body) {
                prop_assert!(req.payload.starts_with("{"), "payload is an object");
                prop_assert!(!req.event_type.is_empty() && !req.actor.is_empty());
            }
            let _ = CreateRequest::parse(&body);
        }

        #[test]
        fn json_shaped_bodies_never_panic(
            t in proptest::option::of(".{0,8}"),
            payload in prop_oneof![Just("{}".to_string()), Just("[]".to_string()), "\\{\"[a-z]{1,4}\":[0-9]{1,3}\\}", Just("null".to_string())],
            expected in proptest::option::of(-3i64..5),
        ) {
            let mut body = format!("{{\"actor\":\"a\",\"payload\":{payload}");
            if let Some(t) = t { body.push_str(&format!(",\"type\":{}", serde_json::to_string(&t).unwrap())); }
            if let Some(e) = expected { body.push_str(&format!(",\"expected_seq\":{e}")); }
            body.push('}');
            match AppendRequest::parse(body.as_bytes()) {
                Ok(req) => prop_assert!(req.expected_seq.is_none_or(|e| e < 5)),
                Err(ValidationError::Field(_)) | Err(ValidationError::Json(_)) => {}
                Err(other) => prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }

    fn field_err(body: &str) -> String {
        match AppendRequest::parse(body.as_bytes()) {
            Err(ValidationError::Field(m)) => m,
            other => panic!("expected field error for {body}, got {other:?}"),
        }
    }

    #[test]
    fn accepted_nesting_is_readable_inside_the_stored_event() {
        let mut accepted = 0;
        for depth in 120..135 {
            let payload = format!("{{\"x\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
            let body = format!(r#"{{"type":"t","actor":"a","payload":{payload}}}"#);
            if AppendRequest::parse(body.as_bytes()).is_ok() {
                accepted = depth;
                let event = format!(r#"{{"seq":1,"payload":{payload}}}"#);
                assert!(
                    serde_json::from_str::<Value>(&event).is_ok(),
                    "payload nested {depth} deep was accepted but its event cannot be read"
                );
            }
        }
        assert!(accepted >= 120, "ordinary nesting must be accepted");
        assert!(accepted < 134, "nesting past the limit must be refused");
    }

    #[test]
    fn parses_a_full_append() {
        let body = br#"{"type":"state","payload":{"b":1, "a":[1,2]},"actor":"agent:x","source":"agent","metadata":{"m":true},"refs":{"to_seq":3,"step":0,"request_id":"r"},"idempotency_key":"k1","expected_seq":7}"#;
        let req = AppendRequest::parse(body).unwrap();
        assert_eq!(req.event_type, "state");
        assert_eq!(
            req.payload, r#"{"b":1, "a":[1,2]}"#,
            "payload kept verbatim"
        );
        assert_eq!(req.source.as_deref(), Some("agent"));
        assert_eq!(req.idempotency_key.as_deref(), Some("k1"));
        assert_eq!(req.expected_seq, Some(7));
    }

    #[test]
    fn defaults_for_optional_fields() {
        let req = AppendRequest::parse(br#"{"type":"t","payload":{},"actor":"a"}"#).unwrap();
        assert_eq!(req.metadata, "{}");
        assert_eq!(req.refs, "{}");
        assert_eq!(req.source, None);
        assert_eq!(req.expected_seq, None);
    }

    #[test]
    fn rejects_rule_violations() {
        assert!(field_err(r#"{"payload":{},"actor":"a"}"#).contains("type"));
        assert!(field_err(r#"{"type":"","payload":{},"actor":"a"}"#).contains("type"));
        assert!(field_err(r#"{"type":1,"payload":{},"actor":"a"}"#).contains("type"));
        assert!(field_err(r#"{"type":"t","actor":"a"}"#).contains("payload"));
        assert!(field_err(r#"{"type":"t","payload":[1],"actor":"a"}"#).contains("payload"));
        assert!(field_err(r#"{"type":"t","payload":"x","actor":"a"}"#).contains("payload"));
        assert!(field_err(r#"{"type":"t","payload":{}}"#).contains("actor"));
        assert!(
            field_err(r#"{"type":"t","payload":{},"actor":"a","source":""}"#).contains("source")
        );
        assert!(
            field_err(r#"{"type":"t","payload":{},"actor":"a","metadata":[]}"#)
                .contains("metadata")
        );
        assert!(
            field_err(r#"{"type":"t","payload":{},"actor":"a","refs":{"to_seq":-1}}"#)
                .contains("to_seq")
        );
        assert!(
            field_err(r#"{"type":"t","payload":{},"actor":"a","refs":{"step":1.5}}"#)
                .contains("step")
        );
        assert!(
            field_err(r#"{"type":"t","payload":{},"actor":"a","refs":{"request_id":5}}"#)
                .contains("request_id")
        );
        assert!(
            field_err(r#"{"type":"t","payload":{},"actor":"a","idempotency_key":""}"#)
                .contains("idempotency_key")
        );
        for bad in ["-1", "1.5", "\"3\"", "true", "18446744073709551616"] {
            let body = format!(r#"{{"type":"t","payload":{{}},"actor":"a","expected_seq":{bad}}}"#);
            assert!(field_err(&body).contains("expected_seq"), "{bad}");
        }
        assert!(field_err("[]").contains("object"));
    }

    #[test]
    fn malformed_and_deep_json_is_invalid_json() {
        for body in ["", "{", "{\"type\":", "nul", "{\"a\":1}x"] {
            assert!(
                matches!(
                    AppendRequest::parse(body.as_bytes()),
                    Err(ValidationError::Json(_))
                ),
                "{body:?}"
            );
        }
        let deep = format!(
            r#"{{"type":"t","actor":"a","payload":{{"x":{}{}}}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(matches!(
            AppendRequest::parse(deep.as_bytes()),
            Err(ValidationError::Json(_))
        ));
        let deep_top = "[".repeat(100_000);
        assert!(AppendRequest::parse(deep_top.as_bytes()).is_err());
    }

    #[test]
    fn fingerprint_ignores_formatting_but_not_content() {
        let a =
            AppendRequest::parse(br#"{"type":"t","payload":{"a":1,"b":2},"actor":"x"}"#).unwrap();
        let b = AppendRequest::parse(
            br#"{ "actor":"x", "payload":{ "b":2, "a":1 }, "type":"t", "metadata":{} }"#,
        )
        .unwrap();
        let c =
            AppendRequest::parse(br#"{"type":"t","payload":{"a":1,"b":3},"actor":"x"}"#).unwrap();
        let d = AppendRequest::parse(
            br#"{"type":"t","payload":{"a":1,"b":2},"actor":"x","source":"s"}"#,
        )
        .unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_ne!(a.fingerprint, c.fingerprint);
        assert_ne!(a.fingerprint, d.fingerprint);
    }

    #[test]
    fn create_request_rules() {
        let empty = CreateRequest::parse(b"").unwrap();
        assert_eq!(empty.id, None);
        assert_eq!(empty.metadata, "{}");
        let full =
            CreateRequest::parse(br#"{"id":"ses_1","title":"","metadata":{"t":"acme"}}"#).unwrap();
        assert_eq!(full.id.unwrap().as_str(), "ses_1");
        assert_eq!(full.title.as_deref(), Some(""));
        assert_eq!(full.metadata, r#"{"t":"acme"}"#);
        assert!(matches!(
            CreateRequest::parse(br#"{"id":"a b"}"#),
            Err(ValidationError::SessionId(_))
        ));
        assert!(CreateRequest::parse(br#"{"id":""}"#).is_err());
        assert!(CreateRequest::parse(br#"{"id":5}"#).is_err());
        assert!(CreateRequest::parse(br#"{"title":5}"#).is_err());
        assert!(CreateRequest::parse(br#"{"metadata":"x"}"#).is_err());
        assert!(matches!(
            CreateRequest::parse(b"{"),
            Err(ValidationError::Json(_))
        ));
    }
}
