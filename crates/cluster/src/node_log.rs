//! The node's durable Raft log: every group's hard state and entries in one write-ahead log,
//! so appends from many groups share one `fdatasync` (group commit).
//!
//! Records are group-tagged. One [`Record::Raft`] carries everything a group asked to persist
//! at once (hard state and entries), so recovery sees all of it or none. An entries record
//! whose first index is at or below what the group already has replaces the rest (a log
//! conflict resolved by the leader): replay gives back exactly the log the group had.
//!
//! Old segments are deleted once no group needs them: every segment starts with a checkpoint
//! of every group's small durable facts (hard state, commit mark, snapshot point), so records
//! in older segments are superseded, and each group remembers which segments still hold its
//! entries above its snapshot point.

use crate::rpc::RaftEntry;
use crate::NodeError;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use starcite_raft::HardState;
use starcite_storage::{StorageError, Wal, WalOptions, WriteSpacing};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Deserialize)]
enum Record {
    Raft {
        group: u32,
        hard_state: Option<HardState>,
        entries: Vec<RaftEntry>,
    },
    /// Commit indexes known at the time (they may lag; never lead).
    Committed {
        marks: Vec<(u32, u64)>,
    },
    /// Entries up to `index` are in the group's snapshot file, which is durable.
    Snapshot {
        group: u32,
        index: u64,
        term: u64,
    },
    Checkpoint {
        groups: Vec<GroupMarks>,
    },
}

/// Same layout as [`Record`], borrowing what it writes.
#[derive(Serialize)]
enum RecordRef<'a> {
    Raft {
        group: u32,
        hard_state: &'a Option<HardState>,
        entries: &'a [RaftEntry],
    },
    Committed {
        marks: &'a [(u32, u64)],
    },
    Snapshot {
        group: u32,
        index: u64,
        term: u64,
    },
    Checkpoint {
        groups: &'a [GroupMarks],
    },
}

impl RecordRef<'_> {
    fn encode(&self) -> Vec<u8> {
        // Serialising plain data into a Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }
}

/// A group's small durable facts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupMarks {
    /// `None` until the group first persisted a hard state.
    pub hard_state: Option<HardState>,
    pub commit: u64,
    /// (index, term) of the snapshot covering the start of the log.
    pub snapshot: (u64, u64),
}

/// What recovery found for one group.
#[derive(Debug, Default)]
pub struct RecoveredGroup {
    pub marks: GroupMarks,
    pub entries: Vec<RaftEntry>,
}

#[derive(Default)]
struct GroupLog {
    marks: GroupMarks,
    /// (segment, highest entry index written there), oldest first: the segments that hold
    /// entries of this group above its snapshot point.
    segments: VecDeque<(u64, u64)>,
}

impl GroupLog {
    fn note_written(&mut self, segment: u64, last_index: u64) {
        match self.segments.back_mut() {
            Some((s, last)) if *s == segment => *last = (*last).max(last_index),
            _ => self.segments.push_back((segment, last_index)),
        }
    }

    fn snapshot_at(&mut self, index: u64, term: u64) {
        if index > self.marks.snapshot.0 {
            self.marks.snapshot = (index, term);
        }
        while self
            .segments
            .front()
            .is_some_and(|&(_, last)| last <= index)
        {
            self.segments.pop_front();
        }
    }
}

/// Replays entries into a contiguous list, as the group's log evolved. The first entries
/// replayed may start above the snapshot point known so far: older segments may be gone,
/// and the snapshot record that allowed it comes later in the log.
fn push_entries(list: &mut Vec<RaftEntry>, snapshot_index: u64, entries: Vec<RaftEntry>) {
    for e in entries {
        if e.index <= snapshot_index {
            continue;
        }
        while list.last().is_some_and(|l| l.index >= e.index) {
            list.pop();
        }
        match list.last() {
            Some(l) if l.index + 1 != e.index => {}
            _ => list.push(e),
        }
    }
}

pub struct NodeLog {
    dir: PathBuf,
    wal: Wal,
    groups: Arc<Vec<Mutex<GroupLog>>>,
    failed: AtomicBool,
    /// Some group's log holds a client command (not only leaders' no-ops).
    has_commands: AtomicBool,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RecoveryStats {
    pub records: u64,
    pub entries: u64,
}

impl NodeLog {
    /// Opens (replaying) the log in `dir`. Blocking. `write_spacing`: see
    /// [`WalOptions::write_spacing`].
    pub fn open(
        dir: &Path,
        groups: u32,
        segment_bytes: u64,
        write_spacing: WriteSpacing,
    ) -> Result<(Arc<NodeLog>, Vec<RecoveredGroup>, RecoveryStats), NodeError> {
        let table: Arc<Vec<Mutex<GroupLog>>> =
            Arc::new((0..groups).map(|_| Mutex::default()).collect());
        let header_table = table.clone();
        let segment_header = Arc::new(move || {
            let marks: Vec<GroupMarks> = header_table
                .iter()
                .map(|g| g.lock().marks.clone())
                .collect();
            RecordRef::Checkpoint { groups: &marks }.encode()
        });
        let mut recovered: Vec<RecoveredGroup> =
            (0..groups).map(|_| RecoveredGroup::default()).collect();
        let mut bad: Option<String> = None;
        let mut stats = RecoveryStats::default();
        let mut has_commands = false;
        let wal = Wal::open(
            WalOptions {
                dir: dir.to_path_buf(),
                segment_bytes,
                segment_header: Some(segment_header),
                hold_wait: starcite_storage::HOLD_WAIT,
                write_spacing,
            },
            |segment, body| {
                if bad.is_some() {
                    return;
                }
                let record: Record = match postcard::from_bytes(body) {
                    Ok(r) => r,
                    Err(e) => {
                        bad = Some(format!("undecodable log record in segment {segment}: {e}"));
                        return;
                    }
                };
                stats.records += 1;
                let check = |group: u32, bad: &mut Option<String>| {
                    if group as usize >= table.len() {
                        *bad = Some(format!(
                            "log record for group {group} but the node has {} groups",
                            table.len()
                        ));
                        false
                    } else {
                        true
                    }
                };
                match record {
                    Record::Raft {
                        group,
                        hard_state,
                        entries,
                    } => {
                        if !check(group, &mut bad) {
                            return;
                        }
                        let g = &mut recovered[group as usize];
                        let mut log = table[group as usize].lock();
                        if let Some(hs) = hard_state {
                            g.marks.hard_state = Some(hs);
                            log.marks.hard_state = Some(hs);
                        }
                        if let Some(last) = entries.last().map(|e| e.index) {
                            has_commands |= entries.iter().any(|e| e.payload.is_some());
                            stats.entries += entries.len() as u64;
                            log.note_written(segment, last);
                            push_entries(&mut g.entries, g.marks.snapshot.0, entries);
                        }
                    }
                    Record::Committed { marks } => {
                        for (group, commit) in marks {
                            if !check(group, &mut bad) {
                                return;
                            }
                            let g = &mut recovered[group as usize];
                            g.marks.commit = g.marks.commit.max(commit);
                            let mut log = table[group as usize].lock();
                            log.marks.commit = log.marks.commit.max(commit);
                        }
                    }
                    Record::Snapshot { group, index, term } => {
                        if !check(group, &mut bad) {
                            return;
                        }
                        let g = &mut recovered[group as usize];
                        if index > g.marks.snapshot.0 {
                            g.marks.snapshot = (index, term);
                            g.entries.retain(|e| e.index > index);
                        }
                        table[group as usize].lock().snapshot_at(index, term);
                    }
                    Record::Checkpoint { groups: marks } => {
                        if marks.len() != table.len() {
                            bad = Some(format!(
                                "log checkpoint holds {} groups but the node has {}",
                                marks.len(),
                                table.len()
                            ));
                            return;
                        }
                        for (i, m) in marks.into_iter().enumerate() {
                            let g = &mut recovered[i];
                            if m.hard_state.is_some() {
                                g.marks.hard_state = m.hard_state;
                            }
                            g.marks.commit = g.marks.commit.max(m.commit);
                            if m.snapshot.0 > g.marks.snapshot.0 {
                                g.marks.snapshot = m.snapshot;
                                let cut = m.snapshot.0;
                                g.entries.retain(|e| e.index > cut);
                            }
                            let mut log = table[i].lock();
                            log.marks.hard_state = g.marks.hard_state;
                            log.marks.commit = g.marks.commit;
                            log.snapshot_at(g.marks.snapshot.0, g.marks.snapshot.1);
                        }
                    }
                }
            },
        )?;
        if let Some(reason) = bad {
            return Err(NodeError::Startup(reason));
        }
        for (i, g) in recovered.iter().enumerate() {
            if let Some(first) = g.entries.first() {
                if first.index != g.marks.snapshot.0 + 1 {
                    return Err(NodeError::Startup(format!(
                        "the log of group {i} starts at entry {} but its snapshot ends at {}: \
                         log segments are missing",
                        first.index, g.marks.snapshot.0
                    )));
                }
            }
        }
        Ok((
            Arc::new(NodeLog {
                dir: dir.to_path_buf(),
                wal,
                groups: table,
                failed: AtomicBool::new(false),
                has_commands: AtomicBool::new(has_commands),
            }),
            recovered,
            stats,
        ))
    }

    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    /// False once a write or fsync failed: the log accepts nothing more until a restart.
    pub fn is_healthy(&self) -> bool {
        !self.failed.load(Ordering::Acquire)
    }

    fn mark_failed(&self, e: &StorageError) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            tracing::error!(error = %e, "log write failed; this node stops taking writes until restarted");
        }
    }

    /// Persists what a group asked for (hard state and entries, in one record); `done` runs
    /// on the log's writer thread once it is durable (or never will be).
    pub fn write_raft(
        self: &Arc<Self>,
        group: u32,
        hard_state: &Option<HardState>,
        entries: &[RaftEntry],
        done: impl FnOnce(Result<(), StorageError>) + Send + 'static,
    ) {
        if !self.is_healthy() {
            done(Err(StorageError::Poisoned));
            return;
        }
        let body = RecordRef::Raft {
            group,
            hard_state,
            entries,
        }
        .encode();
        if !self.has_commands.load(Ordering::Relaxed) && entries.iter().any(|e| e.payload.is_some())
        {
            self.has_commands.store(true, Ordering::Relaxed);
        }
        {
            let mut g = self.groups[group as usize].lock();
            if let Some(hs) = hard_state {
                g.marks.hard_state = Some(*hs);
            }
        }
        let last = entries.last().map(|e| e.index);
        let log = self.clone();
        self.wal.append(
            &body,
            Box::new(move |result| match result {
                Ok(segment) => {
                    if let Some(last) = last {
                        log.groups[group as usize]
                            .lock()
                            .note_written(segment, last);
                    }
                    done(Ok(()))
                }
                Err(e) => {
                    log.mark_failed(&e);
                    done(Err(e))
                }
            }),
        );
    }

    /// Records commit marks (not waited for: a lost mark is only re-learnt from the leader).
    pub fn write_commits(self: &Arc<Self>, marks: &[(u32, u64)]) {
        if marks.is_empty() || !self.is_healthy() {
            return;
        }
        for &(group, commit) in marks {
            let mut g = self.groups[group as usize].lock();
            g.marks.commit = g.marks.commit.max(commit);
        }
        let log = self.clone();
        self.wal.append(
            &RecordRef::Committed { marks }.encode(),
            Box::new(move |r| {
                if let Err(e) = r {
                    log.mark_failed(&e);
                }
            }),
        );
    }

    /// Records that the group's snapshot file (already durable) covers entries up to `index`.
    /// `done` runs once the record is durable.
    pub fn write_snapshot_point(
        self: &Arc<Self>,
        group: u32,
        index: u64,
        term: u64,
        done: impl FnOnce(Result<(), StorageError>) + Send + 'static,
    ) {
        if !self.is_healthy() {
            done(Err(StorageError::Poisoned));
            return;
        }
        self.groups[group as usize].lock().snapshot_at(index, term);
        let log = self.clone();
        self.wal.append(
            &RecordRef::Snapshot { group, index, term }.encode(),
            Box::new(move |r| {
                if let Err(e) = &r {
                    log.mark_failed(e);
                }
                done(r.map(|_| ()))
            }),
        );
    }

    /// The oldest segment still needed, and the groups whose entries keep it.
    pub fn pinning_groups(&self) -> (u64, Vec<u32>) {
        let current = self.current_segment();
        let mut oldest = current;
        let mut groups = Vec::new();
        for (i, g) in self.groups.iter().enumerate() {
            if let Some(&(segment, _)) = g.lock().segments.front() {
                if segment < oldest {
                    oldest = segment;
                    groups.clear();
                }
                if segment == oldest && segment < current {
                    groups.push(i as u32);
                }
            }
        }
        (oldest, groups)
    }

    pub fn current_segment(&self) -> u64 {
        self.wal.stats().current_segment.load(Ordering::Relaxed)
    }

    /// Deletes the segments no group needs any more. Returns how many. Blocking: it first
    /// waits until everything written so far is durable (snapshot points included), so a
    /// crash can never find entries gone whose snapshot point was not recorded.
    pub fn collect_garbage(&self) -> Result<usize, StorageError> {
        let (oldest_needed, _) = self.pinning_groups();
        let (tx, rx) = std::sync::mpsc::channel();
        self.wal.barrier(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.recv().map_err(|_| StorageError::Closed)??;
        Wal::remove_segments_before(&self.dir, oldest_needed)
    }

    /// Log bytes on disk.
    pub fn disk_bytes(&self) -> u64 {
        Wal::segments_disk_bytes(&self.dir).unwrap_or(0)
    }

    /// Whether this node holds client data: a command in some group's log, or a snapshot.
    /// (Leaders' no-ops do not count: a cluster that elected leaders but took no writes has
    /// nothing a new node could fail to protect.)
    pub fn has_data(&self) -> bool {
        self.has_commands.load(Ordering::Relaxed)
            || self.groups.iter().any(|g| g.lock().marks.snapshot.0 > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use starcite_core::Command;
    use starcite_raft::Entry;

    fn entry(term: u64, index: u64) -> RaftEntry {
        Entry {
            term,
            index,
            payload: None::<Command>,
        }
    }

    fn write_sync(log: &Arc<NodeLog>, group: u32, hs: Option<HardState>, entries: &[RaftEntry]) {
        let (tx, rx) = std::sync::mpsc::channel();
        log.write_raft(group, &hs, entries, move |r| drop(tx.send(r)));
        rx.recv().unwrap().unwrap();
    }

    #[test]
    fn replay_gives_back_each_groups_log_with_conflicts_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let hs = HardState {
            term: 3,
            vote: Some(7),
            rejoining: false,
        };
        {
            let (log, _, _) = NodeLog::open(dir.path(), 2, 1 << 20, WriteSpacing::NONE).unwrap();
            write_sync(&log, 0, Some(hs), &[entry(1, 1), entry(1, 2), entry(1, 3)]);
            write_sync(&log, 1, None, &[entry(2, 1)]);
            // Group 0's entries 2.. are replaced by a new leader's.
            write_sync(&log, 0, None, &[entry(3, 2)]);
            log.write_commits(&[(0, 2)]);
            let (tx, rx) = std::sync::mpsc::channel();
            log.write_snapshot_point(1, 1, 2, move |r| drop(tx.send(r)));
            rx.recv().unwrap().unwrap();
        }
        let (_, groups, stats) = NodeLog::open(dir.path(), 2, 1 << 20, WriteSpacing::NONE).unwrap();
        assert_eq!(stats.entries, 5);
        let g0 = &groups[0];
        assert_eq!(g0.marks.hard_state, Some(hs));
        assert_eq!(g0.marks.commit, 2);
        assert_eq!(
            g0.entries
                .iter()
                .map(|e| (e.index, e.term))
                .collect::<Vec<_>>(),
            vec![(1, 1), (2, 3)]
        );
        assert_eq!(groups[1].marks.snapshot, (1, 2));
        assert!(groups[1].entries.is_empty());
    }

    #[test]
    fn old_segments_go_once_snapshots_cover_them_and_checkpoints_keep_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let hs = HardState {
            term: 5,
            vote: None,
            rejoining: true,
        };
        {
            let (log, _, _) = NodeLog::open(dir.path(), 2, 256, WriteSpacing::NONE).unwrap();
            write_sync(&log, 1, Some(hs), &[]);
            for i in 1..=40 {
                write_sync(&log, 0, None, &[entry(5, i)]);
            }
            assert!(log.current_segment() > 3);
            // Nothing is covered yet: every segment with group 0's entries stays.
            assert_eq!(log.collect_garbage().unwrap(), 0);
            let (tx, rx) = std::sync::mpsc::channel();
            log.write_snapshot_point(0, 38, 5, move |r| drop(tx.send(r)));
            rx.recv().unwrap().unwrap();
            assert!(log.collect_garbage().unwrap() > 0);
        }
        let (_, groups, _) = NodeLog::open(dir.path(), 2, 256, WriteSpacing::NONE).unwrap();
        assert_eq!(groups[0].marks.snapshot, (38, 5));
        assert_eq!(
            groups[0]
                .entries
                .iter()
                .map(|e| e.index)
                .collect::<Vec<_>>(),
            vec![39, 40]
        );
        // Group 1's hard state lived in a deleted segment; a checkpoint carried it over.
        assert_eq!(groups[1].marks.hard_state, Some(hs));
    }
}
