//! The node: its openraft groups, the shared log, routing of every request to the node that
//! can serve it, and the reads that make "acknowledged" and "visible" the same thing.
//!
//! A write is executed by its group's leader. Any node accepts it: a node that is not the
//! leader hands it over the peer connection and relays the answer (the client never sees a
//! redirect). An answer is only ever given for a state a quorum has made durable.

use crate::log_store::NodeLog;
use crate::network::{NetworkFactory, NoPeers, Router, SoloNetworkFactory};
use crate::placement::ClusterMap;
use crate::rpc::{ClientOp, ClientReply, RaftRequest, Request, Response, SessionWire};
use crate::state_machine::{GroupShared, GroupStateMachine};
use crate::transport::{CallError, Handler, Transport};
use crate::types::{NodeId, Raft, Snapshot, TypeConfig};
use crate::NodeError;
use bytes::Bytes;
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::{BasicNode, Config, ReadPolicy, SnapshotPolicy};
use openraft_multi::GroupNetworkFactory;
use parking_lot::Mutex;
use starcite_core::{
    group_of, AppendCommand, AppendRequest, Applied, ArchiveAckCommand, ArchiveMark, Command,
    CreateCommand, CreateRequest, SessionId, SessionView, Timestamp,
};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub groups: u32,
    pub idempotency_window: u64,
    /// Log segment size; old segments are deleted once no group needs them.
    pub segment_bytes: u64,
    /// When the log on disk grows past this, the groups holding its oldest segment snapshot.
    pub snapshot_every_bytes: u64,
    /// Each group snapshots (and purges its log) after this many entries.
    pub snapshot_every_entries: u64,
    /// Most writes (creates + appends) in progress at once; beyond that callers wait.
    pub max_inflight_writes: usize,
    /// How long a request may wait for a slot, a leader and a quorum before `unavailable`.
    pub request_timeout: Duration,
    pub node_name: String,
    /// Every node as (name, internal address); empty for a single node.
    pub cluster_nodes: Vec<(String, String)>,
    pub heartbeat_interval: Duration,
    /// Followers wait between this and twice this without a heartbeat before electing.
    pub election_timeout: Duration,
}

impl NodeConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        NodeConfig {
            data_dir: data_dir.into(),
            groups: 256,
            idempotency_window: starcite_core::state::DEFAULT_IDEMPOTENCY_WINDOW,
            segment_bytes: 64 * 1024 * 1024,
            snapshot_every_bytes: 256 * 1024 * 1024,
            snapshot_every_entries: 20_000,
            max_inflight_writes: 8192,
            request_timeout: Duration::from_secs(10),
            node_name: "n1".into(),
            cluster_nodes: Vec::new(),
            heartbeat_interval: Duration::from_millis(100),
            election_timeout: Duration::from_millis(500),
        }
    }

    fn is_cluster(&self) -> bool {
        self.cluster_nodes.len() > 1
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    pub seq: u64,
    pub last_seq: u64,
    pub deduped: bool,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct NodeStats {
    pub sessions: u64,
    pub log_bytes_written: u64,
    pub log_records_written: u64,
    pub log_fsyncs: u64,
    pub log_disk_bytes: u64,
    pub snapshots_taken: u64,
    pub recovery_records_replayed: u64,
    pub recovery_millis: u64,
    /// Groups this node replicates, and of those, how many it leads.
    pub groups_replicated: u64,
    pub groups_led: u64,
    /// Sum of the Raft terms of this node's groups: every election starts a new term.
    pub terms_total: u64,
    /// Requests this node handed to another node, and requests it executed for another node.
    pub forwarded_out: u64,
    pub forwarded_in: u64,
    /// Over the groups this node leads: entries followers still miss (largest, and total).
    pub replication_lag_max: u64,
    pub replication_lag_total: u64,
    pub peer_bytes_sent: u64,
    pub peer_bytes_received: u64,
}

struct Group {
    index: u32,
    /// This node's replica of the group, if it is one of the group's members.
    raft: Option<Raft>,
    shared: Arc<GroupShared>,
    /// For groups this node does not replicate: the node that answered last, or 0.
    leader_hint: AtomicU64,
}

#[derive(Default)]
struct Counters {
    forwarded_out: AtomicU64,
    forwarded_in: AtomicU64,
}

pub struct Node {
    config: NodeConfig,
    map: ClusterMap,
    log: Arc<NodeLog>,
    groups: Vec<Group>,
    transport: Option<Arc<Transport>>,
    inflight: Semaphore,
    counters: Counters,
    recovery_records: u64,
    recovery_millis: u64,
    stop: watch::Sender<bool>,
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    _lock: File,
}

const META_FILE: &str = "starcite.meta";

/// Refuses to run on a data directory written with a different group count (sessions would
/// hash to other groups) or by another node, and keeps two processes off the same directory.
/// Returns the lock and whether the directory is new.
fn prepare_data_dir(config: &NodeConfig) -> Result<(File, bool), NodeError> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).map_err(|e| {
        NodeError::Startup(format!(
            "cannot create data directory {}: {e}",
            dir.display()
        ))
    })?;
    let lock_path = dir.join("LOCK");
    let lock = File::create(&lock_path)
        .map_err(|e| NodeError::Startup(format!("cannot open {}: {e}", lock_path.display())))?;
    lock.try_lock().map_err(|_| {
        NodeError::Startup(format!(
            "data directory {} is in use by another starcite process",
            dir.display()
        ))
    })?;
    let meta_path = dir.join(META_FILE);
    match std::fs::read_to_string(&meta_path) {
        Ok(text) => {
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}=")))
                    .map(|v| v.trim().to_owned())
            };
            let damaged = || NodeError::Startup(format!("{} is damaged", meta_path.display()));
            if field("format").as_deref() != Some("2") {
                return Err(NodeError::Startup(format!(
                    "data directory {} was written by an older starcite (before replicated \
                     groups); start with an empty data directory",
                    dir.display()
                )));
            }
            let groups: u32 = field("groups")
                .and_then(|v| v.parse().ok())
                .ok_or_else(damaged)?;
            if groups != config.groups {
                return Err(NodeError::Startup(format!(
                    "data directory {} was created with {groups} raft groups; \
                     STARCITE_RAFT_GROUPS={} would move sessions between groups. \
                     Set STARCITE_RAFT_GROUPS={groups} or use a new data directory",
                    dir.display(),
                    config.groups
                )));
            }
            let node = field("node").ok_or_else(damaged)?;
            if node != config.node_name {
                return Err(NodeError::Startup(format!(
                    "data directory {} belongs to node {node:?}, not NODE_NAME={:?}",
                    dir.display(),
                    config.node_name
                )));
            }
            Ok((lock, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let tmp = meta_path.with_extension("tmp");
            let text = format!(
                "format=2\ngroups={}\nnode={}\n",
                config.groups, config.node_name
            );
            std::fs::write(&tmp, text)
                .and_then(|_| File::open(&tmp)?.sync_all())
                .and_then(|_| std::fs::rename(&tmp, &meta_path))
                .and_then(|_| File::open(dir)?.sync_all())
                .map_err(|e| {
                    NodeError::Startup(format!("cannot write {}: {e}", meta_path.display()))
                })?;
            Ok((lock, true))
        }
        Err(e) => Err(NodeError::Startup(format!(
            "cannot read {}: {e}",
            meta_path.display()
        ))),
    }
}

fn raft_config(config: &NodeConfig) -> Result<Arc<Config>, NodeError> {
    let election = config.election_timeout.as_millis().max(2) as u64;
    let raft = Config {
        cluster_name: "starcite".into(),
        heartbeat_interval: (config.heartbeat_interval.as_millis() as u64).clamp(1, election / 2),
        election_timeout_min: election,
        election_timeout_max: election * 2,
        install_snapshot_timeout: 60_000,
        max_payload_entries: 256,
        replication_lag_threshold: config.snapshot_every_entries.saturating_mul(2).max(1000),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every_entries.max(1)),
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        backoff: "20ms 40ms ...500ms".into(),
        enable_pre_vote: Some(true),
        ..Default::default()
    };
    raft.validate()
        .map(Arc::new)
        .map_err(|e| NodeError::Startup(format!("raft settings: {e}")))
}

fn unavailable(message: impl Into<String>) -> NodeError {
    NodeError::Unavailable(message.into())
}

const UNKNOWN_OUTCOME: &str = "the outcome is unknown; retry with the same idempotency key";

impl Node {
    /// Opens (recovering) the node's data directory and starts its groups. `listener` is the
    /// bound internal address for a cluster (unused for a single node).
    pub async fn open(
        config: NodeConfig,
        listener: Option<TcpListener>,
    ) -> Result<Arc<Node>, NodeError> {
        if config.groups == 0 {
            return Err(NodeError::Startup("groups must be at least 1".into()));
        }
        let started = Instant::now();
        let nodes = if config.is_cluster() {
            config.cluster_nodes.clone()
        } else {
            vec![(config.node_name.clone(), String::new())]
        };
        let map = ClusterMap::new(&nodes, &config.node_name, config.groups)
            .map_err(NodeError::Startup)?;
        let prepared = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || -> Result<_, NodeError> {
                let (lock, fresh) = prepare_data_dir(&config)?;
                let (log, recovered) = NodeLog::open(
                    &config.data_dir.join("log"),
                    config.groups,
                    config.segment_bytes,
                )?;
                std::fs::create_dir_all(config.data_dir.join("snapshots")).map_err(|e| {
                    NodeError::Startup(format!("cannot create the snapshot directory: {e}"))
                })?;
                Ok((lock, fresh, log, recovered))
            })
            .await
            .map_err(|e| NodeError::Startup(format!("recovery crashed: {e}")))??
        };
        let (lock, _fresh, log, recovered) = prepared;
        let transport = match (config.is_cluster(), listener) {
            (true, Some(listener)) => Some(Transport::start(&map, listener)),
            (true, None) => {
                return Err(NodeError::Startup(
                    "a cluster node needs its internal listener".into(),
                ))
            }
            (false, _) => None,
        };
        let raft_config = raft_config(&config)?;
        let snapshot_dir = config.data_dir.join("snapshots");
        let me = map.me();
        let built = futures_util::future::join_all((0..config.groups).map(|index| {
            let shared = GroupShared::new(index, config.idempotency_window);
            let member = map.is_member(index);
            let store = log.store(index);
            let raft_config = raft_config.clone();
            let transport = transport.clone();
            let sm = GroupStateMachine::new(
                shared.clone(),
                snapshot_dir.join(format!("group-{index:05}.snap")),
                config.idempotency_window,
            );
            async move {
                if !member {
                    return Ok::<_, NodeError>((index, shared, None));
                }
                let raft = match transport {
                    Some(t) => {
                        let net: NetworkFactory =
                            GroupNetworkFactory::new(Router::new(me, t), index);
                        Raft::new(me, raft_config, net, store, sm).await
                    }
                    None => {
                        let net: SoloNetworkFactory = GroupNetworkFactory::new(NoPeers, index);
                        Raft::new(me, raft_config, net, store, sm).await
                    }
                }
                .map_err(|e| NodeError::Startup(format!("group {index} cannot start: {e}")))?;
                Ok((index, shared, Some(raft)))
            }
        }))
        .await;
        let mut groups = Vec::with_capacity(config.groups as usize);
        for result in built {
            let (index, shared, raft) = result?;
            groups.push(Group {
                index,
                raft,
                shared,
                leader_hint: AtomicU64::new(0),
            });
        }
        let recovery_millis = started.elapsed().as_millis() as u64;
        tracing::info!(
            records = recovered.records,
            entries = recovered.entries,
            millis = recovery_millis,
            "recovered data directory"
        );
        let node = Arc::new(Node {
            inflight: Semaphore::new(config.max_inflight_writes.max(1)),
            map,
            log,
            groups,
            transport,
            counters: Counters::default(),
            recovery_records: recovered.records,
            recovery_millis,
            stop: watch::Sender::new(false),
            background: Mutex::new(Vec::new()),
            config,
            _lock: lock,
        });
        if let Some(t) = &node.transport {
            t.set_handler(handler(Arc::downgrade(&node)));
        }
        node.start_groups().await;
        node.spawn_background();
        Ok(node)
    }

    /// Initialises groups that have never run (every member proposes the same membership,
    /// which openraft allows) and, on a single node, elects at once instead of waiting for an
    /// election timeout after a restart.
    async fn start_groups(&self) {
        let members = |index: u32| -> BTreeMap<NodeId, BasicNode> {
            self.map
                .members(index)
                .iter()
                .map(|id| {
                    let addr = self
                        .map
                        .node(*id)
                        .map(|n| n.addr.clone())
                        .unwrap_or_default();
                    (*id, BasicNode { addr })
                })
                .collect()
        };
        let single = self.map.is_single_node();
        futures_util::future::join_all(self.groups.iter().filter_map(|g| {
            let raft = g.raft.clone()?;
            let members = members(g.index);
            Some(async move {
                match raft.is_initialized().await {
                    Ok(false) => {
                        if let Err(e) = raft.initialize(members).await {
                            tracing::debug!(group = g.index, error = %e, "group already initialised");
                        }
                    }
                    Ok(true) if single => {
                        let _ = raft.trigger().elect(false).await;
                    }
                    Ok(true) => {}
                    Err(e) => tracing::error!(group = g.index, error = %e, "group failed to start"),
                }
            })
        }))
        .await;
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    pub fn node_name(&self) -> &str {
        &self.config.node_name
    }

    /// Ready means this node can serve appends now: its log is healthy and every group it
    /// replicates has a leader.
    pub fn is_ready(&self) -> bool {
        self.log.is_healthy()
            && !*self.stop.borrow()
            && self.groups.iter().all(|g| match &g.raft {
                Some(raft) => raft.metrics().borrow_watched().current_leader.is_some(),
                None => true,
            })
    }

    /// Groups of this node's replicas that have no leader yet (for readiness messages).
    pub fn groups_without_leader(&self) -> usize {
        self.groups
            .iter()
            .filter(|g| {
                g.raft
                    .as_ref()
                    .is_some_and(|r| r.metrics().borrow_watched().current_leader.is_none())
            })
            .count()
    }

    fn group(&self, session_id: &str) -> &Group {
        &self.groups[group_of(session_id, self.config.groups) as usize]
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.config.request_timeout
    }

    async fn write_slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, NodeError> {
        if !self.log.is_healthy() {
            return Err(unavailable_log());
        }
        // Fast path without arming a timer: a slot is almost always free.
        if let Ok(permit) = self.inflight.try_acquire() {
            return Ok(permit);
        }
        match tokio::time::timeout(self.config.request_timeout, self.inflight.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(unavailable(
                "too many writes in progress; retry with the same idempotency key",
            )),
        }
    }

    pub async fn create_session(&self, req: CreateRequest) -> Result<SessionView, NodeError> {
        let _permit = self.write_slot().await?;
        let id = req.id.unwrap_or_else(SessionId::generate);
        let id_text = id.as_str().to_owned();
        let group = self.group(&id_text);
        let op = ClientOp::Create {
            id,
            title: req.title,
            metadata: req.metadata,
        };
        match self.route(group, &op, self.deadline()).await? {
            ClientReply::Created(cmd) => Ok(cmd.view()),
            ClientReply::Applied(Applied::SessionExists) => Err(NodeError::SessionExists(id_text)),
            other => Err(unexpected(other)),
        }
    }

    pub async fn append(
        &self,
        session_id: &str,
        request: AppendRequest,
    ) -> Result<AppendOutcome, NodeError> {
        let _permit = self.write_slot().await?;
        let group = self.group(session_id);
        // A retry of an append the state already holds is answered here, without replicating.
        if let Some(answer) = group
            .shared
            .read(|d| d.state.settled_append(session_id, &request))
        {
            return append_outcome(session_id, answer);
        }
        let op = ClientOp::Append {
            session_id: session_id.to_owned(),
            request,
        };
        match self.route(group, &op, self.deadline()).await? {
            ClientReply::Applied(answer) => append_outcome(session_id, answer),
            other => Err(unexpected(other)),
        }
    }

    /// Runs `op` where it can run: here if this node leads the group, else on the leader
    /// (or, for a group this node does not replicate, on a replica that knows the leader).
    async fn route(
        &self,
        group: &Group,
        op: &ClientOp,
        deadline: Instant,
    ) -> Result<ClientReply, NodeError> {
        let mut attempt = 0usize;
        loop {
            let target = self.route_target(group, attempt, deadline).await?;
            let reply = if target == self.map.me() {
                self.execute(group, op, deadline).await
            } else {
                self.forward(group, target, op, deadline).await
            };
            match reply {
                ClientReply::NotLeader(hint) => {
                    if let Some(h) = hint.filter(|h| *h != target) {
                        group.leader_hint.store(h, Ordering::Relaxed);
                    } else {
                        group.leader_hint.store(0, Ordering::Relaxed);
                        if Instant::now() + Duration::from_millis(20) >= deadline {
                            return Err(unavailable(
                                "no leader for this session's group within the request timeout",
                            ));
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    attempt += 1;
                }
                ClientReply::Unavailable(message) => return Err(unavailable(message)),
                other => return Ok(other),
            }
            if Instant::now() >= deadline {
                return Err(unavailable(
                    "no leader for this session's group within the request timeout",
                ));
            }
        }
    }

    /// Where to send a request for `group` now.
    async fn route_target(
        &self,
        group: &Group,
        attempt: usize,
        deadline: Instant,
    ) -> Result<NodeId, NodeError> {
        if let Some(raft) = &group.raft {
            let mut metrics = raft.metrics();
            loop {
                if let Some(leader) = metrics.borrow_watched().current_leader {
                    return Ok(leader);
                }
                if let Some(hint) =
                    Some(group.leader_hint.load(Ordering::Relaxed)).filter(|h| *h != 0)
                {
                    return Ok(hint);
                }
                match tokio::time::timeout_at(deadline.into(), metrics.changed()).await {
                    Ok(Ok(())) => {}
                    _ => {
                        return Err(unavailable(
                            "this session's group has no leader (no quorum); retry later",
                        ))
                    }
                }
            }
        }
        let hint = group.leader_hint.load(Ordering::Relaxed);
        if hint != 0 {
            return Ok(hint);
        }
        let members = self.map.members(group.index);
        Ok(members[attempt % members.len()])
    }

    async fn forward(
        &self,
        group: &Group,
        target: NodeId,
        op: &ClientOp,
        deadline: Instant,
    ) -> ClientReply {
        let Some(transport) = &self.transport else {
            return ClientReply::Unavailable("no peers to forward to".into());
        };
        self.counters.forwarded_out.fetch_add(1, Ordering::Relaxed);
        let request = Request::Client {
            group: group.index,
            op: op.clone(),
        };
        let timeout = deadline.saturating_duration_since(Instant::now());
        let call = transport.call(target, &request, timeout);
        // If this node sees the group's leader change while the request is out, its outcome
        // is unknown: answer now (the client retries with its idempotency key) rather than
        // wait out the timeout on a node that may be gone.
        let leader_changed = async {
            match &group.raft {
                Some(raft) => {
                    let mut metrics = raft.metrics();
                    loop {
                        let leader = metrics.borrow_watched().current_leader;
                        if leader.is_some_and(|l| l != target) {
                            return;
                        }
                        if metrics.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                }
                None => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            r = call => r,
            _ = leader_changed => {
                return ClientReply::Unavailable(format!(
                    "the group's leader changed while the request was in flight; {UNKNOWN_OUTCOME}"
                ))
            }
        };
        match result {
            Ok(Response::Client(reply)) => reply,
            Ok(_) => ClientReply::Unavailable("peer answered with the wrong message".into()),
            // Nothing was sent: try again (the group may be electing a new leader).
            Err(CallError::NotConnected(_)) => ClientReply::NotLeader(None),
            Err(e) => ClientReply::Unavailable(format!("{e}; {UNKNOWN_OUTCOME}")),
        }
    }

    /// Executes `op` on this node's replica of the group.
    async fn execute(&self, group: &Group, op: &ClientOp, deadline: Instant) -> ClientReply {
        let Some(raft) = &group.raft else {
            let hint = group.leader_hint.load(Ordering::Relaxed);
            return ClientReply::NotLeader((hint != 0).then_some(hint));
        };
        match op {
            ClientOp::Create {
                id,
                title,
                metadata,
            } => {
                if group
                    .shared
                    .read(|d| d.state.session(id.as_str()).is_some())
                {
                    return ClientReply::Applied(Applied::SessionExists);
                }
                let cmd = CreateCommand {
                    id: id.as_str().to_owned(),
                    title: title.clone(),
                    metadata: metadata.clone(),
                    created_at: Timestamp::now(),
                };
                match propose(raft, Command::Create(cmd.clone()), deadline).await {
                    Ok(Applied::Created) => ClientReply::Created(cmd),
                    Ok(answer) => ClientReply::Applied(answer),
                    Err(reply) => reply,
                }
            }
            ClientOp::Append {
                session_id,
                request,
            } => {
                let known = group.shared.read(|d| {
                    d.state
                        .session(session_id)
                        .map(|_| d.state.settled_append(session_id, request))
                });
                match known {
                    Some(Some(answer)) => return ClientReply::Applied(answer),
                    Some(None) => {}
                    None => {
                        // Unknown here: make sure this replica has everything committed
                        // before saying so (a 404 is never replicated).
                        if let Err(reply) = linearize(raft, &group.shared, deadline).await {
                            return reply;
                        }
                        if group.shared.read(|d| d.state.session(session_id).is_none()) {
                            return ClientReply::Applied(Applied::SessionNotFound);
                        }
                    }
                }
                let cmd = AppendCommand::new(session_id, request, Timestamp::now());
                match propose(raft, Command::Append(cmd), deadline).await {
                    Ok(answer) => ClientReply::Applied(answer),
                    Err(reply) => reply,
                }
            }
            ClientOp::ReadIndex => match read_index(raft, deadline).await {
                Ok(index) => ClientReply::ReadIndex(index),
                Err(reply) => reply,
            },
            ClientOp::Session { session_id } => {
                if let Err(reply) = self.barrier(group, deadline).await {
                    return reply;
                }
                group.shared.read(|d| match d.state.session(session_id) {
                    Some(s) => ClientReply::Session(SessionWire::from(s.view())),
                    None => ClientReply::NotFound,
                })
            }
            ClientOp::ReadEvents {
                session_id,
                after,
                limit,
            } => match local_events(&group.shared, session_id, *after, *limit as usize) {
                Ok(events) => ClientReply::Events(events),
                Err(NodeError::Trimmed { first_hot, .. }) => ClientReply::Trimmed { first_hot },
                Err(_) => ClientReply::NotFound,
            },
            ClientOp::WaitBeyond {
                session_id,
                after,
                wait_ms,
            } => {
                let Some(mut rx) = group.shared.read(|d| d.subscribe(session_id)) else {
                    return ClientReply::NotFound;
                };
                let wait = Duration::from_millis((*wait_ms).min(60_000));
                let _ = tokio::time::timeout(wait, rx.wait_for(|v| *v > *after)).await;
                let visible = *rx.borrow();
                ClientReply::Visible(visible)
            }
        }
    }

    /// After this, this replica has applied every write acknowledged before the call.
    async fn barrier(&self, group: &Group, deadline: Instant) -> Result<(), ClientReply> {
        // Boxed: `route` may call back into `execute`, which calls this.
        let index = match Box::pin(self.route(group, &ClientOp::ReadIndex, deadline)).await {
            Ok(ClientReply::ReadIndex(index)) => index,
            Ok(other) => return Err(other),
            Err(e) => return Err(ClientReply::Unavailable(e.to_string())),
        };
        match tokio::time::timeout_at(deadline.into(), group.shared.applied_at_least(index)).await {
            Ok(()) => Ok(()),
            Err(_) => Err(ClientReply::Unavailable(
                "this replica did not catch up within the request timeout".into(),
            )),
        }
    }

    /// The session's header, as of every write acknowledged before the call.
    pub async fn session(&self, session_id: &str) -> Result<SessionView, NodeError> {
        let group = self.group(session_id);
        let op = ClientOp::Session {
            session_id: session_id.to_owned(),
        };
        let reply = if group.raft.is_some() {
            self.execute(group, &op, self.deadline()).await
        } else {
            self.route(group, &op, self.deadline()).await?
        };
        match reply {
            ClientReply::Session(w) => Ok(w.into()),
            ClientReply::NotFound => Err(NodeError::SessionNotFound(session_id.to_owned())),
            ClientReply::Unavailable(m) => Err(unavailable(m)),
            other => Err(unexpected(other)),
        }
    }

    /// A handle to follow the session's committed seq, for tails. Fails if the session does
    /// not exist (as of every write acknowledged before the call).
    pub async fn subscribe(self: &Arc<Self>, session_id: &str) -> Result<Subscription, NodeError> {
        let group = self.group(session_id);
        if group.raft.is_some() {
            if let Some(rx) = group.shared.read(|d| d.subscribe(session_id)) {
                return Ok(Subscription::Local(rx));
            }
            // Not here yet: it may have been created through another node a moment ago.
            self.session(session_id).await?;
            return group
                .shared
                .read(|d| d.subscribe(session_id))
                .map(Subscription::Local)
                .ok_or_else(|| NodeError::SessionNotFound(session_id.to_owned()));
        }
        let view = self.session(session_id).await?;
        Ok(Subscription::Remote {
            node: self.clone(),
            session_id: session_id.to_owned(),
            visible: view.last_seq,
        })
    }

    /// Committed events with `seq > after`, oldest first, at most `limit`.
    pub async fn read_events(
        &self,
        session_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Bytes>, NodeError> {
        let group = self.group(session_id);
        if group.raft.is_some() {
            return local_events(&group.shared, session_id, after, limit);
        }
        let op = ClientOp::ReadEvents {
            session_id: session_id.to_owned(),
            after,
            limit: limit.min(u32::MAX as usize) as u32,
        };
        match self.route(group, &op, self.deadline()).await? {
            ClientReply::Events(events) => Ok(events),
            ClientReply::Trimmed { first_hot } => Err(NodeError::Trimmed {
                session_id: session_id.to_owned(),
                first_hot,
            }),
            ClientReply::NotFound => Err(NodeError::SessionNotFound(session_id.to_owned())),
            other => Err(unexpected(other)),
        }
    }

    /// Handles a request from a peer.
    async fn handle(&self, request: Request) -> Result<Response, String> {
        match request {
            Request::Raft { group, rpc } => {
                let raft = self
                    .groups
                    .get(group as usize)
                    .and_then(|g| g.raft.clone())
                    .ok_or_else(|| format!("this node does not replicate group {group}"))?;
                let fatal = |e: openraft::error::Fatal<TypeConfig>| e.to_string();
                match rpc {
                    RaftRequest::Append(r) => raft
                        .append_entries(r)
                        .await
                        .map(Response::Append)
                        .map_err(|e| e.to_string()),
                    RaftRequest::Vote(r) => raft
                        .vote(r)
                        .await
                        .map(Response::Vote)
                        .map_err(|e| e.to_string()),
                    RaftRequest::PreVote(r) => raft
                        .pre_vote(r)
                        .await
                        .map(Response::Vote)
                        .map_err(|e| e.to_string()),
                    RaftRequest::Snapshot { vote, meta, data } => raft
                        .install_full_snapshot(
                            vote,
                            Snapshot {
                                meta,
                                snapshot: data,
                            },
                        )
                        .await
                        .map(Response::Snapshot)
                        .map_err(fatal),
                    RaftRequest::TransferLeader(r) => raft
                        .handle_transfer_leader(r)
                        .await
                        .map(Response::TransferLeader)
                        .map_err(fatal),
                }
            }
            Request::Client { group, op } => {
                let group = self
                    .groups
                    .get(group as usize)
                    .ok_or_else(|| format!("no group {group}"))?;
                self.counters.forwarded_in.fetch_add(1, Ordering::Relaxed);
                Ok(Response::Client(
                    self.execute(group, &op, self.deadline()).await,
                ))
            }
        }
    }

    pub fn stats(&self) -> NodeStats {
        let wal = self.log.wal().stats();
        let mut stats = NodeStats {
            log_bytes_written: wal.bytes_written.load(Ordering::Relaxed),
            log_records_written: wal.records_written.load(Ordering::Relaxed),
            log_fsyncs: wal.fsyncs.load(Ordering::Relaxed),
            log_disk_bytes: self.log.disk_bytes(),
            recovery_records_replayed: self.recovery_records,
            recovery_millis: self.recovery_millis,
            forwarded_out: self.counters.forwarded_out.load(Ordering::Relaxed),
            forwarded_in: self.counters.forwarded_in.load(Ordering::Relaxed),
            ..NodeStats::default()
        };
        if let Some(t) = &self.transport {
            stats.peer_bytes_sent = t.stats.bytes_sent.load(Ordering::Relaxed);
            stats.peer_bytes_received = t.stats.bytes_received.load(Ordering::Relaxed);
        }
        for g in &self.groups {
            let Some(raft) = &g.raft else { continue };
            stats.groups_replicated += 1;
            stats.sessions += g.shared.read(|d| d.state.session_count() as u64);
            stats.snapshots_taken += g.shared.snapshots_built();
            let m = raft.metrics().borrow_watched().clone();
            stats.terms_total += m.current_term;
            if m.current_leader == Some(self.map.me()) && m.state.is_leader() {
                stats.groups_led += 1;
                let last = m.last_log_index.unwrap_or(0);
                for matched in m.replication.iter().flat_map(|r| r.values()) {
                    let lag = last.saturating_sub(matched.map(|l| l.index).unwrap_or(0));
                    stats.replication_lag_max = stats.replication_lag_max.max(lag);
                    stats.replication_lag_total += lag;
                }
            }
        }
        stats
    }

    /// The group's leader as this node sees it (None while unknown or not a member).
    fn leads(&self, group: &Group) -> bool {
        group.raft.as_ref().is_some_and(|r| {
            let m = r.metrics();
            let m = m.borrow_watched();
            m.state.is_leader() && m.current_leader == Some(self.map.me())
        })
    }

    fn spawn_background(self: &Arc<Self>) {
        let mut tasks = self.background.lock();
        tasks.push(tokio::spawn(compact_log(Arc::downgrade(self))));
        if self.config.is_cluster() {
            tasks.push(tokio::spawn(balance_leaders(Arc::downgrade(self))));
        }
    }

    /// Stops background work, leaves the cluster's connections and shuts the groups down.
    pub async fn shutdown(&self) {
        self.stop.send_replace(true);
        for task in self.background.lock().drain(..) {
            task.abort();
        }
        futures_util::future::join_all(self.groups.iter().filter_map(|g| g.raft.clone()).map(
            |raft| async move {
                let _ = raft.shutdown().await;
            },
        ))
        .await;
        if let Some(t) = &self.transport {
            t.shutdown();
        }
    }
}

/// Follows a session's committed seq: locally on a replica, by long polls otherwise.
pub enum Subscription {
    Local(watch::Receiver<u64>),
    Remote {
        node: Arc<Node>,
        session_id: String,
        visible: u64,
    },
}

impl Subscription {
    /// Resolves once the session has committed events beyond `cursor` (or, for a remote
    /// session, after a long-poll round that found none; callers just read again).
    pub async fn wait_beyond(&mut self, cursor: u64) -> Result<(), NodeError> {
        match self {
            Subscription::Local(rx) => rx
                .wait_for(|v| *v > cursor)
                .await
                .map(|_| ())
                .map_err(|_| unavailable("the session's group stopped")),
            Subscription::Remote {
                node,
                session_id,
                visible,
            } => {
                if *visible > cursor {
                    return Ok(());
                }
                let group = node.group(session_id);
                let op = ClientOp::WaitBeyond {
                    session_id: session_id.clone(),
                    after: cursor,
                    wait_ms: 15_000,
                };
                let deadline = Instant::now() + Duration::from_secs(20);
                match node.route(group, &op, deadline).await? {
                    ClientReply::Visible(v) => {
                        *visible = v;
                        Ok(())
                    }
                    ClientReply::NotFound => Err(NodeError::SessionNotFound(session_id.clone())),
                    other => Err(unexpected(other)),
                }
            }
        }
    }
}

fn local_events(
    shared: &GroupShared,
    session_id: &str,
    after: u64,
    limit: usize,
) -> Result<Vec<Bytes>, NodeError> {
    shared.read(|d| {
        let session = d
            .state
            .session(session_id)
            .ok_or_else(|| NodeError::SessionNotFound(session_id.to_owned()))?;
        let visible = d.visible_seq(session_id);
        if visible > after && session.first_seq() > after + 1 {
            return Err(NodeError::Trimmed {
                session_id: session_id.to_owned(),
                first_hot: session.first_seq(),
            });
        }
        Ok(session.events_between(after, visible, limit))
    })
}

/// Proposes a command on this node's replica and waits for its applied answer.
async fn propose(raft: &Raft, cmd: Command, deadline: Instant) -> Result<Applied, ClientReply> {
    match tokio::time::timeout_at(deadline.into(), raft.client_write(cmd)).await {
        Ok(Ok(response)) => Ok(response.data),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
            Err(ClientReply::NotLeader(f.leader_id))
        }
        Ok(Err(e)) => Err(ClientReply::Unavailable(format!("{e}; {UNKNOWN_OUTCOME}"))),
        Err(_) => Err(ClientReply::Unavailable(format!(
            "not committed within the request timeout; {UNKNOWN_OUTCOME}"
        ))),
    }
}

/// On the leader: the log index up to which every acknowledged write is included, with
/// leadership confirmed (lease).
async fn read_index(raft: &Raft, deadline: Instant) -> Result<u64, ClientReply> {
    match tokio::time::timeout_at(deadline.into(), raft.get_read_log_id(ReadPolicy::LeaseRead))
        .await
    {
        Ok(Ok((read, _))) => Ok(read.log_id().index),
        Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
            Err(ClientReply::NotLeader(f.leader_id))
        }
        Ok(Err(e)) => Err(ClientReply::Unavailable(e.to_string())),
        Err(_) => Err(ClientReply::Unavailable(
            "leadership not confirmed within the request timeout".into(),
        )),
    }
}

/// On the leader: waits until this replica has applied everything committed so far.
async fn linearize(
    raft: &Raft,
    shared: &GroupShared,
    deadline: Instant,
) -> Result<(), ClientReply> {
    let index = read_index(raft, deadline).await?;
    tokio::time::timeout_at(deadline.into(), shared.applied_at_least(index))
        .await
        .map_err(|_| ClientReply::Unavailable("apply did not catch up in time".into()))
}

fn append_outcome(session_id: &str, answer: Applied) -> Result<AppendOutcome, NodeError> {
    match answer {
        Applied::Appended { seq } => Ok(AppendOutcome {
            seq,
            last_seq: seq,
            deduped: false,
        }),
        Applied::Deduped { seq, last_seq } => Ok(AppendOutcome {
            seq,
            last_seq,
            deduped: true,
        }),
        Applied::SessionNotFound => Err(NodeError::SessionNotFound(session_id.to_owned())),
        Applied::IdempotencyConflict { key, seq } => {
            Err(NodeError::IdempotencyConflict { key, seq })
        }
        Applied::ExpectedSeqConflict { expected, current } => {
            Err(NodeError::ExpectedSeqConflict { expected, current })
        }
        other => Err(unavailable(format!(
            "unexpected answer to an append: {other:?}"
        ))),
    }
}

fn unexpected(reply: ClientReply) -> NodeError {
    match reply {
        ClientReply::Unavailable(m) => unavailable(m),
        other => unavailable(format!("unexpected answer: {other:?}")),
    }
}

fn unavailable_log() -> NodeError {
    unavailable("the node's log failed a write and no longer accepts writes; restart the node")
}

fn handler(node: Weak<Node>) -> Handler {
    Arc::new(move |_from, request| {
        let node = node.upgrade();
        Box::pin(async move {
            match node {
                Some(node) => node.handle(request).await,
                None => Err("node is shutting down".into()),
            }
        })
    })
}

/// Keeps the log on disk bounded: groups whose old entries pin the oldest segment take a
/// snapshot (which purges them), then segments nobody needs are deleted.
async fn compact_log(node: Weak<Node>) {
    let mut last_forced: Vec<Option<Instant>> = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some(node) = node.upgrade() else { return };
        if last_forced.is_empty() {
            last_forced = vec![None; node.groups.len()];
        }
        let (oldest, pinning) = node.log.pinning_groups();
        let current = node.log.current_segment();
        let too_big = node.log.disk_bytes() > node.config.snapshot_every_bytes;
        if too_big && oldest < current {
            for g in pinning {
                let due =
                    last_forced[g as usize].is_none_or(|t| t.elapsed() > Duration::from_secs(10));
                if let (true, Some(raft)) = (due, &node.groups[g as usize].raft) {
                    last_forced[g as usize] = Some(Instant::now());
                    let _ = raft.trigger().snapshot().await;
                }
            }
        }
        let log = node.log.clone();
        drop(node);
        match tokio::task::spawn_blocking(move || log.collect_garbage()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::debug!(segments = n, "deleted log segments no group needs"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not delete old log segments"),
            Err(_) => {}
        }
    }
}

/// Moves leadership of each group to its preferred member when that member is connected and
/// caught up, so leaders (and the write load) spread evenly over the nodes.
async fn balance_leaders(node: Weak<Node>) {
    tokio::time::sleep(Duration::from_secs(2)).await;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(node) = node.upgrade() else { return };
        let Some(transport) = node.transport.clone() else {
            return;
        };
        let me = node.map.me();
        let mut moved = 0;
        for g in &node.groups {
            if moved >= 8 {
                break;
            }
            let preferred = node.map.preferred_leader(g.index);
            if preferred == me || !node.leads(g) || !transport.is_connected(preferred) {
                continue;
            }
            let Some(raft) = &g.raft else { continue };
            let caught_up = {
                let m = raft.metrics();
                let m = m.borrow_watched();
                let last = m.last_log_index;
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&preferred))
                    .is_some_and(|matched| matched.map(|l| l.index) == last)
            };
            if caught_up {
                tracing::debug!(
                    group = g.index,
                    to = node.map.name_of(preferred),
                    "moving leadership to the preferred node"
                );
                let _ = raft.trigger().transfer_leader(preferred).await;
                moved += 1;
            }
        }
    }
}

/// What the archiver needs from the node: the committed, unarchived events of the groups this
/// node leads, and a way to record what the archive now holds.
#[derive(Debug, Default)]
pub struct ArchiveBacklog {
    /// Sessions whose header must be upserted before their events.
    pub sessions: Vec<SessionView>,
    pub runs: Vec<ArchiveRun>,
}

impl ArchiveBacklog {
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.runs.is_empty()
    }

    pub fn event_count(&self) -> usize {
        self.runs.iter().map(|r| r.events.len()).sum()
    }
}

/// Events `first_seq ..= first_seq + events.len() - 1` of one session.
#[derive(Debug)]
pub struct ArchiveRun {
    pub session_id: String,
    pub first_seq: u64,
    pub events: Vec<Bytes>,
}

impl ArchiveRun {
    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.events.len() as u64 - 1
    }
}

/// How far the archive is behind, for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct ArchiveLag {
    /// Committed events not yet archived.
    pub pending_events: u64,
    /// Sessions with anything not yet archived.
    pub pending_sessions: u64,
    /// Events held in memory (hot tier), archived or not.
    pub hot_events: u64,
}

impl Node {
    fn led_groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.iter().filter(|g| self.leads(g))
    }

    /// Collects up to `budget` committed, unarchived events of the groups this node leads
    /// (each session's run starts right after its archive mark, so acknowledging a run never
    /// leaves a hole).
    pub fn archive_backlog(&self, budget: usize) -> ArchiveBacklog {
        let mut backlog = ArchiveBacklog::default();
        let mut remaining = budget;
        for group in self.led_groups() {
            if remaining == 0 {
                break;
            }
            group.shared.read(|d| {
                for session_id in &d.unarchived {
                    if remaining == 0 {
                        break;
                    }
                    let Some(session) = d.state.session(session_id) else {
                        continue;
                    };
                    if d.headers_unarchived.contains(session_id) {
                        backlog.sessions.push(session.view());
                    }
                    let events =
                        session.events_between(session.archived_seq, session.last_seq, remaining);
                    if events.is_empty() {
                        continue;
                    }
                    remaining -= events.len();
                    backlog.runs.push(ArchiveRun {
                        session_id: session_id.clone(),
                        first_seq: session.archived_seq + 1,
                        events,
                    });
                }
            });
        }
        backlog
    }

    /// Records that the archive durably holds these session headers.
    pub fn headers_archived(&self, sessions: &[SessionView]) {
        for view in sessions {
            self.group(&view.id).shared.update(|d| {
                d.headers_unarchived.remove(&view.id);
                if d.fully_archived(&view.id) {
                    d.unarchived.remove(&view.id);
                }
            });
        }
    }

    /// Replicates that events `1..=archived_seq` of each session are in the archive; every
    /// replica then keeps only the newest `keep_hot` of them in memory. One command per
    /// group. Returns how many events left this node's memory.
    pub async fn acknowledge_archived(
        &self,
        marks: &[(String, u64)],
        keep_hot: u64,
    ) -> Result<u64, NodeError> {
        let mut per_group: BTreeMap<u32, Vec<ArchiveMark>> = BTreeMap::new();
        for (session_id, archived_seq) in marks {
            per_group
                .entry(group_of(session_id, self.config.groups))
                .or_default()
                .push(ArchiveMark {
                    session_id: session_id.clone(),
                    archived_seq: *archived_seq,
                });
        }
        let deadline = self.deadline();
        let results =
            futures_util::future::join_all(per_group.into_iter().filter_map(|(group, marks)| {
                let raft = self.groups[group as usize].raft.clone()?;
                Some(async move {
                    let cmd = Command::ArchiveAck(ArchiveAckCommand { marks, keep_hot });
                    propose(&raft, cmd, deadline).await
                })
            }))
            .await;
        let mut trimmed = 0;
        for r in results {
            match r {
                Ok(Applied::Archived { trimmed: n }) => trimmed += n,
                Ok(_) => {}
                Err(reply) => return Err(unexpected(reply)),
            }
        }
        Ok(trimmed)
    }

    pub fn archive_lag(&self) -> ArchiveLag {
        let mut lag = ArchiveLag::default();
        for group in self.led_groups() {
            group.shared.read(|d| {
                lag.pending_sessions += d.unarchived.len() as u64;
                for session in d.state.sessions() {
                    lag.pending_events += session.last_seq - session.archived_seq;
                    lag.hot_events += session.last_seq + 1 - session.first_seq();
                }
            });
        }
        lag
    }
}
