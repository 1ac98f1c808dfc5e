//! The stored form of an event is its wire JSON, rendered once by the leader and then shared
//! (as bytes) by the log, memory, every tail and the archive.

use crate::time::Timestamp;

/// Everything an event frame carries. Payload, metadata and refs are already-valid JSON text.
#[derive(Debug, Clone, Copy)]
pub struct EventFields<'a> {
    pub seq: u64,
    pub event_type: &'a str,
    pub payload: &'a str,
    pub actor: &'a str,
    pub source: Option<&'a str>,
    pub metadata: &'a str,
    pub refs: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub inserted_at: Timestamp,
}

fn push_json_string(out: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn push_optional_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => push_json_string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// Renders the event frame exactly as the contract shows it.
pub fn render_event(f: &EventFields<'_>) -> Vec<u8> {
    frame_with_seq(f.seq, &render_event_body(f))
}

/// Everything of the frame after its seq: `,"type":…,"inserted_at":"…"}`. The leader renders
/// this before proposing (it does not know the seq yet); apply puts the seq in front.
pub fn render_event_body(f: &EventFields<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        140 + f.payload.len() + f.metadata.len() + f.refs.len() + f.event_type.len(),
    );
    out.extend_from_slice(b",\"type\":");
    push_json_string(&mut out, f.event_type);
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(f.payload.as_bytes());
    out.extend_from_slice(b",\"actor\":");
    push_json_string(&mut out, f.actor);
    out.extend_from_slice(b",\"source\":");
    push_optional_string(&mut out, f.source);
    out.extend_from_slice(b",\"metadata\":");
    out.extend_from_slice(f.metadata.as_bytes());
    out.extend_from_slice(b",\"refs\":");
    out.extend_from_slice(f.refs.as_bytes());
    out.extend_from_slice(b",\"idempotency_key\":");
    push_optional_string(&mut out, f.idempotency_key);
    out.extend_from_slice(b",\"inserted_at\":\"");
    out.extend_from_slice(f.inserted_at.to_string().as_bytes());
    out.extend_from_slice(b"\"}");
    out
}

/// The stored frame: `{"seq":N` followed by a body from [`render_event_body`].
/// The seq at the start of a stored frame (`{"seq":N,…`), read without parsing the frame.
pub fn frame_seq(frame: &[u8]) -> Option<u64> {
    let rest = frame.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// The first of the seqs `after + 1 ..= after + want` that `frames` does not carry in its
/// place, if any: a tier that answers a read with fewer or other events than asked for has a
/// hole, which a reader must report rather than skip.
pub fn first_missing_seq(frames: &[impl AsRef<[u8]>], after: u64, want: usize) -> Option<u64> {
    let misplaced = (after + 1..)
        .zip(frames)
        .find(|(seq, frame)| frame_seq(frame.as_ref()) != Some(*seq))
        .map(|(seq, _)| seq);
    misplaced.or_else(|| (frames.len() < want).then(|| after + 1 + frames.len() as u64))
}

pub fn frame_with_seq(seq: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 28);
    out.extend_from_slice(b"{\"seq\":");
    out.extend_from_slice(seq.to_string().as_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn reads_the_seq_of_a_frame() {
        assert_eq!(frame_seq(br#"{"seq":42,"type":"t"}"#), Some(42));
        assert_eq!(frame_seq(br#"{"seq":1}"#), Some(1));
        assert_eq!(frame_seq(br#"{"type":"t","seq":1}"#), None);
        assert_eq!(frame_seq(b""), None);
    }

    #[test]
    fn finds_the_first_event_out_of_place() {
        let frames = [&br#"{"seq":5}"#[..], br#"{"seq":6}"#, br#"{"seq":8}"#];
        assert_eq!(first_missing_seq(&frames[..2], 4, 2), None);
        assert_eq!(first_missing_seq(&frames[..2], 4, 3), Some(7), "one short");
        assert_eq!(first_missing_seq(&frames, 4, 3), Some(7), "a gap");
        assert_eq!(
            first_missing_seq(&frames, 3, 3),
            Some(4),
            "not the events asked for"
        );
        assert_eq!(first_missing_seq(&[] as &[&[u8]], 3, 0), None);
        assert_eq!(first_missing_seq(&[] as &[&[u8]], 3, 1), Some(4));
    }

    #[test]
    fn renders_valid_json_with_every_field() {
        let bytes = render_event(&EventFields {
            seq: 42,
            event_type: "state",
            payload: r#"{"state": "running", "q":"\"quoted\" ✓"}"#,
            actor: "agent:researcher",
            source: Some("agent"),
            metadata: "{}",
            refs: r#"{"to_seq":41}"#,
            idempotency_key: Some("run_123-step_8"),
            inserted_at: Timestamp(1_770_562_801_123),
        });
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.contains(r#""payload":{"state": "running", "q":"\"quoted\" ✓"}"#));
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["seq"], 42);
        assert_eq!(v["type"], "state");
        assert_eq!(v["actor"], "agent:researcher");
        assert_eq!(v["source"], "agent");
        assert_eq!(v["refs"]["to_seq"], 41);
        assert_eq!(v["idempotency_key"], "run_123-step_8");
        assert_eq!(v["inserted_at"], "2026-02-08T15:00:01.123Z");
    }

    #[test]
    fn absent_optionals_render_as_null() {
        let bytes = render_event(&EventFields {
            seq: 1,
            event_type: "t\n\"x\"",
            payload: "{}",
            actor: "a",
            source: None,
            metadata: "{}",
            refs: "{}",
            idempotency_key: None,
            inserted_at: Timestamp(0),
        });
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["type"], "t\n\"x\"");
        assert!(v["source"].is_null());
        assert!(v["idempotency_key"].is_null());
    }
}
