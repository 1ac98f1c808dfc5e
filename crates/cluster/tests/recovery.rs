//! A node reopened on its data directory holds exactly what was acknowledged before, whether
//! it comes from the log, a snapshot, or both.

use starcite_cluster::{Node, NodeConfig, NodeError};
use starcite_core::{AppendRequest, CreateRequest};

fn config(dir: &std::path::Path) -> NodeConfig {
    let mut c = NodeConfig::new(dir);
    c.groups = 8;
    c.segment_bytes = 4096;
    c
}

fn create_req(id: &str) -> CreateRequest {
    CreateRequest::parse(format!(r#"{{"id":"{id}","title":"t"}}"#).as_bytes()).unwrap()
}

fn append_req(n: u32, key: Option<&str>) -> AppendRequest {
    let key = key
        .map(|k| format!(r#","idempotency_key":"{k}""#))
        .unwrap_or_default();
    AppendRequest::parse(
        format!(r#"{{"type":"t","actor":"a","payload":{{"n":{n}}}{key}}}"#).as_bytes(),
    )
    .unwrap()
}

fn all_events(node: &Node, id: &str) -> Vec<serde_json::Value> {
    node.read_events(id, 0, usize::MAX)
        .unwrap()
        .iter()
        .map(|b| serde_json::from_slice(b).unwrap())
        .collect()
}

async fn fill(node: &Node, sessions: u32, per_session: u32) {
    for s in 0..sessions {
        node.create_session(create_req(&format!("s{s}")))
            .await
            .unwrap();
        for n in 0..per_session {
            let key = format!("k{n}");
            let out = node
                .append(&format!("s{s}"), append_req(n, Some(&key)))
                .await
                .unwrap();
            assert_eq!(out.seq, u64::from(n) + 1);
        }
    }
}

fn open(dir: &std::path::Path) -> std::sync::Arc<Node> {
    Node::open(config(dir)).expect("node opens")
}

#[tokio::test]
async fn restart_replays_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path());
    fill(&node, 5, 40).await;
    let before: Vec<_> = (0..5)
        .map(|s| all_events(&node, &format!("s{s}")))
        .collect();
    drop(node);

    let node = open(dir.path());
    for s in 0..5 {
        let id = format!("s{s}");
        assert_eq!(all_events(&node, &id), before[s as usize]);
        assert_eq!(node.session(&id).await.unwrap().last_seq, 40);
        // Idempotency keys survived: the retry is a dedupe with the original seq.
        let out = node.append(&id, append_req(7, Some("k7"))).await.unwrap();
        assert!(out.deduped);
        assert_eq!(out.seq, 8);
        assert_eq!(
            node.append(&id, append_req(99, None)).await.unwrap().seq,
            41
        );
    }
    assert!(matches!(
        node.create_session(create_req("s0")).await,
        Err(NodeError::SessionExists(_))
    ));
}

#[tokio::test]
async fn restart_from_snapshot_plus_log_tail() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path());
    fill(&node, 3, 30).await;
    node.snapshot_now().unwrap();
    let segments_after_snapshot = std::fs::read_dir(dir.path().join("log"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("wal-")
        })
        .count();
    assert_eq!(segments_after_snapshot, 1, "covered segments deleted");
    // More writes after the snapshot land in the log only.
    for n in 30..45 {
        node.append("s1", append_req(n, Some(&format!("k{n}"))))
            .await
            .unwrap();
    }
    let before = all_events(&node, "s1");
    drop(node);

    let node = open(dir.path());
    assert_eq!(all_events(&node, "s1"), before);
    assert_eq!(node.session("s1").await.unwrap().last_seq, 45);
    assert_eq!(node.session("s2").await.unwrap().last_seq, 30);
    let out = node.append("s1", append_req(3, Some("k3"))).await.unwrap();
    assert!(out.deduped && out.seq == 4);
    let out = node
        .append("s1", append_req(40, Some("k40")))
        .await
        .unwrap();
    assert!(out.deduped && out.seq == 41);
}

#[tokio::test]
async fn a_second_process_cannot_open_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _node = open(dir.path());
    match Node::open(config(dir.path())) {
        Err(NodeError::Startup(m)) => assert!(m.contains("in use"), "{m}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("second open must fail"),
    }
}

#[tokio::test]
async fn group_count_cannot_change_under_existing_data() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let mut c = config(dir.path());
    c.groups = 16;
    match Node::open(c) {
        Err(NodeError::Startup(m)) => assert!(m.contains("STARCITE_RAFT_GROUPS"), "{m}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("changing the group count must be refused"),
    }
}

#[tokio::test]
async fn concurrent_appends_are_gapless_and_visible_only_when_durable() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path());
    node.create_session(create_req("hot")).await.unwrap();
    let mut rx = node.subscribe("hot").await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..8u32 {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for n in 0..50 {
                seqs.push(
                    node.append("hot", append_req(w * 1000 + n, None))
                        .await
                        .unwrap()
                        .seq,
                );
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let seqs = t.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "a writer's own order is kept"
        );
        all.extend(seqs);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=400).collect::<Vec<u64>>());
    rx.wait_for(|&seq| seq == 400).await.unwrap();
    let events = all_events(&node, "hot");
    assert_eq!(events.len(), 400);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"], i as u64 + 1);
    }
}
