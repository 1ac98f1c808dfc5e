//! The node: its groups, the shared log, and the rule that nothing is answered or shown to a
//! reader before the log has made it durable.

use crate::recovery::{encode_record, encode_state, recover};
use crate::NodeError;
use bytes::Bytes;
use parking_lot::Mutex;
use starcite_core::{
    group_of, AppendDecision, AppendRequest, Applied, Command, CreateDecision, CreateRequest,
    GroupState, SessionId, SessionView, Timestamp,
};
use starcite_storage::{write_snapshot, StorageError, Wal};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub groups: u32,
    pub idempotency_window: u64,
    /// Log segment size; old segments are deleted once a snapshot covers them.
    pub segment_bytes: u64,
    /// Take a snapshot after this many log bytes.
    pub snapshot_every_bytes: u64,
    /// Most writes (creates + appends) waiting for the log at once; beyond that callers wait.
    pub max_inflight_writes: usize,
    /// How long a write may wait for a slot and for durability before answering `unavailable`.
    pub request_timeout: Duration,
}

impl NodeConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        NodeConfig {
            data_dir: data_dir.into(),
            groups: 256,
            idempotency_window: starcite_core::state::DEFAULT_IDEMPOTENCY_WINDOW,
            segment_bytes: 64 * 1024 * 1024,
            snapshot_every_bytes: 256 * 1024 * 1024,
            max_inflight_writes: 8192,
            request_timeout: Duration::from_secs(10),
        }
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
    pub snapshots_taken: u64,
    pub recovery_records_replayed: u64,
    pub recovery_millis: u64,
}

struct GroupInner {
    state: GroupState,
    /// Log records this group has handed to the log, and how many of them are durable.
    submitted: u64,
    durable: u64,
    /// Per session: the highest seq that is durable (what tails may see).
    visible: HashMap<String, watch::Sender<u64>>,
    /// Sessions with durable events (or a header) the archive does not have yet.
    unarchived: HashSet<String>,
    /// Sessions whose header the archive may not have yet. Leader memory only: upserting a
    /// header twice is harmless.
    headers_unarchived: HashSet<String>,
}

struct Group {
    index: u32,
    inner: Mutex<GroupInner>,
    /// Durable record count of this group; waiters compare it with what they observed.
    durable: watch::Sender<u64>,
}

pub struct Node {
    config: NodeConfig,
    log_dir: PathBuf,
    groups: Vec<Arc<Group>>,
    wal: Wal,
    failed: Arc<AtomicBool>,
    inflight: Semaphore,
    snapshot_base: AtomicU64,
    snapshots_taken: AtomicU64,
    snapshot_running: Mutex<()>,
    recovery_records: u64,
    recovery_millis: u64,
    _lock: File,
}

const META_FILE: &str = "starcite.meta";

/// Refuses to run on a data directory written with a different group count (sessions would
/// hash to other groups) and keeps two processes off the same directory.
fn prepare_data_dir(config: &NodeConfig) -> Result<File, NodeError> {
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
            let groups = text
                .lines()
                .find_map(|l| l.strip_prefix("groups="))
                .and_then(|v| v.trim().parse::<u32>().ok())
                .ok_or_else(|| NodeError::Startup(format!("{} is damaged", meta_path.display())))?;
            if groups != config.groups {
                return Err(NodeError::Startup(format!(
                    "data directory {} was created with {groups} raft groups; \
                     STARCITE_RAFT_GROUPS={} would move sessions between groups. \
                     Set STARCITE_RAFT_GROUPS={groups} or use a new data directory",
                    dir.display(),
                    config.groups
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let tmp = meta_path.with_extension("tmp");
            std::fs::write(&tmp, format!("format=1\ngroups={}\n", config.groups))
                .and_then(|_| File::open(&tmp)?.sync_all())
                .and_then(|_| std::fs::rename(&tmp, &meta_path))
                .and_then(|_| File::open(dir)?.sync_all())
                .map_err(|e| {
                    NodeError::Startup(format!("cannot write {}: {e}", meta_path.display()))
                })?;
        }
        Err(e) => {
            return Err(NodeError::Startup(format!(
                "cannot read {}: {e}",
                meta_path.display()
            )))
        }
    }
    Ok(lock)
}

impl Node {
    /// Opens (recovering) the node's data directory. Blocking: run it off the async runtime.
    pub fn open(config: NodeConfig) -> Result<Arc<Node>, NodeError> {
        if config.groups == 0 {
            return Err(NodeError::Startup("groups must be at least 1".into()));
        }
        let started = Instant::now();
        let lock = prepare_data_dir(&config)?;
        let log_dir = config.data_dir.join("log");
        let recovered = recover(
            &log_dir,
            config.groups,
            config.idempotency_window,
            config.segment_bytes,
        )?;
        let groups = recovered
            .states
            .into_iter()
            .enumerate()
            .map(|(i, state)| {
                let visible = state
                    .sessions()
                    .map(|s| (s.id.clone(), watch::Sender::new(s.last_seq)))
                    .collect();
                let unarchived: HashSet<String> = state
                    .sessions()
                    .filter(|s| s.archived_seq < s.last_seq || s.archived_seq == 0)
                    .map(|s| s.id.clone())
                    .collect();
                let headers_unarchived = state
                    .sessions()
                    .filter(|s| s.archived_seq == 0)
                    .map(|s| s.id.clone())
                    .collect();
                Arc::new(Group {
                    index: i as u32,
                    inner: Mutex::new(GroupInner {
                        state,
                        submitted: 0,
                        durable: 0,
                        visible,
                        unarchived,
                        headers_unarchived,
                    }),
                    durable: watch::Sender::new(0),
                })
            })
            .collect();
        let recovery_millis = started.elapsed().as_millis() as u64;
        tracing::info!(
            records = recovered.records_replayed,
            millis = recovery_millis,
            "recovered data directory"
        );
        Ok(Arc::new(Node {
            inflight: Semaphore::new(config.max_inflight_writes.max(1)),
            log_dir,
            groups,
            wal: recovered.wal,
            failed: Arc::new(AtomicBool::new(false)),
            snapshot_base: AtomicU64::new(0),
            snapshots_taken: AtomicU64::new(0),
            snapshot_running: Mutex::new(()),
            recovery_records: recovered.records_replayed,
            recovery_millis,
            config,
            _lock: lock,
        }))
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// Ready means every group can take writes now: on a single node, the log is healthy.
    pub fn is_ready(&self) -> bool {
        !self.failed.load(Ordering::Acquire)
    }

    fn group(&self, session_id: &str) -> &Arc<Group> {
        &self.groups[group_of(session_id, self.config.groups) as usize]
    }

    pub async fn create_session(&self, req: CreateRequest) -> Result<SessionView, NodeError> {
        let _permit = self.write_slot().await?;
        let id = req.id.clone().unwrap_or_else(SessionId::generate);
        let group = self.group(id.as_str());
        let (lsn, outcome) = {
            let mut inner = group.inner.lock();
            match inner.state.decide_create(id, &req, Timestamp::now()) {
                CreateDecision::Exists => {
                    let id = req.id.map(|i| i.into_string()).unwrap_or_default();
                    (inner.submitted, Err(NodeError::SessionExists(id)))
                }
                CreateDecision::Accept(cmd) => {
                    let view = SessionView {
                        id: cmd.id.clone(),
                        title: cmd.title.clone(),
                        metadata: cmd.metadata.clone(),
                        created_at: cmd.created_at,
                        updated_at: cmd.created_at,
                        last_seq: 0,
                    };
                    let command = Command::Create(cmd);
                    inner.state.apply(&command);
                    inner.visible.insert(view.id.clone(), watch::Sender::new(0));
                    let lsn = self.submit(group, &mut inner, &command, None);
                    (lsn, Ok(view))
                }
            }
        };
        self.wait_durable(group, lsn).await?;
        outcome
    }

    pub async fn append(
        &self,
        session_id: &str,
        req: AppendRequest,
    ) -> Result<AppendOutcome, NodeError> {
        let _permit = self.write_slot().await?;
        let group = self.group(session_id);
        let (lsn, outcome) = {
            let mut inner = group.inner.lock();
            let observed = inner.submitted;
            match inner
                .state
                .decide_append(session_id, &req, Timestamp::now())
            {
                AppendDecision::NotFound => {
                    return Err(NodeError::SessionNotFound(session_id.to_owned()))
                }
                AppendDecision::Deduped { seq, last_seq } => (
                    observed,
                    Ok(AppendOutcome {
                        seq,
                        last_seq,
                        deduped: true,
                    }),
                ),
                AppendDecision::IdempotencyConflict { key, seq } => {
                    (observed, Err(NodeError::IdempotencyConflict { key, seq }))
                }
                AppendDecision::ExpectedSeqConflict { expected, current } => (
                    observed,
                    Err(NodeError::ExpectedSeqConflict { expected, current }),
                ),
                AppendDecision::Accept(cmd) => {
                    let seq = cmd.seq;
                    let command = Command::Append(cmd);
                    let applied = inner.state.apply(&command);
                    debug_assert_eq!(applied, Applied::Appended { seq });
                    let lsn = self.submit(group, &mut inner, &command, Some(seq));
                    (
                        lsn,
                        Ok(AppendOutcome {
                            seq,
                            last_seq: seq,
                            deduped: false,
                        }),
                    )
                }
            }
        };
        // Every answer, conflicts included, waits until what it was decided on is durable:
        // nobody is told about a state that a crash could still take back.
        self.wait_durable(group, lsn).await?;
        outcome
    }

    /// The session's header as of its durable state.
    pub async fn session(&self, session_id: &str) -> Result<SessionView, NodeError> {
        let group = self.group(session_id);
        let (observed, view) = {
            let inner = group.inner.lock();
            let view = inner
                .state
                .session(session_id)
                .map(|s| s.view())
                .ok_or_else(|| NodeError::SessionNotFound(session_id.to_owned()))?;
            (inner.submitted, view)
        };
        self.wait_durable(group, observed).await?;
        Ok(view)
    }

    /// A receiver of the session's highest durable seq, for tails. Fails if the session does
    /// not exist (durably).
    pub async fn subscribe(&self, session_id: &str) -> Result<watch::Receiver<u64>, NodeError> {
        let group = self.group(session_id);
        let (observed, rx) = {
            let inner = group.inner.lock();
            let rx = inner
                .visible
                .get(session_id)
                .map(|tx| tx.subscribe())
                .ok_or_else(|| NodeError::SessionNotFound(session_id.to_owned()))?;
            (inner.submitted, rx)
        };
        self.wait_durable(group, observed).await?;
        Ok(rx)
    }

    /// Durable events with `seq > after`, oldest first, at most `limit`.
    pub fn read_events(
        &self,
        session_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Bytes>, NodeError> {
        let group = self.group(session_id);
        let inner = group.inner.lock();
        let session = inner
            .state
            .session(session_id)
            .ok_or_else(|| NodeError::SessionNotFound(session_id.to_owned()))?;
        let durable = inner
            .visible
            .get(session_id)
            .map(|tx| *tx.borrow())
            .unwrap_or(0);
        if durable > after && session.first_seq() > after + 1 {
            return Err(NodeError::Trimmed {
                session_id: session_id.to_owned(),
                first_hot: session.first_seq(),
            });
        }
        Ok(session.events_between(after, durable, limit))
    }

    async fn write_slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, NodeError> {
        if !self.is_ready() {
            return Err(unavailable_log());
        }
        // Fast path without arming a timer: a slot is almost always free.
        if let Ok(permit) = self.inflight.try_acquire() {
            return Ok(permit);
        }
        match tokio::time::timeout(self.config.request_timeout, self.inflight.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(NodeError::Unavailable(
                "too many writes in flight; retry with the same idempotency key".into(),
            )),
        }
    }

    /// Hands a command to the log; returns the group's record number for it. Called with the
    /// group lock held so the log order of a group's records is the order they were decided.
    fn submit(
        &self,
        group: &Arc<Group>,
        inner: &mut GroupInner,
        command: &Command,
        seq: Option<u64>,
    ) -> u64 {
        inner.submitted += 1;
        let lsn = inner.submitted;
        let record = encode_record(group.index, command);
        let session_id = command.session_id().to_owned();
        let kind = match command {
            Command::Create(_) => RecordKind::Create,
            Command::Append(_) => RecordKind::Append,
            Command::ArchiveAck(_) => RecordKind::ArchiveAck,
        };
        let group = group.clone();
        let failed = self.failed.clone();
        self.wal.append(
            &record,
            Box::new(move |result| match result {
                Ok(()) => {
                    {
                        let mut inner = group.inner.lock();
                        inner.durable = lsn;
                        if let (Some(seq), Some(tx)) = (seq, inner.visible.get(&session_id)) {
                            tx.send_replace(seq);
                        }
                        match kind {
                            RecordKind::Create => {
                                inner.headers_unarchived.insert(session_id.clone());
                                inner.unarchived.insert(session_id);
                            }
                            RecordKind::Append => {
                                inner.unarchived.insert(session_id);
                            }
                            RecordKind::ArchiveAck => {}
                        }
                    }
                    group.durable.send_replace(lsn);
                }
                Err(e) => {
                    tracing::error!(error = %e, "log write failed; node stops taking writes");
                    failed.store(true, Ordering::Release);
                    group.durable.send_modify(|_| {});
                }
            }),
        );
        lsn
    }

    async fn wait_durable(&self, group: &Group, lsn: u64) -> Result<(), NodeError> {
        let mut rx = group.durable.subscribe();
        let wait = async {
            loop {
                if *rx.borrow_and_update() >= lsn {
                    return Ok(());
                }
                if self.failed.load(Ordering::Acquire) {
                    return Err(unavailable_log());
                }
                if rx.changed().await.is_err() {
                    return Err(unavailable_log());
                }
            }
        };
        match tokio::time::timeout(self.config.request_timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(NodeError::Unavailable(
                "the write was not confirmed durable in time; retry with the same idempotency key"
                    .into(),
            )),
        }
    }

    pub fn stats(&self) -> NodeStats {
        let wal = self.wal.stats();
        NodeStats {
            sessions: self
                .groups
                .iter()
                .map(|g| g.inner.lock().state.session_count() as u64)
                .sum(),
            log_bytes_written: wal.bytes_written.load(Ordering::Relaxed),
            log_records_written: wal.records_written.load(Ordering::Relaxed),
            log_fsyncs: wal.fsyncs.load(Ordering::Relaxed),
            snapshots_taken: self.snapshots_taken.load(Ordering::Relaxed),
            recovery_records_replayed: self.recovery_records,
            recovery_millis: self.recovery_millis,
        }
    }

    /// Takes a snapshot if enough log has been written since the last one. Blocking; meant for
    /// a background thread.
    pub fn snapshot_if_due(&self) -> Result<bool, NodeError> {
        let written = self.wal.stats().bytes_written.load(Ordering::Relaxed);
        if written.saturating_sub(self.snapshot_base.load(Ordering::Relaxed))
            < self.config.snapshot_every_bytes
        {
            return Ok(false);
        }
        self.snapshot_now()?;
        self.snapshot_base.store(written, Ordering::Relaxed);
        Ok(true)
    }

    /// Snapshot protocol: roll the log so that everything older sits in closed segments, copy
    /// every group's state (which includes all of those records), wait until the copies hold
    /// nothing that is not durable, write the snapshot, then delete the covered segments.
    pub fn snapshot_now(&self) -> Result<(), NodeError> {
        let _running = self.snapshot_running.lock();
        let (tx, rx) = std::sync::mpsc::channel();
        self.wal.roll(move |r| {
            let _ = tx.send(r);
        });
        let segment = rx.recv().map_err(|_| StorageError::Closed)??;
        let states: Vec<GroupState> = self
            .groups
            .iter()
            .map(|g| g.inner.lock().state.clone())
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        self.wal.barrier(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.recv().map_err(|_| StorageError::Closed)??;
        let groups = states.iter().map(encode_state).collect();
        write_snapshot(
            &self.log_dir,
            &starcite_storage::Snapshot { segment, groups },
        )?;
        let removed = Wal::remove_segments_before(&self.log_dir, segment)?;
        self.snapshots_taken.fetch_add(1, Ordering::Relaxed);
        tracing::info!(segment, removed_segments = removed, "snapshot written");
        Ok(())
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }
}

#[derive(Clone, Copy)]
enum RecordKind {
    Create,
    Append,
    ArchiveAck,
}

/// Durable events the archive does not have yet, as contiguous runs per session.
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
    /// Durable events not yet archived.
    pub pending_events: u64,
    /// Sessions with anything not yet archived.
    pub pending_sessions: u64,
    /// Events held in memory (hot tier), archived or not.
    pub hot_events: u64,
}

impl Node {
    /// Collects up to `budget` durable, unarchived events (each session's run starts right
    /// after its archive mark, so acknowledging a run never leaves a hole).
    pub fn archive_backlog(&self, budget: usize) -> ArchiveBacklog {
        let mut backlog = ArchiveBacklog::default();
        let mut remaining = budget;
        for group in &self.groups {
            if remaining == 0 {
                break;
            }
            let inner = group.inner.lock();
            for session_id in &inner.unarchived {
                if remaining == 0 {
                    break;
                }
                let Some(session) = inner.state.session(session_id) else {
                    continue;
                };
                if inner.headers_unarchived.contains(session_id) {
                    backlog.sessions.push(session.view());
                }
                let durable = inner
                    .visible
                    .get(session_id)
                    .map(|tx| *tx.borrow())
                    .unwrap_or(0);
                if durable <= session.archived_seq {
                    continue;
                }
                let events = session.events_between(session.archived_seq, durable, remaining);
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
        }
        backlog
    }

    /// Records that the archive durably holds these session headers.
    pub fn headers_archived(&self, sessions: &[SessionView]) {
        for view in sessions {
            let group = self.group(&view.id);
            let mut inner = group.inner.lock();
            inner.headers_unarchived.remove(&view.id);
            let done = inner
                .state
                .session(&view.id)
                .is_some_and(|s| s.archived_seq >= s.last_seq);
            if done {
                inner.unarchived.remove(&view.id);
            }
        }
    }

    /// Logs that events `1..=archived_seq` of each session are in the archive; memory then
    /// keeps only the newest `keep_hot` of them. All acknowledgements go to the log at once
    /// and share its fsyncs. Returns how many events left memory.
    pub async fn acknowledge_archived(
        &self,
        marks: &[(String, u64)],
        keep_hot: u64,
    ) -> Result<u64, NodeError> {
        let mut waits: Vec<(&Arc<Group>, u64)> = Vec::new();
        let mut trimmed_total = 0;
        for (session_id, archived_seq) in marks {
            let group = self.group(session_id);
            let mut inner = group.inner.lock();
            let command = Command::ArchiveAck(starcite_core::ArchiveAckCommand {
                session_id: session_id.clone(),
                archived_seq: *archived_seq,
                keep_hot,
            });
            let trimmed = match inner.state.apply(&command) {
                Applied::Archived { trimmed } => trimmed,
                _ => continue,
            };
            trimmed_total += trimmed;
            let fully_archived = inner
                .state
                .session(session_id)
                .is_some_and(|s| s.archived_seq >= s.last_seq)
                && !inner.headers_unarchived.contains(session_id);
            if fully_archived {
                inner.unarchived.remove(session_id);
            }
            let lsn = self.submit(group, &mut inner, &command, None);
            match waits.iter_mut().find(|(g, _)| Arc::ptr_eq(g, group)) {
                Some((_, max)) => *max = (*max).max(lsn),
                None => waits.push((group, lsn)),
            }
        }
        for (group, lsn) in waits {
            self.wait_durable(group, lsn).await?;
        }
        Ok(trimmed_total)
    }

    pub fn archive_lag(&self) -> ArchiveLag {
        let mut lag = ArchiveLag::default();
        for group in &self.groups {
            let inner = group.inner.lock();
            lag.pending_sessions += inner.unarchived.len() as u64;
            for session in inner.state.sessions() {
                lag.pending_events += session.last_seq - session.archived_seq;
                lag.hot_events += session.last_seq + 1 - session.first_seq();
            }
        }
        lag
    }
}

fn unavailable_log() -> NodeError {
    NodeError::Unavailable(
        "the node's log failed a write and no longer accepts writes; restart the node".into(),
    )
}
