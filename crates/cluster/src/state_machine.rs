//! A group's state machine: the sessions it owns, applied in commit order on every replica.
//!
//! Readers (tails, pages, the archiver) share the applied state through [`GroupShared`]; what
//! they see has been committed by a quorum, so nothing shown can be taken back by a crash or a
//! failover. Snapshots are the whole group state, written atomically to one file per group.

use crate::types::{LogId, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig};
use futures_util::StreamExt;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, RaftSnapshotBuilder};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use starcite_core::{Applied, Command, GroupState};
use starcite_storage::{read_framed_file, write_framed_file};
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;

const SNAPSHOT_MAGIC: &[u8; 8] = b"STGSNAP1";

/// What readers of a group see: the applied state and the bookkeeping derived from it.
pub struct GroupData {
    pub state: GroupState,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    /// Per session: its applied `last_seq`, for tails to wait on.
    visible: HashMap<String, watch::Sender<u64>>,
    /// Sessions with events (or a header) the archive may not have yet.
    pub unarchived: HashSet<String>,
    /// Sessions whose header the archive may not have yet. Not replicated (upserting a
    /// header twice is harmless); rebuilt from the state after a snapshot or restart.
    pub headers_unarchived: HashSet<String>,
}

impl GroupData {
    fn new(state: GroupState) -> Self {
        let mut data = GroupData {
            state,
            last_applied: None,
            last_membership: StoredMembership::default(),
            visible: HashMap::new(),
            unarchived: HashSet::new(),
            headers_unarchived: HashSet::new(),
        };
        data.rebuild_derived();
        data
    }

    /// Recomputes the derived sets from the state, keeping existing watch senders so that
    /// tails waiting on them see the new values.
    fn rebuild_derived(&mut self) {
        self.unarchived.clear();
        self.headers_unarchived.clear();
        for s in self.state.sessions() {
            match self.visible.get(&s.id) {
                Some(tx) => {
                    tx.send_replace(s.last_seq);
                }
                None => {
                    self.visible
                        .insert(s.id.clone(), watch::Sender::new(s.last_seq));
                }
            }
            if s.archived_seq < s.last_seq || s.archived_seq == 0 {
                self.unarchived.insert(s.id.clone());
            }
            if s.archived_seq == 0 {
                self.headers_unarchived.insert(s.id.clone());
            }
        }
    }

    /// A receiver of the session's applied `last_seq`.
    pub fn subscribe(&self, session_id: &str) -> Option<watch::Receiver<u64>> {
        self.visible.get(session_id).map(|tx| tx.subscribe())
    }

    pub fn visible_seq(&self, session_id: &str) -> u64 {
        self.visible
            .get(session_id)
            .map(|tx| *tx.borrow())
            .unwrap_or(0)
    }

    /// Whether everything of the session (header and events) is archived.
    pub fn fully_archived(&self, session_id: &str) -> bool {
        !self.headers_unarchived.contains(session_id)
            && self
                .state
                .session(session_id)
                .is_some_and(|s| s.archived_seq >= s.last_seq)
    }

    fn apply_command(&mut self, cmd: &Command) -> Applied {
        let answer = self.state.apply(cmd);
        match (cmd, &answer) {
            (Command::Create(c), Applied::Created) => {
                self.visible
                    .entry(c.id.clone())
                    .or_insert_with(|| watch::Sender::new(0));
                self.unarchived.insert(c.id.clone());
                self.headers_unarchived.insert(c.id.clone());
            }
            (Command::Append(a), Applied::Appended { seq }) => {
                if let Some(tx) = self.visible.get(&a.session_id) {
                    tx.send_replace(*seq);
                }
                if !self.unarchived.contains(&a.session_id) {
                    self.unarchived.insert(a.session_id.clone());
                }
            }
            (Command::ArchiveAck(ack), Applied::Archived { .. }) => {
                for mark in &ack.marks {
                    if self.fully_archived(&mark.session_id) {
                        self.unarchived.remove(&mark.session_id);
                    }
                }
            }
            _ => {}
        }
        answer
    }
}

/// A group's applied state, shared by the state machine (writer) and readers.
pub struct GroupShared {
    pub index: u32,
    data: Mutex<GroupData>,
    /// Index of the last applied log entry, for read barriers.
    applied: watch::Sender<u64>,
    snapshots: std::sync::atomic::AtomicU64,
}

impl GroupShared {
    pub fn new(index: u32, idempotency_window: u64) -> Arc<Self> {
        Arc::new(GroupShared {
            index,
            data: Mutex::new(GroupData::new(GroupState::new(idempotency_window))),
            applied: watch::Sender::new(0),
            snapshots: Default::default(),
        })
    }

    /// Snapshots this replica has built.
    pub fn snapshots_built(&self) -> u64 {
        self.snapshots.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `f` on the applied state. Never hold it across an await.
    pub fn read<T>(&self, f: impl FnOnce(&GroupData) -> T) -> T {
        f(&self.data.lock())
    }

    pub fn update<T>(&self, f: impl FnOnce(&mut GroupData) -> T) -> T {
        f(&mut self.data.lock())
    }

    /// Waits until the state machine has applied the log up to `index`.
    pub async fn applied_at_least(&self, index: u64) {
        let mut rx = self.applied.subscribe();
        // The sender lives as long as `self`, so `wait_for` cannot fail while we hold it.
        let _ = rx.wait_for(|&applied| applied >= index).await;
    }

    pub fn applied_index(&self) -> u64 {
        *self.applied.borrow()
    }
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
}

/// openraft's state machine for one group: applies to [`GroupShared`] and keeps the group's
/// latest snapshot in `snapshot_path`.
#[derive(Clone)]
pub struct GroupStateMachine {
    shared: Arc<GroupShared>,
    snapshot_path: PathBuf,
    idempotency_window: u64,
}

impl GroupStateMachine {
    pub fn new(shared: Arc<GroupShared>, snapshot_path: PathBuf, idempotency_window: u64) -> Self {
        GroupStateMachine {
            shared,
            snapshot_path,
            idempotency_window,
        }
    }

    fn decode_state(&self, data: &[u8]) -> Result<GroupState, io::Error> {
        postcard::from_bytes::<GroupState>(data)
            .map(|s| s.with_idempotency_window(self.idempotency_window))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("snapshot: {e}")))
    }

    async fn write_snapshot_file(&self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), io::Error> {
        let header = postcard::to_allocvec(&SnapshotFile { meta: meta.clone() })
            .map_err(io::Error::other)?;
        let path = self.snapshot_path.clone();
        let data = data.to_vec();
        tokio::task::spawn_blocking(move || {
            write_framed_file(&path, SNAPSHOT_MAGIC, &[&header, &data])
        })
        .await
        .map_err(io::Error::other)?
        .map_err(io::Error::other)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for GroupStateMachine {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let (state, last_log_id, last_membership) = self
            .shared
            .read(|d| (d.state.clone(), d.last_applied, d.last_membership.clone()));
        let data = tokio::task::spawn_blocking(move || postcard::to_allocvec(&state))
            .await
            .map_err(io::Error::other)?
            .map_err(io::Error::other)?;
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
        };
        self.write_snapshot_file(&meta, &data).await?;
        self.shared
            .snapshots
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Snapshot {
            meta,
            snapshot: data,
        })
    }
}

impl RaftStateMachine<TypeConfig> for GroupStateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = GroupStateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok(self
            .shared
            .read(|d| (d.last_applied, d.last_membership.clone())))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures_util::Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>>
            + Unpin
            + Send,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let index = entry.log_id.index;
            let answer = self.shared.update(|d| {
                d.last_applied = Some(entry.log_id);
                match &entry.payload {
                    EntryPayload::Blank => Applied::Ignored,
                    EntryPayload::Membership(m) => {
                        d.last_membership = StoredMembership::new(Some(entry.log_id), m.clone());
                        Applied::Ignored
                    }
                    EntryPayload::Normal(cmd) => d.apply_command(cmd),
                }
            });
            self.shared.applied.send_replace(index);
            if let Some(responder) = responder {
                responder.send(answer);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let state = self.decode_state(&snapshot)?;
        self.write_snapshot_file(meta, &snapshot).await?;
        let index = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        self.shared.update(|d| {
            d.state = state;
            d.last_applied = meta.last_log_id;
            d.last_membership = meta.last_membership.clone();
            d.rebuild_derived();
        });
        self.shared.applied.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let path = self.snapshot_path.clone();
        let frames = tokio::task::spawn_blocking(move || read_framed_file(&path, SNAPSHOT_MAGIC))
            .await
            .map_err(io::Error::other)?
            .map_err(io::Error::other)?;
        let Some(mut frames) = frames else {
            return Ok(None);
        };
        if frames.len() != 2 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot {} is damaged", self.snapshot_path.display()),
            ));
        }
        let data = frames.pop().unwrap_or_default();
        let file: SnapshotFile = postcard::from_bytes(&frames[0]).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot {}: {e}", self.snapshot_path.display()),
            )
        })?;
        Ok(Some(Snapshot {
            meta: file.meta,
            snapshot: data,
        }))
    }
}
