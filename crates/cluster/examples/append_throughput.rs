//! In-process append throughput of a single node (no HTTP): N tasks appending to S sessions
//! for D seconds. Prints appends/s and CPU microseconds per append.
//!
//! cargo run --release -p starcite-cluster --example append_throughput -- [tasks] [sessions] [secs] [groups]

use starcite_cluster::{Node, NodeConfig};
use starcite_core::{AppendRequest, CreateRequest, SessionId};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let tasks = *args.first().unwrap_or(&64);
    let sessions = *args.get(1).unwrap_or(&500);
    let secs = *args.get(2).unwrap_or(&10);
    let groups = *args.get(3).unwrap_or(&256) as u32;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = NodeConfig::new(dir.path());
    config.groups = groups;
    let node = Node::open(config, None).await.expect("node opens");
    while !node.is_ready() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for s in 0..sessions {
        let body = format!(r#"{{"id":"s{s}"}}"#);
        node.create_session(CreateRequest::parse(body.as_bytes()).expect("valid"))
            .await
            .expect("created");
    }
    let _ = SessionId::parse("x");
    let payload = "x".repeat(120);
    let body =
        format!(r#"{{"type":"content","actor":"agent:a","payload":{{"text":"{payload}"}}}}"#);
    let request = AppendRequest::parse(body.as_bytes()).expect("valid");
    let done = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(secs);
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    let workers: Vec<_> = (0..tasks)
        .map(|t| {
            let node = node.clone();
            let request = request.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let mut i = t;
                while Instant::now() < stop {
                    let session = format!("s{}", i % sessions);
                    node.append(&session, request.clone())
                        .await
                        .expect("append");
                    done.fetch_add(1, Ordering::Relaxed);
                    i += tasks;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let n = done.load(Ordering::Relaxed) as f64;
    println!(
        "{tasks} tasks, {sessions} sessions, {groups} groups: {:.0} appends/s, {:.1} µs CPU per append",
        n / elapsed,
        cpu * 1e6 / n
    );
}
