//! A group's state machine: the sessions it owns, applied in commit order on every replica.
//!
//! Readers (tails, pages, the archiver) share the applied state through [`GroupShared`]; what
//! they see has been committed by a quorum, so nothing shown can be taken back by a crash or a
//! failover. Snapshots are the whole group state, written atomically to one file per group.

use crate::NodeError;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use starcite_core::{Applied, Command, GroupState};
use starcite_storage::{read_framed_file, write_framed_file};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;

/// Format 2: sessions carry their spilled runs. Format 1 files (no spill store) are refused
/// with a clear message rather than misread: postcard data is not self-describing.
const SNAPSHOT_MAGIC: &[u8; 8] = b"STGSNAP2";
const OLD_SNAPSHOT_MAGICS: [&[u8; 8]; 1] = [b"STGSNAP1"];

/// What readers of a group see: the applied state and the bookkeeping derived from it.
pub struct GroupData {
    pub state: GroupState,
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
            visible: HashMap::new(),
            unarchived: HashSet::new(),
            headers_unarchived: HashSet::new(),
        };
        data.rebuild_derived();
        data
    }

    /// Recomputes the derived sets from the state, keeping existing watch senders so that
    /// tails waiting on them see the new values.
    pub fn rebuild_derived(&mut self) {
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

    pub fn apply_command(&mut self, cmd: &Command) -> Applied {
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
    pub fn new(index: u32, state: GroupState, applied: u64) -> Arc<Self> {
        Arc::new(GroupShared {
            index,
            data: Mutex::new(GroupData::new(state)),
            applied: watch::Sender::new(applied),
            snapshots: Default::default(),
        })
    }

    /// Records that the state now reflects the log up to `index`.
    pub fn set_applied(&self, index: u64) {
        self.applied.send_if_modified(|a| {
            if index > *a {
                *a = index;
                true
            } else {
                false
            }
        });
    }

    pub fn count_snapshot(&self) {
        self.snapshots
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

/// A group's snapshot on disk: the state machine as of `index` (whose entry had `term`).
pub struct SnapshotFile {
    pub index: u64,
    pub term: u64,
    /// The postcard-encoded [`GroupState`].
    pub data: bytes::Bytes,
}

#[derive(Serialize, Deserialize)]
struct SnapshotHeader {
    index: u64,
    term: u64,
}

impl SnapshotFile {
    /// Reads the snapshot at `path`, if there is one. Blocking.
    pub fn read(path: &Path) -> Result<Option<SnapshotFile>, NodeError> {
        let frames = match read_framed_file(path, SNAPSHOT_MAGIC) {
            Ok(frames) => frames,
            Err(e) => {
                let mut magic = [0u8; 8];
                let old = std::fs::File::open(path)
                    .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
                    .is_ok_and(|_| OLD_SNAPSHOT_MAGICS.contains(&&magic));
                if old {
                    return Err(NodeError::Startup(format!(
                        "snapshot {} was written by an older Starcite (format {}); this build \
                         reads format 2 only: start it on a new data directory",
                        path.display(),
                        String::from_utf8_lossy(&magic[7..])
                    )));
                }
                return Err(e.into());
            }
        };
        let Some(mut frames) = frames else {
            return Ok(None);
        };
        let damaged = || NodeError::Startup(format!("snapshot {} is damaged", path.display()));
        if frames.len() != 2 {
            return Err(damaged());
        }
        let data = frames.pop().unwrap_or_default();
        let header: SnapshotHeader = postcard::from_bytes(&frames[0]).map_err(|_| damaged())?;
        Ok(Some(SnapshotFile {
            index: header.index,
            term: header.term,
            data: bytes::Bytes::from(data),
        }))
    }

    /// Writes it atomically and durably. Blocking.
    pub fn write(&self, path: &Path) -> Result<(), NodeError> {
        let header = postcard::to_allocvec(&SnapshotHeader {
            index: self.index,
            term: self.term,
        })
        .map_err(|e| NodeError::Startup(e.to_string()))?;
        write_framed_file(path, SNAPSHOT_MAGIC, &[&header, &self.data])?;
        Ok(())
    }

    pub fn decode(&self, idempotency_window: u64) -> Result<GroupState, NodeError> {
        decode_state(&self.data, idempotency_window)
    }
}

pub fn encode_state(state: &GroupState) -> bytes::Bytes {
    // Serialising plain data into a Vec cannot fail.
    bytes::Bytes::from(postcard::to_allocvec(state).unwrap_or_default())
}

pub fn decode_state(data: &[u8], idempotency_window: u64) -> Result<GroupState, NodeError> {
    postcard::from_bytes::<GroupState>(data)
        .map(|s| s.restored(idempotency_window))
        .map_err(|e| NodeError::Startup(format!("snapshot cannot be decoded: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_round_trip_and_an_older_format_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("group.snap");
        let data = encode_state(&GroupState::new(10));
        let file = SnapshotFile {
            index: 7,
            term: 2,
            data: data.clone(),
        };
        file.write(&path).expect("write");
        let back = SnapshotFile::read(&path).expect("read").expect("present");
        assert_eq!((back.index, back.term, back.data), (7, 2, data));

        write_framed_file(&path, OLD_SNAPSHOT_MAGICS[0], &[b"x", b"y"]).expect("write old");
        let err = SnapshotFile::read(&path)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("older Starcite (format 1)"), "{err}");
    }
}
