//! openraft's log storage for every group of the node, over one shared write-ahead log.
//!
//! Every group's entries, votes, commit marks, truncations and purges go into the node-wide
//! [`Wal`] as group-tagged records, so appends from many groups share one `fdatasync` (group
//! commit). Each group keeps its unpurged entries in memory for replication and apply; the log
//! on disk is what recovery reads.
//!
//! Old segments are deleted once no group needs them: every segment starts with a checkpoint
//! of every group's vote, commit mark and purge mark (so records in older segments are
//! superseded), and each group remembers which segments hold its unpurged entries.
//!
//! `append` returns as soon as its entries are queued; the log's writer thread reports the
//! flush to openraft once the fsync covering them is done. openraft issue #2118 (a node that
//! becomes leader marks its in-flight appends flushed without waiting) cannot bite here: a
//! node only becomes leader after saving its vote, `save_vote` waits for its record to be
//! durable, and the log is one ordered file, so that fsync covers every append queued before
//! it. `tests/durability.rs` keeps a kill -9 test over leader changes that would catch a
//! regression.

use crate::types::{Entry, LogId, TypeConfig, Vote};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::RaftLogReader;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use starcite_storage::{StorageError, Wal, WalOptions};
use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Most payload bytes handed to one replication message (at least one entry).
const REPLICATION_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// What the log stores. [`RecordRef`] writes the same layout without copying entries.
#[derive(Deserialize)]
enum Record {
    Entries { group: u32, entries: Vec<Entry> },
    Vote { group: u32, vote: Vote },
    Committed { group: u32, log_id: Option<LogId> },
    Truncate { group: u32, after: Option<LogId> },
    Purge { group: u32, upto: LogId },
    Checkpoint { groups: Vec<GroupMarks> },
}

#[derive(Serialize)]
enum RecordRef<'a> {
    Entries {
        group: u32,
        entries: &'a [Entry],
    },
    Vote {
        group: u32,
        vote: &'a Vote,
    },
    Committed {
        group: u32,
        log_id: &'a Option<LogId>,
    },
    Truncate {
        group: u32,
        after: &'a Option<LogId>,
    },
    Purge {
        group: u32,
        upto: &'a LogId,
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

/// A group's small durable facts; every segment starts with these for all groups.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct GroupMarks {
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
}

#[derive(Default)]
struct GroupLog {
    marks: GroupMarks,
    /// Unpurged entries, contiguous by index.
    entries: VecDeque<Entry>,
    /// (segment, highest entry index written there), oldest first: which segments hold
    /// entries this group has not purged yet.
    segments: VecDeque<(u64, u64)>,
}

impl GroupLog {
    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|e| e.index())
    }

    fn truncate_after(&mut self, after: Option<u64>) {
        while let Some(last) = self.last_index() {
            if after.is_some_and(|a| last <= a) {
                break;
            }
            self.entries.pop_back();
        }
    }

    /// Adds entries, first dropping any of ours they replace (a replay of a log in which a
    /// truncation was implied rather than recorded gives the same result).
    fn push_entries(&mut self, entries: impl IntoIterator<Item = Entry>) {
        let purged = self.marks.purged.as_ref().map(|l| l.index);
        for entry in entries {
            let index = entry.index();
            if purged.is_some_and(|p| index <= p) {
                continue;
            }
            if self.last_index().is_some_and(|last| last >= index) {
                self.truncate_after(index.checked_sub(1));
            }
            self.entries.push_back(entry);
        }
    }

    fn purge(&mut self, upto: &LogId) {
        while self
            .entries
            .front()
            .is_some_and(|e| e.index() <= upto.index)
        {
            self.entries.pop_front();
        }
        while self
            .segments
            .front()
            .is_some_and(|&(_, last)| last <= upto.index)
        {
            self.segments.pop_front();
        }
        if self.marks.purged.as_ref().is_none_or(|p| p < upto) {
            self.marks.purged = Some(*upto);
        }
    }

    fn note_durable(&mut self, segment: u64, last_index: u64) {
        match self.segments.back_mut() {
            Some((s, last)) if *s == segment => *last = (*last).max(last_index),
            _ => self.segments.push_back((segment, last_index)),
        }
    }

    fn apply_record(&mut self, segment: u64, record: Record) {
        match record {
            Record::Entries { entries, .. } => {
                if let Some(last) = entries.last().map(|e| e.index()) {
                    self.push_entries(entries);
                    self.note_durable(segment, last);
                }
            }
            Record::Vote { vote, .. } => self.marks.vote = Some(vote),
            Record::Committed { log_id, .. } => self.marks.committed = log_id,
            Record::Truncate { after, .. } => self.truncate_after(after.map(|l| l.index)),
            Record::Purge { upto, .. } => self.purge(&upto),
            Record::Checkpoint { .. } => {}
        }
    }
}

/// The node's log: one WAL, one [`GroupLog`] per group.
pub struct NodeLog {
    dir: PathBuf,
    wal: Wal,
    groups: Arc<Vec<Mutex<GroupLog>>>,
    failed: AtomicBool,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RecoveredLog {
    pub records: u64,
    pub entries: u64,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl NodeLog {
    /// Opens (replaying) the log in `dir`. Blocking.
    pub fn open(
        dir: &Path,
        groups: u32,
        segment_bytes: u64,
    ) -> Result<(Arc<NodeLog>, RecoveredLog), crate::NodeError> {
        let table: Arc<Vec<Mutex<GroupLog>>> =
            Arc::new((0..groups).map(|_| Mutex::default()).collect());
        let header_table = table.clone();
        let segment_header = Arc::new(move || {
            let groups: Vec<GroupMarks> = header_table
                .iter()
                .map(|g| g.lock().marks.clone())
                .collect();
            RecordRef::Checkpoint { groups: &groups }.encode()
        });
        let mut bad: Option<String> = None;
        let mut recovered = RecoveredLog::default();
        let wal = Wal::open(
            WalOptions {
                dir: dir.to_path_buf(),
                segment_bytes,
                segment_header: Some(segment_header),
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
                recovered.records += 1;
                let group = match &record {
                    Record::Checkpoint { groups: marks } => {
                        if marks.len() != table.len() {
                            bad = Some(format!(
                                "log checkpoint holds {} groups but the node has {}",
                                marks.len(),
                                table.len()
                            ));
                            return;
                        }
                        for (g, m) in table.iter().zip(marks) {
                            let mut g = g.lock();
                            g.marks = m.clone();
                            if let Some(purged) = m.purged {
                                g.purge(&purged);
                            }
                        }
                        return;
                    }
                    Record::Entries { group, entries } => {
                        recovered.entries += entries.len() as u64;
                        *group
                    }
                    Record::Vote { group, .. }
                    | Record::Committed { group, .. }
                    | Record::Truncate { group, .. }
                    | Record::Purge { group, .. } => *group,
                };
                match table.get(group as usize) {
                    Some(g) => g.lock().apply_record(segment, record),
                    None => {
                        bad = Some(format!(
                            "log record for group {group} but the node has {} groups",
                            table.len()
                        ))
                    }
                }
            },
        )?;
        if let Some(reason) = bad {
            return Err(crate::NodeError::Startup(reason));
        }
        Ok((
            Arc::new(NodeLog {
                dir: dir.to_path_buf(),
                wal,
                groups: table,
                failed: AtomicBool::new(false),
            }),
            recovered,
        ))
    }

    pub fn store(self: &Arc<Self>, group: u32) -> GroupLogStore {
        GroupLogStore {
            log: self.clone(),
            group,
        }
    }

    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    /// False once a write or fsync failed: the log accepts nothing more until a restart.
    pub fn is_healthy(&self) -> bool {
        !self.failed.load(Ordering::Acquire)
    }

    /// Groups whose unpurged entries keep the oldest segment alive, and that segment; empty
    /// when nothing older than the segment being written is needed.
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
    /// waits until the purge records that freed them are durable (purges are written without
    /// waiting), so a crash can never find entries gone whose purge was not recorded.
    pub fn collect_garbage(&self) -> Result<usize, StorageError> {
        let (oldest_needed, _) = self.pinning_groups();
        let (tx, rx) = std::sync::mpsc::channel();
        self.wal.barrier(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.recv().map_err(|_| StorageError::Closed)??;
        Wal::remove_segments_before(&self.dir, oldest_needed)
    }

    /// Live log bytes on disk (every segment still present).
    pub fn disk_bytes(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with("wal-"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    fn group(&self, group: u32) -> &Mutex<GroupLog> {
        &self.groups[group as usize]
    }

    /// Hands `body` to the WAL; `done` runs once it is durable (with its segment). Callers
    /// hold the group's lock, so a group's records reach the log in the order its memory
    /// changed.
    fn write(
        &self,
        body: &[u8],
        done: impl FnOnce(Result<u64, StorageError>) + Send + 'static,
    ) -> Result<(), io::Error> {
        if !self.is_healthy() {
            return Err(io_err(StorageError::Poisoned));
        }
        self.wal.append(body, Box::new(done));
        Ok(())
    }

    fn mark_failed(&self, e: &StorageError) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            tracing::error!(error = %e, "log write failed; this node stops taking writes until restarted");
        }
    }
}

/// One group's view of the node log: what openraft calls the log store.
#[derive(Clone)]
pub struct GroupLogStore {
    log: Arc<NodeLog>,
    group: u32,
}

impl GroupLogStore {
    /// Writes a record while holding the group's lock and waits until it is durable.
    async fn write_durable(
        &self,
        mutate: impl FnOnce(&mut GroupLog) -> Vec<u8>,
    ) -> Result<(), io::Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut g = self.log.group(self.group).lock();
            let body = mutate(&mut g);
            self.log.write(&body, move |r| {
                let _ = tx.send(r);
            })?;
        }
        self.await_durable(rx).await.map(|_| ())
    }

    async fn await_durable(
        &self,
        rx: tokio::sync::oneshot::Receiver<Result<u64, StorageError>>,
    ) -> Result<u64, io::Error> {
        match rx.await {
            Ok(Ok(segment)) => Ok(segment),
            Ok(Err(e)) => {
                self.log.mark_failed(&e);
                Err(io_err(e))
            }
            Err(_) => Err(io_err(StorageError::Closed)),
        }
    }

    /// Writes a record without waiting for it to become durable (it is ordered before
    /// everything written after it, which is what its readers need).
    fn write_lazy(&self, mutate: impl FnOnce(&mut GroupLog) -> Vec<u8>) -> Result<(), io::Error> {
        let mut g = self.log.group(self.group).lock();
        let body = mutate(&mut g);
        let log = self.log.clone();
        self.log.write(&body, move |r| {
            if let Err(e) = r {
                log.mark_failed(&e);
            }
        })
    }
}

fn range_start(range: &impl RangeBounds<u64>) -> u64 {
    match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    }
}

fn range_end_exclusive(range: &impl RangeBounds<u64>) -> u64 {
    match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    }
}

impl GroupLogStore {
    fn entries_in(&self, start: u64, end: u64, max_bytes: usize) -> Vec<Entry> {
        let g = self.log.group(self.group).lock();
        let Some(first) = g.entries.front().map(|e| e.index()) else {
            return Vec::new();
        };
        let from = start.max(first);
        if from >= end {
            return Vec::new();
        }
        let skip = (from - first) as usize;
        let take = ((end - from).min(usize::MAX as u64)) as usize;
        let mut bytes = 0usize;
        g.entries
            .iter()
            .skip(skip)
            .take(take)
            .enumerate()
            .take_while(|(i, e)| {
                bytes += entry_size(e);
                *i == 0 || bytes <= max_bytes
            })
            .map(|(_, e)| e.clone())
            .collect()
    }
}

/// Roughly what an entry costs to send: its event body dominates.
fn entry_size(entry: &Entry) -> usize {
    match &entry.payload {
        openraft::EntryPayload::Normal(starcite_core::Command::Append(a)) => a.body.len() + 64,
        _ => 64,
    }
}

impl RaftLogReader<TypeConfig> for GroupLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        Ok(self.entries_in(range_start(&range), range_end_exclusive(&range), usize::MAX))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.log.group(self.group).lock().marks.vote)
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, io::Error> {
        Ok(self.entries_in(start, end, REPLICATION_BATCH_BYTES))
    }
}

impl RaftLogStorage<TypeConfig> for GroupLogStore {
    type LogReader = GroupLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let g = self.log.group(self.group).lock();
        let last_purged_log_id = g.marks.purged;
        let last_log_id = g.entries.back().map(|e| e.log_id()).or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let group = self.group;
        self.write_durable(|g| {
            g.marks.vote = Some(*vote);
            RecordRef::Vote { group, vote }.encode()
        })
        .await
    }

    /// The commit mark needs no fsync of its own: it is ordered after the entries it covers,
    /// and a mark that is lost in a crash only means re-learning it from the leader.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        let group = self.group;
        self.write_lazy(|g| {
            g.marks.committed = committed;
            RecordRef::Committed {
                group,
                log_id: &committed,
            }
            .encode()
        })
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.log.group(self.group).lock().marks.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.index()) else {
            callback.io_completed(Ok(()));
            return Ok(());
        };
        let group = self.group;
        let mut g = self.log.group(group).lock();
        let body = RecordRef::Entries {
            group,
            entries: &entries,
        }
        .encode();
        g.push_entries(entries);
        let log = self.log.clone();
        self.log.write(&body, move |r| {
            let reported = match r {
                Ok(segment) => {
                    log.group(group).lock().note_durable(segment, last);
                    Ok(())
                }
                Err(e) => {
                    log.mark_failed(&e);
                    Err(io_err(e))
                }
            };
            callback.io_completed(reported);
        })
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let group = self.group;
        self.write_durable(|g| {
            g.truncate_after(last_log_id.map(|l| l.index));
            RecordRef::Truncate {
                group,
                after: &last_log_id,
            }
            .encode()
        })
        .await
    }

    /// Purged entries are in a durable snapshot already; the record only lets recovery skip
    /// them, so it need not be waited for.
    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let group = self.group;
        self.write_lazy(|g| {
            g.purge(&log_id);
            RecordRef::Purge {
                group,
                upto: &log_id,
            }
            .encode()
        })
    }
}
