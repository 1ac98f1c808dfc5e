//! The in-flight write bound, pushed past: with every slot held by a write that cannot
//! commit, the next caller waits for a slot no longer than the request timeout and is told
//! to retry, instead of queueing without bound.

use starcite_cluster::{ClusterState, Node, NodeConfig, NodeError};
use starcite_core::CreateRequest;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_past_the_in_flight_bound_are_refused_after_the_request_timeout() {
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let me = listener.local_addr().expect("addr").to_string();
    let mut config = NodeConfig::new(dir.path());
    config.groups = 4;
    config.max_inflight_writes = 2;
    config.request_timeout = Duration::from_millis(500);
    // Two peers that never come up: no group can elect a leader, so no write can finish.
    config.cluster_nodes = vec![
        ("n1".into(), me),
        ("n2".into(), "127.0.0.1:9".into()),
        ("n3".into(), "127.0.0.1:9".into()),
    ];
    config.cluster_state = ClusterState::New;
    let node = Node::open(config, Some(listener))
        .await
        .expect("node opens");
    let create = |id: String| {
        let node = node.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let body = format!(r#"{{"id":"{id}"}}"#);
            let result = node
                .create_session(CreateRequest::parse(body.as_bytes()).expect("valid"))
                .await;
            (result, started.elapsed())
        })
    };
    // Two writes take both slots and hold them for the request timeout; three more arrive
    // just after. When the first two give up, two of the waiters get their slots; the third
    // has waited its whole timeout by then and is refused.
    let holders: Vec<_> = (0..2).map(|i| create(format!("held-{i}"))).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiters: Vec<_> = (0..3).map(|i| create(format!("waiting-{i}"))).collect();
    let mut refused_for_a_slot = 0;
    for task in holders.into_iter().chain(waiters) {
        let (result, waited) = task.await.expect("task");
        assert!(waited < Duration::from_secs(3), "a write waited {waited:?}");
        match result {
            Err(NodeError::Unavailable(message)) => {
                if message.contains("too many writes") {
                    refused_for_a_slot += 1;
                }
            }
            other => panic!("no write can succeed without a leader: {other:?}"),
        }
    }
    assert_eq!(
        refused_for_a_slot, 1,
        "exactly the write that found no slot"
    );
    // Slots are free again: the next write gets one (and fails only for want of a leader).
    let next = node
        .create_session(CreateRequest::parse(br#"{"id":"later"}"#).expect("valid"))
        .await;
    match next {
        Err(NodeError::Unavailable(message)) => {
            assert!(!message.contains("too many writes"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    node.shutdown().await;
}
