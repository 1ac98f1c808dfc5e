//! What the archiver needs from the node: the committed, unarchived events of the groups this
//! node leads, and a way to replicate what the archive now holds.

use crate::node::Node;
use crate::NodeError;
use bytes::Bytes;
use starcite_core::{
    group_of, Applied, ArchiveAckCommand, ArchiveMark, Command, SessionView, SpillRun,
};
use std::collections::BTreeMap;

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
    fn led_groups(&self) -> impl Iterator<Item = &crate::group::Group> {
        self.groups.iter().filter(|g| self.leads(g))
    }

    /// Collects up to `budget` committed, unarchived events of the groups this node leads
    /// (each session's run starts right after its archive mark, so acknowledging a run never
    /// leaves a hole). Spilled events are read back from local disk.
    pub async fn archive_backlog(&self, budget: usize) -> ArchiveBacklog {
        let mut backlog = ArchiveBacklog::default();
        let mut spilled: Vec<(u32, String, u64, Vec<SpillRun>, usize)> = Vec::new();
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
            });
        }
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
                .entry(group_of(session_id, self.config().groups))
                .or_default()
                .push(ArchiveMark {
                    session_id: session_id.clone(),
                    archived_seq: *archived_seq,
                });
        }
        let deadline = std::time::Instant::now() + self.config().request_timeout;
        let results =
            futures_util::future::join_all(per_group.into_iter().map(|(group, marks)| {
                let cmd = Command::ArchiveAck(ArchiveAckCommand { marks, keep_hot });
                self.propose_in(group, cmd, deadline)
            }))
            .await;
        let mut trimmed = 0;
        for r in results {
            match r {
                Ok(Applied::Archived { trimmed: n }) => trimmed += n,
                Ok(_) => {}
                Err(e) => return Err(e),
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
                    lag.hot_events += session.hot_len() as u64;
                }
            });
        }
        lag
    }
}
