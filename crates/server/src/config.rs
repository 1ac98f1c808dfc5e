//! `starcite serve` settings: every one an environment variable and a flag, validated once at
//! start-up.

use clap::Args;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// HTTP port.
    #[arg(long, env = "PORT", default_value_t = 4000)]
    pub port: u16,

    /// Address the HTTP listener binds to (use 0.0.0.0 in containers).
    #[arg(long, env = "STARCITE_BIND", default_value = "127.0.0.1")]
    pub bind: IpAddr,

    /// Directory for the log, snapshots and the embedded archive. Created if missing.
    #[arg(
        long,
        env = "STARCITE_RAFT_DATA_DIR",
        default_value = "./starcite-data"
    )]
    pub data_dir: PathBuf,

    /// This node's name in CLUSTER_NODES.
    #[arg(long, env = "NODE_NAME", default_value = "n1")]
    pub node_name: String,

    /// Every node's internal (node-to-node) address as name@host:port,… (the same list on
    /// every node). This node listens on its own entry's port. Unset, or naming only this
    /// node: a single node.
    #[arg(long, env = "CLUSTER_NODES")]
    pub cluster_nodes: Option<String>,

    /// How a node with an empty data directory joins: `auto` asks the other nodes (rejoin if
    /// any has data), `new` (a new cluster), `existing` (a replaced or wiped node: it catches
    /// up before it votes).
    #[arg(long, env = "STARCITE_CLUSTER_STATE", default_value = "auto",
          value_parser = ["auto", "new", "existing"])]
    pub cluster_state: String,

    /// Address the internal listener binds to. Default: the host of this node's
    /// CLUSTER_NODES entry if it is an IP address, else 0.0.0.0 (on that entry's port).
    #[arg(long, env = "STARCITE_CLUSTER_BIND")]
    pub cluster_bind: Option<IpAddr>,

    /// How often a group leader sends heartbeats to its followers (milliseconds).
    #[arg(long, env = "STARCITE_RAFT_HEARTBEAT_MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(10..=10_000))]
    pub raft_heartbeat_ms: u64,

    /// A follower that hears nothing from its leader for this long (up to twice this)
    /// starts an election (milliseconds). Must be at least twice the heartbeat interval.
    #[arg(long, env = "STARCITE_RAFT_ELECTION_TIMEOUT_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub raft_election_timeout_ms: u64,

    /// Number of groups sessions hash into. Fixed for the life of a data directory.
    #[arg(long, env = "STARCITE_RAFT_GROUPS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub raft_groups: u32,

    /// Postgres URL for the cold archive (also read from STARCITE_POSTGRES_URL); a cluster's
    /// nodes share it. Unset: the embedded archive in the data directory (in a cluster, each
    /// node's own, holding the sessions it replicates). All nodes must agree.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,

    /// Archive cadence in milliseconds: what is pending is copied over about this long, in
    /// 1,000-event batches (less than a batch pending: once per interval).
    #[arg(long, env = "STARCITE_ARCHIVE_FLUSH_INTERVAL_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub archive_flush_interval_ms: u64,

    /// Archived events kept hot (in memory) per session.
    #[arg(long, env = "STARCITE_TAIL_KEEP", default_value_t = 1000)]
    pub tail_keep: u64,

    /// Postgres connection pool size.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_pool_size: u32,

    /// Largest accepted request body in bytes; bigger bodies get 413 payload_too_large.
    #[arg(long, env = "STARCITE_MAX_BODY_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(64..=(256 * 1024 * 1024)))]
    pub max_body_bytes: u64,

    /// Number of most recent events per session whose idempotency keys are remembered.
    #[arg(long, env = "STARCITE_IDEMPOTENCY_WINDOW", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub idempotency_window: u64,

    /// How long a request may wait (for a write slot, for durability) before 503 unavailable.
    #[arg(long, env = "STARCITE_REQUEST_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_ms: u64,

    /// A tail whose socket accepts nothing for this long is closed with code 1013 (slow
    /// consumer) and its last delivered seq.
    #[arg(long, env = "STARCITE_TAIL_SEND_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub tail_send_timeout_ms: u64,

    /// Idle tails are pinged at this interval (milliseconds).
    #[arg(long, env = "STARCITE_TAIL_PING_INTERVAL_MS", default_value_t = 15_000,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub tail_ping_interval_ms: u64,

    /// Keep the log on disk near this size: past it, the groups holding its oldest segment
    /// take a snapshot so that segment can be deleted.
    #[arg(long, env = "STARCITE_SNAPSHOT_EVERY_BYTES", default_value_t = 256 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..))]
    pub snapshot_every_bytes: u64,

    /// Each group takes a snapshot (and drops the log entries it covers) after this many
    /// log entries.
    #[arg(long, env = "STARCITE_SNAPSHOT_EVERY_ENTRIES", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(10..))]
    pub snapshot_every_entries: u64,

    /// Memory the events held hot may take, in bytes, over all groups. Past it, the node
    /// moves events to its spill store on local disk (events already archived simply leave
    /// memory), so an archive outage costs disk, not memory.
    #[arg(long, env = "STARCITE_HOT_MAX_BYTES", default_value_t = 256 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(4096..))]
    pub hot_max_bytes: u64,

    /// Log segment size in bytes.
    #[arg(long, env = "STARCITE_SEGMENT_BYTES", default_value_t = 64 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..))]
    pub segment_bytes: u64,

    /// Most open client connections; beyond it new connections get an immediate 503 and are
    /// closed.
    #[arg(long, env = "STARCITE_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,

    /// A client must send a request's complete headers within this many milliseconds.
    #[arg(long, env = "STARCITE_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_ms: u64,

    /// Origins allowed to call the API from a browser (CORS), comma-separated, or `*`.
    /// Unset: no CORS headers (same-origin and non-browser clients only).
    #[arg(long, env = "STARCITE_CORS_ORIGINS")]
    pub cors_origins: Option<String>,

    /// Threads serving requests and peers. Default: one per CPU core, shared out among the
    /// cluster's nodes on this same host (at least one each): three nodes on a 2-core machine
    /// get one each.
    #[arg(long, env = "STARCITE_WORKER_THREADS",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,

    /// Log format: `text` (human-readable) or `json`.
    #[arg(long, env = "STARCITE_LOG_FORMAT", default_value = "text",
          value_parser = ["text", "json"])]
    pub log_format: String,
}

impl ServeConfig {
    /// Checks that cannot be expressed as a single flag's parser. Returns a message for people.
    pub fn validate(&mut self) -> Result<(), String> {
        if self.database_url.is_none() {
            self.database_url = std::env::var("STARCITE_POSTGRES_URL")
                .ok()
                .filter(|s| !s.is_empty());
        }
        if let Some(url) = &self.database_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(format!(
                    "DATABASE_URL must be a postgres:// or postgresql:// URL, got {url:?}"
                ));
            }
        }
        if let Some(origins) = &self.cors_origins {
            for origin in origins.split(',').map(str::trim).filter(|o| *o != "*") {
                if !(origin.starts_with("http://") || origin.starts_with("https://"))
                    || origin.parse::<axum::http::HeaderValue>().is_err()
                {
                    return Err(format!(
                        "STARCITE_CORS_ORIGINS entry {origin:?} is not an origin like https://app.example.com"
                    ));
                }
            }
        }
        if self.node_name.is_empty() {
            return Err("NODE_NAME must not be empty".into());
        }
        if let Some(nodes) = self
            .cluster_nodes
            .as_deref()
            .filter(|s| !s.trim().is_empty())
        {
            let parsed = parse_cluster_nodes(nodes)?;
            if !parsed.iter().any(|(name, _)| name == &self.node_name) {
                return Err(format!(
                    "NODE_NAME {:?} is not listed in CLUSTER_NODES {nodes:?}",
                    self.node_name
                ));
            }
        }
        if self.raft_election_timeout_ms < 2 * self.raft_heartbeat_ms {
            return Err(format!(
                "STARCITE_RAFT_ELECTION_TIMEOUT_MS ({}) must be at least twice \
                 STARCITE_RAFT_HEARTBEAT_MS ({})",
                self.raft_election_timeout_ms, self.raft_heartbeat_ms
            ));
        }
        Ok(())
    }

    /// Every node as (name, internal address) when this node is part of a multi-node
    /// cluster; empty for a single node.
    pub fn cluster(&self) -> Vec<(String, String)> {
        self.cluster_nodes
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .and_then(|raw| parse_cluster_nodes(raw).ok())
            .filter(|nodes| nodes.len() > 1)
            .unwrap_or_default()
    }

    /// How many of the cluster's nodes (this one included) run on this node's host: the same
    /// host name or address, or loopback addresses both. 1 for a single node.
    pub fn nodes_on_this_host(&self) -> usize {
        let nodes = self.cluster();
        let Some((_, mine)) = nodes.iter().find(|(name, _)| name == &self.node_name) else {
            return 1;
        };
        let mine = host_of(mine);
        nodes
            .iter()
            .filter(|(_, addr)| same_host(&host_of(addr), &mine))
            .count()
            .max(1)
    }

    /// Tokio worker threads: as configured, else the host's cores shared out among the nodes
    /// running on it. Several processes each taking every core fight over them: on two cores,
    /// three nodes with two workers each used ~15% more CPU per append than with one each,
    /// for a higher tail latency and no more throughput (docs/benchmarks.md).
    pub fn worker_thread_count(&self, cores: usize) -> usize {
        match self.worker_threads {
            Some(n) => usize::from(n),
            None => (cores / self.nodes_on_this_host()).max(1),
        }
    }

    /// Where the internal listener binds, for a multi-node cluster.
    pub fn cluster_listen_addr(&self) -> Option<std::net::SocketAddr> {
        let nodes = self.cluster();
        let (_, addr) = nodes.iter().find(|(name, _)| name == &self.node_name)?;
        let (host, port) = addr.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip = self
            .cluster_bind
            .or_else(|| host.parse::<IpAddr>().ok())
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        Some(std::net::SocketAddr::new(ip, port))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// The host part of `host:port` (brackets of an IPv6 address removed), lowercased.
fn host_of(addr: &str) -> String {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

fn same_host(a: &str, b: &str) -> bool {
    let loopback =
        |h: &str| h == "localhost" || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    a == b || (loopback(a) && loopback(b))
}

/// `name@host:port,…` → [(name, "host:port")].
pub fn parse_cluster_nodes(raw: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for item in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, addr) = item
            .split_once('@')
            .ok_or_else(|| format!("CLUSTER_NODES entry {item:?} is not name@host:port"))?;
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| format!("CLUSTER_NODES entry {item:?} has no port"))?;
        if name.is_empty() || host.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!(
                "CLUSTER_NODES entry {item:?} is not name@host:port"
            ));
        }
        if out.iter().any(|(n, _)| n == name) {
            return Err(format!("CLUSTER_NODES names {name:?} twice"));
        }
        out.push((name.to_owned(), addr.to_owned()));
    }
    if out.is_empty() {
        return Err("CLUSTER_NODES is empty".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cluster_nodes() {
        let nodes = parse_cluster_nodes("n1@127.0.0.1:7101, n2@localhost:7102").unwrap();
        assert_eq!(nodes[1], ("n2".into(), "localhost:7102".into()));
        assert!(parse_cluster_nodes("n1").is_err());
        assert!(parse_cluster_nodes("n1@host").is_err());
        assert!(parse_cluster_nodes("n1@h:1,n1@h:2").is_err());
        assert!(parse_cluster_nodes(" , ").is_err());
    }

    fn config(args: &[&str]) -> ServeConfig {
        use clap::Parser;
        #[derive(Parser)]
        struct Args {
            #[command(flatten)]
            serve: ServeConfig,
        }
        let mut all = vec!["starcite"];
        all.extend_from_slice(args);
        Args::parse_from(all).serve
    }

    /// A config for node `name` of the cluster `nodes`, plus `extra` flags.
    fn node(name: &str, nodes: &str, extra: &[&str]) -> ServeConfig {
        let mut args = vec!["--node-name", name, "--cluster-nodes", nodes];
        args.extend_from_slice(extra);
        config(&args)
    }

    #[test]
    fn cores_are_shared_out_among_the_nodes_on_this_host() {
        // A single node takes every core.
        let c = config(&[]);
        assert_eq!(c.nodes_on_this_host(), 1);
        assert_eq!(c.worker_thread_count(8), 8);
        // Three nodes on loopback (one spelled `localhost`): a third of the cores, at least one.
        let loopback = "n1@127.0.0.1:7101,n2@127.0.0.1:7102,n3@localhost:7103";
        let c = node("n2", loopback, &[]);
        assert_eq!(c.nodes_on_this_host(), 3);
        assert_eq!(c.worker_thread_count(2), 1);
        assert_eq!(c.worker_thread_count(8), 2);
        // Nodes on their own hosts take every core; two of three sharing a host halve them.
        let c = node(
            "n1",
            "n1@10.0.0.1:7101,n2@10.0.0.2:7101,n3@10.0.0.3:7101",
            &[],
        );
        assert_eq!(c.worker_thread_count(8), 8);
        let c = node("n1", "n1@[::1]:7101,n2@[::1]:7102,n3@10.0.0.3:7101", &[]);
        assert_eq!(c.nodes_on_this_host(), 2);
        assert_eq!(c.worker_thread_count(8), 4);
        // A configured count wins.
        let c = node("n1", loopback, &["--worker-threads", "2"]);
        assert_eq!(c.worker_thread_count(2), 2);
    }

    #[test]
    fn cluster_settings() {
        let mut c = config(&[
            "--node-name",
            "n2",
            "--cluster-nodes",
            "n1@127.0.0.1:7101,n2@127.0.0.1:7102,n3@db.internal:7103",
        ]);
        c.validate().unwrap();
        assert_eq!(c.cluster().len(), 3);
        assert_eq!(
            c.cluster_listen_addr(),
            Some("127.0.0.1:7102".parse().unwrap())
        );
        let mut c = config(&[
            "--node-name",
            "n3",
            "--cluster-nodes",
            "n1@a:1,n3@db.internal:7103",
        ]);
        c.validate().unwrap();
        assert_eq!(
            c.cluster_listen_addr(),
            Some("0.0.0.0:7103".parse().unwrap())
        );
        let mut single = config(&["--cluster-nodes", "n1@127.0.0.1:7101"]);
        single.validate().unwrap();
        assert!(single.cluster().is_empty());
        let mut bad = config(&["--node-name", "n4", "--cluster-nodes", "n1@a:1,n2@b:2"]);
        assert!(bad.validate().is_err());
        let mut bad = config(&[
            "--raft-heartbeat-ms",
            "300",
            "--raft-election-timeout-ms",
            "500",
        ]);
        assert!(bad.validate().is_err());
    }
}
