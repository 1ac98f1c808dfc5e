//! The node's background work: time for the Raft engines, log compaction, leader balance.

use crate::node::Node;
use starcite_raft::{NodeId, Role};
use std::collections::HashMap;
use std::sync::Weak;
use std::time::{Duration, Instant};

/// How often every group's engine is ticked; the Raft timeouts are multiples of it.
const TICK: Duration = Duration::from_millis(10);

/// Drives every group's clock (elections, heartbeats, retransmissions) and records commit
/// marks in the log now and then, so a restart re-applies without waiting for a leader.
pub(crate) async fn tick(node: Weak<Node>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut round = 0u64;
    let mut epochs: HashMap<NodeId, u64> = HashMap::new();
    loop {
        interval.tick().await;
        let Some(node) = node.upgrade() else { return };
        if node.is_stopping() {
            return;
        }
        let now = node.now();
        round += 1;
        let mark_commits = round.is_multiple_of(10);
        let mut marks = Vec::new();
        let reconnected = reconnected_peers(&node, &mut epochs);
        // Every 10 s: what the groups without a leader look like, for whoever investigates.
        let report_leaderless = round.is_multiple_of(1000);
        let mut leaderless = Vec::new();
        let mut rejoining = Vec::new();
        for g in &node.groups {
            let Some(core) = &g.core else { continue };
            let mut core = core.lock();
            for &peer in &reconnected {
                core.raft.peer_reconnected(peer, now);
            }
            core.raft.tick(now);
            node.drive(g, &mut core);
            if report_leaderless && core.raft.leader().is_none() {
                leaderless.push(describe(g.index, &core.raft));
            }
            if report_leaderless && core.raft.is_rejoining() {
                rejoining.push(describe(g.index, &core.raft));
            }
            let commit = core.raft.commit();
            if mark_commits && commit > core.commit_marked {
                core.commit_marked = commit;
                marks.push((g.index, commit));
            }
        }
        node.log.write_commits(&marks);
        if !leaderless.is_empty() {
            tracing::warn!(
                groups = leaderless.len(),
                first = %leaderless.iter().take(4).cloned().collect::<Vec<_>>().join("; "),
                "groups without a leader"
            );
        }
        if !rejoining.is_empty() {
            tracing::info!(
                groups = rejoining.len(),
                first = %rejoining.iter().take(4).cloned().collect::<Vec<_>>().join("; "),
                "groups catching up after this node lost its data (they may not vote until then)"
            );
        }
    }
}

fn describe(group: u32, raft: &starcite_raft::Raft<starcite_core::Command>) -> String {
    let log = raft.log();
    format!(
        "group {group}: {:?} of {:?} term {} log ({}, {}) commit {}{}",
        raft.role(),
        raft.leader(),
        raft.term(),
        log.last_index(),
        log.last_term(),
        raft.commit(),
        match (raft.is_rejoining(), raft.rejoin_target()) {
            (false, _) => String::new(),
            (true, None) => " rejoining, no target yet".to_string(),
            (true, Some(t)) => format!(" rejoining until index {t}"),
        }
    )
}

/// Peers connected anew since the last call (a restarted node, a dropped connection).
fn reconnected_peers(node: &Node, epochs: &mut HashMap<NodeId, u64>) -> Vec<NodeId> {
    let Some(transport) = &node.transport else {
        return Vec::new();
    };
    let me = node.map.me();
    node.map
        .nodes()
        .iter()
        .map(|n| n.id)
        .filter(|&peer| peer != me)
        .filter(|&peer| {
            let epoch = transport.connection_epoch(peer);
            let known = epochs.insert(peer, epoch).unwrap_or(0);
            epoch != known && known != 0
        })
        .collect()
}

/// How often compaction looks for work. Short, so that snapshots come a few at a time: a
/// snapshot is a few milliseconds of serialising and a flush, and 256 of them back to back
/// (every group holding the oldest segment) stalled appends for over a second.
const COMPACTION_ROUND: Duration = Duration::from_millis(100);
/// Snapshots taken per round (20 a second): every group of a default node in under 13 s.
const SNAPSHOTS_PER_ROUND: usize = 2;

/// Keeps each group's log short (snapshot after `snapshot_every_entries`) and the log on disk
/// bounded: past `snapshot_every_bytes`, groups holding the oldest segment snapshot too; then
/// segments nobody needs are deleted. Snapshots are paced; past twice the byte bound the
/// pace gives way and every group holding the oldest segment snapshots at once.
pub(crate) async fn compact_log(node: Weak<Node>) {
    let mut last_forced: Vec<Option<Instant>> = Vec::new();
    loop {
        tokio::time::sleep(COMPACTION_ROUND).await;
        let Some(node) = node.upgrade() else { return };
        if node.is_stopping() {
            return;
        }
        if last_forced.is_empty() {
            last_forced = vec![None; node.groups.len()];
        }
        // Only groups holding a closed segment: the one being written cannot be freed.
        let (_, pinning) = node.log.pinning_groups();
        let every = node.config().snapshot_every_entries;
        let (due, forced) = snapshots_due(
            node.log.disk_bytes(),
            node.config().snapshot_every_bytes,
            &pinning,
            |g| last_forced[g as usize].is_some_and(|t| t.elapsed() < Duration::from_secs(10)),
            node.groups
                .iter()
                .filter(|g| node.entries_since_snapshot(g) >= every)
                .map(|g| g.index),
        );
        for &g in &due[..forced] {
            last_forced[g as usize] = Some(Instant::now());
        }
        let worker = node.clone();
        drop(node);
        let result = tokio::task::spawn_blocking(move || {
            for g in due {
                if let Err(e) = worker.compact_group(&worker.groups[g as usize]) {
                    tracing::error!(group = g, error = %e, "snapshot failed; the log keeps growing until one succeeds");
                }
            }
            worker.log.collect_garbage()
        })
        .await;
        match result {
            Ok(Ok(0)) | Err(_) => {}
            Ok(Ok(n)) => tracing::debug!(segments = n, "deleted log segments no group needs"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not delete old log segments"),
        }
    }
}

/// The groups one compaction round snapshots, and how many of them (the first) are forced by
/// the log's size. Past `bound` bytes on disk, the groups still holding the oldest closed
/// segment (`pinning`; empty if the oldest is the one being written) come first, except those
/// forced within the last 10 s (`recently_forced`); then groups with enough entries since
/// their last snapshot (`over_entries`). At most [`SNAPSHOTS_PER_ROUND`], unless the log is
/// past twice its bound.
fn snapshots_due(
    disk: u64,
    bound: u64,
    pinning: &[u32],
    recently_forced: impl Fn(u32) -> bool,
    over_entries: impl Iterator<Item = u32>,
) -> (Vec<u32>, usize) {
    let budget = if disk > bound.saturating_mul(2) {
        usize::MAX
    } else {
        SNAPSHOTS_PER_ROUND
    };
    let mut due: Vec<u32> = Vec::new();
    if disk > bound {
        due.extend(
            pinning
                .iter()
                .copied()
                .filter(|&g| !recently_forced(g))
                .take(budget),
        );
    }
    let forced = due.len();
    for g in over_entries {
        if due.len() >= budget {
            break;
        }
        if !due.contains(&g) {
            due.push(g);
        }
    }
    (due, forced)
}

/// How often memory is checked against the budget: what arrives meanwhile is the most the
/// budget can be overrun by.
const SPILL_CHECK: Duration = Duration::from_millis(100);

/// Keeps the events held in memory under the node's budget by spilling to local disk, and
/// every 10 s lets go of spill segments the archive has caught up with.
pub(crate) async fn spill(node: Weak<Node>) {
    let mut round = 0u64;
    loop {
        tokio::time::sleep(SPILL_CHECK).await;
        let Some(node) = node.upgrade() else { return };
        if node.is_stopping() {
            return;
        }
        round += 1;
        let over = node.hot_bytes() > node.config().hot_max_bytes;
        let sweep = round.is_multiple_of(100);
        if !over && !sweep {
            continue;
        }
        let worker = node.clone();
        drop(node);
        let _ = tokio::task::spawn_blocking(move || {
            if over {
                match worker.spill_over_budget() {
                    Ok(freed) => tracing::debug!(freed, "spilled events to local disk"),
                    Err(e) => tracing::error!(error = %e, "cannot spill events to local disk; memory grows until it can"),
                }
            }
            if sweep {
                for g in &worker.groups {
                    let result = if worker.snapshot_pins_spill(g) {
                        worker.compact_group(g)
                    } else {
                        Ok(())
                    }
                    .and_then(|_| worker.collect_spill_garbage(g).map(|_| ()));
                    if let Err(e) = result {
                        tracing::warn!(group = g.index, error = %e, "cannot delete spill segments the archive has caught up with");
                    }
                }
            }
        })
        .await;
    }
}

/// How often leadership is rebalanced, and how many groups one round moves at most. A node
/// that started first wins the elections of every group until its peers are up; the moves
/// bring each group back to its preferred leader within about a second of all nodes being
/// connected (85 groups each on 3 nodes of 256 groups), not over ten seconds of a cluster
/// that serves its first load with one node leading most groups. A move costs its group one
/// election's round trip.
const BALANCE_ROUND: Duration = Duration::from_millis(200);
const MOVES_PER_ROUND: usize = 16;

/// Moves leadership of each group to its preferred member when that member is connected and
/// caught up, so leaders (and the write load) spread evenly over the nodes.
pub(crate) async fn balance_leaders(node: Weak<Node>) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    loop {
        tokio::time::sleep(BALANCE_ROUND).await;
        let Some(node) = node.upgrade() else { return };
        if node.is_stopping() {
            return;
        }
        let Some(transport) = node.transport.clone() else {
            return;
        };
        let me = node.map.me();
        let now = node.now();
        let mut moved = 0;
        for g in &node.groups {
            if moved >= MOVES_PER_ROUND {
                break;
            }
            let preferred = node.map.preferred_leader(g.index);
            let Some(core) = &g.core else { continue };
            if preferred == me || !transport.is_connected(preferred) {
                continue;
            }
            let mut core = core.lock();
            if core.raft.is_transferring() {
                continue;
            }
            let status = core.raft.status();
            let caught_up = status.role == Role::Leader
                && status.peers.iter().any(|p| {
                    p.id == preferred && p.matched == status.last_index && p.silent_ms < 500
                });
            if caught_up {
                tracing::debug!(
                    group = g.index,
                    to = node.map.name_of(preferred),
                    "moving leadership to the preferred node"
                );
                core.raft.transfer_leadership(preferred, now);
                node.drive(g, &mut core);
                moved += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1024 * 1024;

    #[test]
    fn below_the_bound_only_groups_over_their_entry_count_snapshot_a_few_at_a_time() {
        let (due, forced) = snapshots_due(
            100 * MB,
            256 * MB,
            &[1, 2, 3],
            |_| false,
            [7, 8, 9].into_iter(),
        );
        assert_eq!((due, forced), (vec![7, 8], 0));
    }

    #[test]
    fn past_the_bound_groups_holding_the_oldest_segment_come_first_paced() {
        let (due, forced) =
            snapshots_due(300 * MB, 256 * MB, &[1, 2, 3], |_| false, [9].into_iter());
        assert_eq!((due, forced), (vec![1, 2], 2));
        // Recently forced groups wait; the rest of the round goes to entry-count snapshots.
        let (due, forced) = snapshots_due(
            300 * MB,
            256 * MB,
            &[1, 2, 3],
            |g| g != 3,
            [3, 9].into_iter(),
        );
        assert_eq!((due, forced), (vec![3, 9], 1));
    }

    #[test]
    fn past_twice_the_bound_every_group_holding_the_oldest_segment_snapshots_at_once() {
        let pinning: Vec<u32> = (0..256).collect();
        let (due, forced) = snapshots_due(
            600 * MB,
            256 * MB,
            &pinning,
            |_| false,
            [3, 300].into_iter(),
        );
        assert_eq!(forced, 256);
        assert_eq!(due.len(), 257, "group 3 is not taken twice; 300 joins");
    }
}
