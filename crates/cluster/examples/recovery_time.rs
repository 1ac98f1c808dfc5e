//! Measures how long a node takes to reopen a data directory holding N events.
//!
//! `cargo run --release -p starcite-cluster --example recovery_time -- [events] [sessions] [--snapshot]`
//!
//! Writes `events` ~200-byte events spread over `sessions` sessions through the node API (real
//! log, real fsyncs, many writers at once so group commit batches them), closes the node, then
//! times `Node::open` three times. With `--snapshot` a snapshot is taken before closing, so the
//! reopen loads the snapshot instead of replaying the log.

use starcite_cluster::{Node, NodeConfig};
use starcite_core::{AppendRequest, CreateRequest};
use std::time::Instant;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let events: u64 = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let sessions: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(500);
    let snapshot = args.iter().any(|a| a == "--snapshot");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = NodeConfig::new(dir.path());
    config.snapshot_every_bytes = u64::MAX;
    let node = Node::open(config.clone()).expect("open");
    for s in 0..sessions {
        let body = format!(r#"{{"id":"s{s}"}}"#);
        node.create_session(CreateRequest::parse(body.as_bytes()).unwrap())
            .await
            .expect("create");
    }
    let text = "x".repeat(160);
    let started = Instant::now();
    let writers = 256u64;
    let per_writer = events / writers;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let node = node.clone();
        let text = text.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                let body = format!(
                    r#"{{"type":"content","actor":"agent:bench","payload":{{"text":"{text}","i":{i}}}}}"#
                );
                let session = format!("s{}", (w * per_writer + i) % sessions);
                node.append(&session, AppendRequest::parse(body.as_bytes()).unwrap())
                    .await
                    .expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let written = writers * per_writer;
    let elapsed = started.elapsed();
    let stats = node.stats();
    println!(
        "wrote {written} events in {:.1}s ({:.0}/s, {} fsyncs, {:.1} records per fsync, {} MiB of log)",
        elapsed.as_secs_f64(),
        written as f64 / elapsed.as_secs_f64(),
        stats.log_fsyncs,
        stats.log_records_written as f64 / stats.log_fsyncs.max(1) as f64,
        stats.log_bytes_written / (1024 * 1024)
    );
    if snapshot {
        let t = Instant::now();
        node.snapshot_now().expect("snapshot");
        println!("snapshot took {:.2}s", t.elapsed().as_secs_f64());
    }
    drop(node);
    for round in 1..=3 {
        let t = Instant::now();
        let node = Node::open(config.clone()).expect("reopen");
        let secs = t.elapsed().as_secs_f64();
        let lag = node.archive_lag();
        assert_eq!(lag.hot_events, written, "every event recovered");
        println!(
            "reopen {round}: {secs:.2}s for {} events ({} log records replayed)",
            lag.hot_events,
            node.stats().recovery_records_replayed
        );
        drop(node);
    }
}
