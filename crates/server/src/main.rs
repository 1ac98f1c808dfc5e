//! The `starcite` binary.

mod app;
mod cli;
mod config;
mod error;
mod listener;
mod metrics;
mod openapi;
mod reader;
mod tail;

use clap::{Parser, Subcommand};
use config::ServeConfig;
use starcite_cluster::{ClusterState, Node, NodeConfig};
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Every request allocates a handful of small buffers; glibc malloc showed up at ~20% of CPU
/// under load, mimalloc's thread-local free lists make that nearly disappear.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Durable, low-latency session event storage for LLM applications.
#[derive(Debug, Parser)]
#[command(name = "starcite", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a Starcite node (single node with embedded storage by default).
    Serve(ServeConfig),
    /// Create a session and print it as JSON.
    Create {
        #[command(flatten)]
        client: cli::ClientOpts,
        #[command(flatten)]
        args: cli::CreateArgs,
    },
    /// Append one event to a session and print the ack as JSON.
    Append {
        #[command(flatten)]
        client: cli::ClientOpts,
        #[command(flatten)]
        args: cli::AppendArgs,
    },
    /// Print a session's events as JSON lines (replay from --cursor, then follow live).
    Tail {
        #[command(flatten)]
        client: cli::ClientOpts,
        #[command(flatten)]
        args: cli::TailArgs,
    },
}

/// Upper bound on a graceful shutdown; past it the process exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => serve(config),
        Command::Create { client, args } => cli::create(client, args),
        Command::Append { client, args } => cli::append(client, args),
        Command::Tail { client, args } => cli::tail(client, args),
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn serve(mut config: ServeConfig) -> ExitCode {
    if let Err(message) = config.validate() {
        eprintln!("starcite: invalid configuration: {message}");
        return ExitCode::from(2);
    }
    init_logging(&config.log_format);
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::debug!(error = %e, "cannot turn transparent huge pages off");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = config.worker_thread_count(cores);
    tracing::info!(
        workers,
        cores,
        nodes_on_this_host = config.nodes_on_this_host(),
        "worker threads (STARCITE_WORKER_THREADS sets them)"
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("starcite: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            eprintln!("starcite: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: ServeConfig) -> Result<(), String> {
    let metrics = metrics::install().map_err(|e| format!("cannot set up metrics: {e}"))?;
    let addr = std::net::SocketAddr::new(config.bind, config.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let state = Arc::new(app::AppState {
        node: OnceLock::new(),
        config: config.clone(),
        metrics: Some(metrics.clone()),
        shutdown: shutdown_rx,
        tails: Default::default(),
        archive: Default::default(),
    });

    let upkeep = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            metrics.run_upkeep();
        }
    });

    // Serve health checks while the log is recovered; the API answers 503 until then.
    let router = app::router(state.clone());
    let limits = listener::Limits {
        max_connections: config.max_connections as usize,
        header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
    };
    let connections = listener::ConnectionTracker::default();
    let server = tokio::spawn(listener::serve(
        listener,
        router,
        limits,
        state.shutdown.clone(),
        connections.clone(),
    ));
    tracing::info!(%addr, data_dir = %config.data_dir.display(), groups = config.raft_groups, "starcite listening");

    let cluster = config.cluster();
    let internal = match config.cluster_listen_addr() {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen for peers on {addr}: {e}"))?,
        ),
        None => None,
    };
    let node_config = NodeConfig {
        data_dir: config.data_dir.clone(),
        groups: config.raft_groups,
        idempotency_window: config.idempotency_window,
        segment_bytes: config.segment_bytes,
        snapshot_every_bytes: config.snapshot_every_bytes,
        snapshot_every_entries: config.snapshot_every_entries,
        hot_max_bytes: config.hot_max_bytes,
        max_inflight_writes: 8192,
        request_timeout: config.request_timeout(),
        node_name: config.node_name.clone(),
        cluster_nodes: cluster.clone(),
        cluster_state: match config.cluster_state.as_str() {
            "new" => ClusterState::New,
            "existing" => ClusterState::Existing,
            _ => ClusterState::Auto,
        },
        heartbeat_interval: Duration::from_millis(config.raft_heartbeat_ms),
        election_timeout: Duration::from_millis(config.raft_election_timeout_ms),
        per_replica_archive: cluster.len() > 1 && config.database_url.is_none(),
    };
    let node = Node::open(node_config, internal)
        .await
        .map_err(|e| format!("cannot open data directory: {e}"))?;
    let _ = state.node.set(node.clone());
    if cluster.is_empty() {
        tracing::info!("node open (single node)");
    } else {
        tracing::info!(node = %config.node_name, nodes = cluster.len(), "node open; joining the cluster");
    }

    let (archiver_stop, archiver_stopped) = tokio::sync::watch::channel(false);
    let archiver = spawn_archiver(
        config.clone(),
        node.clone(),
        state.archive.clone(),
        archiver_stopped,
    )?;

    wait_for_signal().await;
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    let _ = shutdown_tx.send(true);
    let drained = async {
        let _ = server.await;
        connections.drained().await;
        state.tails.drained().await;
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, drained).await.is_err() {
        tracing::warn!("connections still open after the grace period; closing them");
    }
    // One last archive flush, bounded: everything is in the log anyway.
    let _ = archiver_stop.send(true);
    if tokio::time::timeout(SHUTDOWN_GRACE, archiver)
        .await
        .is_err()
    {
        tracing::warn!("archive flush did not finish in time; the log still holds everything");
    }
    upkeep.abort();
    node.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Runs the archiver on a thread of its own, at a lower CPU priority, with its own
/// single-threaded runtime: batch encoding and its database connections (their threads
/// inherit the priority, so the embedded archive's SQLite writes and checkpoints do too) then
/// wait for the request path instead of holding one of its workers or cores. Whatever takes
/// the node's locks it hands back to the request path's runtime (`node_runtime`). Resolves
/// when the archiver has stopped.
fn spawn_archiver(
    config: ServeConfig,
    node: Arc<Node>,
    slot: Arc<OnceLock<Arc<starcite_archive::Archive>>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::sync::oneshot::Receiver<()>, String> {
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel();
    // Called on the request path's runtime: the archiver hands it whatever takes the node's
    // locks (see `ArchiverConfig::node_runtime`).
    let node_runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("starcite-archive".into())
        .spawn(move || {
            starcite_cluster::priority::lower_this_thread("the archiver");
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => {
                    runtime.block_on(archive_loop(config, node, node_runtime, slot, stop))
                }
                Err(e) => tracing::error!(error = %e, "cannot start the archiver's runtime; nothing is archived"),
            }
            let _ = stopped_tx.send(());
        })
        .map_err(|e| format!("cannot start the archiver thread: {e}"))?;
    Ok(stopped_rx)
}

/// Connects the archive (retrying with backoff: the node serves appends and tails meanwhile),
/// then runs the write-behind archiver until shutdown.
///
/// Without Postgres, a cluster's nodes each archive every group they replicate to their own
/// embedded file and read what they trimmed back from it (the node's `per_replica_archive`);
/// the API's reader then never needs the archive itself, since the node answers every read.
async fn archive_loop(
    config: ServeConfig,
    node: Arc<Node>,
    node_runtime: tokio::runtime::Handle,
    slot: Arc<OnceLock<Arc<starcite_archive::Archive>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    let archive = loop {
        let opened = match &config.database_url {
            Some(url) => {
                starcite_archive::Archive::connect_postgres(url, config.db_pool_size).await
            }
            None => {
                starcite_archive::Archive::open_sqlite(&config.data_dir.join("archive.sqlite3"))
                    .await
            }
        };
        match opened {
            Ok(archive) => break Arc::new(archive),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "archive not available yet");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {},
                    _ = starcite_archive::stopped(&mut stop) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    if node.config().per_replica_archive {
        tracing::info!(
            kind = archive.kind(),
            "archive connected: this node's own (no DATABASE_URL), for every group it replicates"
        );
        node.attach_local_archive(archive.clone());
    } else {
        tracing::info!(kind = archive.kind(), "archive connected");
        let _ = slot.set(archive.clone());
    }
    starcite_archive::run_archiver(
        node,
        archive,
        starcite_archive::ArchiverConfig {
            flush_interval: Duration::from_millis(config.archive_flush_interval_ms),
            keep_hot: config.tail_keep,
            node_runtime,
        },
        stop,
    )
    .await;
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
