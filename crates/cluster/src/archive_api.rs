//! What the archiver needs from the node: the committed, unarchived events of the groups it
//! archives, and a way to record what the archive now holds.
//!
//! Two arrangements. With a shared archive (Postgres, or a single node's embedded file), each
//! group's leader archives and replicates the marks through Raft, so every replica trims.
//! Without one, in a cluster, every replica archives its groups to its own embedded file and
//! applies its marks locally: like spilling, that changes where a replica keeps its events,
//! never what they are. Such a replica reads what it trimmed back from its own archive, and a
//! snapshot it sends carries those events (the receiver's archive may not have them).

use crate::node::Node;
use crate::NodeError;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use starcite_core::{
    first_missing_seq, group_of, Applied, ArchiveAckCommand, ArchiveMark, Command, GroupState,
    SessionView, SpillRun,
};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Reading events back from an archive: the shared one (by the API's reader) or, in a
/// cluster where each node archives to its own embedded file, this replica's own.
pub trait ArchiveReader: Send + Sync {
    /// Up to `limit` archived events of the session with `seq > after`, oldest first.
    fn read_events<'a>(
        &'a self,
        session_id: &'a str,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Bytes>, String>>;
}

/// Why events could not be read from an archive.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveReadError {
    /// The archive could not be reached: the events exist and can be read later.
    #[error("archive read failed: {0}")]
    Down(String),
    /// The events should be in the archive and are not: a hole that must not be skipped.
    #[error("the archive is missing event {seq} of session {session_id} (events {from}..{to} should be there)")]
    Missing {
        session_id: String,
        seq: u64,
        from: u64,
        to: u64,
    },
}

/// Events `after + 1 ..` below `first_hot` (at most `limit`) from `archive`, each checked to
/// be the event asked for.
pub async fn read_archived(
    archive: &dyn ArchiveReader,
    session_id: &str,
    after: u64,
    first_hot: u64,
    limit: usize,
) -> Result<Vec<Bytes>, ArchiveReadError> {
    let want = (first_hot.saturating_sub(after + 1) as usize).min(limit);
    let frames = archive
        .read_events(session_id, after, want)
        .await
        .map_err(ArchiveReadError::Down)?;
    match first_missing_seq(&frames, after, want) {
        Some(seq) => Err(ArchiveReadError::Missing {
            session_id: session_id.to_owned(),
            seq,
            from: after + 1,
            to: first_hot.saturating_sub(1),
        }),
        None => Ok(frames),
    }
}

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

/// The archiver's bookkeeping runs on the request path's runtime (it takes the groups'
/// locks), which has one worker per node when nodes share a host: walking every group in one
/// poll kept that worker from requests for 0.7 ms per batch, up to 5.8 ms on a busy machine
/// (docs/benchmarks.md). So a walk lets requests in as it goes, with `yield_now`, which also
/// polls the I/O driver so that requests still in their sockets get in too (the peer link's
/// writer waits only for the tasks already queued, see `transport::YieldToQueued`). It yields
/// once per [`WALK_SLICE`] of work, not after every group: that cost an `epoll_wait` per
/// group, about 2,000 a second per node at 8,000 appends/s, a third of the node's
/// `epoll_wait`s (docs/benchmarks.md).
struct GroupWalk {
    since: std::time::Instant,
}

/// How long a walk over the groups keeps the worker before letting requests in.
const WALK_SLICE: std::time::Duration = std::time::Duration::from_micros(100);

impl GroupWalk {
    fn start() -> GroupWalk {
        GroupWalk {
            since: std::time::Instant::now(),
        }
    }

    fn slice_over(&self, now: std::time::Instant) -> bool {
        now.saturating_duration_since(self.since) >= WALK_SLICE
    }

    /// Call after each group: yields if the walk has had the worker for a slice.
    async fn next_group(&mut self) {
        if self.slice_over(std::time::Instant::now()) {
            tokio::task::yield_now().await;
            self.since = std::time::Instant::now();
        }
    }
}

impl Node {
    /// The groups this node archives: those it leads, or with a per-replica archive, every
    /// group it replicates.
    fn archived_groups(&self) -> impl Iterator<Item = &crate::group::Group> {
        self.archived_groups_from(0)
    }

    /// [`Self::archived_groups`], starting at group `start` and wrapping around. Leadership
    /// is looked at as each group comes up.
    fn archived_groups_from(&self, start: usize) -> impl Iterator<Item = &crate::group::Group> {
        let per_replica = self.config().per_replica_archive;
        let (before, after) = self.groups.split_at(start.min(self.groups.len()));
        after.iter().chain(before).filter(move |g| {
            if per_replica {
                g.is_member()
            } else {
                self.leads(g)
            }
        })
    }

    /// Attaches this replica's own archive (with `per_replica_archive`): until then, reads of
    /// events it trimmed and snapshot transfers wait, as `unavailable`.
    pub fn attach_local_archive(&self, archive: Arc<dyn ArchiveReader>) {
        let _ = self.local_archive.set(archive);
    }

    /// Collects up to `budget` committed, unarchived events of the groups this node archives
    /// (each session's run starts right after its archive mark, so acknowledging a run never
    /// leaves a hole). Spilled events are read back from local disk.
    ///
    /// Each collection starts after the last group the previous one visited, so the groups
    /// take turns and each session's run is about what it appended in one turn (an archive
    /// interval under a steady load). Starting from the first group every time archived the
    /// low groups' sessions in runs of a few events each — every chunk row, index entry and
    /// header update of the embedded archive costs a page write, and its checkpoint another:
    /// chunks of 16 events on average against 87 now, the SQLite thread's CPU a third lower
    /// (docs/benchmarks.md, thirteenth session) — and starved the high groups while the low
    /// ones kept every batch full.
    pub async fn archive_backlog(&self, budget: usize) -> ArchiveBacklog {
        let mut backlog = ArchiveBacklog::default();
        let mut spilled: Vec<(u32, String, u64, Vec<SpillRun>, usize)> = Vec::new();
        let mut remaining = budget;
        let count = self.groups.len();
        let start = self.archive_cursor.load(Ordering::Relaxed) as usize % count.max(1);
        let mut resume_at = start;
        let mut walk = GroupWalk::start();
        for group in self.archived_groups_from(start) {
            if remaining == 0 {
                break;
            }
            let visited = group.shared.read(|d| {
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
                    let from = session.archived_seq;
                    if let Some(runs) = session.spilled_from(from, session.last_seq) {
                        // On local disk: this round takes the spilled part only.
                        let want = ((session.first_seq() - 1 - from) as usize).min(remaining);
                        remaining -= want;
                        spilled.push((group.index, session_id.clone(), from, runs, want));
                        continue;
                    }
                    let events = session.events_between(from, session.last_seq, remaining);
                    if events.is_empty() {
                        continue;
                    }
                    remaining -= events.len();
                    backlog.runs.push(ArchiveRun {
                        session_id: session_id.clone(),
                        first_seq: from + 1,
                        events,
                    });
                }
                !d.unarchived.is_empty()
            });
            // The next collection starts after this group even if the budget ran out in it:
            // a group that alone fills every batch would otherwise hold the start for good.
            resume_at = (group.index as usize + 1) % count;
            if visited {
                walk.next_group().await;
            }
        }
        self.archive_cursor
            .store(resume_at as u32, Ordering::Relaxed);
        if spilled.is_empty() {
            return backlog;
        }
        let store = self.spill.clone();
        let read = tokio::task::spawn_blocking(move || {
            spilled
                .into_iter()
                .filter_map(|(group, session_id, after, runs, want)| {
                    match crate::spill::read_runs(&store, group, &session_id, &runs, after, want) {
                        Ok(events) if !events.is_empty() => Some(ArchiveRun {
                            session_id,
                            first_seq: after + 1,
                            events,
                        }),
                        Ok(_) => None,
                        Err(e) => {
                            // Left for the next round (its runs may have just been archived).
                            tracing::warn!(session_id, error = %e, "cannot read spilled events for the archive");
                            None
                        }
                    }
                })
                .collect::<Vec<_>>()
        })
        .await;
        if let Ok(runs) = read {
            backlog.runs.extend(runs);
        }
        backlog
    }

    /// Records that the archive durably holds these session headers.
    pub fn headers_archived(&self, sessions: &[SessionView]) {
        for view in sessions {
            let group = &self.groups[group_of(&view.id, self.config().groups) as usize];
            group.shared.update(|d| {
                d.headers_unarchived.remove(&view.id);
                if d.fully_archived(&view.id) {
                    d.unarchived.remove(&view.id);
                }
            });
        }
    }

    /// Records that events `1..=archived_seq` of each session are in the archive; every
    /// replica (with a per-replica archive, this one) then keeps only the newest `keep_hot` of
    /// them in memory. One command per group, replicated or, with a per-replica archive,
    /// applied here only. Returns how many events left this node's memory.
    pub async fn acknowledge_archived(
        &self,
        marks: &[(String, u64)],
        keep_hot: u64,
    ) -> Result<u64, NodeError> {
        let mut per_group: BTreeMap<u32, Vec<ArchiveMark>> = BTreeMap::new();
        for (session_id, archived_seq) in marks {
            per_group
                .entry(group_of(session_id, self.config().groups))
                .or_default()
                .push(ArchiveMark {
                    session_id: session_id.clone(),
                    archived_seq: *archived_seq,
                });
        }
        let commands = per_group.into_iter().map(|(group, marks)| {
            (
                group,
                Command::ArchiveAck(ArchiveAckCommand { marks, keep_hot }),
            )
        });
        let answers: Vec<Applied> = if self.config().per_replica_archive {
            let mut answers = Vec::new();
            let mut walk = GroupWalk::start();
            for (group, cmd) in commands {
                answers.push(
                    self.groups[group as usize]
                        .shared
                        .update(|d| d.apply_command(&cmd)),
                );
                walk.next_group().await;
            }
            answers
        } else {
            let deadline = std::time::Instant::now() + self.config().request_timeout;
            futures_util::future::join_all(
                commands.map(|(group, cmd)| self.propose_in(group, cmd, deadline)),
            )
            .await
            .into_iter()
            .collect::<Result<_, _>>()?
        };
        Ok(answers
            .iter()
            .map(|a| match a {
                Applied::Archived { trimmed } => *trimmed,
                _ => 0,
            })
            .sum())
    }

    /// Committed events not yet archived, for pacing the archiver: the sessions with nothing
    /// pending (most of them, on a node holding many idle sessions) are not visited.
    pub async fn archive_pending_events(&self) -> u64 {
        let mut pending = 0;
        let mut walk = GroupWalk::start();
        for group in self.archived_groups() {
            let visited = group.shared.read(|d| {
                for session_id in &d.unarchived {
                    if let Some(session) = d.state.session(session_id) {
                        pending += session.last_seq - session.archived_seq;
                    }
                }
                !d.unarchived.is_empty()
            });
            if visited {
                walk.next_group().await;
            }
        }
        pending
    }

    /// Every session's figures, for metrics (at scrape time).
    pub fn archive_lag(&self) -> ArchiveLag {
        let mut lag = ArchiveLag::default();
        for group in self.archived_groups() {
            group.shared.read(|d| {
                lag.pending_sessions += d.unarchived.len() as u64;
                for session in d.state.sessions() {
                    lag.pending_events += session.last_seq - session.archived_seq;
                    lag.hot_events += session.hot_len() as u64;
                }
            });
        }
        lag
    }

    /// Events `after + 1 ..` (below `first_hot`, at most `limit`) from this replica's own
    /// archive, each checked to be the event asked for.
    pub(crate) async fn read_own_archive(
        &self,
        session_id: &str,
        after: u64,
        first_hot: u64,
        limit: usize,
    ) -> Result<Vec<Bytes>, NodeError> {
        let archive = self.local_archive.get().ok_or_else(|| {
            NodeError::Unavailable(format!(
                "events {}..{} of session {session_id} are in this node's archive, which is not open yet",
                after + 1,
                first_hot - 1
            ))
        })?;
        read_archived(archive.as_ref(), session_id, after, first_hot, limit)
            .await
            .map_err(|e| NodeError::Unavailable(format!("this node's archive: {e}")))
    }

    /// Makes a state decoded from this node's snapshot file independent of its archive: the
    /// events it archived are read back into memory and every archive mark is cleared, for a
    /// replica whose archive is its own. Call after the spilled runs are read back (memory
    /// then starts where the archive ends). Blocking: call from a blocking thread of the
    /// runtime.
    pub(crate) fn unarchive_for_transfer(&self, state: &mut GroupState) -> Result<(), NodeError> {
        let runtime = tokio::runtime::Handle::current();
        let archived: Vec<(String, u64)> = state
            .sessions()
            .filter(|s| s.archived_seq > 0 || s.first_seq() > 1)
            .map(|s| (s.id.clone(), s.first_seq()))
            .collect();
        for (session_id, first_hot) in archived {
            let events = if first_hot > 1 {
                runtime.block_on(self.read_own_archive(&session_id, 0, first_hot, usize::MAX))?
            } else {
                Vec::new()
            };
            state
                .unarchive(&session_id, events)
                .map_err(NodeError::Unavailable)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// Runs `walk.next_group()` beside a queued task and says whether that task got in.
    async fn lets_queued_task_in(walk: &mut GroupWalk) -> bool {
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        let other = tokio::spawn(async move { flag.store(true, Ordering::Relaxed) });
        walk.next_group().await;
        let got_in = ran.load(Ordering::Relaxed);
        other.await.unwrap();
        got_in
    }

    #[test]
    fn a_slice_is_over_after_walk_slice() {
        let walk = GroupWalk::start();
        assert!(!walk.slice_over(walk.since + WALK_SLICE / 2));
        assert!(walk.slice_over(walk.since + WALK_SLICE));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_walk_yields_only_once_its_slice_is_over() {
        let second = std::time::Duration::from_secs(1);
        // A slice that cannot be over yet, however slowly this test runs.
        let mut walk = GroupWalk {
            since: std::time::Instant::now() + second,
        };
        assert!(!lets_queued_task_in(&mut walk).await, "yielded early");
        let long_ago = std::time::Instant::now() - second;
        walk.since = long_ago;
        assert!(lets_queued_task_in(&mut walk).await, "did not yield");
        assert!(walk.since > long_ago, "the next slice starts at the yield");
    }
}
