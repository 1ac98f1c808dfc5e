//! Driving one group's Raft engine: persisting what it asks for in the node log, sending its
//! messages, holding back the ones that must wait for durability, applying committed entries
//! to the state machine and answering the proposals waiting on them.
//!
//! Everything here is synchronous and non-blocking (the log and the transport queue their
//! work), so it runs wherever the event happens: a request task proposing, the log's writer
//! thread reporting durability, a peer connection delivering a message, the ticker.

use crate::node::Node;
use crate::rpc::RaftMessage;
use crate::state_machine::{decode_state, GroupShared, SnapshotFile};
use crate::NodeError;
use parking_lot::Mutex;
use starcite_core::{Applied, Command, GroupState};
use starcite_raft::{Message, NodeId, Raft};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::sync::{oneshot, watch};

/// Applied entries a replica keeps in memory beyond what its followers need, so that a
/// follower briefly behind (or a new leader's followers) can catch up from the log rather
/// than a snapshot.
const RELEASE_KEEP: u64 = 1024;

/// The answer to a proposal: what apply said, or `Err` if another entry took its place.
pub(crate) type Answer = Result<Applied, ()>;

pub(crate) struct Core {
    pub raft: Raft<Command>,
    /// Proposals waiting for their entry: index → (term, answer channel).
    waiters: BTreeMap<u64, (u64, oneshot::Sender<Answer>)>,
    /// Persistence batches handed to the log, and how many of them are durable.
    handed: u64,
    durable: u64,
    /// Messages to send once batch `.0` is durable.
    gated: Vec<(u64, NodeId, RaftMessage)>,
    /// A snapshot received from the leader, decoded, for the engine to install.
    pending_install: Option<GroupState>,
    /// Commit index last recorded in the log.
    pub commit_marked: u64,
}

pub(crate) struct Group {
    pub index: u32,
    /// This node's replica, if it is one of the group's members.
    pub core: Option<Mutex<Core>>,
    pub shared: Arc<GroupShared>,
    /// The leader as this replica knows it.
    pub leader: watch::Sender<Option<NodeId>>,
    /// For groups this node does not replicate: the node that answered last, or 0.
    pub leader_hint: AtomicU64,
    /// Index of the snapshot file on disk; held while the file is replaced.
    pub snapshot_file: std::sync::Mutex<u64>,
    pub snapshot_path: PathBuf,
    /// Spill segments the snapshot file refers to (they must outlive it).
    pub snapshot_spill: Mutex<BTreeSet<u64>>,
}

impl Group {
    pub fn new(
        index: u32,
        raft: Option<Raft<Command>>,
        shared: Arc<GroupShared>,
        snapshot_index: u64,
        snapshot_path: PathBuf,
        snapshot_spill: BTreeSet<u64>,
    ) -> Group {
        let commit = raft.as_ref().map_or(0, |r| r.commit());
        Group {
            index,
            core: raft.map(|raft| {
                Mutex::new(Core {
                    raft,
                    waiters: BTreeMap::new(),
                    handed: 0,
                    durable: 0,
                    gated: Vec::new(),
                    pending_install: None,
                    commit_marked: commit,
                })
            }),
            shared,
            leader: watch::Sender::new(None),
            leader_hint: AtomicU64::new(0),
            snapshot_file: std::sync::Mutex::new(snapshot_index),
            snapshot_path,
            snapshot_spill: Mutex::new(snapshot_spill),
        }
    }

    pub fn is_member(&self) -> bool {
        self.core.is_some()
    }
}

impl Core {
    /// Registers a proposal's answer channel.
    pub fn wait_for(&mut self, index: u64, term: u64) -> oneshot::Receiver<Answer> {
        let (tx, rx) = oneshot::channel();
        self.waiters.insert(index, (term, tx));
        rx
    }
}

impl Node {
    /// Carries out everything the engine asks for after an input. Call with the group's core
    /// locked, after every call into the engine.
    pub(crate) fn drive(&self, group: &Group, core: &mut Core) {
        while core.raft.has_ready() {
            let ready = core.raft.take_ready();
            if let Some(install) = &ready.install {
                // The leader's snapshot replaces this replica's state (the file is already
                // durable: it was written before the engine saw the message).
                let state = match core.pending_install.take() {
                    Some(state) => Ok(state),
                    None => decode_state(&install.data, self.config().idempotency_window),
                };
                match state {
                    Ok(state) => group.shared.update(|d| {
                        d.state = state;
                        d.rebuild_derived();
                    }),
                    Err(e) => {
                        tracing::error!(group = group.index, error = %e, "cannot install a snapshot")
                    }
                }
                group.shared.set_applied(install.index);
            }
            let log_entries = ready.hard_state.is_some() || !ready.entries.is_empty();
            if log_entries || ready.install.is_some() {
                core.handed += 1;
                let seq = core.handed;
                let last = ready.entries.last().map(|e| (e.index, e.term));
                let node = self.weak();
                let index = group.index;
                let done = move |r: Result<(), starcite_storage::StorageError>| {
                    if r.is_ok() {
                        if let Some(node) = node.upgrade() {
                            node.on_durable(index, seq, last);
                        }
                    }
                };
                match (&ready.install, log_entries) {
                    (Some(install), true) => {
                        self.log
                            .write_snapshot_point(index, install.index, install.term, |_| {});
                        self.log
                            .write_raft(index, &ready.hard_state, &ready.entries, done);
                    }
                    (Some(install), false) => {
                        self.log
                            .write_snapshot_point(index, install.index, install.term, done);
                    }
                    (None, _) => {
                        self.log
                            .write_raft(index, &ready.hard_state, &ready.entries, done)
                    }
                }
            }
            for (to, message) in &ready.messages {
                self.send_raft(*to, group.index, message);
            }
            let handed = core.handed;
            core.gated
                .extend(ready.gated.into_iter().map(|(to, m)| (handed, to, m)));
            for to in ready.send_snapshot {
                self.send_snapshot(group.index, to);
            }
        }
        if !core.gated.is_empty() {
            let durable = core.durable;
            let mut i = 0;
            while i < core.gated.len() {
                if core.gated[i].0 <= durable {
                    let (_, to, message) = core.gated.remove(i);
                    self.send_raft(to, group.index, &message);
                } else {
                    i += 1;
                }
            }
        }
        self.apply_committed(group, core);
        let leader = core.raft.leader();
        group.leader.send_if_modified(|known| {
            if *known != leader {
                *known = leader;
                true
            } else {
                false
            }
        });
    }

    /// The log made batch `seq` of `group` durable (on the log's writer thread).
    fn on_durable(&self, group: u32, seq: u64, last: Option<(u64, u64)>) {
        let Some(g) = self.groups.get(group as usize) else {
            return;
        };
        let Some(core) = &g.core else { return };
        let mut core = core.lock();
        core.durable = core.durable.max(seq);
        if let Some((index, term)) = last {
            core.raft.persisted(index, term);
        }
        self.drive(g, &mut core);
    }

    fn apply_committed(&self, group: &Group, core: &mut Core) {
        let applied_before = core.raft.applied();
        loop {
            let (from, to) = core.raft.committed_range(512);
            if from > to {
                break;
            }
            let log = core.raft.log();
            let answers: Vec<(u64, u64, Applied)> = group.shared.update(|d| {
                (from..=to)
                    .filter_map(|i| log.entry(i))
                    .map(|e| {
                        let answer = match &e.payload {
                            Some(cmd) => d.apply_command(cmd),
                            None => Applied::Ignored,
                        };
                        (e.index, e.term, answer)
                    })
                    .collect()
            });
            core.raft.advance_applied(to);
            group.shared.set_applied(to);
            if core.waiters.is_empty() {
                continue;
            }
            for (index, term, answer) in answers {
                if let Some((proposed_term, tx)) = core.waiters.remove(&index) {
                    let _ = tx.send(if proposed_term == term {
                        Ok(answer)
                    } else {
                        Err(())
                    });
                }
            }
        }
        if core.raft.applied() > applied_before {
            // Applied entries are in the state (and the durable log): memory keeps only what
            // followers may still need.
            let keep = if self.map.is_single_node() {
                0
            } else {
                RELEASE_KEEP
            };
            core.raft.release(keep);
        }
    }

    /// Queues a Raft message for `to`; false if there is no connection to it.
    pub(crate) fn send_raft(&self, to: NodeId, group: u32, message: &RaftMessage) -> bool {
        self.transport
            .as_ref()
            .is_some_and(|t| t.send_raft(to, group, message))
    }

    /// A peer's Raft message (on the connection's reader: must not block).
    pub(crate) fn on_raft_message(
        self: &Arc<Self>,
        from: NodeId,
        group: u32,
        message: RaftMessage,
    ) {
        let Some(g) = self.groups.get(group as usize) else {
            return;
        };
        let Some(core) = &g.core else { return };
        if matches!(message, Message::Snapshot { .. }) {
            // Decoding and writing a snapshot takes time: off the connection's reader.
            let node = self.clone();
            tokio::task::spawn_blocking(move || node.receive_snapshot(from, group, message));
            return;
        }
        let mut core = core.lock();
        core.raft.step(from, message, self.now());
        self.drive(g, &mut core);
    }

    /// A snapshot from the leader: decode it, make it durable, then let the engine take it.
    /// Blocking.
    fn receive_snapshot(&self, from: NodeId, group: u32, message: RaftMessage) {
        let Message::Snapshot {
            index,
            snapshot_term,
            data,
            ..
        } = &message
        else {
            return;
        };
        let g = &self.groups[group as usize];
        let Some(core) = &g.core else { return };
        let state = match decode_state(data, self.config().idempotency_window) {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(group, error = %e, "dropping an unreadable snapshot from the leader");
                return;
            }
        };
        let needed = core.lock().raft.commit() < *index;
        if needed {
            let file = SnapshotFile {
                index: *index,
                term: *snapshot_term,
                data: data.clone(),
            };
            // The leader's state is self-contained: it refers to no spill segment here.
            if let Err(e) = self.store_snapshot(g, &file, BTreeSet::new()) {
                tracing::error!(group, error = %e, "cannot store the leader's snapshot");
                return;
            }
            tracing::info!(group, index, "installing a snapshot from the leader");
        }
        let mut core = core.lock();
        core.pending_install = Some(state);
        core.raft.step(from, message, self.now());
        self.drive(g, &mut core);
        core.pending_install = None;
    }

    /// Replaces the group's snapshot file, unless it already holds a newer one. `spilled`:
    /// the spill segments the file refers to (already durable). Blocking.
    pub(crate) fn store_snapshot(
        &self,
        g: &Group,
        file: &SnapshotFile,
        spilled: BTreeSet<u64>,
    ) -> Result<bool, NodeError> {
        let mut current = g
            .snapshot_file
            .lock()
            .map_err(|_| NodeError::Startup("snapshot lock poisoned".into()))?;
        if file.index <= *current {
            return Ok(false);
        }
        {
            // Until the new file is in place, the old one's segments are still needed too.
            let mut pinned = g.snapshot_spill.lock();
            pinned.extend(spilled.iter().copied());
        }
        file.write(&g.snapshot_path)?;
        *g.snapshot_spill.lock() = spilled;
        *current = file.index;
        g.shared.count_snapshot();
        Ok(true)
    }

    /// Sends `to` the group's snapshot file (it is behind the leader's compacted log).
    fn send_snapshot(&self, group: u32, to: NodeId) {
        let node = self.weak();
        tokio::task::spawn_blocking(move || {
            let Some(node) = node.upgrade() else { return };
            let g = &node.groups[group as usize];
            let Some(core) = &g.core else { return };
            let connected = node.transport.as_ref().is_some_and(|t| t.is_connected(to));
            if !connected {
                core.lock().raft.snapshot_unavailable(to);
                return;
            }
            // The follower needs what the log no longer holds in memory; a snapshot older than
            // that would not do: take a fresh one first.
            let needed = core.lock().raft.log().snap_index();
            let file_index = g.snapshot_file.lock().map(|i| *i).unwrap_or(0);
            if file_index < needed {
                if let Err(e) = node.compact_group(g) {
                    tracing::error!(group, error = %e, "cannot take a snapshot for a follower");
                }
            }
            let file = match node.snapshot_for_transfer(g) {
                Ok(file) => file,
                Err(e) => {
                    tracing::warn!(group, error = %e, "cannot prepare a snapshot for a follower");
                    None
                }
            };
            let mut core = core.lock();
            match file {
                Some(file) => {
                    let message = Message::Snapshot {
                        term: core.raft.term(),
                        index: file.index,
                        snapshot_term: file.term,
                        data: file.data,
                        sent_at: node.now(),
                    };
                    drop(core);
                    if !node.send_raft(to, group, &message) {
                        let mut core = g.core.as_ref().map(|c| c.lock());
                        if let Some(core) = core.as_mut() {
                            core.raft.snapshot_unavailable(to);
                        }
                    }
                }
                None => {
                    core.raft.snapshot_unavailable(to);
                    node.drive(g, &mut core);
                }
            }
        });
    }

    /// Snapshots the group's applied state and lets its log forget what the snapshot covers.
    /// Blocking.
    pub(crate) fn compact_group(&self, g: &Group) -> Result<(), NodeError> {
        let Some(core) = &g.core else { return Ok(()) };
        let file_index = g.snapshot_file.lock().map(|i| *i).unwrap_or(0);
        let taken = {
            let core = core.lock();
            let applied = core.raft.applied();
            match core.raft.log().term_at(applied) {
                Some(term) if applied > file_index => {
                    // Apply runs under the core lock, so the state is exactly `applied`.
                    Some((applied, term, g.shared.read(|d| d.state.for_snapshot())))
                }
                _ => None,
            }
        };
        let Some((index, term, state)) = taken else {
            return Ok(());
        };
        let spilled = state.spill_segments();
        if !spilled.is_empty() {
            // The snapshot refers to spilled runs: they must be durable before it is.
            if let Some(mut segments) = self.spill.lock(g.index) {
                segments.sync()?;
            }
        }
        let data = crate::state_machine::encode_state(&state);
        drop(state);
        self.store_snapshot(g, &SnapshotFile { index, term, data }, spilled)?;
        core.lock().raft.compact(index);
        self.log.write_snapshot_point(g.index, index, term, |_| {});
        self.collect_spill_garbage(g)?;
        Ok(())
    }

    /// The group's snapshot file as a follower can install it: spilled runs read back in,
    /// and with a per-replica archive, archived events too.
    /// Blocking.
    fn snapshot_for_transfer(&self, g: &Group) -> Result<Option<SnapshotFile>, NodeError> {
        // Held so that no segment the file refers to is deleted while it is read.
        let _segments = self.spill.lock(g.index);
        let file = {
            let _held = g
                .snapshot_file
                .lock()
                .map_err(|_| NodeError::Startup("snapshot lock poisoned".into()))?;
            SnapshotFile::read(&g.snapshot_path)?
        };
        let Some(mut file) = file else {
            return Ok(None);
        };
        let per_replica_archive = self.config().per_replica_archive;
        if g.snapshot_spill.lock().is_empty() && !per_replica_archive {
            return Ok(Some(file));
        }
        let mut state = file.decode(self.config().idempotency_window)?;
        self.unspill_for_transfer(g.index, &mut state)?;
        if per_replica_archive {
            self.unarchive_for_transfer(&mut state)?;
        }
        file.data = crate::state_machine::encode_state(&state);
        Ok(Some(file))
    }

    /// Entries applied since the group's last snapshot file.
    pub(crate) fn entries_since_snapshot(&self, g: &Group) -> u64 {
        let Some(core) = &g.core else { return 0 };
        let file_index = g.snapshot_file.lock().map(|i| *i).unwrap_or(0);
        core.lock().raft.applied().saturating_sub(file_index)
    }
}
