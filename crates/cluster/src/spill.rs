//! Keeping memory bounded while the archive is behind: when the events held in memory pass
//! the node's budget, the groups holding the most move their events to the spill store on
//! local disk (archived ones are just dropped: the archive serves them). Readers, the
//! archiver and snapshot transfers read spilled runs back from disk.
//!
//! Spilling changes where a replica keeps its events, never what they are, so replicas may
//! spill differently. A snapshot refers to the spilled runs of its replica; the runs are made
//! durable before the snapshot is written, and a segment is deleted only when neither the
//! current state nor the snapshot on disk refers to it.

use crate::group::Group;
use crate::node::Node;
use crate::NodeError;
use bytes::Bytes;
use starcite_core::{frame_seq, GroupState, SpillRun};
use starcite_storage::SpillStore;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Largest extent written for one run: what a reader needing one event of it reads at most.
const MAX_RUN_BYTES: u64 = 1024 * 1024;

/// Reads the events of `runs` (one session's, in order) with `seq > after`, at most `limit`.
/// Every event is checked to carry the seq its run says.
pub(crate) fn read_runs(
    store: &SpillStore,
    group: u32,
    session_id: &str,
    runs: &[SpillRun],
    after: u64,
    limit: usize,
) -> Result<Vec<Bytes>, NodeError> {
    let mut out = Vec::new();
    for run in runs {
        if out.len() >= limit {
            break;
        }
        let events = store.read(group, &run.extent)?;
        if events.len() as u64 != run.to - run.from + 1 {
            return Err(NodeError::Unavailable(format!(
                "spilled events {}..={} of session {session_id} read back as {} events",
                run.from,
                run.to,
                events.len()
            )));
        }
        for (seq, event) in (run.from..).zip(events) {
            if seq <= after {
                continue;
            }
            if frame_seq(&event) != Some(seq) {
                return Err(NodeError::Unavailable(format!(
                    "spilled event {seq} of session {session_id} is not that event"
                )));
            }
            out.push(event);
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok(out)
}

/// Once memory is back under the budget, how much longer a budget pass rests after each
/// group than the group took (for archived events, the thread freeing them rests): the rest
/// of the pass (down to half the budget) then takes at most a quarter of a core. Freeing
/// 130 MB of events gone cold is ~300 ms of CPU (a microsecond an event); done in one go on
/// every node of a cluster sharing two cores, it stalled appends for as long. Above the
/// budget there is no rest: memory comes first.
const BUDGET_PASS_REST: u32 = 3;

/// How many times as long as a group took a budget pass rests after it, with `hot` bytes of
/// events still in memory (the pass's own count: appends since it began wait for the next).
fn budget_pass_rest(hot: u64, budget: u64) -> u32 {
    if hot <= budget {
        BUDGET_PASS_REST
    } else {
        0
    }
}

impl Node {
    /// Events held in memory by the groups this node replicates.
    pub fn hot_bytes(&self) -> u64 {
        self.groups
            .iter()
            .filter(|g| g.is_member())
            .map(|g| g.shared.read(|d| d.state.hot_bytes()))
            .sum()
    }

    /// If memory holds more events than the budget, frees memory until it is under half the
    /// budget: first by dropping archived events, then by spilling the largest groups.
    /// Blocking. Returns the bytes of memory freed.
    pub(crate) fn spill_over_budget(&self) -> Result<u64, NodeError> {
        let budget = self.config().hot_max_bytes;
        let mut sizes: Vec<(u64, u32)> = self
            .groups
            .iter()
            .filter(|g| g.is_member())
            .map(|g| (g.shared.read(|d| d.state.hot_bytes()), g.index))
            .collect();
        let mut total: u64 = sizes.iter().map(|(b, _)| b).sum();
        if total <= budget {
            return Ok(0);
        }
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let mut freed = 0;
        // First what costs no disk: events the archive already has leave memory.
        for &(_, index) in &sizes {
            if total <= budget / 2 {
                return Ok(freed);
            }
            let g = &self.groups[index as usize];
            let (taken, n) = g.shared.update(|d| d.state.take_archived());
            freed += n;
            total = total.saturating_sub(n);
            // Outside the group's lock, below the request path's priority.
            self.reclaimer.free(taken, budget_pass_rest(total, budget));
        }
        for (_, index) in sizes {
            if total <= budget / 2 {
                break;
            }
            let started = Instant::now();
            let n = self.spill_group(&self.groups[index as usize])?;
            freed += n;
            total = total.saturating_sub(n);
            std::thread::sleep(started.elapsed() * budget_pass_rest(total, budget));
        }
        Ok(freed)
    }

    /// Moves every event of the group out of memory. Blocking. Returns the bytes freed.
    pub(crate) fn spill_group(&self, g: &Group) -> Result<u64, NodeError> {
        let Some(mut segments) = self.spill.lock(g.index) else {
            return Ok(0);
        };
        let (before, chunks) = g.shared.update(|d| {
            let before = d.state.hot_bytes();
            (before, d.state.take_spillable(MAX_RUN_BYTES))
        });
        // Written outside the state's lock: appends and reads go on meanwhile.
        let mut written = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let extent = segments.write(&chunk.events)?;
            written.push((chunk, extent));
        }
        let (after, events) = g.shared.update(|d| {
            let mut events = 0;
            for (chunk, extent) in &written {
                let n = chunk.events.len();
                if d.state
                    .commit_spill(&chunk.session_id, chunk.from, n, *extent)
                {
                    events += n as u64;
                }
            }
            (d.state.hot_bytes(), events)
        });
        self.counters
            .spilled_events
            .fetch_add(events, Ordering::Relaxed);
        Ok(before.saturating_sub(after))
    }

    /// Deletes the group's spill segments that neither its state nor its snapshot file
    /// refers to. Blocking.
    pub(crate) fn collect_spill_garbage(&self, g: &Group) -> Result<usize, NodeError> {
        let Some(mut segments) = self.spill.lock(g.index) else {
            return Ok(0);
        };
        if segments.segment_count() == 0 {
            return Ok(0);
        }
        let mut keep = g.snapshot_spill.lock().clone();
        keep.extend(g.shared.read(|d| d.state.spill_segments()));
        Ok(segments.retain(&keep)?)
    }

    /// Whether the group's snapshot file refers to spill segments its state no longer needs
    /// (the archive caught up): a new snapshot would let them go.
    pub(crate) fn snapshot_pins_spill(&self, g: &Group) -> bool {
        let pinned = g.snapshot_spill.lock().clone();
        if pinned.is_empty() {
            return false;
        }
        let live = g.shared.read(|d| d.state.spill_segments());
        !pinned.is_subset(&live)
    }

    /// Makes a state decoded from this node's snapshot file self-contained: spilled runs
    /// are read back into memory, for a replica that cannot read this node's disk. Hold the
    /// group's spill lock while the file is read and this runs. Blocking.
    pub(crate) fn unspill_for_transfer(
        &self,
        group: u32,
        state: &mut GroupState,
    ) -> Result<(), NodeError> {
        let spilled: Vec<(String, Vec<SpillRun>)> = state
            .sessions()
            .filter(|s| s.spilled_runs().next().is_some())
            .map(|s| (s.id.clone(), s.spilled_runs().copied().collect()))
            .collect();
        for (session_id, runs) in spilled {
            let events = read_runs(&self.spill, group, &session_id, &runs, 0, usize::MAX)?;
            state
                .unspill(&session_id, events)
                .map_err(NodeError::Unavailable)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_pass_rests_only_once_memory_is_under_the_budget() {
        assert_eq!(budget_pass_rest(1001, 1000), 0, "over the budget: no rest");
        assert_eq!(budget_pass_rest(1000, 1000), BUDGET_PASS_REST);
        assert_eq!(budget_pass_rest(10, 1000), BUDGET_PASS_REST);
    }
}
