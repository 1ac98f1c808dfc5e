//! The node: its Raft groups, the shared log, routing of every request to the node that can
//! serve it, and the reads that make "acknowledged" and "visible" the same thing.
//!
//! A write is executed by its group's leader. Any node accepts it: a node that is not the
//! leader hands it over the peer connection and relays the answer (the client never sees a
//! redirect). An answer is only ever given for a state a quorum has made durable.

use crate::data_dir::{self, Meta};
use crate::group::{Answer, Group};
use crate::node_log::NodeLog;
use crate::placement::ClusterMap;
use crate::rpc::{ClientOp, ClientReply, Request, Response, SessionWire};
use crate::state_machine::{GroupShared, SnapshotFile};
use crate::transport::{CallError, Transport};
use crate::NodeError;
use bytes::Bytes;
use parking_lot::Mutex;
use starcite_core::{
    group_of, AppendCommand, AppendRequest, Applied, Command, CreateCommand, CreateRequest,
    GroupState, SessionId, SessionView, SpillRun, Timestamp,
};
use starcite_raft::{NodeId, Raft, ReadError, Restored, Role};
use starcite_storage::{SpillStore, WriteSpacing};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Semaphore};

/// In a cluster, while several records share each write (a lone writer is never held back),
/// a node's log starts a write at most every 1 ms while records arrive at up to 3,000/s, and
/// at most every 3 ms from 6,000/s on (in between, in proportion). Every fsync also sets off
/// Raft messages — acknowledgements, commits, answers — so fewer, fuller fsyncs take CPU off
/// every append when the cluster is busy: 1 ms instead of none took p99 at half the maximum
/// load from 10–53 ms to 8–14 ms, and 3 ms instead of 1 ms at 6,000–7,000 appends/s (evenly
/// spread) took it from a median of 12 ms to 7 ms for 0.5–0.9 ms more at p50
/// (docs/benchmarks.md). At 2,000/s that p50 cost is 1.4 ms for a tail that needs no help, so
/// the wait grows with the load. A single node spends its fsyncs on nothing else, so it does
/// not wait.
const CLUSTER_LOG_WRITE_SPACING: WriteSpacing = WriteSpacing {
    quiet: Duration::from_millis(1),
    busy: Duration::from_millis(3),
    quiet_rate: 3000.0,
    busy_rate: 6000.0,
};

/// How a node that starts with an empty data directory joins its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterState {
    /// Ask the peers: join as a new member of a new cluster if none has data, else rejoin.
    Auto,
    /// A new cluster: vote at once.
    New,
    /// An existing cluster (a replaced or wiped node): catch up before voting.
    Existing,
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub groups: u32,
    pub idempotency_window: u64,
    /// Log segment size; old segments are deleted once no group needs them.
    pub segment_bytes: u64,
    /// When the log on disk grows past this, the groups holding its oldest segment snapshot.
    pub snapshot_every_bytes: u64,
    /// Each group snapshots (and drops the log entries it covers) after this many entries.
    pub snapshot_every_entries: u64,
    /// Most writes (creates + appends) in progress at once; beyond that callers wait.
    pub max_inflight_writes: usize,
    /// How long a request may wait for a slot, a leader and a quorum before `unavailable`.
    pub request_timeout: Duration,
    pub node_name: String,
    /// Every node as (name, internal address); empty (or just this node) for a single node.
    pub cluster_nodes: Vec<(String, String)>,
    pub cluster_state: ClusterState,
    pub heartbeat_interval: Duration,
    /// Followers wait between this and twice this without a heartbeat before electing.
    pub election_timeout: Duration,
    /// Memory the events held hot may take (all groups); past it, events move to the
    /// spill store on local disk.
    pub hot_max_bytes: u64,
    /// Each replica archives to its own embedded archive (a cluster without a shared
    /// Postgres) instead of the leader archiving for all: archive marks are then this
    /// replica's, applied locally, never replicated; see [`crate::ArchiveReader`].
    pub per_replica_archive: bool,
}

impl NodeConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        NodeConfig {
            data_dir: data_dir.into(),
            groups: 256,
            idempotency_window: starcite_core::state::DEFAULT_IDEMPOTENCY_WINDOW,
            segment_bytes: 64 * 1024 * 1024,
            snapshot_every_bytes: 256 * 1024 * 1024,
            snapshot_every_entries: 100_000,
            max_inflight_writes: 8192,
            request_timeout: Duration::from_secs(10),
            node_name: "n1".into(),
            cluster_nodes: Vec::new(),
            cluster_state: ClusterState::Auto,
            heartbeat_interval: Duration::from_millis(100),
            election_timeout: Duration::from_millis(500),
            hot_max_bytes: 256 * 1024 * 1024,
            per_replica_archive: false,
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
    /// Groups whose replica here lost its data and has not caught up yet (it may not vote).
    pub groups_rejoining: u64,
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
    /// Memory taken by events held hot; bytes of spilled events on disk; events spilled.
    pub hot_bytes: u64,
    pub spill_disk_bytes: u64,
    pub spilled_events: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    forwarded_out: AtomicU64,
    forwarded_in: AtomicU64,
    pub spilled_events: AtomicU64,
}

pub struct Node {
    me: Weak<Node>,
    config: NodeConfig,
    pub(crate) map: ClusterMap,
    pub(crate) log: Arc<NodeLog>,
    pub(crate) groups: Vec<Group>,
    pub(crate) transport: Option<Arc<Transport>>,
    pub(crate) spill: Arc<SpillStore>,
    /// Frees what budget passes take out of memory, below the request path's priority.
    pub(crate) reclaimer: crate::reclaim::Reclaimer,
    /// This replica's own archive, with `per_replica_archive` (attached once it is open).
    pub(crate) local_archive: std::sync::OnceLock<Arc<dyn crate::ArchiveReader>>,
    /// The group the archiver's next collection starts at.
    pub(crate) archive_cursor: std::sync::atomic::AtomicU32,
    inflight: Semaphore,
    pub(crate) counters: Counters,
    recovery_records: u64,
    recovery_millis: AtomicU64,
    clock: Instant,
    stop: watch::Sender<bool>,
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    _lock: File,
}

fn unavailable(message: impl Into<String>) -> NodeError {
    NodeError::Unavailable(message.into())
}

const UNKNOWN_OUTCOME: &str = "the outcome is unknown; retry with the same idempotency key";

fn raft_config(config: &NodeConfig, map: &ClusterMap, group: u32) -> starcite_raft::Config {
    let mut c = starcite_raft::Config::new(map.me(), map.members(group).to_vec());
    c.election_timeout_ms = (config.election_timeout.as_millis() as u64).max(2);
    c.election_rank = map.election_rank(group, map.me());
    c.heartbeat_ms =
        (config.heartbeat_interval.as_millis() as u64).clamp(1, c.election_timeout_ms / 2);
    c.seed = map.me() ^ u64::from(group).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    c
}

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
        let (lock, meta, log, recovered, stats, spill) = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || -> Result<_, NodeError> {
                let (lock, meta) =
                    data_dir::open(&config.data_dir, config.groups, &config.node_name)?;
                let spill = SpillStore::open(&config.data_dir.join("spill"), config.groups)?;
                let write_spacing = if config.is_cluster() {
                    CLUSTER_LOG_WRITE_SPACING
                } else {
                    WriteSpacing::NONE
                };
                let (log, recovered, stats) = NodeLog::open(
                    &config.data_dir.join("log"),
                    config.groups,
                    config.segment_bytes,
                    write_spacing,
                )?;
                std::fs::create_dir_all(config.data_dir.join("snapshots")).map_err(|e| {
                    NodeError::Startup(format!("cannot create the snapshot directory: {e}"))
                })?;
                Ok((lock, meta, log, recovered, stats, Arc::new(spill)))
            })
            .await
            .map_err(|e| NodeError::Startup(format!("recovery crashed: {e}")))??
        };
        let node_slot: Arc<std::sync::OnceLock<Weak<Node>>> = Default::default();
        let transport = match (config.is_cluster(), listener) {
            (true, Some(listener)) => {
                // Replicas must agree on what an archive mark means (see archive_api.rs).
                let archive = if config.per_replica_archive {
                    "archive=per-node"
                } else {
                    "archive=shared"
                };
                let t = Transport::start(&map, listener, archive);
                t.set_handler(crate::peer::request_handler(log.clone(), node_slot.clone()));
                t.set_raft_handler(crate::peer::raft_handler(node_slot.clone()));
                t.set_log_holder(log.wal().holder());
                Some(t)
            }
            (true, None) => {
                return Err(NodeError::Startup(
                    "a cluster node needs its internal listener".into(),
                ))
            }
            (false, _) => None,
        };
        let meta = match meta {
            Some(meta) => meta,
            None => {
                let rejoin = match (&transport, config.cluster_state) {
                    (None, _) | (_, ClusterState::New) => false,
                    (Some(_), ClusterState::Existing) => true,
                    (Some(t), ClusterState::Auto) => crate::peer::cluster_has_data(t, &map).await,
                };
                if rejoin {
                    tracing::warn!("this node starts without data in a cluster that has some: it catches up before it votes");
                }
                let meta = Meta {
                    groups: config.groups,
                    rejoin,
                };
                let dir = config.data_dir.clone();
                let name = config.node_name.clone();
                tokio::task::spawn_blocking(move || data_dir::write_meta(&dir, &name, meta))
                    .await
                    .map_err(|e| NodeError::Startup(e.to_string()))??;
                meta
            }
        };
        let snapshot_dir = config.data_dir.join("snapshots");
        let clock = Instant::now();
        let groups = {
            let config = config.clone();
            let map = map.clone();
            let spill = spill.clone();
            tokio::task::spawn_blocking(move || -> Result<Vec<Group>, NodeError> {
                let mut groups = Vec::with_capacity(config.groups as usize);
                for (index, rec) in recovered.into_iter().enumerate() {
                    let index = index as u32;
                    let path = snapshot_dir.join(format!("group-{index:05}.snap"));
                    let file = SnapshotFile::read(&path)?;
                    let (snap_index, snap_term, state) = match &file {
                        Some(f) => (f.index, f.term, f.decode(config.idempotency_window)?),
                        None => (0, 0, GroupState::new(config.idempotency_window)),
                    };
                    if rec.marks.snapshot.0 > snap_index {
                        return Err(NodeError::Startup(format!(
                            "group {index}: the log was compacted up to {} but the snapshot \
                             file {} {}; refusing to start without that data",
                            rec.marks.snapshot.0,
                            path.display(),
                            if file.is_some() {
                                "is older"
                            } else {
                                "is missing"
                            }
                        )));
                    }
                    // Spill segments written after this snapshot hold nothing it needs (the
                    // log has those events): only the snapshot's own runs are kept.
                    let spilled = state.spill_segments();
                    if let Some(mut segments) = spill.lock(index) {
                        segments.retain(&spilled)?;
                    }
                    let shared = GroupShared::new(index, state, snap_index);
                    let raft = map.is_member(index).then(|| {
                        let mut cfg = raft_config(&config, &map, index);
                        cfg.rejoining = meta.rejoin && rec.marks.hard_state.is_none();
                        Raft::new(
                            cfg,
                            Restored {
                                hard_state: rec.marks.hard_state.unwrap_or_default(),
                                snapshot: (snap_index, snap_term),
                                entries: rec
                                    .entries
                                    .into_iter()
                                    .filter(|e| e.index > snap_index)
                                    .collect(),
                                commit: rec.marks.commit,
                            },
                            0,
                            crate::rpc::command_size,
                        )
                    });
                    groups.push(Group::new(index, raft, shared, snap_index, path, spilled));
                }
                Ok(groups)
            })
            .await
            .map_err(|e| NodeError::Startup(format!("recovery crashed: {e}")))??
        };
        let node = Arc::new_cyclic(|me| Node {
            me: me.clone(),
            inflight: Semaphore::new(config.max_inflight_writes.max(1)),
            map,
            log,
            groups,
            transport,
            spill,
            reclaimer: crate::reclaim::Reclaimer::start(),
            local_archive: Default::default(),
            archive_cursor: Default::default(),
            counters: Counters::default(),
            recovery_records: stats.records,
            recovery_millis: AtomicU64::new(0),
            clock,
            stop: watch::Sender::new(false),
            background: Mutex::new(Vec::new()),
            config,
            _lock: lock,
        });
        let _ = node_slot.set(Arc::downgrade(&node));
        node.start_groups();
        if let Some(transport) = &node.transport {
            // Raft messages that arrived while the node was opening were dropped (a snapshot
            // among them would leave its leader waiting out the snapshot timeout): new
            // connections make the leaders resend.
            transport.reconnect_all();
        }
        let recovery_millis = started.elapsed().as_millis() as u64;
        node.recovery_millis
            .store(recovery_millis, Ordering::Relaxed);
        tracing::info!(
            records = stats.records,
            entries = stats.entries,
            millis = recovery_millis,
            "recovered data directory"
        );
        node.spawn_background();
        Ok(node)
    }

    /// Applies what recovery knows to be committed, and starts elections where waiting would
    /// only delay readiness: at once on a single node, and by each group's preferred leader.
    fn start_groups(&self) {
        let single = self.map.is_single_node();
        let now = self.now();
        for g in &self.groups {
            let Some(core) = &g.core else { continue };
            let mut core = core.lock();
            if single || self.map.preferred_leader(g.index) == self.map.me() {
                core.raft.campaign(now);
            }
            self.drive(g, &mut core);
        }
    }

    pub(crate) fn weak(&self) -> Weak<Node> {
        self.me.clone()
    }

    /// Milliseconds on this node's monotonic clock (the engines' time).
    pub(crate) fn now(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
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
        self.log.is_healthy() && !*self.stop.borrow() && self.groups_without_leader() == 0
    }

    /// Groups of this node's replicas that have no leader yet.
    pub fn groups_without_leader(&self) -> usize {
        self.groups
            .iter()
            .filter(|g| g.is_member() && g.leader.borrow().is_none())
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
        // On the leader, a retry of an append the state already holds is answered here,
        // without replicating. (A follower's state may lag what was acknowledged.)
        if *group.leader.borrow() == Some(self.map.me()) {
            if let Some(answer) = group
                .shared
                .read(|d| d.state.settled_append(session_id, &request))
            {
                return append_outcome(session_id, answer);
            }
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
                        if Instant::now() + Duration::from_millis(10) >= deadline {
                            return Err(no_leader());
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    attempt += 1;
                }
                ClientReply::Unavailable(message) => return Err(unavailable(message)),
                other => return Ok(other),
            }
            if Instant::now() >= deadline {
                return Err(no_leader());
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
        if group.is_member() {
            let mut leader = group.leader.subscribe();
            loop {
                if let Some(l) = *leader.borrow_and_update() {
                    return Ok(l);
                }
                if let Some(hint) =
                    Some(group.leader_hint.load(Ordering::Relaxed)).filter(|h| *h != 0)
                {
                    return Ok(hint);
                }
                match tokio::time::timeout_at(deadline.into(), leader.changed()).await {
                    Ok(Ok(())) => {}
                    _ => return Err(no_leader()),
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
            op: Box::new(op.clone()),
        };
        let timeout = deadline.saturating_duration_since(Instant::now());
        let call = transport.call(target, &request, timeout);
        // If this node sees the group's leader change while the request is out, its outcome
        // is unknown: answer now (the client retries with its idempotency key) rather than
        // wait out the timeout on a node that may be gone.
        let leader_changed = async {
            if !group.is_member() {
                return std::future::pending().await;
            }
            let mut leader = group.leader.subscribe();
            let _ = leader.wait_for(|l| l.is_some_and(|l| l != target)).await;
            if leader.has_changed().is_err() {
                std::future::pending::<()>().await;
            }
            // A handover answers promptly; a crashed or paused node does not.
            tokio::time::sleep(Duration::from_millis(500)).await;
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

    /// Proposes a command on this node's replica and waits for its applied answer.
    async fn propose(
        &self,
        group: &Group,
        cmd: Command,
        deadline: Instant,
    ) -> Result<Applied, ClientReply> {
        let Some(core) = &group.core else {
            return Err(ClientReply::NotLeader(None));
        };
        let rx: oneshot::Receiver<Answer> = {
            let mut core = core.lock();
            match core.raft.propose(cmd, self.now()) {
                Ok((index, term)) => {
                    let rx = core.wait_for(index, term);
                    self.drive(group, &mut core);
                    rx
                }
                Err(hint) => return Err(ClientReply::NotLeader(hint)),
            }
        };
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(Ok(answer))) => Ok(answer),
            Ok(Ok(Err(()))) => Err(ClientReply::Unavailable(format!(
                "leadership changed before the write committed; {UNKNOWN_OUTCOME}"
            ))),
            Ok(Err(_)) => Err(ClientReply::Unavailable(format!(
                "the group stopped; {UNKNOWN_OUTCOME}"
            ))),
            Err(_) => Err(ClientReply::Unavailable(format!(
                "not committed within the request timeout; {UNKNOWN_OUTCOME}"
            ))),
        }
    }

    /// Proposes `cmd` in group `group` on this node (it must lead the group).
    pub(crate) async fn propose_in(
        &self,
        group: u32,
        cmd: Command,
        deadline: Instant,
    ) -> Result<Applied, NodeError> {
        self.propose(&self.groups[group as usize], cmd, deadline)
            .await
            .map_err(unexpected)
    }

    /// On the leader: the log index up to which every acknowledged write is included, with
    /// leadership confirmed (lease).
    async fn read_index(&self, group: &Group, deadline: Instant) -> Result<u64, ClientReply> {
        let Some(core) = &group.core else {
            return Err(ClientReply::NotLeader(None));
        };
        loop {
            let answer = core.lock().raft.read_index(self.now());
            match answer {
                Ok(index) => return Ok(index),
                Err(ReadError::NotLeader(hint)) => return Err(ClientReply::NotLeader(hint)),
                Err(ReadError::NotReady) => {
                    if Instant::now() >= deadline {
                        return Err(ClientReply::Unavailable(
                            "leadership not confirmed within the request timeout".into(),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }

    /// On the leader: waits until this replica has applied everything committed so far.
    async fn linearize(&self, group: &Group, deadline: Instant) -> Result<(), ClientReply> {
        let index = self.read_index(group, deadline).await?;
        tokio::time::timeout_at(deadline.into(), group.shared.applied_at_least(index))
            .await
            .map_err(|_| ClientReply::Unavailable("apply did not catch up in time".into()))
    }

    /// Executes `op` on this node's replica of the group.
    pub(crate) async fn execute(
        &self,
        group: &Group,
        op: &ClientOp,
        deadline: Instant,
    ) -> ClientReply {
        if !group.is_member() {
            let hint = group.leader_hint.load(Ordering::Relaxed);
            return ClientReply::NotLeader((hint != 0).then_some(hint));
        }
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
                match self
                    .propose(group, Command::Create(cmd.clone()), deadline)
                    .await
                {
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
                        if let Err(reply) = self.linearize(group, deadline).await {
                            return reply;
                        }
                        if group.shared.read(|d| d.state.session(session_id).is_none()) {
                            return ClientReply::Applied(Applied::SessionNotFound);
                        }
                    }
                }
                let cmd = AppendCommand::new(session_id, request, Timestamp::now());
                match self.propose(group, Command::Append(cmd), deadline).await {
                    Ok(answer) => ClientReply::Applied(answer),
                    Err(reply) => reply,
                }
            }
            ClientOp::ReadIndex => match self.read_index(group, deadline).await {
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
            } => match self
                .read_local(group, session_id, *after, *limit as usize)
                .await
            {
                Ok(events) => ClientReply::Events(events),
                Err(NodeError::Trimmed { first_hot, .. }) => ClientReply::Trimmed { first_hot },
                Err(NodeError::SessionNotFound(_)) => ClientReply::NotFound,
                Err(e) => ClientReply::Unavailable(e.to_string()),
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
        let reply = if group.is_member() {
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
        if group.is_member() {
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
        if group.is_member() {
            return self.read_local(group, session_id, after, limit).await;
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

    /// Events of a session this node replicates, from memory or its spill store (or its own
    /// archive, with `per_replica_archive`; otherwise the archive is the caller's business:
    /// `Trimmed` says where it starts).
    async fn read_local(
        &self,
        group: &Group,
        session_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Bytes>, NodeError> {
        let mut attempts = 0;
        loop {
            let runs = match local_events(&group.shared, session_id, after, limit) {
                Ok(LocalEvents::Memory(events)) => return Ok(events),
                Ok(LocalEvents::Spilled(runs)) => runs,
                // This replica's archive marks are its own: only its own archive can serve
                // them, for a caller here or on another node.
                Err(NodeError::Trimmed { first_hot, .. }) if self.config.per_replica_archive => {
                    return self
                        .read_own_archive(session_id, after, first_hot, limit)
                        .await;
                }
                Err(e) => return Err(e),
            };
            let store = self.spill.clone();
            let (index, id) = (group.index, session_id.to_owned());
            let read = tokio::task::spawn_blocking(move || {
                crate::spill::read_runs(&store, index, &id, &runs, after, limit)
            })
            .await
            .map_err(|e| unavailable(format!("spill read crashed: {e}")))?;
            match read {
                Ok(events) if !events.is_empty() => return Ok(events),
                // The runs changed under the read (archived and deleted, or a snapshot
                // installed): look again.
                _ if attempts < 3 => attempts += 1,
                Ok(_) => return Err(unavailable("spilled events could not be found")),
                Err(e) => return Err(e),
            }
        }
    }

    /// A client operation a peer handed to this node.
    pub(crate) async fn handle_client(&self, group: u32, op: ClientOp) -> Result<Response, String> {
        let group = self
            .groups
            .get(group as usize)
            .ok_or_else(|| format!("no group {group}"))?;
        self.counters.forwarded_in.fetch_add(1, Ordering::Relaxed);
        Ok(Response::Client(
            self.execute(group, &op, self.deadline()).await,
        ))
    }

    pub fn stats(&self) -> NodeStats {
        let wal = self.log.wal().stats();
        let mut stats = NodeStats {
            log_bytes_written: wal.bytes_written.load(Ordering::Relaxed),
            log_records_written: wal.records_written.load(Ordering::Relaxed),
            log_fsyncs: wal.fsyncs.load(Ordering::Relaxed),
            log_disk_bytes: self.log.disk_bytes(),
            recovery_records_replayed: self.recovery_records,
            recovery_millis: self.recovery_millis.load(Ordering::Relaxed),
            forwarded_out: self.counters.forwarded_out.load(Ordering::Relaxed),
            forwarded_in: self.counters.forwarded_in.load(Ordering::Relaxed),
            spill_disk_bytes: self.spill.disk_bytes(),
            spilled_events: self.counters.spilled_events.load(Ordering::Relaxed),
            ..NodeStats::default()
        };
        if let Some(t) = &self.transport {
            stats.peer_bytes_sent = t.stats.bytes_sent.load(Ordering::Relaxed);
            stats.peer_bytes_received = t.stats.bytes_received.load(Ordering::Relaxed);
        }
        for g in &self.groups {
            let Some(core) = &g.core else { continue };
            stats.groups_replicated += 1;
            let (sessions, hot_bytes) = g
                .shared
                .read(|d| (d.state.session_count() as u64, d.state.hot_bytes()));
            stats.sessions += sessions;
            stats.hot_bytes += hot_bytes;
            stats.snapshots_taken += g.shared.snapshots_built();
            let (status, rejoining) = {
                let core = core.lock();
                (core.raft.status(), core.raft.is_rejoining())
            };
            stats.groups_rejoining += u64::from(rejoining);
            stats.terms_total += status.term;
            if status.role == Role::Leader {
                stats.groups_led += 1;
                for peer in &status.peers {
                    let lag = status.last_index.saturating_sub(peer.matched);
                    stats.replication_lag_max = stats.replication_lag_max.max(lag);
                    stats.replication_lag_total += lag;
                }
            }
        }
        stats
    }

    /// Whether this node leads `group` now.
    pub(crate) fn leads(&self, group: &Group) -> bool {
        group
            .core
            .as_ref()
            .is_some_and(|c| c.lock().raft.is_leader())
    }

    fn spawn_background(self: &Arc<Self>) {
        let mut tasks = self.background.lock();
        tasks.push(tokio::spawn(crate::background::tick(Arc::downgrade(self))));
        tasks.push(tokio::spawn(crate::background::compact_log(
            Arc::downgrade(self),
        )));
        tasks.push(tokio::spawn(crate::background::spill(Arc::downgrade(self))));
        if self.config.is_cluster() {
            tasks.push(tokio::spawn(crate::background::balance_leaders(
                Arc::downgrade(self),
            )));
        }
    }

    pub(crate) fn is_stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Stops background work and leaves the cluster's connections. What is durable stays.
    pub async fn shutdown(&self) {
        self.stop.send_replace(true);
        for task in self.background.lock().drain(..) {
            task.abort();
        }
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

/// Where this replica holds the events right after a cursor.
enum LocalEvents {
    Memory(Vec<Bytes>),
    /// On local disk, in these runs.
    Spilled(Vec<SpillRun>),
}

fn local_events(
    shared: &GroupShared,
    session_id: &str,
    after: u64,
    limit: usize,
) -> Result<LocalEvents, NodeError> {
    shared.read(|d| {
        let session = d
            .state
            .session(session_id)
            .ok_or_else(|| NodeError::SessionNotFound(session_id.to_owned()))?;
        let visible = d.visible_seq(session_id);
        if visible > after && session.first_local_seq() > after + 1 {
            return Err(NodeError::Trimmed {
                session_id: session_id.to_owned(),
                first_hot: session.first_local_seq(),
            });
        }
        if let Some(runs) = session.spilled_from(after, visible) {
            return Ok(LocalEvents::Spilled(runs));
        }
        Ok(LocalEvents::Memory(
            session.events_between(after, visible, limit),
        ))
    })
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

fn no_leader() -> NodeError {
    unavailable("this session's group has no leader (no quorum of its replicas) right now; retry with the same idempotency key")
}

fn unavailable_log() -> NodeError {
    unavailable("the node's log failed a write and no longer accepts writes; restart the node")
}
