//! The archiver paces itself by the node's pending events, counted over the sessions with
//! something unarchived only; the count must match the full walk the metrics do.

mod support;

use starcite_cluster::{Node, NodeConfig};
use starcite_core::{AppendRequest, CreateRequest};
use std::sync::Arc;

async fn open(dir: &std::path::Path) -> Arc<Node> {
    let mut config = NodeConfig::new(dir);
    config.groups = 4;
    support::open_ready(config).await
}

async fn append(node: &Node, session: &str, n: usize) {
    for i in 0..n {
        let body = format!(r#"{{"type":"t","actor":"a","payload":{{"i":{i}}}}}"#);
        node.append(
            session,
            AppendRequest::parse(body.as_bytes()).expect("valid"),
        )
        .await
        .expect("append acknowledged");
    }
}

fn assert_counts(node: &Node, expected: u64) {
    assert_eq!(node.archive_pending_events(), expected);
    assert_eq!(node.archive_lag().pending_events, expected, "the full walk");
}

#[tokio::test]
async fn pending_events_counted_over_unarchived_sessions_match_the_full_walk() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = open(dir.path()).await;
    for id in ["a", "b", "c"] {
        let body = format!(r#"{{"id":"{id}"}}"#);
        node.create_session(CreateRequest::parse(body.as_bytes()).expect("valid"))
            .await
            .expect("created");
    }
    assert_counts(&node, 0);
    append(&node, "a", 5).await;
    append(&node, "b", 3).await;
    append(&node, "c", 2).await;
    assert_counts(&node, 10);

    // Events 1-2 of a and all of b archived: c and the rest of a are pending.
    let marks = [("a".to_owned(), 2), ("b".to_owned(), 3)];
    node.acknowledge_archived(&marks, 100)
        .await
        .expect("marks recorded");
    assert_counts(&node, 5);

    // Everything archived (headers too): nothing pending, and no session left to visit.
    let backlog = node.archive_backlog(100).await;
    node.headers_archived(&backlog.sessions);
    let marks: Vec<(String, u64)> = backlog
        .runs
        .iter()
        .map(|run| (run.session_id.clone(), run.last_seq()))
        .collect();
    node.acknowledge_archived(&marks, 100)
        .await
        .expect("marks recorded");
    assert_counts(&node, 0);
    append(&node, "b", 4).await;
    assert_counts(&node, 4);
}
