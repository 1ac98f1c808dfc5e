//! Starts real `starcite serve` processes on loopback ports for the operations tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
    _temp: Option<tempfile::TempDir>,
    env: Vec<(String, String)>,
}

pub fn free_port() -> u16 {
    starcite_localhost::free_port().expect("a free loopback port")
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_starcite")
}

impl Server {
    pub async fn start(env: &[(&str, &str)]) -> Server {
        let mut server = Server::unstarted(env);
        server.spawn().await;
        server
    }

    /// A server with its own directory and port that is not running yet.
    pub fn unstarted(env: &[(&str, &str)]) -> Server {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().to_path_buf();
        Server {
            port: free_port(),
            dir,
            child: None,
            _temp: Some(temp),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Starts the process without waiting for readiness (a cluster node is ready only once
    /// its peers are up).
    pub fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .env("PORT", self.port.to_string())
            .env("STARCITE_BIND", "127.0.0.1")
            .env("STARCITE_RAFT_DATA_DIR", self.dir.join("data"))
            .env("STARCITE_RAFT_GROUPS", "16")
            .stdout(Stdio::from(log.try_clone().expect("log file")))
            .stderr(Stdio::from(log));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("starcite serve starts"));
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    async fn spawn(&mut self) {
        self.launch();
        self.wait_ready().await;
    }

    pub async fn wait_ready(&self) {
        // No idle pooled connection may outlive the check: some tests count connections.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("http client");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(r) = client
                .get(format!("{}/health/ready", self.url()))
                .send()
                .await
            {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server did not become ready in 20 s; log:\n{}", self.log());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                panic!(
                    "server did not exit within {within:?}; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data directory and port.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub async fn create(client: &reqwest::Client, server: &Server, id: &str) {
    let r = client
        .post(format!("{}/v1/sessions", server.url()))
        .json(&serde_json::json!({"id": id}))
        .send()
        .await
        .expect("create request");
    assert_eq!(r.status(), 201, "create {id}");
}

pub async fn append(
    client: &reqwest::Client,
    server: &Server,
    id: &str,
    payload: serde_json::Value,
) -> u64 {
    let r = client
        .post(format!("{}/v1/sessions/{id}/append", server.url()))
        .json(&serde_json::json!({"type": "content", "actor": "agent:test", "payload": payload}))
        .send()
        .await
        .expect("append request");
    assert_eq!(r.status(), 201, "append to {id}");
    let body: serde_json::Value = r.json().await.expect("ack json");
    body["seq"].as_u64().expect("seq")
}

pub async fn metrics_text(server: &Server) -> String {
    reqwest::get(format!("{}/metrics", server.url()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// The value of an unlabelled metric.
pub async fn metric(server: &Server, name: &str) -> f64 {
    metrics_text(server)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

/// Every event of a session over the paged HTTP read, oldest first.
pub async fn all_events(
    client: &reqwest::Client,
    server: &Server,
    id: &str,
) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut cursor = 0;
    loop {
        let page: serde_json::Value = client
            .get(format!(
                "{}/v1/sessions/{id}/events?cursor={cursor}&limit=1000",
                server.url()
            ))
            .send()
            .await
            .expect("events")
            .json()
            .await
            .expect("json");
        let events = page["events"].as_array().expect("events array").clone();
        if events.is_empty() {
            return out;
        }
        cursor = page["next_cursor"].as_u64().expect("next_cursor");
        out.extend(events);
    }
}

/// Opens a WebSocket tail and reads `count` event frames (10 s per frame at most).
pub async fn ws_events(
    server: &Server,
    id: &str,
    cursor: u64,
    count: usize,
) -> Vec<serde_json::Value> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, _) = tokio_tungstenite::connect_async(
        server.ws_url(&format!("/v1/sessions/{id}/tail?cursor={cursor}")),
    )
    .await
    .expect("ws");
    let mut out = Vec::new();
    while out.len() < count {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("frame within 10 s")
            .expect("open")
            .expect("ok");
        match msg {
            Message::Text(t) => out.push(serde_json::from_str(&t).expect("json")),
            Message::Close(frame) => panic!("tail closed early: {frame:?}"),
            _ => {}
        }
    }
    out
}

/// Several `starcite serve` processes forming one cluster on loopback.
pub struct Cluster {
    pub nodes: Vec<Server>,
}

impl Cluster {
    /// Starts `n` nodes (names n1…) and waits until every one is ready.
    pub async fn start(n: usize, env: &[(&str, &str)]) -> Cluster {
        let mut cluster = Cluster::unstarted(n, env);
        for node in &mut cluster.nodes {
            node.launch();
        }
        for node in &cluster.nodes {
            node.wait_ready().await;
        }
        cluster
    }

    /// `n` nodes (names n1…) configured as one cluster, none running yet.
    pub fn unstarted(n: usize, env: &[(&str, &str)]) -> Cluster {
        let peer_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let cluster_nodes = peer_ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("n{}@127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        for i in 0..n {
            let mut server = Server::unstarted(env);
            server.set_env("NODE_NAME", &format!("n{}", i + 1));
            server.set_env("CLUSTER_NODES", &cluster_nodes);
            nodes.push(server);
        }
        Cluster { nodes }
    }

    pub fn node(&self, i: usize) -> &Server {
        &self.nodes[i]
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    /// Starts node `i` again on its data directory and waits until it is ready.
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].kill9();
        self.nodes[i].launch();
        self.nodes[i].wait_ready().await;
    }

    /// Every node killed with SIGKILL, then all started again.
    pub async fn restart_all(&mut self) {
        for node in &mut self.nodes {
            node.kill9();
        }
        for node in &mut self.nodes {
            node.launch();
        }
        for node in &self.nodes {
            node.wait_ready().await;
        }
    }
}

/// POSTs JSON to the first node that answers; on 503 or a network error tries the next one
/// (the same request: appends carry an idempotency key). Gives up after `within`.
pub async fn post_any(
    client: &reqwest::Client,
    urls: &[String],
    path: &str,
    body: &serde_json::Value,
    within: Duration,
) -> (u16, serde_json::Value) {
    let deadline = Instant::now() + within;
    let mut i = 0usize;
    loop {
        let url = &urls[i % urls.len()];
        i += 1;
        match client
            .post(format!("{url}{path}"))
            .json(body)
            .timeout(Duration::from_secs(3))
            .send()
            .await
        {
            Ok(r) if r.status() != 503 => {
                let status = r.status().as_u16();
                let json = r.json().await.unwrap_or(serde_json::Value::Null);
                return (status, json);
            }
            _ => {
                assert!(
                    Instant::now() < deadline,
                    "{path}: no node answered in {within:?}"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }
}
