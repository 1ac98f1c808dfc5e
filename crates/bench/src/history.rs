//! The drill's history checker. Pure: it gets everything the drill recorded (acknowledged
//! appends, conflicts, every node's stored history, every tailer's deliveries, the archive's
//! rows) and returns the violations of the contract's guarantees. No I/O, no clocks, so every
//! check is unit-tested with histories that break it.

use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};

/// An append the server acknowledged with `201`.
#[derive(Debug, Clone, PartialEq)]
pub struct Ack {
    pub session: String,
    pub key: String,
    pub payload: Value,
    pub seq: u64,
    pub last_seq: u64,
    pub deduped: bool,
    pub expected_seq: Option<u64>,
    /// Requests sent for this key (1 = the first try was answered).
    pub attempts: u32,
}

/// An append answered `409 expected_seq_conflict`: nothing may have been stored for its key.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    pub session: String,
    pub key: String,
    pub expected_seq: u64,
}

/// One event a tailer received, with the number of the connection it came on.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub conn: u32,
    pub event: Value,
}

/// Everything one tailer received, in arrival order, across its reconnects (each started with
/// the last received seq as cursor, the first with cursor 0).
#[derive(Debug, Clone, PartialEq)]
pub struct TailLog {
    pub tailer: usize,
    pub session: String,
    pub deliveries: Vec<Delivery>,
}

/// One node's full stored history: session → events in the order the paged read returned them.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeHistory {
    pub node: String,
    pub sessions: BTreeMap<String, Vec<Value>>,
}

/// One row of the archive's `events` table (`frame` is the stored event JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct ArchivedRow {
    pub seq: u64,
    pub frame: Option<Value>,
}

#[derive(Debug, Clone, Default)]
pub struct History {
    pub sessions: Vec<String>,
    /// `last_seq` per session as the cluster reports it at the end.
    pub last_seq: BTreeMap<String, u64>,
    pub acks: Vec<Ack>,
    pub conflicts: Vec<Conflict>,
    /// Every idempotency key the drill ever sent (acknowledged or not).
    pub sent_keys: HashSet<String>,
    /// The first node is the reference the others and the tails are compared with.
    pub nodes: Vec<NodeHistory>,
    pub tails: Vec<TailLog>,
    /// The archives read at the end: one shared (Postgres), or each node's own file.
    pub archives: Vec<ArchiveCopy>,
    /// How many of the nodes' own archives must hold each session whole (its replicas);
    /// 0 with a shared archive.
    pub archive_copies_per_session: usize,
}

/// What one archive holds: its rows per session, in `ORDER BY seq`.
#[derive(Debug, Clone, Default)]
pub struct ArchiveCopy {
    /// `archive` for the shared one, `archive of n2` for a node's own.
    pub name: String,
    pub rows: BTreeMap<String, Vec<ArchivedRow>>,
    /// A shared archive must hold every session; a node's own holds only those the node
    /// replicates (each of them whole).
    pub holds_every_session: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Violation {
    pub kind: &'static str,
    pub session: String,
    pub detail: String,
}

fn violation(kind: &'static str, session: &str, detail: String) -> Violation {
    Violation {
        kind,
        session: session.to_owned(),
        detail,
    }
}

pub fn event_seq(event: &Value) -> Option<u64> {
    event.get("seq").and_then(Value::as_u64)
}

fn event_key(event: &Value) -> Option<&str> {
    event.get("idempotency_key").and_then(Value::as_str)
}

/// `[3, 4, 5, 9]` → `"3..=5, 9"`.
fn ranges(seqs: &[u64]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < seqs.len() {
        let start = seqs[i];
        let mut end = start;
        while i + 1 < seqs.len() && seqs[i + 1] == end + 1 {
            i += 1;
            end = seqs[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}..={end}")
        });
        i += 1;
        if out.len() >= 10 && i < seqs.len() {
            out.push(format!("… ({} more)", seqs.len() - i));
            break;
        }
    }
    out.join(", ")
}

/// Seqs must be exactly `1..=last_seq`, ascending, each once. Reports duplicates, reorders,
/// gaps and seqs beyond `last_seq`. `what` names the source (`node n2`, `archive`).
fn check_sequence(
    what: &str,
    session: &str,
    seqs: impl IntoIterator<Item = Option<u64>>,
    last_seq: u64,
    kinds: [&'static str; 4],
    out: &mut Vec<Violation>,
) {
    let [dup, reorder, gap, beyond] = kinds;
    let mut seen = HashSet::new();
    let mut prev = 0u64;
    for (i, seq) in seqs.into_iter().enumerate() {
        let Some(seq) = seq else {
            out.push(violation(
                "malformed_event",
                session,
                format!("{what}: item {i} has no numeric seq"),
            ));
            continue;
        };
        if !seen.insert(seq) {
            out.push(violation(
                dup,
                session,
                format!("{what}: seq {seq} stored more than once (position {i})"),
            ));
        } else if seq < prev {
            out.push(violation(
                reorder,
                session,
                format!("{what}: seq {seq} at position {i} comes after seq {prev}"),
            ));
        }
        prev = prev.max(seq);
        if seq == 0 || seq > last_seq {
            out.push(violation(
                beyond,
                session,
                format!("{what}: seq {seq} outside 1..={last_seq} (the session's last_seq)"),
            ));
        }
    }
    let missing: Vec<u64> = (1..=last_seq).filter(|s| !seen.contains(s)).collect();
    if !missing.is_empty() {
        out.push(violation(
            gap,
            session,
            format!(
                "{what}: seqs {} missing (last_seq {last_seq})",
                ranges(&missing)
            ),
        ));
    }
}

/// The first difference between two histories of one session, if any.
fn first_difference(a: &[Value], b: &[Value]) -> Option<String> {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x != y {
            return Some(format!("position {i}: {x} vs {y}"));
        }
    }
    if a.len() != b.len() {
        return Some(format!("{} events vs {}", a.len(), b.len()));
    }
    None
}

fn check_node(
    h: &History,
    node: &NodeHistory,
    conflict_keys: &HashSet<(&str, &str)>,
    out: &mut Vec<Violation>,
) {
    let what = format!("node {}", node.node);
    for session in &h.sessions {
        let last_seq = h.last_seq.get(session).copied().unwrap_or(0);
        let Some(events) = node.sessions.get(session) else {
            out.push(violation(
                "session_missing",
                session,
                format!("{what}: the session's history was not read"),
            ));
            continue;
        };
        check_sequence(
            &what,
            session,
            events.iter().map(event_seq),
            last_seq,
            ["duplicate_seq", "reorder", "gap", "seq_beyond_last_seq"],
            out,
        );
        let mut keys: HashMap<&str, u64> = HashMap::new();
        for event in events {
            let seq = event_seq(event).unwrap_or(0);
            let Some(key) = event_key(event) else {
                out.push(violation(
                    "unknown_event",
                    session,
                    format!(
                        "{what}: seq {seq} has no idempotency key (every drill append has one)"
                    ),
                ));
                continue;
            };
            if let Some(first) = keys.insert(key, seq) {
                out.push(violation(
                    "key_stored_twice",
                    session,
                    format!("{what}: idempotency key {key} stored at seq {first} and at seq {seq}"),
                ));
            }
            if !h.sent_keys.contains(key) {
                out.push(violation(
                    "unknown_event",
                    session,
                    format!("{what}: seq {seq} has key {key}, which the drill never sent"),
                ));
            }
            if conflict_keys.contains(&(session.as_str(), key)) {
                out.push(violation(
                    "conflict_stored",
                    session,
                    format!(
                        "{what}: key {key} was answered expected_seq_conflict, yet is stored at seq {seq}"
                    ),
                ));
            }
        }
        let by_seq: HashMap<u64, &Value> = events
            .iter()
            .filter_map(|e| event_seq(e).map(|s| (s, e)))
            .collect();
        for ack in h.acks.iter().filter(|a| &a.session == session) {
            let answer = if ack.deduped { "deduped answer" } else { "ack" };
            match by_seq.get(&ack.seq) {
                Some(stored) if event_key(stored) == Some(ack.key.as_str()) => {
                    if stored.get("payload") != Some(&ack.payload) {
                        out.push(violation(
                            "ack_payload_mismatch",
                            session,
                            format!(
                                "{what}: seq {} (key {}) holds payload {}, acked {}",
                                ack.seq,
                                ack.key,
                                stored.get("payload").unwrap_or(&Value::Null),
                                ack.payload
                            ),
                        ));
                    }
                }
                other => {
                    let holder = other
                        .map(|e| format!("holds key {:?}", event_key(e)))
                        .unwrap_or_else(|| "is not stored".into());
                    let elsewhere = keys
                        .get(ack.key.as_str())
                        .map(|s| format!("; the key is stored at seq {s}"))
                        .unwrap_or_else(|| "; the key is not stored at all".into());
                    out.push(violation(
                        if ack.deduped {
                            "dedupe_wrong_seq"
                        } else {
                            "ack_lost"
                        },
                        session,
                        format!(
                            "{what}: {answer} for key {} said seq {}, which {holder}{elsewhere}",
                            ack.key, ack.seq
                        ),
                    ));
                }
            }
        }
    }
}

/// Checks a recorded history; returns every violation found (empty = the history is valid).
pub fn check(h: &History) -> Vec<Violation> {
    let mut out = Vec::new();
    let conflict_keys: HashSet<(&str, &str)> = h
        .conflicts
        .iter()
        .map(|c| (c.session.as_str(), c.key.as_str()))
        .collect();

    // The acknowledgements among themselves.
    let mut by_seq: HashMap<(&str, u64), &Ack> = HashMap::new();
    let mut by_key: HashMap<(&str, &str), &Ack> = HashMap::new();
    for ack in &h.acks {
        let s = ack.session.as_str();
        if ack.last_seq < ack.seq || ack.seq == 0 {
            out.push(violation(
                "ack_inconsistent",
                s,
                format!(
                    "key {}: seq {} with last_seq {}",
                    ack.key, ack.seq, ack.last_seq
                ),
            ));
        }
        if let Some(expected) = ack.expected_seq {
            if ack.seq != expected + 1 {
                out.push(violation(
                    "expected_seq_violated",
                    s,
                    format!(
                        "key {}: appended with expected_seq {expected} but acked at seq {}",
                        ack.key, ack.seq
                    ),
                ));
            }
        }
        if ack.deduped && ack.attempts <= 1 {
            out.push(violation(
                "dedupe_without_retry",
                s,
                format!(
                    "key {}: the first request for a new key was answered deduped (seq {})",
                    ack.key, ack.seq
                ),
            ));
        }
        if let Some(other) = by_seq.insert((s, ack.seq), ack) {
            if other.key != ack.key {
                let how = match (other.expected_seq, ack.expected_seq) {
                    (Some(a), Some(b)) => {
                        format!(" (both with expected_seq: {a} and {b} — two writers both won)")
                    }
                    _ => String::new(),
                };
                out.push(violation(
                    "seq_acked_twice",
                    s,
                    format!(
                        "seq {} acknowledged to key {} and to key {}{how}",
                        ack.seq, other.key, ack.key
                    ),
                ));
            }
        }
        if let Some(other) = by_key.insert((s, ack.key.as_str()), ack) {
            if other.seq != ack.seq {
                out.push(violation(
                    "key_acked_at_two_seqs",
                    s,
                    format!(
                        "key {} acknowledged at seq {} and {}",
                        ack.key, other.seq, ack.seq
                    ),
                ));
            }
        }
        if conflict_keys.contains(&(s, ack.key.as_str())) {
            out.push(violation(
                "ack_and_conflict",
                s,
                format!(
                    "key {} was both acknowledged (seq {}) and answered expected_seq_conflict",
                    ack.key, ack.seq
                ),
            ));
        }
    }

    // Every node's stored history on its own, then against the reference (the first node).
    for node in &h.nodes {
        check_node(h, node, &conflict_keys, &mut out);
    }
    let reference = h.nodes.first();
    if let Some(reference) = reference {
        for node in &h.nodes[1..] {
            for session in &h.sessions {
                let (Some(a), Some(b)) =
                    (reference.sessions.get(session), node.sessions.get(session))
                else {
                    continue;
                };
                if let Some(diff) = first_difference(a, b) {
                    out.push(violation(
                        "node_divergence",
                        session,
                        format!("node {} vs node {}: {diff}", reference.node, node.node),
                    ));
                }
            }
        }
    }
    let reference_events: HashMap<(&str, u64), &Value> = reference
        .map(|r| {
            r.sessions
                .iter()
                .flat_map(|(s, events)| {
                    events
                        .iter()
                        .filter_map(move |e| event_seq(e).map(|seq| ((s.as_str(), seq), e)))
                })
                .collect()
        })
        .unwrap_or_default();

    // Tails: across reconnects the deliveries must be exactly 1, 2, 3 … last_seq, each equal to
    // the stored event.
    for tail in &h.tails {
        let s = tail.session.as_str();
        let what = format!("tailer {}", tail.tailer);
        let mut next = 1u64;
        let mut prev_conn = None;
        for (i, d) in tail.deliveries.iter().enumerate() {
            let boundary = if prev_conn.is_some() && prev_conn != Some(d.conn) {
                " (first event after a reconnect)"
            } else {
                ""
            };
            prev_conn = Some(d.conn);
            let Some(seq) = event_seq(&d.event) else {
                out.push(violation(
                    "malformed_event",
                    s,
                    format!("{what}: delivery {i} has no numeric seq"),
                ));
                continue;
            };
            if seq < next {
                out.push(violation(
                    "tail_duplicate_or_reorder",
                    s,
                    format!(
                        "{what}: connection {} delivered seq {seq} after seq {}{boundary}",
                        d.conn,
                        next - 1
                    ),
                ));
            } else {
                if seq > next {
                    let missing: Vec<u64> = (next..seq).collect();
                    out.push(violation(
                        "tail_skipped",
                        s,
                        format!(
                            "{what}: connection {} delivered seq {seq} after seq {}, skipping {}{boundary}",
                            d.conn,
                            next - 1,
                            ranges(&missing)
                        ),
                    ));
                }
                next = seq + 1;
            }
            match reference_events.get(&(s, seq)) {
                Some(stored) if *stored == &d.event => {}
                Some(stored) => out.push(violation(
                    "tail_event_mismatch",
                    s,
                    format!(
                        "{what}: seq {seq} delivered as {} but stored as {stored}",
                        d.event
                    ),
                )),
                // (A session whose history could not be read is reported once, above.)
                None if reference.is_some_and(|r| r.sessions.contains_key(s)) => {
                    out.push(violation(
                        "tail_event_mismatch",
                        s,
                        format!("{what}: seq {seq} delivered but not stored"),
                    ))
                }
                None => {}
            }
        }
        let last_seq = h.last_seq.get(s).copied().unwrap_or(0);
        if next <= last_seq {
            out.push(violation(
                "tail_incomplete",
                s,
                format!(
                    "{what}: received up to seq {} of {last_seq} by the end",
                    next - 1
                ),
            ));
        }
    }

    // The archives: each holds every session it has rows of whole and as the nodes do.
    for archive in &h.archives {
        for session in &h.sessions {
            let last_seq = h.last_seq.get(session).copied().unwrap_or(0);
            let empty = Vec::new();
            let rows = match archive.rows.get(session) {
                Some(rows) if !rows.is_empty() => rows,
                _ if !archive.holds_every_session => continue,
                _ => &empty,
            };
            check_sequence(
                &archive.name,
                session,
                rows.iter().map(|r| Some(r.seq)),
                last_seq,
                [
                    "archive_duplicate",
                    "archive_reorder",
                    "archive_gap",
                    "archive_beyond_last_seq",
                ],
                &mut out,
            );
            for row in rows {
                let (Some(frame), Some(stored)) = (
                    &row.frame,
                    reference_events.get(&(session.as_str(), row.seq)),
                ) else {
                    continue;
                };
                if frame != *stored {
                    out.push(violation(
                        "archive_mismatch",
                        session,
                        format!(
                            "{} seq {} holds {frame}, nodes hold {stored}",
                            archive.name, row.seq
                        ),
                    ));
                }
            }
        }
    }
    // Without a shared archive, each session is in its replicas' own archives.
    if h.archive_copies_per_session > 0 {
        for session in &h.sessions {
            let copies = h
                .archives
                .iter()
                .filter(|a| a.rows.get(session).is_some_and(|r| !r.is_empty()))
                .count();
            if copies < h.archive_copies_per_session {
                out.push(violation(
                    "archive_copies_missing",
                    session,
                    format!(
                        "in {copies} nodes' archives, {} expected",
                        h.archive_copies_per_session
                    ),
                ));
            }
        }
    }
    out
}

/// Violation counts by kind.
pub fn by_kind(violations: &[Violation]) -> BTreeMap<&'static str, usize> {
    let mut out = BTreeMap::new();
    for v in violations {
        *out.entry(v.kind).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const S: &str = "s1";

    fn event(seq: u64, key: &str) -> Value {
        json!({"seq": seq, "type": "drill", "payload": {"k": key}, "actor": "writer:0",
               "source": null, "metadata": {}, "refs": {}, "idempotency_key": key,
               "inserted_at": "2026-01-01T00:00:00.000Z"})
    }

    fn ack(seq: u64, key: &str) -> Ack {
        Ack {
            session: S.into(),
            key: key.into(),
            payload: json!({"k": key}),
            seq,
            last_seq: seq,
            deduped: false,
            expected_seq: None,
            attempts: 1,
        }
    }

    fn tail(events: &[Value]) -> TailLog {
        TailLog {
            tailer: 0,
            session: S.into(),
            deliveries: events
                .iter()
                .map(|e| Delivery {
                    conn: 1,
                    event: e.clone(),
                })
                .collect(),
        }
    }

    /// Five acked appends stored on three nodes, seen by one tailer, archived: valid.
    fn clean() -> History {
        let keys = ["a", "b", "c", "d", "e"];
        let events: Vec<Value> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| event(i as u64 + 1, k))
            .collect();
        let nodes = ["n1", "n2", "n3"]
            .iter()
            .map(|n| NodeHistory {
                node: n.to_string(),
                sessions: BTreeMap::from([(S.to_string(), events.clone())]),
            })
            .collect();
        let mut acks: Vec<Ack> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| ack(i as u64 + 1, k))
            .collect();
        // A retried append answered deduped, and one with expected_seq.
        acks[1].deduped = true;
        acks[1].attempts = 2;
        acks[3].expected_seq = Some(3);
        History {
            sessions: vec![S.into()],
            last_seq: BTreeMap::from([(S.to_string(), 5)]),
            acks,
            conflicts: vec![Conflict {
                session: S.into(),
                key: "lost-race".into(),
                expected_seq: 2,
            }],
            sent_keys: keys
                .iter()
                .map(|k| k.to_string())
                .chain(["lost-race".to_string(), "never-acked".to_string()])
                .collect(),
            nodes,
            tails: vec![tail(&events)],
            archives: vec![ArchiveCopy {
                name: "archive".into(),
                rows: BTreeMap::from([(S.to_string(), archived_rows(&events))]),
                holds_every_session: true,
            }],
            archive_copies_per_session: 0,
        }
    }

    fn archived_rows(events: &[Value]) -> Vec<ArchivedRow> {
        events
            .iter()
            .map(|e| ArchivedRow {
                seq: event_seq(e).unwrap(),
                frame: Some(e.clone()),
            })
            .collect()
    }

    fn kinds(h: &History) -> Vec<&'static str> {
        check(h).into_iter().map(|v| v.kind).collect()
    }

    fn set_all_nodes(h: &mut History, events: Vec<Value>) {
        for node in &mut h.nodes {
            node.sessions.insert(S.into(), events.clone());
        }
    }

    #[test]
    fn clean_history_has_no_violations() {
        assert_eq!(check(&clean()), vec![]);
    }

    #[test]
    fn reports_a_gap() {
        let mut h = clean();
        // Seq 3 missing on every node; the tailer saw the same.
        let events: Vec<Value> = [1, 2, 4, 5]
            .iter()
            .map(|&s| event(s, ["a", "b", "c", "d", "e"][s as usize - 1]))
            .collect();
        set_all_nodes(&mut h, events);
        let k = kinds(&h);
        assert!(k.contains(&"gap"), "{k:?}");
        assert!(k.contains(&"ack_lost"), "{k:?}");
        let gap = check(&h).into_iter().find(|v| v.kind == "gap").unwrap();
        assert!(gap.detail.contains("seqs 3 missing"), "{}", gap.detail);
    }

    #[test]
    fn reports_a_gap_on_one_node_only() {
        let mut h = clean();
        h.nodes[2].sessions.get_mut(S).unwrap().remove(4);
        let k = kinds(&h);
        assert!(k.contains(&"gap"), "{k:?}");
        assert!(k.contains(&"node_divergence"), "{k:?}");
    }

    #[test]
    fn reports_a_duplicate() {
        let mut h = clean();
        let mut events = h.nodes[0].sessions[S].clone();
        events.insert(2, event(2, "b"));
        set_all_nodes(&mut h, events);
        let k = kinds(&h);
        assert!(k.contains(&"duplicate_seq"), "{k:?}");
    }

    #[test]
    fn reports_a_reorder() {
        let mut h = clean();
        let mut events = h.nodes[0].sessions[S].clone();
        events.swap(1, 2);
        set_all_nodes(&mut h, events);
        let k = kinds(&h);
        assert!(k.contains(&"reorder"), "{k:?}");
        assert!(!k.contains(&"gap"), "{k:?}");
    }

    #[test]
    fn reports_two_writers_winning_the_same_expected_seq() {
        let mut h = clean();
        // Two optimistic writers both read last_seq 3 and both were acked seq 4.
        let mut winner = ack(4, "x");
        winner.expected_seq = Some(3);
        h.sent_keys.insert("x".into());
        h.acks.push(winner);
        let k = kinds(&h);
        assert!(k.contains(&"seq_acked_twice"), "{k:?}");
        let v = check(&h)
            .into_iter()
            .find(|v| v.kind == "seq_acked_twice")
            .unwrap();
        assert!(v.detail.contains("two writers both won"), "{}", v.detail);
    }

    #[test]
    fn reports_an_expected_seq_append_at_the_wrong_seq() {
        let mut h = clean();
        h.acks[4].expected_seq = Some(2);
        assert!(kinds(&h).contains(&"expected_seq_violated"));
    }

    #[test]
    fn reports_a_key_stored_twice() {
        let mut h = clean();
        // A retry of "b" was appended again as seq 6 instead of being deduped.
        let mut events = h.nodes[0].sessions[S].clone();
        events.push(event(6, "b"));
        set_all_nodes(&mut h, events);
        h.last_seq.insert(S.into(), 6);
        let k = kinds(&h);
        assert!(k.contains(&"key_stored_twice"), "{k:?}");
    }

    #[test]
    fn reports_a_dedupe_answer_with_the_wrong_seq() {
        let mut h = clean();
        h.acks[1].seq = 4; // key "b" is stored at seq 2
        let k = kinds(&h);
        assert!(k.contains(&"dedupe_wrong_seq"), "{k:?}");
    }

    #[test]
    fn reports_a_conflicted_key_that_was_stored() {
        let mut h = clean();
        h.conflicts.push(Conflict {
            session: S.into(),
            key: "e".into(),
            expected_seq: 3,
        });
        let k = kinds(&h);
        assert!(k.contains(&"conflict_stored"), "{k:?}");
    }

    #[test]
    fn reports_a_payload_mismatch_and_an_unknown_event() {
        let mut h = clean();
        h.acks[0].payload = json!({"k": "other"});
        h.sent_keys.remove("e");
        let k = kinds(&h);
        assert!(k.contains(&"ack_payload_mismatch"), "{k:?}");
        assert!(k.contains(&"unknown_event"), "{k:?}");
    }

    #[test]
    fn reports_a_tail_that_skipped() {
        let mut h = clean();
        let mut events = h.nodes[0].sessions[S].clone();
        events.remove(2);
        h.tails = vec![tail(&events)];
        let k = kinds(&h);
        assert_eq!(k, vec!["tail_skipped"]);
    }

    #[test]
    fn reports_a_tail_duplicate_across_a_reconnect() {
        let mut h = clean();
        let events = h.nodes[0].sessions[S].clone();
        let mut t = tail(&events[..3]);
        // Reconnected with cursor 2 instead of 3: seq 3 again.
        for e in &events[2..] {
            t.deliveries.push(Delivery {
                conn: 2,
                event: e.clone(),
            });
        }
        h.tails = vec![t];
        let violations = check(&h);
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert_eq!(violations[0].kind, "tail_duplicate_or_reorder");
        assert!(violations[0].detail.contains("after a reconnect"));
    }

    #[test]
    fn reports_an_incomplete_tail_and_a_changed_event() {
        let mut h = clean();
        let mut events = h.nodes[0].sessions[S].clone();
        events.truncate(4);
        events[0]["payload"] = json!({"k": "changed"});
        h.tails = vec![tail(&events)];
        let k = kinds(&h);
        assert!(k.contains(&"tail_incomplete"), "{k:?}");
        assert!(k.contains(&"tail_event_mismatch"), "{k:?}");
    }

    /// Each node's own archive: sessions it does not replicate are absent (fine), those it
    /// does must be whole, and each session must be in as many as it has replicas.
    #[test]
    fn checks_each_nodes_own_archive_over_the_sessions_it_holds() {
        let mut h = clean();
        let events = h.nodes[0].sessions[S].clone();
        let own = |name: &str, rows: Vec<ArchivedRow>| ArchiveCopy {
            name: name.into(),
            rows: BTreeMap::from([(S.to_string(), rows)]),
            holds_every_session: false,
        };
        h.archives = vec![
            own("archive of n1", archived_rows(&events)),
            own("archive of n2", archived_rows(&events)),
            own("archive of n3", Vec::new()),
        ];
        h.archive_copies_per_session = 2;
        assert_eq!(kinds(&h), Vec::<&str>::new());
        h.archive_copies_per_session = 3;
        assert_eq!(kinds(&h), vec!["archive_copies_missing"]);
        h.archives[2] = own("archive of n3", archived_rows(&events[..3]));
        assert_eq!(kinds(&h), vec!["archive_gap"]);
    }

    #[test]
    fn reports_archive_gaps_and_duplicates() {
        let mut h = clean();
        let rows = h.archives[0].rows.get_mut(S).unwrap();
        rows.remove(1);
        rows.push(ArchivedRow {
            seq: 5,
            frame: None,
        });
        let k = kinds(&h);
        assert!(k.contains(&"archive_gap"), "{k:?}");
        assert!(k.contains(&"archive_duplicate"), "{k:?}");
    }

    #[test]
    fn reports_an_acked_seq_the_cluster_forgot() {
        let mut h = clean();
        // Every node lost seq 5 and reports last_seq 4: the ack for "e" is lost.
        let mut events = h.nodes[0].sessions[S].clone();
        events.pop();
        set_all_nodes(&mut h, events.clone());
        h.last_seq.insert(S.into(), 4);
        h.tails = vec![tail(&events)];
        h.archives.clear();
        assert_eq!(kinds(&h), vec!["ack_lost"; 3]);
    }

    #[test]
    fn an_unread_session_is_reported_once_not_per_delivery() {
        let mut h = clean();
        for node in &mut h.nodes {
            node.sessions.clear();
        }
        h.archives.clear();
        let k = kinds(&h);
        assert_eq!(k, vec!["session_missing"; 3], "{k:?}");
    }

    #[test]
    fn ranges_are_compact() {
        assert_eq!(ranges(&[3, 4, 5, 9]), "3..=5, 9");
        assert_eq!(ranges(&[]), "");
    }
}
