//! `starcite-bench drill`: a fault-injection drill. Starts a real local cluster of `starcite
//! serve` processes (optionally with a throwaway PostgreSQL as the cold archive), drives
//! writers that retry every append with the same idempotency key until it is acknowledged and
//! WebSocket tailers that reconnect anywhere with their last seq, while a seeded schedule
//! kills, pauses and wipes nodes and stops Postgres. At the end the cluster is healed, every
//! node's full history (and the archive's) is read, and the pure checker in
//! [`crate::history`] judges the record.

use crate::history::{
    self, Ack, ArchiveCopy, ArchivedRow, Conflict, Delivery, History, NodeHistory, TailLog,
    Violation,
};
use clap::{Args, ValueEnum};
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex as AsyncMutex;

#[derive(Args, Clone, Debug)]
pub struct DrillArgs {
    /// The `starcite` binary (default: `starcite` next to this executable).
    #[arg(long)]
    pub bin: Option<PathBuf>,
    /// Cluster size (3 or 5; at most a minority is ever down or paused at once).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Seconds of load and faults.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Writer tasks (a quarter of them append with expected_seq).
    #[arg(long, default_value_t = 16)]
    pub writers: usize,
    /// Sessions the writers append to.
    #[arg(long, default_value_t = 20)]
    pub sessions: usize,
    /// WebSocket tailers (spread over the sessions, reconnecting on any failure).
    #[arg(long, default_value_t = 6)]
    pub tailers: usize,
    /// Seed of the fault schedule and workload choices (default: from the clock; always
    /// printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Mean time between faults (each interval is drawn from 0.5–1.5 × this).
    #[arg(long, default_value_t = 3000)]
    pub fault_every_ms: u64,
    /// Fault kinds to draw from, comma-separated (default: all that apply).
    #[arg(long, value_delimiter = ',')]
    pub faults: Vec<FaultKind>,
    /// Use this PostgreSQL as the cold archive (`DATABASE_URL` of every node).
    #[arg(long)]
    pub postgres_url: Option<String>,
    /// Start a throwaway PostgreSQL (initdb/pg_ctl from /usr/lib/postgresql/*/bin) in the temp
    /// dir as the cold archive; enables the Postgres-outage fault.
    #[arg(long, conflicts_with = "postgres_url")]
    pub postgres_throwaway: bool,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Approximate size of each event's JSON in bytes.
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    /// `STARCITE_RAFT_GROUPS` of the nodes (default: the server's default).
    #[arg(long)]
    pub raft_groups: Option<u32>,
    /// `STARCITE_ARCHIVE_FLUSH_INTERVAL_MS` of the nodes.
    #[arg(long, default_value_t = 200)]
    pub archive_flush_ms: u64,
    /// `STARCITE_TAIL_KEEP` of the nodes (small, so trimming happens during the drill).
    #[arg(long, default_value_t = 50)]
    pub tail_keep: u64,
    /// `STARCITE_HOT_MAX_BYTES` of the nodes (small, so events spill to disk during the
    /// drill and snapshots, transfers and reads go through the spill store).
    #[arg(long, default_value_t = 2 * 1024 * 1024)]
    pub hot_max_bytes: u64,
    /// Keep the temp dir (data dirs and node logs) even when the drill passes.
    #[arg(long)]
    pub keep_dir: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// kill -9 a random node, restart it after 1–3 s.
    Kill,
    /// kill -9 the node leading the most Raft groups, restart it after 1–3 s.
    KillLeader,
    /// SIGSTOP a random node for 1–4 s, then SIGCONT.
    Pause,
    /// kill -9 a random node, delete its data directory, restart it after 1–3 s.
    Wipe,
    /// Stop the throwaway PostgreSQL for 2–5 s, then start it again.
    PgOutage,
}

impl FaultKind {
    fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::KillLeader => "kill-leader",
            FaultKind::Pause => "pause",
            FaultKind::Wipe => "wipe",
            FaultKind::PgOutage => "pg-outage",
        }
    }
}

/// splitmix64: small, seedable, good enough to draw a schedule.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next_u64() % (hi - lo + 1))
    }
}

use starcite_localhost::free_port;

fn secs(since: Instant) -> f64 {
    (since.elapsed().as_millis() as f64) / 1000.0
}

// ---------------------------------------------------------------------------------------------
// Processes: the nodes and the throwaway PostgreSQL.

struct Node {
    name: String,
    http_port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Option<tokio::process::Child>,
    paused: bool,
    starts: u32,
}

impl Node {
    fn launch(&mut self, bin: &Path, env: &[(String, String)], t: f64) -> Result<(), String> {
        use std::io::Write;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| format!("opening {}: {e}", self.log_path.display()))?;
        self.starts += 1;
        let _ = writeln!(
            log,
            "\n==== drill: start #{} of {} at {t:.1}s ====",
            self.starts, self.name
        );
        let err_log = log
            .try_clone()
            .map_err(|e| format!("log file of {}: {e}", self.name))?;
        let mut cmd = tokio::process::Command::new(bin);
        cmd.arg("serve")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("NODE_NAME", &self.name)
            .env("PORT", self.http_port.to_string())
            .env("STARCITE_RAFT_DATA_DIR", &self.data_dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::from(log))
            .stderr(std::process::Stdio::from(err_log))
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {} ({}): {e}", self.name, bin.display()))?;
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    fn note(&self, text: &str) {
        use std::io::Write;
        if let Ok(mut log) = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log_path)
        {
            let _ = writeln!(log, "==== drill: {text} ====");
        }
    }

    async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        self.paused = false;
    }

    async fn signal(&mut self, sig: &str) -> Result<(), String> {
        let pid = self
            .child
            .as_ref()
            .and_then(|c| c.id())
            .ok_or_else(|| format!("{} is not running", self.name))?;
        let status = tokio::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .await
            .map_err(|e| format!("kill -{sig} {pid}: {e}"))?;
        if !status.success() {
            return Err(format!("kill -{sig} {pid} ({}) failed", self.name));
        }
        self.paused = sig == "STOP";
        Ok(())
    }

    /// The exit status when the process ended on its own.
    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status.to_string())
            }
            _ => None,
        }
    }
}

struct Cluster {
    bin: PathBuf,
    /// Environment shared by every node (`NODE_NAME`, `PORT` and the data dir are per node).
    env: Vec<(String, String)>,
    nodes: Vec<AsyncMutex<Node>>,
    names: Vec<String>,
    urls: Vec<String>,
    /// Up and not paused: writers and tailers pick among these.
    live: Vec<AtomicBool>,
    /// Under a fault: down, paused, or restarted and not ready yet.
    busy: Vec<AtomicBool>,
    max_down: usize,
    probe: reqwest::Client,
    start: Instant,
}

impl Cluster {
    fn new(
        bin: &Path,
        dir: &Path,
        n: usize,
        extra_env: &[(String, String)],
        start: Instant,
    ) -> Result<Cluster, String> {
        let raft_ports = (0..n).map(|_| free_port()).collect::<Result<Vec<_>, _>>()?;
        let cluster_nodes = raft_ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("n{}@127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut env = vec![
            ("CLUSTER_NODES".to_string(), cluster_nodes),
            ("STARCITE_BIND".to_string(), "127.0.0.1".to_string()),
        ];
        env.extend(extra_env.iter().cloned());
        let mut nodes = Vec::new();
        let mut urls = Vec::new();
        let mut names = Vec::new();
        for i in 0..n {
            let name = format!("n{}", i + 1);
            let http_port = free_port()?;
            urls.push(format!("http://127.0.0.1:{http_port}"));
            names.push(name.clone());
            nodes.push(AsyncMutex::new(Node {
                data_dir: dir.join(&name),
                log_path: dir.join(format!("{name}.log")),
                name,
                http_port,
                child: None,
                paused: false,
                starts: 0,
            }));
        }
        let probe = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        Ok(Cluster {
            bin: bin.to_path_buf(),
            env,
            live: (0..n).map(|_| AtomicBool::new(false)).collect(),
            busy: (0..n).map(|_| AtomicBool::new(false)).collect(),
            max_down: (n - 1) / 2,
            nodes,
            names,
            urls,
            probe,
            start,
        })
    }

    async fn launch(&self, i: usize) -> Result<(), String> {
        let t = secs(self.start);
        self.nodes[i].lock().await.launch(&self.bin, &self.env, t)
    }

    async fn is_ready(&self, i: usize) -> bool {
        matches!(
            self.probe
                .get(format!("{}/health/ready", self.urls[i]))
                .send()
                .await,
            Ok(r) if r.status() == 200
        )
    }

    /// Waits until node `i` answers `/health/ready` with 200; the time it took.
    async fn wait_ready(&self, i: usize, within: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            if self.is_ready(i).await {
                return Ok(started.elapsed());
            }
            if let Some(status) = self.nodes[i].lock().await.exited() {
                return Err(format!(
                    "{} exited while starting ({status})",
                    self.names[i]
                ));
            }
            if started.elapsed() > within {
                return Err(format!(
                    "{} not ready within {}s",
                    self.names[i],
                    within.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn pick_live(&self, rng: &mut Rng) -> usize {
        let live: Vec<usize> = (0..self.urls.len())
            .filter(|&i| self.live[i].load(Ordering::Relaxed))
            .collect();
        if live.is_empty() {
            rng.below(self.urls.len())
        } else {
            live[rng.below(live.len())]
        }
    }

    fn busy_count(&self) -> usize {
        self.busy
            .iter()
            .filter(|b| b.load(Ordering::Relaxed))
            .count()
    }

    /// `starcite_raft_groups_led` of node `i`.
    async fn groups_led(&self, i: usize) -> Option<f64> {
        self.gauge(i, "starcite_raft_groups_led").await
    }

    /// Whether some node still has groups catching up after losing its data. Wiping another
    /// node then could leave a group with a single replica allowed to vote: it stops for good
    /// (the operator rule in docs/deployment.md), so the drill waits, as an operator must.
    async fn any_rejoining(&self) -> bool {
        for i in 0..self.urls.len() {
            if self.busy[i].load(Ordering::Relaxed) {
                continue;
            }
            if self
                .gauge(i, "starcite_raft_groups_rejoining")
                .await
                .is_none_or(|v| v > 0.0)
            {
                return true;
            }
        }
        false
    }

    /// An unlabelled gauge from node `i`'s `/metrics`.
    async fn gauge(&self, i: usize, name: &str) -> Option<f64> {
        let prefix = format!("{name} ");
        let text = self
            .probe
            .get(format!("{}/metrics", self.urls[i]))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    async fn shutdown(&self) {
        for node in &self.nodes {
            node.lock().await.kill9().await;
        }
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n") || o.stdout == b"0")
        .unwrap_or(false)
}

/// A throwaway PostgreSQL in the drill's temp dir (as in `crates/archive/tests/support`): run
/// as the `postgres` user when we are root, because initdb refuses root.
struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    root: bool,
}

impl Postgres {
    fn command(&self, tool: &str) -> tokio::process::Command {
        if self.root {
            let mut c = tokio::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(tool));
            c
        } else {
            tokio::process::Command::new(self.bin.join(tool))
        }
    }

    async fn create(dir: &Path) -> Result<Postgres, String> {
        let bin = starcite_localhost::postgres_bin_dir().ok_or(
            "--postgres-throwaway needs the PostgreSQL server binaries in \
             /usr/lib/postgresql/*/bin (apt-get install postgresql)",
        )?;
        let root = is_root();
        let pg_dir = dir.join("pg");
        std::fs::create_dir_all(&pg_dir)
            .map_err(|e| format!("creating {}: {e}", pg_dir.display()))?;
        if root {
            let status = tokio::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&pg_dir)
                .status()
                .await
                .map_err(|e| format!("chown: {e}"))?;
            if !status.success() {
                return Err("chown of the throwaway PostgreSQL dir failed".into());
            }
        }
        let pg = Postgres {
            bin,
            data: pg_dir.join("data"),
            port: free_port()?,
            root,
        };
        let out = pg
            .command("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&pg.data)
            .output()
            .await
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        pg.start().await?;
        Ok(pg)
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    async fn start(&self) -> Result<(), String> {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "60", "-l"])
            .arg(self.data.join("server.log"))
            .arg("-o")
            .arg(format!(
                "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=200",
                self.port,
                self.data.display()
            ))
            .arg("start")
            .output()
            .await
            .map_err(|e| format!("pg_ctl start: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "pg_ctl start failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    async fn stop(&self, mode: &str) -> Result<(), String> {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "stop"])
            .output()
            .await
            .map_err(|e| format!("pg_ctl stop: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "pg_ctl stop failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut cmd = if self.root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"));
            c
        } else {
            std::process::Command::new(self.bin.join("pg_ctl"))
        };
        let _ = cmd
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

// ---------------------------------------------------------------------------------------------
// The workload: writers and tailers.

#[derive(Default)]
struct Counters {
    acked: AtomicU64,
    deduped: AtomicU64,
    conflicts: AtomicU64,
    retries: AtomicU64,
    unavailable: AtomicU64,
    server_errors: AtomicU64,
    network_errors: AtomicU64,
    tail_deliveries: AtomicU64,
    tail_connections: AtomicU64,
}

impl Counters {
    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

struct Shared {
    cluster: Arc<Cluster>,
    sessions: Vec<String>,
    run: String,
    pad: String,
    /// Writers start no new append.
    stop_new: AtomicBool,
    /// Writers stop retrying the append in flight.
    give_up: AtomicBool,
    /// Per session, the seq tailers must reach before they stop (set at the end).
    tail_targets: std::sync::Mutex<Option<HashMap<String, u64>>>,
    tail_stop: AtomicBool,
    counters: Counters,
    /// Server errors worth a look (first few), for the report.
    error_samples: std::sync::Mutex<Vec<String>>,
    start: Instant,
}

impl Shared {
    fn sample_error(&self, text: String) {
        if let Ok(mut s) = self.error_samples.lock() {
            if s.len() < 20 {
                s.push(format!("[{:.1}s] {text}", secs(self.start)));
            }
        }
    }
}

#[derive(Default)]
struct WriterLog {
    acks: Vec<Ack>,
    conflicts: Vec<Conflict>,
    sent_keys: Vec<String>,
    /// Answers that are not part of the contract for these requests (violations).
    unexpected: Vec<(String, String)>,
    /// Keys still unacknowledged when the writer had to give up.
    unacked: Vec<(String, String)>,
}

enum Answer {
    Ack {
        seq: u64,
        last_seq: u64,
        deduped: bool,
        attempts: u32,
    },
    Conflict,
    Unexpected(String),
    GaveUp,
}

async fn backoff(attempt: u32, rng: &mut Rng) {
    let base = 20u64 << attempt.min(4);
    tokio::time::sleep(rng.millis(base / 2, base)).await;
}

/// Sends the same append (same idempotency key) to random live nodes until a definite answer.
async fn append_until_answered(
    shared: &Shared,
    client: &reqwest::Client,
    session: &str,
    body: &Value,
    rng: &mut Rng,
) -> Answer {
    let mut attempts = 0u32;
    loop {
        if shared.give_up.load(Ordering::Relaxed) {
            return Answer::GaveUp;
        }
        if attempts > 0 {
            shared.counters.retries.fetch_add(1, Ordering::Relaxed);
            backoff(attempts, rng).await;
        }
        attempts += 1;
        let node = shared.cluster.pick_live(rng);
        let url = format!("{}/v1/sessions/{session}/append", shared.cluster.urls[node]);
        let response = match client.post(&url).json(body).send().await {
            Ok(r) => r,
            Err(_) => {
                shared
                    .counters
                    .network_errors
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let status = response.status().as_u16();
        let Ok(bytes) = response.bytes().await else {
            shared
                .counters
                .network_errors
                .fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        match status {
            201 => {
                let (Some(seq), Some(last_seq), Some(deduped)) = (
                    answer["seq"].as_u64(),
                    answer["last_seq"].as_u64(),
                    answer["deduped"].as_bool(),
                ) else {
                    return Answer::Unexpected(format!(
                        "201 without seq/last_seq/deduped from {}: {}",
                        shared.cluster.names[node],
                        String::from_utf8_lossy(&bytes)
                    ));
                };
                return Answer::Ack {
                    seq,
                    last_seq,
                    deduped,
                    attempts,
                };
            }
            409 if answer["error"] == "expected_seq_conflict"
                && body.get("expected_seq").is_some() =>
            {
                return Answer::Conflict;
            }
            503 => {
                shared.counters.unavailable.fetch_add(1, Ordering::Relaxed);
            }
            500..=599 => {
                shared
                    .counters
                    .server_errors
                    .fetch_add(1, Ordering::Relaxed);
                shared.sample_error(format!(
                    "append via {} → {status}: {}",
                    shared.cluster.names[node],
                    String::from_utf8_lossy(&bytes)
                ));
            }
            _ => {
                return Answer::Unexpected(format!(
                    "append via {} → {status}: {}",
                    shared.cluster.names[node],
                    String::from_utf8_lossy(&bytes)
                ));
            }
        }
    }
}

/// `last_seq` of a session from a random live node; `None` once writers must stop.
async fn read_last_seq(
    shared: &Shared,
    client: &reqwest::Client,
    session: &str,
    rng: &mut Rng,
) -> Result<Option<u64>, String> {
    let mut attempts = 0;
    loop {
        if shared.stop_new.load(Ordering::Relaxed) {
            return Ok(None);
        }
        if attempts > 0 {
            backoff(attempts, rng).await;
        }
        attempts += 1;
        let node = shared.cluster.pick_live(rng);
        let url = format!("{}/v1/sessions/{session}", shared.cluster.urls[node]);
        let Ok(response) = client.get(&url).send().await else {
            continue;
        };
        let status = response.status().as_u16();
        let Ok(bytes) = response.bytes().await else {
            continue;
        };
        match status {
            200 => {
                let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                return match v["last_seq"].as_u64() {
                    Some(s) => Ok(Some(s)),
                    None => Err(format!(
                        "session read via {} without last_seq: {}",
                        shared.cluster.names[node],
                        String::from_utf8_lossy(&bytes)
                    )),
                };
            }
            500..=599 => {}
            _ => {
                return Err(format!(
                    "session read via {} → {status}: {}",
                    shared.cluster.names[node],
                    String::from_utf8_lossy(&bytes)
                ))
            }
        }
    }
}

async fn writer(shared: Arc<Shared>, w: usize, optimistic: bool, mut rng: Rng) -> WriterLog {
    let mut log = WriterLog::default();
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(1))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            log.unexpected
                .push((String::new(), format!("writer {w}: no http client: {e}")));
            return log;
        }
    };
    let mut n = 0u64;
    while !shared.stop_new.load(Ordering::Relaxed) {
        n += 1;
        let session = shared.sessions[rng.below(shared.sessions.len())].clone();
        let key = format!("{}-w{w}-{n}", shared.run);
        let payload = json!({"w": w, "n": n, "pad": shared.pad});
        let mut body = json!({
            "type": "drill",
            "actor": format!("writer:{w}"),
            "payload": payload,
            "idempotency_key": key,
        });
        let expected_seq = if optimistic {
            match read_last_seq(&shared, &client, &session, &mut rng).await {
                Ok(Some(s)) => Some(s),
                Ok(None) => break,
                Err(e) => {
                    log.unexpected.push((session.clone(), e));
                    if log.unexpected.len() > 100 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        } else {
            None
        };
        if let Some(e) = expected_seq {
            body["expected_seq"] = json!(e);
        }
        log.sent_keys.push(key.clone());
        match append_until_answered(&shared, &client, &session, &body, &mut rng).await {
            Answer::Ack {
                seq,
                last_seq,
                deduped,
                attempts,
            } => {
                shared.counters.acked.fetch_add(1, Ordering::Relaxed);
                if deduped {
                    shared.counters.deduped.fetch_add(1, Ordering::Relaxed);
                }
                log.acks.push(Ack {
                    session,
                    key,
                    payload: digest(&payload),
                    seq,
                    last_seq,
                    deduped,
                    expected_seq,
                    attempts,
                });
            }
            Answer::Conflict => {
                shared.counters.conflicts.fetch_add(1, Ordering::Relaxed);
                log.conflicts.push(Conflict {
                    session,
                    key,
                    expected_seq: expected_seq.unwrap_or(0),
                });
            }
            Answer::Unexpected(text) => {
                log.unexpected
                    .push((session, format!("writer {w}, key {key}: {text}")));
                if log.unexpected.len() > 100 {
                    break;
                }
            }
            Answer::GaveUp => {
                log.unacked.push((session, key));
                break;
            }
        }
    }
    log
}

fn tail_done(shared: &Shared, session: &str, last: u64) -> bool {
    if shared.tail_stop.load(Ordering::Relaxed) {
        return true;
    }
    match shared.tail_targets.lock() {
        Ok(targets) => targets
            .as_ref()
            .is_some_and(|t| last >= t.get(session).copied().unwrap_or(0)),
        Err(_) => true,
    }
}

/// Follows one session over WebSocket; on any close, error or 5 s of silence reconnects to a
/// random live node with the last received seq as cursor.
async fn tailer(shared: Arc<Shared>, t: usize, session: String, mut rng: Rng) -> TailLog {
    use tokio_tungstenite::tungstenite::Message;
    let mut deliveries = Vec::new();
    let mut last = 0u64;
    let mut conn = 0u32;
    while !tail_done(&shared, &session, last) {
        let node = shared.cluster.pick_live(&mut rng);
        let url = format!(
            "{}/v1/sessions/{session}/tail?cursor={last}",
            shared.cluster.urls[node].replacen("http://", "ws://", 1)
        );
        let connected =
            tokio::time::timeout(Duration::from_secs(3), crate::http::ws_connect(&url)).await;
        let Ok(Ok(mut ws)) = connected else {
            tokio::time::sleep(rng.millis(50, 150)).await;
            continue;
        };
        conn += 1;
        shared
            .counters
            .tail_connections
            .fetch_add(1, Ordering::Relaxed);
        let mut idle = Duration::ZERO;
        loop {
            match tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    idle = Duration::ZERO;
                    let event: Value = serde_json::from_str(text.as_str())
                        .map(compact_event)
                        .unwrap_or_else(|_| Value::String(text.as_str().to_owned()));
                    if let Some(seq) = history::event_seq(&event) {
                        last = last.max(seq);
                    }
                    deliveries.push(Delivery { conn, event });
                    shared
                        .counters
                        .tail_deliveries
                        .fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => break,
                Ok(Some(Ok(_))) => {}
                Err(_) => {
                    if tail_done(&shared, &session, last) {
                        break;
                    }
                    idle += Duration::from_millis(500);
                    if idle >= Duration::from_secs(5) {
                        break;
                    }
                }
            }
        }
    }
    TailLog {
        tailer: t,
        session,
        deliveries,
    }
}

// ---------------------------------------------------------------------------------------------
// Faults.

#[derive(Debug, Clone, Serialize)]
struct FaultRecord {
    kind: FaultKind,
    target: String,
    at_s: f64,
    /// How long the node was down or paused (or Postgres stopped).
    down_ms: u64,
    /// From restart (or SIGCONT) to `/health/ready` = 200.
    ready_ms: Option<u64>,
    /// Wipes: from ready to no group of the node still catching up (it votes again).
    caught_up_ms: Option<u64>,
    note: String,
}

async fn node_fault(
    cluster: Arc<Cluster>,
    kind: FaultKind,
    i: usize,
    down: Duration,
    note: String,
) -> (FaultRecord, Option<String>) {
    let at_s = secs(cluster.start);
    let name = cluster.names[i].clone();
    cluster.live[i].store(false, Ordering::Relaxed);
    let mut error = None;
    {
        let mut node = cluster.nodes[i].lock().await;
        match kind {
            FaultKind::Pause => {
                node.note(&format!("SIGSTOP at {at_s:.1}s"));
                if let Err(e) = node.signal("STOP").await {
                    error = Some(e);
                }
            }
            _ => {
                node.kill9().await;
                node.note(&format!("{} (kill -9) at {at_s:.1}s", kind.name()));
                if kind == FaultKind::Wipe {
                    if let Err(e) = std::fs::remove_dir_all(&node.data_dir) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            error = Some(format!("wiping {}: {e}", node.data_dir.display()));
                        }
                    }
                }
            }
        }
    }
    println!(
        "  [{at_s:6.1}s] {:<11} {name} for {:.1}s{}",
        kind.name(),
        down.as_secs_f64(),
        if note.is_empty() {
            String::new()
        } else {
            format!(" ({note})")
        }
    );
    tokio::time::sleep(down).await;
    {
        let mut node = cluster.nodes[i].lock().await;
        let t = secs(cluster.start);
        let result = if kind == FaultKind::Pause {
            node.note(&format!("SIGCONT at {t:.1}s"));
            node.signal("CONT").await
        } else {
            node.launch(&cluster.bin, &cluster.env, t)
        };
        if let Err(e) = result {
            error.get_or_insert(e);
        }
    }
    let ready = cluster.wait_ready(i, Duration::from_secs(90)).await;
    let ready_ms = ready.as_ref().ok().map(|d| d.as_millis() as u64);
    if let Err(e) = ready {
        error.get_or_insert(e);
    } else {
        cluster.live[i].store(true, Ordering::Relaxed);
        cluster.busy[i].store(false, Ordering::Relaxed);
    }
    let mut caught_up_ms = None;
    if kind == FaultKind::Wipe && ready_ms.is_some() {
        let since = Instant::now();
        while since.elapsed() < Duration::from_secs(90) {
            if cluster.gauge(i, "starcite_raft_groups_rejoining").await == Some(0.0) {
                caught_up_ms = Some(since.elapsed().as_millis() as u64);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if caught_up_ms.is_none() {
            error.get_or_insert(format!(
                "{name} still had groups catching up 90 s after it was ready again"
            ));
        }
    }
    // A node that never became ready stays busy: no further fault may take another node down.
    (
        FaultRecord {
            kind,
            target: name,
            at_s,
            down_ms: down.as_millis() as u64,
            ready_ms,
            caught_up_ms,
            note,
        },
        error,
    )
}

async fn pg_fault(
    pg: Arc<Postgres>,
    busy: Arc<AtomicBool>,
    down: Duration,
    immediate: bool,
    start: Instant,
) -> (FaultRecord, Option<String>) {
    let at_s = secs(start);
    let mode = if immediate { "immediate" } else { "fast" };
    println!(
        "  [{at_s:6.1}s] pg-outage   postgres for {:.1}s (stop -m {mode})",
        down.as_secs_f64()
    );
    let mut error = pg.stop(mode).await.err();
    tokio::time::sleep(down).await;
    let started = Instant::now();
    // pg_ctl start can fail while the old postmaster is still shutting down: retry a little.
    let mut result = pg.start().await;
    for _ in 0..5 {
        if result.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        result = pg.start().await;
    }
    if let Err(e) = result {
        error.get_or_insert(e);
    }
    busy.store(false, Ordering::Relaxed);
    (
        FaultRecord {
            kind: FaultKind::PgOutage,
            target: "postgres".into(),
            at_s,
            down_ms: down.as_millis() as u64,
            ready_ms: Some(started.elapsed().as_millis() as u64),
            caught_up_ms: None,
            note: format!("pg_ctl stop -m {mode}"),
        },
        error,
    )
}

#[derive(Default)]
struct FaultLog {
    records: Vec<FaultRecord>,
    /// Fault or recovery failures (a node that never became ready again, a node that exited
    /// on its own): drill-level violations.
    problems: Vec<String>,
}

/// Draws faults on the seeded schedule until `stop`; a fault whose node budget is used up
/// waits until a node is back. Waits for the faults in progress before returning.
async fn inject(
    cluster: Arc<Cluster>,
    pg: Option<Arc<Postgres>>,
    kinds: Vec<FaultKind>,
    every: Duration,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> FaultLog {
    let mut rng = Rng::new(seed ^ 0xFA_0175);
    let mut log = FaultLog::default();
    let mut tasks = tokio::task::JoinSet::new();
    let pg_busy = Arc::new(AtomicBool::new(false));
    let n = cluster.urls.len();
    let jitter = |rng: &mut Rng| every.mul_f64(0.5 + (rng.next_u64() % 1000) as f64 / 1000.0);
    let mut next = Instant::now() + jitter(&mut rng);
    'schedule: loop {
        while Instant::now() < next {
            if stop.load(Ordering::Relaxed) {
                break 'schedule;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            while let Some(done) = tasks.try_join_next() {
                collect(&mut log, done);
            }
        }
        // Nodes that died on their own are a finding; start them again.
        for i in 0..n {
            if cluster.busy[i].load(Ordering::Relaxed) {
                continue;
            }
            let exited = match cluster.nodes[i].try_lock() {
                Ok(mut node) => node.exited(),
                Err(_) => None,
            };
            if let Some(status) = exited {
                let t = secs(cluster.start);
                log.problems.push(format!(
                    "{} exited on its own at {t:.1}s ({status}); restarted",
                    cluster.names[i]
                ));
                println!(
                    "  [{t:6.1}s] {} EXITED ON ITS OWN ({status})",
                    cluster.names[i]
                );
                cluster.live[i].store(false, Ordering::Relaxed);
                cluster.busy[i].store(true, Ordering::Relaxed);
                let c = cluster.clone();
                tasks.spawn(async move {
                    let mut error = c.launch(i).await.err();
                    let ready = c.wait_ready(i, Duration::from_secs(90)).await;
                    match ready {
                        Ok(_) => {
                            c.live[i].store(true, Ordering::Relaxed);
                            c.busy[i].store(false, Ordering::Relaxed);
                        }
                        Err(e) => {
                            error.get_or_insert(e);
                        }
                    }
                    (None, error)
                });
            }
        }
        // Draw everything for this step up front so the schedule depends only on the seed.
        let kind = kinds[rng.below(kinds.len())];
        let victim = rng.next_u64();
        let down_short = rng.millis(1000, 3000);
        let down_pause = rng.millis(1000, 4000);
        let down_pg = rng.millis(2000, 5000);
        let immediate = rng.next_u64().is_multiple_of(2);
        let gap = jitter(&mut rng);
        next = Instant::now() + gap;
        if kind == FaultKind::PgOutage {
            let Some(pg) = pg.clone() else { continue };
            if pg_busy.swap(true, Ordering::Relaxed) {
                continue; // an outage is already in progress
            }
            let start = cluster.start;
            let busy = pg_busy.clone();
            tasks.spawn(async move {
                let (r, e) = pg_fault(pg, busy, down_pg, immediate, start).await;
                (Some(r), e)
            });
            continue;
        }
        // Wait for the node budget (never more than a minority down or paused).
        while cluster.busy_count() >= cluster.max_down {
            if stop.load(Ordering::Relaxed) {
                break 'schedule;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            while let Some(done) = tasks.try_join_next() {
                collect(&mut log, done);
            }
        }
        if kind == FaultKind::Wipe {
            while cluster.any_rejoining().await || cluster.busy_count() > 0 {
                if stop.load(Ordering::Relaxed) {
                    break 'schedule;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                while let Some(done) = tasks.try_join_next() {
                    collect(&mut log, done);
                }
            }
        }
        next = Instant::now() + gap;
        let candidates: Vec<usize> = (0..n)
            .filter(|&i| !cluster.busy[i].load(Ordering::Relaxed))
            .collect();
        if candidates.is_empty() {
            continue;
        }
        let mut note = String::new();
        let i = if kind == FaultKind::KillLeader {
            let mut best: Option<(usize, f64)> = None;
            for &i in &candidates {
                if let Some(led) = cluster.groups_led(i).await {
                    if best.is_none_or(|(_, b)| led > b) {
                        best = Some((i, led));
                    }
                }
            }
            match best {
                Some((i, led)) => {
                    note = format!("leading {led} groups");
                    i
                }
                None => {
                    note = "no metrics answered; random node".into();
                    candidates[(victim % candidates.len() as u64) as usize]
                }
            }
        } else {
            candidates[(victim % candidates.len() as u64) as usize]
        };
        cluster.busy[i].store(true, Ordering::Relaxed);
        let down = if kind == FaultKind::Pause {
            down_pause
        } else {
            down_short
        };
        let c = cluster.clone();
        tasks.spawn(async move {
            let (r, e) = node_fault(c, kind, i, down, note).await;
            (Some(r), e)
        });
    }
    while let Some(done) = tasks.join_next().await {
        collect(&mut log, done);
    }
    log
}

type FaultOutcome = (Option<FaultRecord>, Option<String>);

fn collect(log: &mut FaultLog, done: Result<FaultOutcome, tokio::task::JoinError>) {
    match done {
        Ok((record, error)) => {
            if let Some(e) = error {
                let what = record
                    .as_ref()
                    .map(|r| format!("{} of {} at {:.1}s: ", r.kind.name(), r.target, r.at_s))
                    .unwrap_or_default();
                println!("  fault problem: {what}{e}");
                log.problems.push(format!("{what}{e}"));
            }
            if let Some(r) = record {
                log.records.push(r);
            }
        }
        Err(e) => log.problems.push(format!("fault task failed: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// The end: reading every node's history and the archive.

/// GET with retries on 503, 5xx and network errors until `within` has passed.
async fn get_json(client: &reqwest::Client, url: &str, within: Duration) -> Result<Value, String> {
    let started = Instant::now();
    let mut last_error;
    loop {
        match client.get(url).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                match r.bytes().await {
                    Ok(bytes) if status == 200 => {
                        return serde_json::from_slice(&bytes)
                            .map_err(|e| format!("GET {url}: bad JSON: {e}"));
                    }
                    Ok(bytes) if status >= 500 => {
                        last_error = format!("{status} {}", String::from_utf8_lossy(&bytes));
                    }
                    Ok(bytes) => {
                        return Err(format!(
                            "GET {url} → {status}: {}",
                            String::from_utf8_lossy(&bytes)
                        ))
                    }
                    Err(e) => last_error = e.to_string(),
                }
            }
            Err(e) => last_error = e.to_string(),
        }
        if started.elapsed() > within {
            return Err(format!(
                "GET {url}: no answer within {within:?} ({last_error})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A session's full history from one node, over the paged events read.
/// What the checker keeps of an event: its seq and idempotency key, a digest of its payload
/// (compared with the acknowledged one) and a digest of the whole event (compared across
/// nodes, tails and the archive). Kept whole as JSON, the events of a 2.5M-append run (every
/// node's copy, the tails' and the archive's) took more than the machine's 24 GiB.
fn compact_event(event: Value) -> Value {
    let Value::Object(fields) = &event else {
        return event;
    };
    let mut out = serde_json::Map::new();
    for name in ["seq", "idempotency_key"] {
        if let Some(v) = fields.get(name) {
            out.insert(name.to_owned(), v.clone());
        }
    }
    if let Some(payload) = fields.get("payload") {
        out.insert("payload".to_owned(), digest(payload));
    }
    out.insert("digest".to_owned(), digest(&event));
    Value::Object(out)
}

/// A 64-bit digest of a JSON value (its canonical text: object keys sorted), as a number.
fn digest(value: &Value) -> Value {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.to_string().hash(&mut h);
    Value::from(h.finish())
}

async fn read_history(
    client: &reqwest::Client,
    base: &str,
    session: &str,
    within: Duration,
) -> Result<Vec<Value>, String> {
    let mut out: Vec<Value> = Vec::new();
    let mut cursor = 0u64;
    loop {
        let url = format!("{base}/v1/sessions/{session}/events?cursor={cursor}&limit=1000");
        let page = get_json(client, &url, within).await?;
        let events = page["events"]
            .as_array()
            .ok_or_else(|| format!("GET {url}: no events array"))?;
        if events.is_empty() {
            return Ok(out);
        }
        let next = page["next_cursor"]
            .as_u64()
            .ok_or_else(|| format!("GET {url}: no next_cursor"))?;
        if next <= cursor {
            return Err(format!(
                "GET {url}: next_cursor {next} does not advance past {cursor}"
            ));
        }
        out.extend(events.iter().cloned().map(compact_event));
        cursor = next;
    }
}

/// Waits until the shared archive holds at least `last_seq` rows per session, then reads them.
async fn read_archive(
    url: &str,
    last_seq: &BTreeMap<String, u64>,
) -> Result<(ArchiveCopy, f64), String> {
    use sqlx::{Connection, Row};
    let started = Instant::now();
    let mut conn = loop {
        match sqlx::PgConnection::connect(url).await {
            Ok(c) => break c,
            Err(e) if started.elapsed() > Duration::from_secs(60) => {
                return Err(format!("cannot connect to the archive: {e}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    let ids: Vec<String> = last_seq.keys().cloned().collect();
    loop {
        let rows = sqlx::query(
            "SELECT session_id, count(*) FROM events WHERE session_id = ANY($1) GROUP BY session_id",
        )
        .bind(&ids)
        .fetch_all(&mut conn)
        .await
        .map_err(|e| format!("archive count: {e}"))?;
        let mut counts: HashMap<String, i64> = HashMap::new();
        for row in rows {
            let id: String = row.try_get(0).map_err(|e| e.to_string())?;
            let n: i64 = row.try_get(1).map_err(|e| e.to_string())?;
            counts.insert(id, n);
        }
        let behind = last_seq
            .iter()
            .filter(|(s, &n)| counts.get(*s).copied().unwrap_or(0) < n as i64)
            .count();
        if behind == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            println!("  the archive is still behind on {behind} sessions after 120 s");
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let waited = started.elapsed().as_secs_f64();
    let mut out = BTreeMap::new();
    for id in &ids {
        let rows = sqlx::query("SELECT seq, frame FROM events WHERE session_id = $1 ORDER BY seq")
            .bind(id)
            .fetch_all(&mut conn)
            .await
            .map_err(|e| format!("archive read of {id}: {e}"))?;
        let list = rows
            .iter()
            .map(|row| archived_row(row.try_get(0), row.try_get(1)))
            .collect::<Result<_, _>>()?;
        out.insert(id.clone(), list);
    }
    let copy = ArchiveCopy {
        name: "archive".into(),
        rows: out,
        holds_every_session: true,
    };
    Ok((copy, waited))
}

/// One archived row as the checker keeps it, from the `seq` and `frame` columns.
fn archived_row(
    seq: Result<i64, sqlx::Error>,
    frame: Result<Option<String>, sqlx::Error>,
) -> Result<ArchivedRow, String> {
    let seq = seq.map_err(|e| e.to_string())?;
    let frame = frame.map_err(|e| e.to_string())?;
    Ok(ArchivedRow {
        seq: seq.max(0) as u64,
        frame: frame
            .and_then(|f| serde_json::from_str(&f).ok())
            .map(compact_event),
    })
}

/// Without Postgres each node archives the sessions it replicates to its own SQLite file:
/// waits until every session has `copies` whole copies among the files, then reads them all.
async fn read_node_archives(
    files: &[(String, PathBuf)],
    last_seq: &BTreeMap<String, u64>,
    copies: usize,
) -> Result<(Vec<ArchiveCopy>, f64), String> {
    use sqlx::{Connection, Row};
    let started = Instant::now();
    loop {
        let mut whole: HashMap<&str, usize> = HashMap::new();
        for (_, path) in files {
            for (id, count) in sqlite_counts(path).await? {
                if let Some((id, _)) = last_seq.get_key_value(&id).filter(|(_, &n)| count >= n) {
                    *whole.entry(id.as_str()).or_default() += 1;
                }
            }
        }
        let behind = last_seq
            .keys()
            .filter(|id| whole.get(id.as_str()).copied().unwrap_or(0) < copies)
            .count();
        if behind == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            println!("  the nodes' archives are still behind on {behind} sessions after 120 s");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let waited = started.elapsed().as_secs_f64();
    let mut out = Vec::new();
    for (node, path) in files {
        let mut rows = BTreeMap::new();
        if path.exists() {
            let mut conn = sqlite_connect(path).await?;
            for id in last_seq.keys() {
                let list =
                    sqlx::query("SELECT seq, frame FROM events WHERE session_id = ? ORDER BY seq")
                        .bind(id)
                        .fetch_all(&mut conn)
                        .await
                        .map_err(|e| format!("archive of {node}, read of {id}: {e}"))?
                        .iter()
                        .map(|row| archived_row(row.try_get(0), row.try_get(1)))
                        .collect::<Result<Vec<_>, _>>()?;
                rows.insert(id.clone(), list);
            }
            let _ = conn.close().await;
        }
        out.push(ArchiveCopy {
            name: format!("archive of {node}"),
            rows,
            holds_every_session: false,
        });
    }
    Ok((out, waited))
}

async fn sqlite_connect(path: &Path) -> Result<sqlx::SqliteConnection, String> {
    use sqlx::Connection;
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .busy_timeout(Duration::from_secs(10));
    sqlx::SqliteConnection::connect_with(&options)
        .await
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

/// Events per session in a node's archive file (none if it does not exist yet).
async fn sqlite_counts(path: &Path) -> Result<Vec<(String, u64)>, String> {
    use sqlx::{Connection, Row};
    if !path.exists() {
        return Ok(Vec::new());
    }
    let mut conn = sqlite_connect(path).await?;
    // Through the `events` view, like the history read below: the drill checks what an
    // operator sees, whatever the table layout behind it.
    let rows = sqlx::query("SELECT session_id, count(*) FROM events GROUP BY session_id")
        .fetch_all(&mut conn)
        .await
        .map_err(|e| format!("count in {}: {e}", path.display()))?;
    let _ = conn.close().await;
    rows.iter()
        .map(|r| {
            let id: String = r.try_get(0).map_err(|e| e.to_string())?;
            let n: i64 = r.try_get(1).map_err(|e| e.to_string())?;
            Ok((id, n.max(0) as u64))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The drill.

#[derive(Debug, Serialize)]
pub struct DrillReport {
    command: String,
    seed: u64,
    nodes: usize,
    duration_s: f64,
    writers: usize,
    sessions: usize,
    tailers: usize,
    fault_every_ms: u64,
    /// The cold archive: a throwaway or given Postgres, or each node's own file.
    archive: String,
    temp_dir: String,
    appends_acked: u64,
    dedupes: u64,
    conflicts: u64,
    retries: u64,
    unavailable_503: u64,
    server_errors_5xx: u64,
    network_errors: u64,
    unacked_at_end: usize,
    events_stored: u64,
    tail_deliveries: u64,
    tail_connections: u64,
    /// Events the nodes moved to their spill stores (since each node's last start).
    events_spilled: u64,
    faults_injected: usize,
    faults_by_kind: BTreeMap<String, usize>,
    fault_readiness_ms_max: Option<u64>,
    wipe_catch_up_ms_max: Option<u64>,
    archive_wait_s: Option<f64>,
    elapsed_s: f64,
    violations: usize,
    violations_by_kind: BTreeMap<String, usize>,
    first_violations: Vec<Violation>,
    error_samples: Vec<String>,
    faults: Vec<FaultRecord>,
}

fn default_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 % 1_000_000_000)
        .unwrap_or(1)
}

pub async fn run(args: DrillArgs) -> Result<(), String> {
    if args.nodes < 3 || args.nodes.is_multiple_of(2) {
        return Err("--nodes must be odd and at least 3 (3 or 5)".into());
    }
    if args.writers == 0 || args.sessions == 0 || args.duration.is_nan() || args.duration <= 0.0 {
        return Err("--writers, --sessions and --duration must be positive".into());
    }
    if args.fault_every_ms == 0 {
        return Err("--fault-every-ms must be positive".into());
    }
    let seed = args.seed.unwrap_or_else(default_seed);
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this executable: {e}"))?
            .with_file_name("starcite"),
    };
    if !bin.is_file() {
        return Err(format!(
            "{} not found (build it with cargo build --release -p starcite-server, or pass --bin)",
            bin.display()
        ));
    }
    let dir = std::env::temp_dir().join(format!("starcite-drill-{seed}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        // The throwaway PostgreSQL runs as another user and must reach its directory.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
    }
    println!(
        "drill: seed {seed}, {} nodes, {}s, {} writers, {} sessions, {} tailers, a fault every ~{} ms; temp dir {}",
        args.nodes,
        args.duration,
        args.writers,
        args.sessions,
        args.tailers,
        args.fault_every_ms,
        dir.display()
    );
    // Ctrl-C or SIGTERM (e.g. from `timeout`) ends the drill cleanly: dropping it kills the
    // nodes (kill_on_drop) and stops the throwaway PostgreSQL.
    let interrupted = async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            } => "SIGTERM",
        }
    };
    let outcome = tokio::select! {
        r = drill(&args, seed, &bin, &dir) => r,
        sig = interrupted => Err(format!("interrupted by {sig}")),
    };
    let report = match outcome {
        Ok(r) => r,
        Err(e) => {
            println!("drill: aborted; temp dir kept: {}", dir.display());
            return Err(format!("drill (seed {seed}): {e}"));
        }
    };
    print_report(&report);
    if let Some(out) = &args.out {
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(out, json).map_err(|e| format!("writing {}: {e}", out.display()))?;
    }
    if report.violations == 0 {
        if args.keep_dir {
            println!("temp dir kept: {}", dir.display());
        } else if let Err(e) = std::fs::remove_dir_all(&dir) {
            println!("could not remove {}: {e}", dir.display());
        }
        println!("violations: 0");
        Ok(())
    } else {
        println!("temp dir kept (node logs, data dirs): {}", dir.display());
        println!("violations: {}", report.violations);
        Err(format!(
            "drill found {} violations (seed {seed})",
            report.violations
        ))
    }
}

fn print_report(r: &DrillReport) {
    println!();
    println!("drill result (seed {}):", r.seed);
    println!(
        "  appends acked {}  (dedupes {}, expected_seq conflicts {}, retries {}, 503s {}, other 5xx {}, network errors/timeouts {})",
        r.appends_acked,
        r.dedupes,
        r.conflicts,
        r.retries,
        r.unavailable_503,
        r.server_errors_5xx,
        r.network_errors
    );
    println!(
        "  events stored {}  unacked at the end {}  spilled to disk {} (since each node's last start)",
        r.events_stored, r.unacked_at_end, r.events_spilled
    );
    println!(
        "  tail deliveries {}  over {} connections",
        r.tail_deliveries, r.tail_connections
    );
    let kinds: Vec<String> = r
        .faults_by_kind
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!(
        "  faults injected {}: {}  (slowest return to ready {} ms; slowest catch-up after a wipe {} ms)",
        r.faults_injected,
        kinds.join(", "),
        r.fault_readiness_ms_max
            .map(|m| m.to_string())
            .unwrap_or_else(|| "-".into()),
        r.wipe_catch_up_ms_max
            .map(|m| m.to_string())
            .unwrap_or_else(|| "-".into())
    );
    if let Some(w) = r.archive_wait_s {
        println!("  archive ({}) caught up {w:.1}s after the end", r.archive);
    }
    for s in r.error_samples.iter().take(5) {
        println!("  server error sample: {s}");
    }
    if r.violations > 0 {
        let kinds: Vec<String> = r
            .violations_by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!("  violations by kind: {}", kinds.join(", "));
        for v in r.first_violations.iter().take(20) {
            println!("  VIOLATION {} [{}]: {}", v.kind, v.session, v.detail);
        }
    }
    println!("  elapsed {:.1}s", r.elapsed_s);
}

async fn drill(args: &DrillArgs, seed: u64, bin: &Path, dir: &Path) -> Result<DrillReport, String> {
    let start = Instant::now();
    let mut rng = Rng::new(seed);
    // The cold archive.
    let pg = if args.postgres_throwaway {
        let pg = Postgres::create(dir).await?;
        println!(
            "  throwaway PostgreSQL on port {} in {}",
            pg.port,
            pg.data.display()
        );
        Some(Arc::new(pg))
    } else {
        None
    };
    let pg_url = pg
        .as_ref()
        .map(|p| p.url())
        .or_else(|| args.postgres_url.clone());
    let mut env = vec![
        (
            "STARCITE_ARCHIVE_FLUSH_INTERVAL_MS".to_string(),
            args.archive_flush_ms.to_string(),
        ),
        ("STARCITE_TAIL_KEEP".to_string(), args.tail_keep.to_string()),
        (
            "STARCITE_HOT_MAX_BYTES".to_string(),
            args.hot_max_bytes.to_string(),
        ),
    ];
    if let Some(url) = &pg_url {
        env.push(("DATABASE_URL".to_string(), url.clone()));
    }
    if let Some(groups) = args.raft_groups {
        env.push(("STARCITE_RAFT_GROUPS".to_string(), groups.to_string()));
    }
    let cluster = Arc::new(Cluster::new(bin, dir, args.nodes, &env, start)?);
    let result = drill_on(
        args,
        seed,
        &mut rng,
        cluster.clone(),
        pg.clone(),
        pg_url,
        dir,
        start,
    )
    .await;
    cluster.shutdown().await;
    drop(pg);
    result
}

#[allow(clippy::too_many_arguments)]
async fn drill_on(
    args: &DrillArgs,
    seed: u64,
    rng: &mut Rng,
    cluster: Arc<Cluster>,
    pg: Option<Arc<Postgres>>,
    pg_url: Option<String>,
    dir: &Path,
    start: Instant,
) -> Result<DrillReport, String> {
    let n = args.nodes;
    for i in 0..n {
        cluster.launch(i).await?;
    }
    for i in 0..n {
        cluster
            .wait_ready(i, Duration::from_secs(120))
            .await
            .map_err(|e| format!("cluster start: {e}"))?;
        cluster.live[i].store(true, Ordering::Relaxed);
    }
    println!(
        "  cluster ready after {:.1}s: {}",
        secs(start),
        cluster.urls.join(" ")
    );

    // Sessions, with ids unique to this run (a shared Postgres may hold earlier runs).
    let run = format!("d{seed}-{:x}", default_seed() % 0xFFFFFF);
    let sessions: Vec<String> = (0..args.sessions).map(|i| format!("{run}-s{i}")).collect();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    for id in &sessions {
        let started = Instant::now();
        loop {
            let node = cluster.pick_live(rng);
            let r = client
                .post(format!("{}/v1/sessions", cluster.urls[node]))
                .json(&json!({"id": id, "title": "drill"}))
                .send()
                .await;
            match r.map(|r| r.status().as_u16()) {
                // 409: an earlier try that timed out did create it.
                Ok(201) | Ok(409) => break,
                Ok(s) if s < 500 => return Err(format!("creating session {id}: {s}")),
                _ if started.elapsed() > Duration::from_secs(60) => {
                    return Err(format!("creating session {id}: no answer within 60 s"))
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    let shared = Arc::new(Shared {
        cluster: cluster.clone(),
        sessions: sessions.clone(),
        run: run.clone(),
        pad: "x".repeat(args.payload_bytes.saturating_sub(110).max(8)),
        stop_new: AtomicBool::new(false),
        give_up: AtomicBool::new(false),
        tail_targets: std::sync::Mutex::new(None),
        tail_stop: AtomicBool::new(false),
        counters: Counters::default(),
        error_samples: std::sync::Mutex::new(Vec::new()),
        start,
    });
    let mut tailers = Vec::new();
    for t in 0..args.tailers {
        let session = sessions[t % sessions.len()].clone();
        let r = Rng::new(seed ^ (0x7A11 + t as u64));
        tailers.push(tokio::spawn(tailer(shared.clone(), t, session, r)));
    }
    let mut writers = Vec::new();
    for w in 0..args.writers {
        let r = Rng::new(seed ^ (0x3717E + w as u64));
        writers.push(tokio::spawn(writer(shared.clone(), w, w % 4 == 3, r)));
    }
    let mut kinds: Vec<FaultKind> = if args.faults.is_empty() {
        vec![
            FaultKind::Kill,
            FaultKind::KillLeader,
            FaultKind::Pause,
            FaultKind::Wipe,
            FaultKind::PgOutage,
        ]
    } else {
        args.faults.clone()
    };
    if pg.is_none() {
        kinds.retain(|k| *k != FaultKind::PgOutage);
    }
    kinds.sort();
    kinds.dedup();
    let stop_faults = Arc::new(AtomicBool::new(false));
    let injector = if kinds.is_empty() {
        None
    } else {
        Some(tokio::spawn(inject(
            cluster.clone(),
            pg.clone(),
            kinds,
            Duration::from_millis(args.fault_every_ms),
            seed,
            stop_faults.clone(),
        )))
    };
    let progress = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            loop {
                tick.tick().await;
                let c = &shared.counters;
                let acked = Counters::get(&c.acked);
                let live: Vec<String> = (0..shared.cluster.urls.len())
                    .map(|i| {
                        let up = shared.cluster.live[i].load(Ordering::Relaxed);
                        format!("{}{}", if up { "" } else { "-" }, shared.cluster.names[i])
                    })
                    .collect();
                println!(
                    "  [{:6.1}s] acked {acked} (+{}/s), dedupes {}, conflicts {}, retries {}, tail deliveries {}; nodes {}",
                    secs(shared.start),
                    (acked - last) / 5,
                    Counters::get(&c.deduped),
                    Counters::get(&c.conflicts),
                    Counters::get(&c.retries),
                    Counters::get(&c.tail_deliveries),
                    live.join(" ")
                );
                last = acked;
            }
        })
    };

    // Load and faults for --duration; a cluster that acknowledges nothing for 120 s ends them
    // early (the verdict will say why).
    let load_end = Instant::now() + Duration::from_secs_f64(args.duration);
    let mut last_acked = (0u64, Instant::now());
    let mut stalled = None;
    while Instant::now() < load_end {
        tokio::time::sleep(
            load_end
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1)),
        )
        .await;
        let acked = Counters::get(&shared.counters.acked);
        if acked != last_acked.0 {
            last_acked = (acked, Instant::now());
        } else if last_acked.1.elapsed() > Duration::from_secs(120) {
            let t = secs(start);
            println!("  [{t:6.1}s] no append acknowledged for 120 s: ending the load early");
            stalled = Some(t);
            break;
        }
    }
    println!(
        "  [{:6.1}s] load and faults end; healing the cluster",
        secs(start)
    );
    shared.stop_new.store(true, Ordering::Relaxed);
    stop_faults.store(true, Ordering::Relaxed);
    let mut faults = match injector {
        Some(j) => j
            .await
            .map_err(|e| format!("fault injector crashed: {e}"))?,
        None => FaultLog::default(),
    };
    // Heal: every node running and not paused, then ready.
    for i in 0..n {
        let mut node = cluster.nodes[i].lock().await;
        if let Some(status) = node.exited() {
            faults.problems.push(format!(
                "{} had exited on its own by the end ({status})",
                node.name
            ));
        }
        if node.paused {
            node.signal("CONT").await?;
        }
        if node.child.is_none() {
            node.launch(&cluster.bin, &cluster.env, secs(start))?;
        }
    }
    if let Some(pg) = &pg {
        // Harmless if it is running already.
        let _ = pg.start().await;
    }
    let mut drill_violations: Vec<Violation> = Vec::new();
    if let Some(t) = stalled {
        drill_violations.push(Violation {
            kind: "stalled",
            session: String::new(),
            detail: format!(
                "no append was acknowledged between {:.1}s and {t:.1}s (load ended early)",
                t - 120.0
            ),
        });
    }
    let heal_deadline = Instant::now() + Duration::from_secs(120);
    let mut not_ready: Vec<usize> = (0..n).collect();
    let mut last_error: HashMap<usize, String> = HashMap::new();
    while !not_ready.is_empty() && Instant::now() < heal_deadline {
        let mut still = Vec::new();
        for &i in &not_ready {
            if cluster.is_ready(i).await {
                cluster.live[i].store(true, Ordering::Relaxed);
                continue;
            }
            let mut node = cluster.nodes[i].lock().await;
            if let Some(status) = node.exited() {
                // Exited on its own while healing: a finding; start it again.
                let t = secs(start);
                println!(
                    "  [{t:6.1}s] {} EXITED ON ITS OWN while healing ({status})",
                    node.name
                );
                faults.problems.push(format!(
                    "{} exited on its own at {t:.1}s while healing ({status}); restarted",
                    node.name
                ));
                if let Err(e) = node.launch(&cluster.bin, &cluster.env, t) {
                    last_error.insert(i, e);
                }
            }
            still.push(i);
        }
        not_ready = still;
        if !not_ready.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let healthy = not_ready.is_empty();
    for i in not_ready {
        let e = last_error.remove(&i).unwrap_or_default();
        println!("  {} NOT READY after healing {e}", cluster.names[i]);
        drill_violations.push(Violation {
            kind: "node_not_ready",
            session: String::new(),
            detail: format!(
                "{} not ready within 120 s after the faults stopped and every process was running {e}",
                cluster.names[i]
            ),
        });
    }
    println!(
        "  [{:6.1}s] {}; writers finish their last appends",
        secs(start),
        if healthy {
            "all nodes ready"
        } else {
            "the cluster did not heal"
        }
    );
    // Writers finish the append in flight (a healthy cluster must answer within 60 s).
    let give_up = {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            shared.give_up.store(true, Ordering::Relaxed);
        })
    };
    let mut logs = Vec::new();
    for w in writers {
        logs.push(w.await.map_err(|e| format!("writer crashed: {e}"))?);
    }
    give_up.abort();
    progress.abort();

    // The final last_seq of every session, from the first node that answers.
    let mut max_acked: HashMap<&str, u64> = HashMap::new();
    for ack in logs.iter().flat_map(|l| &l.acks) {
        let m = max_acked.entry(ack.session.as_str()).or_insert(0);
        *m = (*m).max(ack.seq);
    }
    let per_try = Duration::from_secs(if healthy { 60 } else { 5 });
    let answers = futures_util::future::join_all(sessions.iter().enumerate().map(|(k, id)| {
        let (client, cluster) = (&client, &cluster);
        async move {
            let mut answer = Err(String::new());
            for j in 0..n {
                let node = (k + j) % n;
                answer = get_json(
                    client,
                    &format!("{}/v1/sessions/{id}", cluster.urls[node]),
                    per_try,
                )
                .await
                .and_then(|v| {
                    v["last_seq"]
                        .as_u64()
                        .ok_or_else(|| format!("session {id} without last_seq: {v}"))
                });
                if answer.is_ok() {
                    break;
                }
            }
            answer
        }
    }))
    .await;
    let mut last_seq = BTreeMap::new();
    for (id, answer) in sessions.iter().zip(answers) {
        let s = match answer {
            Ok(s) => s,
            Err(e) => {
                let fallback = max_acked.get(id.as_str()).copied().unwrap_or(0);
                drill_violations.push(Violation {
                    kind: "session_unavailable",
                    session: id.clone(),
                    detail: format!(
                        "no node answered GET /v1/sessions/{id} after healing ({e}); checking against the highest acked seq {fallback}"
                    ),
                });
                fallback
            }
        };
        last_seq.insert(id.clone(), s);
    }
    // Tailers catch up to it (60 s at most).
    if let Ok(mut t) = shared.tail_targets.lock() {
        *t = Some(last_seq.clone().into_iter().collect());
    }
    let tail_stop = {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            shared.tail_stop.store(true, Ordering::Relaxed);
        })
    };
    let mut tails = Vec::new();
    for t in tailers {
        tails.push(t.await.map_err(|e| format!("tailer crashed: {e}"))?);
    }
    tail_stop.abort();
    println!(
        "  [{:6.1}s] tailers done; reading every node's history",
        secs(start)
    );

    // Every node's full history.
    let mut nodes = Vec::new();
    let reader = reqwest::Client::builder()
        .timeout(if healthy {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(5)
        })
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    let read_within = if healthy {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(5)
    };
    for i in 0..n {
        let mut histories = BTreeMap::new();
        let reads = futures_util::future::join_all(
            sessions
                .iter()
                .map(|id| read_history(&reader, &cluster.urls[i], id, read_within)),
        )
        .await;
        for (id, read) in sessions.iter().zip(reads) {
            match read {
                Ok(events) => {
                    histories.insert(id.clone(), events);
                }
                Err(e) => drill_violations.push(Violation {
                    kind: "read_failed",
                    session: id.clone(),
                    detail: format!("{}: {e}", cluster.names[i]),
                }),
            }
        }
        nodes.push(NodeHistory {
            node: cluster.names[i].clone(),
            sessions: histories,
        });
    }
    // The reference (compared with the other nodes and the tails) is the node that answered
    // for the most sessions.
    nodes.sort_by_key(|h| std::cmp::Reverse(h.sessions.len()));
    let events_stored: u64 = nodes
        .first()
        .map(|h| h.sessions.values().map(|e| e.len() as u64).sum())
        .unwrap_or(0);
    // Spilled since each node's last start (counters restart with the process).
    let mut events_spilled = 0u64;
    for i in 0..n {
        events_spilled += cluster
            .gauge(i, "starcite_spilled_events_total")
            .await
            .unwrap_or(0.0) as u64;
    }
    let read = match &pg_url {
        Some(url) => read_archive(url, &last_seq)
            .await
            .map(|(copy, waited)| (vec![copy], waited)),
        None => {
            let mut files = Vec::new();
            for node in &cluster.nodes {
                let node = node.lock().await;
                files.push((node.name.clone(), node.data_dir.join("archive.sqlite3")));
            }
            read_node_archives(&files, &last_seq, n.min(3)).await
        }
    };
    let (archives, archive_wait_s) = match read {
        Ok((archives, waited)) => (archives, Some(waited)),
        Err(e) => {
            drill_violations.push(Violation {
                kind: "archive_unreadable",
                session: String::new(),
                detail: e,
            });
            (Vec::new(), None)
        }
    };

    // The record, and the verdict.
    let mut history = History {
        sessions: sessions.clone(),
        last_seq,
        nodes,
        tails,
        archive_copies_per_session: if pg_url.is_some() || archives.is_empty() {
            0
        } else {
            n.min(3)
        },
        archives,
        ..History::default()
    };
    let mut unacked = 0;
    for log in logs {
        history.acks.extend(log.acks);
        history.conflicts.extend(log.conflicts);
        history.sent_keys.extend(log.sent_keys);
        for (session, detail) in log.unexpected {
            drill_violations.push(Violation {
                kind: "unexpected_response",
                session,
                detail,
            });
        }
        for (session, key) in log.unacked {
            unacked += 1;
            drill_violations.push(Violation {
                kind: "append_never_acked",
                session,
                detail: format!(
                    "key {key}: no answer within 60 s after the cluster was healed and ready"
                ),
            });
        }
    }
    for p in &faults.problems {
        drill_violations.push(Violation {
            kind: "node_fault_recovery",
            session: String::new(),
            detail: p.clone(),
        });
    }
    let mut violations = drill_violations;
    violations.extend(history::check(&history));

    let c = &shared.counters;
    let mut faults_by_kind = BTreeMap::new();
    for r in &faults.records {
        *faults_by_kind.entry(r.kind.name().to_string()).or_insert(0) += 1;
    }
    Ok(DrillReport {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        seed,
        nodes: n,
        duration_s: args.duration,
        writers: args.writers,
        sessions: args.sessions,
        tailers: args.tailers,
        fault_every_ms: args.fault_every_ms,
        archive: if args.postgres_throwaway {
            "throwaway Postgres".into()
        } else if args.postgres_url.is_some() {
            "Postgres".into()
        } else {
            "each node's own SQLite file".into()
        },
        temp_dir: dir.display().to_string(),
        appends_acked: Counters::get(&c.acked),
        dedupes: Counters::get(&c.deduped),
        conflicts: Counters::get(&c.conflicts),
        retries: Counters::get(&c.retries),
        unavailable_503: Counters::get(&c.unavailable),
        server_errors_5xx: Counters::get(&c.server_errors),
        network_errors: Counters::get(&c.network_errors),
        unacked_at_end: unacked,
        events_stored,
        tail_deliveries: Counters::get(&c.tail_deliveries),
        tail_connections: Counters::get(&c.tail_connections),
        events_spilled,
        faults_injected: faults.records.len(),
        faults_by_kind,
        fault_readiness_ms_max: faults
            .records
            .iter()
            .filter(|r| r.kind != FaultKind::PgOutage)
            .filter_map(|r| r.ready_ms)
            .max(),
        wipe_catch_up_ms_max: faults.records.iter().filter_map(|r| r.caught_up_ms).max(),
        archive_wait_s,
        elapsed_s: secs(start),
        violations: violations.len(),
        violations_by_kind: history::by_kind(&violations)
            .into_iter()
            .map(|(k, n)| (k.to_string(), n))
            .collect(),
        first_violations: violations.iter().take(100).cloned().collect(),
        error_samples: shared
            .error_samples
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default(),
        faults: faults.records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_events_keep_what_the_checker_compares() {
        let payload = json!({"w": 3, "n": 17, "pad": "xxxx"});
        let text = r#"{"seq":5,"type":"drill","payload":{"n":17,"w":3,"pad":"xxxx"},"actor":"writer:3","idempotency_key":"k","inserted_at":"2026-11-23T00:00:00.000Z"}"#;
        let event = compact_event(serde_json::from_str(text).unwrap());
        assert_eq!(history::event_seq(&event), Some(5));
        assert_eq!(event["idempotency_key"], "k");
        assert_eq!(
            event["payload"],
            digest(&payload),
            "the acked payload's digest"
        );
        assert_eq!(event, compact_event(serde_json::from_str(text).unwrap()));
        let later = text.replace("00.000Z", "00.001Z");
        assert_ne!(event, compact_event(serde_json::from_str(&later).unwrap()));
        let other = text.replace(r#""pad":"xxxx""#, r#""pad":"xxxy""#);
        let other = compact_event(serde_json::from_str(&other).unwrap());
        assert_ne!(event["payload"], other["payload"]);
        assert_eq!(compact_event(json!("not an event")), json!("not an event"));
    }
}
