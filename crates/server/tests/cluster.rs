//! Three real `starcite serve` processes on loopback ports: requests to any node, a leader
//! killed under load, a paused follower, a full-cluster restart, and a node that missed many
//! writes catching up from a snapshot. Every check is about what was acknowledged: present
//! exactly once, in order, with no gap, on every node.

mod support;

use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::{all_events, post_any, Cluster, Server};
use tokio_tungstenite::tungstenite::Message;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

async fn create(client: &reqwest::Client, urls: &[String], id: &str) {
    let (status, body) = post_any(
        client,
        urls,
        "/v1/sessions",
        &json!({"id": id}),
        Duration::from_secs(20),
    )
    .await;
    assert!(
        status == 201 || status == 409,
        "create {id}: {status} {body}"
    );
}

/// Appends with an idempotency key, retrying on any node until a definite answer.
async fn append(client: &reqwest::Client, urls: &[String], id: &str, n: u64) -> Value {
    let body = json!({"type": "content", "actor": "agent:test", "payload": {"n": n},
                      "idempotency_key": format!("{id}-{n}")});
    let (status, ack) = post_any(
        client,
        urls,
        &format!("/v1/sessions/{id}/append"),
        &body,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(status, 201, "append {id} #{n}: {ack}");
    ack
}

/// Checks that `server` holds exactly events 1..=`acked.len()` of `id`, each with the payload
/// of the append acknowledged with that seq.
async fn assert_holds(client: &reqwest::Client, server: &Server, id: &str, acked: &[(u64, u64)]) {
    let events = all_events(client, server, id).await;
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    let expected: Vec<u64> = (1..=acked.len() as u64).collect();
    assert_eq!(seqs, expected, "{id} on {}", server.url());
    for (seq, n) in acked {
        assert_eq!(
            events[*seq as usize - 1]["payload"]["n"].as_u64(),
            Some(*n),
            "{id} seq {seq} on {}",
            server.url()
        );
    }
}

/// Follows a session over WebSocket, reconnecting (to the next node, with its cursor) when a
/// connection ends, until it has seen seq `until`. Returns every seq received, in order.
async fn tail_until(
    urls: Vec<String>,
    id: String,
    until: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Vec<u64> {
    let mut seen: Vec<u64> = Vec::new();
    let mut node = 0usize;
    loop {
        let cursor = seen.last().copied().unwrap_or(0);
        if stop.load(Ordering::Relaxed) && cursor >= until.load(Ordering::Relaxed) {
            return seen;
        }
        let url = urls[node % urls.len()].replacen("http://", "ws://", 1);
        node += 1;
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(3),
            tokio_tungstenite::connect_async(format!(
                "{url}/v1/sessions/{id}/tail?cursor={cursor}"
            )),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        loop {
            let next = tokio::time::timeout(Duration::from_millis(500), ws.next()).await;
            match next {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).expect("event json");
                    seen.push(v["seq"].as_u64().expect("seq"));
                }
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => break,
                Ok(Some(Ok(_))) => {}
                Err(_) => {
                    let last = seen.last().copied().unwrap_or(0);
                    if stop.load(Ordering::Relaxed) && last >= until.load(Ordering::Relaxed) {
                        return seen;
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_node_serves_every_operation() {
    let cluster = Cluster::start(3, &[]).await;
    let c = client();
    let urls = cluster.urls();
    // Create on one node, append through each, read and tail on others.
    let r = c
        .post(format!("{}/v1/sessions", urls[0]))
        .json(&json!({"id": "s1", "title": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    for (i, url) in urls.iter().enumerate() {
        let ack: Value = c
            .post(format!("{url}/v1/sessions/s1/append"))
            .json(&json!({"type": "t", "actor": "a", "payload": {"n": i + 1}, "idempotency_key": format!("k{i}")}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(ack["seq"], i as u64 + 1, "{ack}");
    }
    // A retry through another node is deduplicated, not appended again.
    let ack: Value = c
        .post(format!("{}/v1/sessions/s1/append", urls[2]))
        .json(&json!({"type": "t", "actor": "a", "payload": {"n": 1}, "idempotency_key": "k0"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ack, json!({"seq": 1, "last_seq": 3, "deduped": true}));
    // expected_seq is checked against the group's state wherever the request arrives.
    let r = c
        .post(format!("{}/v1/sessions/s1/append", urls[1]))
        .json(&json!({"type": "t", "actor": "a", "payload": {}, "expected_seq": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    // Reads on every node see every acknowledged write (linearizable reads).
    for node in &cluster.nodes {
        let s: Value = c
            .get(format!("{}/v1/sessions/s1", node.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(s["last_seq"], 3, "{} {s}", node.url());
        assert_holds(&c, node, "s1", &[(1, 1), (2, 2), (3, 3)]).await;
    }
    let r = c
        .get(format!("{}/v1/sessions/nope", urls[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // A tail on a follower replays, then streams what other nodes append.
    let tail = tokio::spawn({
        let node = cluster.node(2).ws_url("/v1/sessions/s1/tail?cursor=1");
        async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(node).await.expect("ws");
            let mut seqs = Vec::new();
            while seqs.len() < 4 {
                if let Some(Ok(Message::Text(t))) = ws.next().await {
                    seqs.push(
                        serde_json::from_str::<Value>(&t).unwrap()["seq"]
                            .as_u64()
                            .unwrap(),
                    );
                }
            }
            seqs
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    for n in 4..=5 {
        append(&c, &urls[..1], "s1", n).await;
    }
    let seqs = tokio::time::timeout(Duration::from_secs(10), tail)
        .await
        .expect("tail in time")
        .unwrap();
    assert_eq!(seqs, vec![2, 3, 4, 5]);
    // The cluster metrics are there.
    let metrics = support::metrics_text(cluster.node(0)).await;
    for name in [
        "starcite_raft_groups_led",
        "starcite_raft_elections_total",
        "starcite_raft_replication_lag_max",
        "starcite_forwarded_requests_total",
    ] {
        assert!(metrics.contains(name), "{name} missing");
    }
}

/// Writers (one session each, retrying with their idempotency keys on any node) and tailers
/// run while node 1 is killed with SIGKILL and later restarted. Afterwards every node holds
/// exactly the acknowledged events, and every tail saw each seq once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill_under_load_loses_nothing() {
    let mut cluster = Cluster::start(3, &[]).await;
    let c = client();
    let urls = cluster.urls();
    let sessions: Vec<String> = (0..6).map(|i| format!("w{i}")).collect();
    for s in &sessions {
        create(&c, &urls, s).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    let mut tails = Vec::new();
    for (i, s) in sessions.iter().enumerate() {
        let last = Arc::new(std::sync::atomic::AtomicU64::new(0));
        // Tailers on the nodes that stay up (and they move on when one goes away).
        let tail_urls: Vec<String> = vec![urls[1 + i % 2].clone(), urls[2 - i % 2].clone()];
        tails.push(tokio::spawn(tail_until(
            tail_urls,
            s.clone(),
            last.clone(),
            stop.clone(),
        )));
        let (c, urls, s, stop) = (c.clone(), urls.clone(), s.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                // A retry after an unknown outcome may find the first attempt committed: it
                // is answered as a dedupe with the original seq, never appended twice.
                let ack = append(&c, &urls, &s, n).await;
                let seq = ack["seq"].as_u64().unwrap();
                assert_eq!(
                    seq,
                    acked.len() as u64 + 1,
                    "{s}: seq {seq} after {}",
                    acked.len()
                );
                acked.push((seq, n));
                last.store(seq, Ordering::Relaxed);
            }
            (s, acked)
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.nodes[0].kill9();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.nodes[0].launch();
    cluster.nodes[0].wait_ready().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut results: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for w in writers {
        let (s, acked) = w.await.unwrap();
        assert!(acked.len() > 10, "{s} made progress: {}", acked.len());
        results.insert(s, acked);
    }
    for (i, t) in tails.into_iter().enumerate() {
        let seen = tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("tail finishes")
            .unwrap();
        let expected: Vec<u64> = (1..=results[&sessions[i]].len() as u64).collect();
        assert_eq!(seen, expected, "tail of {}", sessions[i]);
    }
    for node in &cluster.nodes {
        for (s, acked) in &results {
            assert_holds(&c, node, s, acked).await;
        }
    }
}

/// Nodes started one after another: the first ones up win every election they can, then
/// leadership moves to each group's preferred node, so that soon after the last node is ready
/// every node leads about a third of the groups (and takes a third of the writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leaders_spread_evenly_soon_after_a_staggered_start() {
    // The default group count: with the tests' few groups any pace of moves looks quick.
    let mut cluster = Cluster::unstarted(3, &[("STARCITE_RAFT_GROUPS", "256")]);
    for node in &mut cluster.nodes {
        node.launch();
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    for node in &cluster.nodes {
        node.wait_ready().await;
    }
    let fair = 256.0 / 3.0;
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    loop {
        let mut led = Vec::new();
        for node in &cluster.nodes {
            led.push(support::metric(node, "starcite_raft_groups_led").await);
        }
        if led.iter().all(|n| (n - fair).abs() <= 8.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "groups led per node still uneven 4 s after the last node was ready: {led:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_node_resumes_and_catches_up() {
    let cluster = Cluster::start(3, &[]).await;
    let c = client();
    let urls = cluster.urls();
    create(&c, &urls, "p").await;
    let mut acked = Vec::new();
    for n in 1..=20 {
        acked.push((append(&c, &urls, "p", n).await["seq"].as_u64().unwrap(), n));
    }
    cluster.node(2).signal("STOP");
    let live = &urls[..2];
    for n in 21..=60 {
        acked.push((append(&c, live, "p", n).await["seq"].as_u64().unwrap(), n));
    }
    cluster.node(2).signal("CONT");
    for n in 61..=70 {
        acked.push((append(&c, &urls, "p", n).await["seq"].as_u64().unwrap(), n));
    }
    for node in &cluster.nodes {
        assert_holds(&c, node, "p", &acked).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_cluster_kill_and_restart_keeps_every_acknowledged_event() {
    let mut cluster = Cluster::start(3, &[]).await;
    let c = client();
    let urls = cluster.urls();
    let mut all = HashMap::new();
    for s in ["r1", "r2", "r3"] {
        create(&c, &urls, s).await;
        let mut acked = Vec::new();
        for n in 1..=30 {
            acked.push((append(&c, &urls, s, n).await["seq"].as_u64().unwrap(), n));
        }
        all.insert(s, acked);
    }
    cluster.restart_all().await;
    for node in &cluster.nodes {
        for (s, acked) in &all {
            assert_holds(&c, node, s, acked).await;
        }
    }
    // Idempotency keys survived too: a retry is a dedupe, not a new event.
    let (status, ack) = post_any(&c, &urls, "/v1/sessions/r1/append",
        &json!({"type": "content", "actor": "agent:test", "payload": {"n": 1}, "idempotency_key": "r1-1"}),
        Duration::from_secs(10)).await;
    assert_eq!(
        (status, ack),
        (201, json!({"seq": 1, "last_seq": 30, "deduped": true}))
    );
}

/// A node down while the others write (and compact their logs into snapshots) comes back and
/// is brought up to date with a snapshot, then the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_missed_many_writes_catches_up_from_a_snapshot() {
    // With no archive and a tiny memory budget, the leaders' snapshots refer to spilled
    // runs: the snapshot sent must carry those events.
    let mut cluster = Cluster::start(3, &SNAPSHOTS_OF_SPILLED_EVENTS).await;
    let c = client();
    let urls = cluster.urls();
    create(&c, &urls, "m").await;
    cluster.nodes[2].kill9();
    let live = &urls[..2];
    let mut acked = Vec::new();
    for n in 1..=300 {
        acked.push((append(&c, live, "m", n).await["seq"].as_u64().unwrap(), n));
    }
    // Let the survivors snapshot and drop the entries node 3 would need.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart(2).await;
    assert_holds(&c, cluster.node(2), "m", &acked).await;
    let log = cluster.node(2).log();
    assert!(
        log.contains("installing a snapshot from the leader"),
        "no snapshot installed:\n{log}"
    );
    assert_spilled(&cluster).await;
}

/// Snapshots every 20 entries and a memory budget far below what the tests append; no
/// archive flush during the test, so what leaves memory is spilled.
const SNAPSHOTS_OF_SPILLED_EVENTS: [(&str, &str); 3] = [
    ("STARCITE_SNAPSHOT_EVERY_ENTRIES", "20"),
    ("STARCITE_HOT_MAX_BYTES", "4096"),
    ("STARCITE_ARCHIVE_FLUSH_INTERVAL_MS", "600000"),
];

async fn assert_spilled(cluster: &Cluster) {
    let mut spilled = 0.0;
    for node in &cluster.nodes {
        if node.is_running() {
            spilled += support::metric(node, "starcite_spilled_events_total").await;
        }
    }
    assert!(spilled > 0.0, "the test meant to spill events did not");
}

/// A node whose disk is wiped comes back empty, catches up every group (from snapshots where
/// the others compacted their logs, from the log elsewhere) promptly — well within the
/// leaders' 10 s snapshot timeout, so no snapshot sent while it was starting is left waiting —
/// and then counts toward the quorum: with another node down, writes go on, and the wiped
/// node holds every acknowledged event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_node_catches_up_at_once_and_then_carries_the_quorum() {
    let mut cluster = Cluster::start(3, &SNAPSHOTS_OF_SPILLED_EVENTS).await;
    let c = client();
    let urls = cluster.urls();
    let sessions = ["w1", "w2", "w3", "w4"];
    let mut acked: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
    for s in sessions {
        create(&c, &urls, s).await;
        for n in 1..=60 {
            let seq = append(&c, &urls, s, n).await["seq"].as_u64().unwrap();
            acked.entry(s).or_default().push((seq, n));
        }
    }
    // Let the groups snapshot and compact what the wiped node will need.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.nodes[2].kill9();
    std::fs::remove_dir_all(cluster.nodes[2].data_dir()).expect("wipe the data directory");
    cluster.nodes[2].launch();
    cluster.nodes[2].wait_ready().await;
    let started = std::time::Instant::now();
    loop {
        let rejoining = support::metric(cluster.node(2), "starcite_raft_groups_rejoining").await;
        if rejoining == 0.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{rejoining} groups still catching up 8 s after the wiped node was ready:\n{}",
            cluster.node(2).log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Node 1 goes down: nodes 2 and 3 must form the quorum, so node 3 must vote again.
    cluster.nodes[0].kill9();
    let live = &urls[1..];
    for s in sessions {
        for n in 61..=70 {
            let seq = append(&c, live, s, n).await["seq"].as_u64().unwrap();
            acked.entry(s).or_default().push((seq, n));
        }
    }
    for s in sessions {
        assert_holds(&c, cluster.node(2), s, &acked[s]).await;
    }
    assert_spilled(&cluster).await;
}

/// Each session's events as every node's own embedded archive holds them: (node, frames).
async fn archived_copies(cluster: &Cluster, id: &str) -> Vec<(usize, Vec<Value>)> {
    let mut copies = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let path = node.data_dir().join("archive.sqlite3");
        let archive = starcite_archive::Archive::open_sqlite(&path)
            .await
            .expect("open the node's archive file");
        let frames = archive.read_events(id, 0, 10_000).await.expect("read");
        if !frames.is_empty() {
            let events = frames
                .iter()
                .map(|f| serde_json::from_slice(f).expect("frame json"))
                .collect();
            copies.push((i, events));
        }
    }
    copies
}

/// Waits until `node` has archived everything it replicates and trimmed memory down to the
/// events kept hot.
async fn wait_archived_and_trimmed(node: &Server, max_hot: f64) {
    let started = std::time::Instant::now();
    loop {
        let pending = support::metric(node, "starcite_archive_pending_rows").await;
        let hot = support::metric(node, "starcite_archive_tail_size").await;
        if pending == 0.0 && hot <= max_hot {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{}: {pending} events unarchived, {hot} in memory after 20 s:\n{}",
            node.url(),
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every session is in exactly three nodes' own archives (its replicas'), each copy whole.
async fn assert_three_whole_copies(cluster: &Cluster, acked: &HashMap<String, Vec<(u64, u64)>>) {
    for (id, acked) in acked {
        let copies = archived_copies(cluster, id).await;
        assert_eq!(
            copies.len(),
            3,
            "{id} archived by nodes {:?}",
            copies.iter().map(|c| c.0).collect::<Vec<_>>()
        );
        for (node, events) in copies {
            let got: Vec<(u64, u64)> = events
                .iter()
                .map(|e| {
                    (
                        e["seq"].as_u64().unwrap(),
                        e["payload"]["n"].as_u64().unwrap(),
                    )
                })
                .collect();
            assert_eq!(&got, acked, "{id} in the archive of node {}", node + 1);
        }
    }
}

/// Without Postgres, every node archives the groups it replicates to its own embedded file and
/// trims memory: each session ends up whole in its three replicas' files, every node (four,
/// so each group has a node outside it that forwards its reads) replays each session whole
/// across archive and memory, and a wiped node is sent the history its archive lost with the
/// snapshot, archives it again and serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_postgres_each_node_archives_to_its_own_file() {
    let env = [
        ("STARCITE_ARCHIVE_FLUSH_INTERVAL_MS", "100"),
        ("STARCITE_TAIL_KEEP", "3"),
        ("STARCITE_SNAPSHOT_EVERY_ENTRIES", "20"),
        ("STARCITE_RAFT_GROUPS", "8"),
    ];
    let mut cluster = Cluster::start(4, &env).await;
    let c = client();
    let urls = cluster.urls();
    let sessions: Vec<String> = (0..6).map(|i| format!("own-{i}")).collect();
    let mut acked: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for s in &sessions {
        create(&c, &urls, s).await;
        for n in 1..=40 {
            let seq = append(&c, &urls, s, n).await["seq"].as_u64().unwrap();
            acked.entry(s.clone()).or_default().push((seq, n));
        }
    }
    let max_hot = (sessions.len() * 3) as f64;
    let mut inserted = 0.0;
    for node in &cluster.nodes {
        wait_archived_and_trimmed(node, max_hot).await;
        inserted += support::metric(node, "starcite_archive_inserted_total").await;
    }
    assert_eq!(
        inserted,
        (3 * sessions.len() * 40) as f64,
        "each replica archives once"
    );
    assert_three_whole_copies(&cluster, &acked).await;
    for node in &cluster.nodes {
        for s in &sessions {
            assert_holds(&c, node, s, &acked[s]).await;
            let tail = support::ws_events(node, s, 0, 40).await;
            let seqs: Vec<u64> = tail.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
            assert_eq!(
                seqs,
                (1..=40).collect::<Vec<_>>(),
                "{s} tailed on {}",
                node.url()
            );
        }
    }

    // Node 4's archive goes with its disk; the others' snapshots (their logs are compacted)
    // bring the history back, and node 4 archives it in its own file again.
    cluster.nodes[3].kill9();
    std::fs::remove_dir_all(cluster.nodes[3].data_dir()).expect("wipe the data directory");
    cluster.nodes[3].launch();
    cluster.nodes[3].wait_ready().await;
    let started = std::time::Instant::now();
    while support::metric(cluster.node(3), "starcite_raft_groups_rejoining").await > 0.0 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "node 4 still catching up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = cluster.node(3).log();
    assert!(
        log.contains("installing a snapshot from the leader"),
        "no snapshot installed:\n{log}"
    );
    wait_archived_and_trimmed(cluster.node(3), max_hot).await;
    assert_three_whole_copies(&cluster, &acked).await;
    for s in &sessions {
        assert_holds(&c, cluster.node(3), s, &acked[s]).await;
    }
}

/// A node started with `DATABASE_URL` among nodes without it would read archive marks that
/// mean something else to it: the others refuse its connections, it says why, and it never
/// turns ready, while the two that agree serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_that_disagree_on_the_archive_refuse_each_other() {
    let mut cluster = Cluster::unstarted(3, &[]);
    cluster.nodes[0].set_env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nowhere");
    for node in &mut cluster.nodes {
        node.launch();
    }
    cluster.nodes[1].wait_ready().await;
    cluster.nodes[2].wait_ready().await;
    let c = client();
    create(&c, &cluster.urls()[1..], "agreeing").await;
    append(&c, &cluster.urls()[1..], "agreeing", 1).await;
    let started = std::time::Instant::now();
    loop {
        let refused = cluster
            .nodes
            .iter()
            .any(|n| n.log().contains("different cluster configuration"));
        if refused {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no node refused the odd one out:\n{}",
            cluster.node(1).log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = c
        .get(format!("{}/health/ready", cluster.node(0).url()))
        .send()
        .await
        .expect("ready request")
        .status();
    assert_eq!(ready, 503, "the node with DATABASE_URL must not serve");
}
