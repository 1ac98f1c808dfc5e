//! The archiver paces itself by the node's pending events, counted over the sessions with
//! something unarchived only; the count must match the full walk the metrics do.

mod support;

use starcite_cluster::{ArchiveBacklog, Node, NodeConfig};
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

/// Sessions s0..s11 (spread over the groups), two events each.
async fn twelve_sessions_of_two_events(node: &Node) -> Vec<String> {
    let ids: Vec<String> = (0..12).map(|i| format!("s{i}")).collect();
    for id in &ids {
        let body = format!(r#"{{"id":"{id}"}}"#);
        node.create_session(CreateRequest::parse(body.as_bytes()).expect("valid"))
            .await
            .expect("created");
        append(node, id, 2).await;
    }
    ids
}

/// What the archiver does once a backlog is stored: headers and marks recorded.
async fn record_archived(node: &Node, backlog: &ArchiveBacklog) {
    node.headers_archived(&backlog.sessions);
    let marks: Vec<(String, u64)> = backlog
        .runs
        .iter()
        .map(|run| (run.session_id.clone(), run.last_seq()))
        .collect();
    node.acknowledge_archived(&marks, 100)
        .await
        .expect("marks recorded");
}

async fn assert_counts(node: &Node, expected: u64) {
    assert_eq!(node.archive_pending_events().await, expected);
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
    assert_counts(&node, 0).await;
    append(&node, "a", 5).await;
    append(&node, "b", 3).await;
    append(&node, "c", 2).await;
    assert_counts(&node, 10).await;

    // Events 1-2 of a and all of b archived: c and the rest of a are pending.
    let marks = [("a".to_owned(), 2), ("b".to_owned(), 3)];
    node.acknowledge_archived(&marks, 100)
        .await
        .expect("marks recorded");
    assert_counts(&node, 5).await;

    // Everything archived (headers too): nothing pending, and no session left to visit.
    let backlog = node.archive_backlog(100).await;
    record_archived(&node, &backlog).await;
    assert_counts(&node, 0).await;
    append(&node, "b", 4).await;
    assert_counts(&node, 4).await;
}

/// Polls `work` to completion with a waker that does nothing, counting the times it gave the
/// thread back before finishing.
fn run_counting_yields<T>(work: impl std::future::Future<Output = T>) -> (T, usize) {
    let mut work = std::pin::pin!(work);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut yields = 0;
    loop {
        match work.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(out) => return (out, yields),
            std::task::Poll::Pending => yields += 1,
        }
    }
}

#[tokio::test]
async fn the_archive_bookkeeping_pauses_between_groups_at_most() {
    // It runs on the request path's runtime (one worker per node when nodes share a host) and
    // lets requests in between groups once a walk has held the worker for a slice (the rule
    // is unit-tested in `archive_api`). A pause costs an `epoll_wait`, so a walk never pauses
    // more than once per group with work, and the walk's figures are whole across pauses.
    let dir = tempfile::tempdir().expect("temp dir");
    let node = open(dir.path()).await;
    let ids = twelve_sessions_of_two_events(&node).await;
    let groups: std::collections::BTreeSet<u32> = ids
        .iter()
        .map(|id| starcite_core::group_of(id, 4))
        .collect();
    assert!(groups.len() >= 2, "the sessions span several groups");

    let (pending, yields) = run_counting_yields(node.archive_pending_events());
    assert_eq!(pending, 24);
    assert!(
        yields <= groups.len(),
        "{yields} pauses over {} groups",
        groups.len()
    );

    let (backlog, yields) = run_counting_yields(node.archive_backlog(1_000));
    assert_eq!(backlog.event_count(), 24);
    assert!(
        yields <= groups.len(),
        "{yields} pauses over {} groups",
        groups.len()
    );
    record_archived(&node, &backlog).await;
    assert_counts(&node, 0).await;
}

#[tokio::test]
async fn collections_take_turns_over_the_groups() {
    // A group busy enough to fill every batch on its own must not keep the other groups'
    // events out of the archive.
    let dir = tempfile::tempdir().expect("temp dir");
    let node = open(dir.path()).await;
    let ids = twelve_sessions_of_two_events(&node).await;
    let group = |id: &str| starcite_core::group_of(id, 4);
    let busy = ids
        .iter()
        .min_by_key(|id| group(id))
        .expect("sessions")
        .clone();
    assert!(
        ids.iter().any(|id| group(id) != group(&busy)),
        "the sessions span several groups"
    );
    // Three turns of the four groups, the busy session's group over a batch every time.
    for _ in 0..12 {
        append(&node, &busy, 20).await;
        let backlog = node.archive_backlog(10).await;
        assert!(backlog.event_count() <= 10);
        record_archived(&node, &backlog).await;
    }
    let left = node.archive_backlog(10_000).await;
    let starved: Vec<&str> = left
        .runs
        .iter()
        .map(|run| run.session_id.as_str())
        .filter(|id| group(id) != group(&busy))
        .collect();
    assert!(
        starved.is_empty(),
        "sessions of the other groups still wait: {starved:?}"
    );
}
