//! Reopening a node's data directory gives back exactly what was acknowledged: events,
//! `last_seq` and idempotency keys, whether recovery starts from the log alone or from
//! snapshots plus the log written after them.

mod support;

use bytes::Bytes;
use starcite_cluster::{Node, NodeConfig};
use starcite_core::{AppendRequest, CreateRequest};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SESSIONS: usize = 12;

fn config(dir: &Path, snapshots: bool) -> NodeConfig {
    let mut config = NodeConfig::new(dir);
    config.groups = 8;
    // Small segments, so that snapshots let recovery skip (deleted) old ones.
    config.segment_bytes = 64 * 1024;
    if snapshots {
        config.snapshot_every_entries = 100;
        config.snapshot_every_bytes = 128 * 1024;
    } else {
        config.snapshot_every_entries = u64::MAX;
        config.snapshot_every_bytes = u64::MAX;
    }
    config
}

async fn open(config: NodeConfig) -> Arc<Node> {
    support::open_ready(config).await
}

fn request(session: usize, i: usize) -> AppendRequest {
    let body = format!(
        r#"{{"type":"content","actor":"agent:a","payload":{{"n":{i},"s":{session}}},"idempotency_key":"k-{session}-{i}"}}"#
    );
    AppendRequest::parse(body.as_bytes()).expect("valid request")
}

/// Appends `per_session` events to every session; returns the acknowledged seq of each
/// `(session, i)`.
async fn write(node: &Arc<Node>, from: usize, per_session: usize) -> BTreeMap<(usize, usize), u64> {
    let tasks: Vec<_> = (0..SESSIONS)
        .map(|s| {
            let node = node.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in from..from + per_session {
                    let outcome = node
                        .append(&format!("s{s}"), request(s, i))
                        .await
                        .expect("append acknowledged");
                    assert!(!outcome.deduped);
                    acked.push(((s, i), outcome.seq));
                }
                acked
            })
        })
        .collect();
    let mut all = BTreeMap::new();
    for t in tasks {
        all.extend(t.await.expect("writer"));
    }
    all
}

async fn history(node: &Arc<Node>) -> Vec<(u64, Vec<Bytes>)> {
    let mut out = Vec::new();
    for s in 0..SESSIONS {
        let id = format!("s{s}");
        let view = node.session(&id).await.expect("session exists");
        let events = node
            .read_events(&id, 0, usize::MAX)
            .await
            .expect("events readable");
        out.push((view.last_seq, events));
    }
    out
}

async fn check_recovery(snapshots: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = open(config(dir.path(), snapshots)).await;
    for s in 0..SESSIONS {
        let body = format!(r#"{{"id":"s{s}"}}"#);
        node.create_session(CreateRequest::parse(body.as_bytes()).expect("valid"))
            .await
            .expect("created");
    }
    let mut acked = write(&node, 0, 150).await;
    if snapshots {
        // Compaction runs in the background every half second.
        let deadline = Instant::now() + Duration::from_secs(10);
        while node.stats().snapshots_taken == 0 {
            assert!(Instant::now() < deadline, "no snapshot was taken");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The same compaction round then deletes the segments the snapshots cover.
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    // More writes after the snapshots: recovery needs snapshot + log.
    acked.extend(write(&node, 150, 40).await);
    let before = history(&node).await;
    node.shutdown().await;
    drop(node);

    let node = open(config(dir.path(), snapshots)).await;
    let after = history(&node).await;
    assert_eq!(
        before, after,
        "recovered history differs from the acknowledged one"
    );
    for (s, (last_seq, events)) in after.iter().enumerate() {
        assert_eq!(*last_seq, 190, "session s{s}");
        assert_eq!(events.len(), 190, "session s{s} has a gap or extra events");
    }
    if snapshots {
        let replayed = node.stats().recovery_records_replayed;
        assert!(
            replayed < (SESSIONS * 190) as u64,
            "recovery replayed {replayed} records: the snapshots were not used"
        );
    }
    // Every acknowledged idempotency key is remembered: its retry answers the original seq.
    for ((s, i), seq) in &acked {
        let outcome = node
            .append(&format!("s{s}"), request(*s, *i))
            .await
            .expect("retry answered");
        assert!(outcome.deduped, "key k-{s}-{i} forgotten after recovery");
        assert_eq!(outcome.seq, *seq, "key k-{s}-{i} answered with another seq");
    }
    // And the sessions continue gapless.
    let next = node.append("s0", request(0, 10_000)).await.expect("append");
    assert_eq!(next.seq, 191);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_from_the_log_alone_gives_back_what_was_acknowledged() {
    check_recovery(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_from_snapshots_and_log_gives_back_what_was_acknowledged() {
    check_recovery(true).await;
}
