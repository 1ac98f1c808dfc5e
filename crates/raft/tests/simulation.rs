//! Deterministic simulation of a replicated group: several engines, a network that delays,
//! drops, duplicates and partitions messages, disks that make writes durable late, crashes that
//! lose everything not yet durable, and log compaction with snapshot transfer. Everything comes
//! from one seed, so a failing seed replays exactly.
//!
//! Checked on every run: at most one leader per term; every node applies the same payload at
//! the same index (state machine safety); and, after the faults stop, every proposal a leader
//! acknowledged (applied at the index and term it was proposed with) is applied on every node,
//! exactly once.

use starcite_raft::{Config, Entry, HardState, Message, Raft, Ready, Restored, Role};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Op(u64);

fn size(_: &Op) -> usize {
    64
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What a node's disk holds.
#[derive(Default, Clone)]
struct Disk {
    hs: HardState,
    /// A hard state was ever written.
    hs_written: bool,
    /// Written (durably, first thing) when the node started on an empty disk in a cluster
    /// that has data: the real node keeps it in its meta file.
    rejoin_marker: bool,
    entries: Vec<Entry<Op>>,
    /// (index, term, applied payloads up to index)
    snapshot: (u64, u64, Vec<u64>),
}

impl Disk {
    fn write_entries(&mut self, entries: &[Entry<Op>]) {
        for e in entries {
            while self.entries.last().is_some_and(|l| l.index >= e.index) {
                self.entries.pop();
            }
            if e.index > self.snapshot.0 {
                self.entries.push(e.clone());
            }
        }
    }
}

struct Pending {
    seq: u64,
    due: u64,
    hs: Option<HardState>,
    entries: Vec<Entry<Op>>,
    install: Option<(u64, u64, Vec<u64>)>,
}

struct Node {
    raft: Option<Raft<Op>>,
    disk: Disk,
    pending: VecDeque<Pending>,
    gated: Vec<(u64, u64, Message<Op>)>,
    handed: u64,
    durable: u64,
    applied: Vec<u64>,
    /// index → (term, payload) of proposals this node made as leader.
    proposals: HashMap<u64, (u64, u64)>,
}

struct Sim {
    rng: Rng,
    now: u64,
    ids: Vec<u64>,
    nodes: BTreeMap<u64, Node>,
    network: Vec<(u64, u64, u64, Message<Op>)>,
    blocked: BTreeSet<(u64, u64)>,
    leaders: HashMap<u64, u64>,
    global: HashMap<u64, u64>,
    acked: BTreeSet<u64>,
    next_op: u64,
    drop_percent: u64,
}

const ELECTION: u64 = 100;

fn config(id: u64, ids: &[u64], seed: u64) -> Config {
    let mut c = Config::new(id, ids.to_vec());
    c.election_timeout_ms = ELECTION;
    c.heartbeat_ms = 20;
    c.max_append_entries = 8;
    c.max_inflight = 3;
    // The same ratio to the election timeout as the real default (10 s to 500 ms).
    c.snapshot_timeout_ms = 20 * ELECTION;
    c.seed = seed;
    c
}

impl Sim {
    fn new(seed: u64, n: u64) -> Sim {
        let ids: Vec<u64> = (1..=n).collect();
        let mut nodes = BTreeMap::new();
        for &id in &ids {
            let raft = Raft::new(config(id, &ids, seed), Restored::default(), 0, size);
            nodes.insert(
                id,
                Node {
                    raft: Some(raft),
                    disk: Disk::default(),
                    pending: VecDeque::new(),
                    gated: Vec::new(),
                    handed: 0,
                    durable: 0,
                    applied: Vec::new(),
                    proposals: HashMap::new(),
                },
            );
        }
        Sim {
            rng: Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
            now: 0,
            ids,
            nodes,
            network: Vec::new(),
            blocked: BTreeSet::new(),
            leaders: HashMap::new(),
            global: HashMap::new(),
            acked: BTreeSet::new(),
            next_op: 1,
            drop_percent: 0,
        }
    }

    fn send(&mut self, from: u64, to: u64, msg: Message<Op>) {
        if self.blocked.contains(&(from, to)) || self.rng.chance(self.drop_percent) {
            return;
        }
        let delay = 1 + self.rng.below(8);
        if self.rng.chance(2) {
            self.network
                .push((self.now + delay + 5, from, to, msg.clone()));
        }
        self.network.push((self.now + delay, from, to, msg));
    }

    /// Takes and carries out everything the node's engine asks for.
    fn drive(&mut self, id: u64) {
        loop {
            let now = self.now;
            let ready: Ready<Op> = {
                let node = self.nodes.get_mut(&id).expect("node");
                let Some(raft) = node.raft.as_mut() else {
                    return;
                };
                if !raft.has_ready() {
                    break;
                }
                raft.take_ready()
            };
            let leader_term = {
                let raft = self.nodes[&id].raft.as_ref().expect("live");
                (raft.role() == Role::Leader).then(|| raft.term())
            };
            if std::env::var("SIM_TRACE").is_ok() {
                let r = self.nodes[&id].raft.as_ref().expect("live");
                if !ready.entries.is_empty()
                    || ready.install.is_some()
                    || ready.hard_state.is_some()
                {
                    eprintln!(
                        "{} node {id} {:?} term {} commit {} entries {:?} hs {:?} install {:?}",
                        self.now,
                        r.role(),
                        r.term(),
                        r.commit(),
                        ready
                            .entries
                            .iter()
                            .map(|e| (e.index, e.term))
                            .collect::<Vec<_>>(),
                        ready.hard_state,
                        ready.install.as_ref().map(|i| i.index)
                    );
                }
            }
            if let Some(term) = leader_term {
                if let Some(&other) = self.leaders.get(&term) {
                    assert_eq!(other, id, "two leaders in term {term}");
                }
                self.leaders.insert(term, id);
            }
            let install = ready.install.as_ref().map(|i| {
                let applied: Vec<u64> = serde_json::from_slice(&i.data).expect("snapshot data");
                (i.index, i.term, applied)
            });
            let node = self.nodes.get_mut(&id).expect("node");
            if let Some((_, _, applied)) = &install {
                node.applied = applied.clone();
            }
            let needs_disk =
                ready.hard_state.is_some() || !ready.entries.is_empty() || install.is_some();
            if needs_disk {
                node.handed += 1;
                let due = now + self.rng.below(20);
                node.pending.push_back(Pending {
                    seq: node.handed,
                    due,
                    hs: ready.hard_state,
                    entries: ready.entries,
                    install,
                });
            }
            let handed = node.handed;
            for (to, msg) in ready.gated {
                node.gated.push((handed, to, msg));
            }
            for (to, msg) in ready.messages {
                self.send(id, to, msg);
            }
            for to in ready.send_snapshot {
                let node = &self.nodes[&id];
                let (index, term, applied) = node.disk.snapshot.clone();
                let raft_term = node.raft.as_ref().expect("live").term();
                let data = bytes::Bytes::from(serde_json::to_vec(&applied).expect("encode"));
                self.send(
                    id,
                    to,
                    Message::Snapshot {
                        term: raft_term,
                        index,
                        snapshot_term: term,
                        data,
                        sent_at: now,
                    },
                );
            }
        }
        self.release_gated(id);
        self.apply(id);
    }

    fn release_gated(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("node");
        let durable = node.durable;
        let (ready, waiting): (Vec<_>, Vec<_>) = node
            .gated
            .drain(..)
            .partition(|(seq, _, _)| *seq <= durable);
        node.gated = waiting;
        for (_, to, msg) in ready {
            self.send(id, to, msg);
        }
    }

    fn apply(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("node");
        let Some(raft) = node.raft.as_mut() else {
            return;
        };
        for entry in raft.take_committed(usize::MAX) {
            if let Some(Op(op)) = entry.payload {
                node.applied.push(op);
            }
            let marker = entry.payload.as_ref().map(|o| o.0).unwrap_or(0);
            match self.global.get(&entry.index) {
                Some(&known) => assert_eq!(
                    known, marker,
                    "node {id} applied {marker} at index {} where another applied {known}",
                    entry.index
                ),
                None => {
                    self.global.insert(entry.index, marker);
                }
            }
            if let Some((term, op)) = node.proposals.remove(&entry.index) {
                if term == entry.term {
                    self.acked.insert(op);
                }
            }
        }
    }

    fn complete_disk(&mut self, id: u64) {
        let now = self.now;
        let node = self.nodes.get_mut(&id).expect("node");
        let mut changed = false;
        while node.pending.front().is_some_and(|p| p.due <= now) {
            let p = node.pending.pop_front().expect("front");
            if let Some(hs) = p.hs {
                node.disk.hs = hs;
                node.disk.hs_written = true;
            }
            if let Some(snapshot) = p.install {
                node.disk.entries.retain(|e| e.index > snapshot.0);
                node.disk.snapshot = snapshot;
            }
            node.disk.write_entries(&p.entries);
            node.durable = p.seq;
            if let (Some(raft), Some(last)) = (node.raft.as_mut(), p.entries.last()) {
                raft.persisted(last.index, last.term);
            }
            changed = true;
        }
        if changed {
            self.drive(id);
        }
    }

    fn crash(&mut self, id: u64) {
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!("{} crash {id}", self.now);
        }
        let node = self.nodes.get_mut(&id).expect("node");
        node.raft = None;
        node.pending.clear();
        node.gated.clear();
        node.proposals.clear();
    }

    /// The node comes back with an empty disk (replaced or wiped), knowing it.
    fn wipe(&mut self, id: u64, seed: u64) {
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!("{} wipe {id}", self.now);
        }
        self.crash(id);
        let node = self.nodes.get_mut(&id).expect("node");
        node.disk = Disk {
            rejoin_marker: true,
            ..Disk::default()
        };
        node.applied.clear();
        node.handed = 0;
        node.durable = 0;
        let mut cfg = config(id, &self.ids, seed ^ self.now);
        cfg.rejoining = true;
        node.raft = Some(Raft::new(cfg, Restored::default(), self.now, size));
    }

    fn restart(&mut self, id: u64, seed: u64) {
        let ids = self.ids.clone();
        let now = self.now;
        let node = self.nodes.get_mut(&id).expect("node");
        if node.raft.is_some() {
            return;
        }
        let (snap_index, snap_term, applied) = node.disk.snapshot.clone();
        let restored = Restored {
            hard_state: node.disk.hs,
            snapshot: (snap_index, snap_term),
            entries: node
                .disk
                .entries
                .iter()
                .filter(|e| e.index > snap_index)
                .cloned()
                .collect(),
            commit: 0,
        };
        node.applied = applied;
        node.handed = 0;
        node.durable = 0;
        let mut cfg = config(id, &ids, seed ^ now);
        // Until the first hard state is durable, the marker decides.
        cfg.rejoining = node.disk.rejoin_marker && !node.disk.hs_written;
        node.raft = Some(Raft::new(cfg, restored, now, size));
    }

    fn compact(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("node");
        let Some(raft) = node.raft.as_mut() else {
            return;
        };
        let applied = raft.applied();
        let Some(term) = raft.log().term_at(applied) else {
            return;
        };
        if applied <= raft.log().snap_index() {
            return;
        }
        // The snapshot is made durable before the log forgets what it covers.
        node.disk.snapshot = (applied, term, node.applied.clone());
        node.disk.entries.retain(|e| e.index > applied);
        raft.compact(applied);
    }

    fn propose(&mut self) {
        let leader = self
            .nodes
            .iter()
            .filter_map(|(&id, n)| n.raft.as_ref().filter(|r| r.is_leader()).map(|_| id))
            .next();
        let Some(id) = leader else { return };
        let op = self.next_op;
        self.next_op += 1;
        let now = self.now;
        let node = self.nodes.get_mut(&id).expect("node");
        if let Some(raft) = node.raft.as_mut() {
            if let Ok((index, term)) = raft.propose(Op(op), now) {
                node.proposals.insert(index, (term, op));
            }
        }
        self.drive(id);
    }

    fn step_time(&mut self) {
        self.now += 1;
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = self.network.drain(..).partition(|m| m.0 <= now);
        self.network = later;
        for (_, from, to, msg) in due {
            if let Some(raft) = self.nodes.get_mut(&to).and_then(|n| n.raft.as_mut()) {
                raft.step(from, msg, now);
                self.drive(to);
            }
        }
        for id in self.ids.clone() {
            self.complete_disk(id);
            if now.is_multiple_of(5) {
                if let Some(raft) = self.nodes.get_mut(&id).and_then(|n| n.raft.as_mut()) {
                    raft.tick(now);
                }
                self.drive(id);
            }
        }
    }

    fn partition(&mut self) {
        self.blocked.clear();
        let victim = self.ids[self.rng.below(self.ids.len() as u64) as usize];
        for &other in &self.ids {
            if other != victim {
                self.blocked.insert((victim, other));
                if self.rng.chance(70) {
                    self.blocked.insert((other, victim));
                }
            }
        }
    }

    fn leader_count(&self) -> usize {
        self.nodes
            .values()
            .filter(|n| n.raft.as_ref().is_some_and(|r| r.is_leader()))
            .count()
    }
}

fn run(seed: u64, n: u64, chaos_ms: u64) {
    let mut sim = Sim::new(seed, n);
    sim.drop_percent = 5;
    let mut down: Vec<u64> = Vec::new();
    for _ in 0..chaos_ms {
        sim.step_time();
        let r = sim.rng.below(1000);
        match r {
            0..=199 => sim.propose(),
            // Crash any node, leaders half of the time; several may be down at once (safety
            // must hold regardless; liveness is only checked after healing).
            200..=205 if down.len() < n as usize => {
                // Leaders half of the time: that is where durability bugs show.
                let leader = sim
                    .nodes
                    .iter()
                    .find(|(_, node)| node.raft.as_ref().is_some_and(|r| r.is_leader()))
                    .map(|(&id, _)| id);
                let id = match leader {
                    Some(l) if sim.rng.chance(50) => l,
                    _ => sim.ids[sim.rng.below(n) as usize],
                };
                if !down.contains(&id) {
                    sim.crash(id);
                    down.push(id);
                }
            }
            206..=211 if !down.is_empty() => {
                let id = down.remove(sim.rng.below(down.len() as u64) as usize);
                sim.restart(id, seed);
            }
            212..=214 => sim.partition(),
            215..=222 => sim.blocked.clear(),
            223..=230 => {
                let id = sim.ids[sim.rng.below(n) as usize];
                sim.compact(id);
            }
            232 => {
                // Wipe a node's disk while every other node is up and none is still catching
                // up from an earlier wipe: only this replica's data is lost (losing two
                // copies of a three-node group at once is beyond what Raft can survive).
                // (As recorded on disk: a node that caught up but crashed before saving that
                // would rejoin again, and two rejoining nodes of three cannot elect anyone.)
                let settled = sim.nodes.values().all(|n| {
                    n.raft.as_ref().is_some_and(|r| !r.is_rejoining()) && !n.disk.hs.rejoining
                });
                if down.is_empty() && settled {
                    let id = sim.ids[sim.rng.below(n) as usize];
                    sim.wipe(id, seed);
                }
            }
            231 => {
                let leader = sim
                    .nodes
                    .iter()
                    .find(|(_, node)| node.raft.as_ref().is_some_and(|r| r.is_leader()))
                    .map(|(&id, _)| id);
                if let Some(id) = leader {
                    let to = sim.ids[sim.rng.below(n) as usize];
                    let now = sim.now;
                    if let Some(raft) = sim.nodes.get_mut(&id).and_then(|n| n.raft.as_mut()) {
                        raft.transfer_leadership(to, now);
                    }
                    sim.drive(id);
                }
            }
            _ => {}
        }
    }
    // Heal: everything up, no partitions, no loss; then a burst of proposals must commit.
    sim.blocked.clear();
    sim.drop_percent = 0;
    for id in down.drain(..) {
        sim.restart(id, seed);
    }
    for _ in 0..3000 {
        sim.step_time();
    }
    if sim.leader_count() != 1 {
        for (id, node) in &sim.nodes {
            eprintln!("node {id}: {:?} rejoining={:?} lastterm={:?} pending={} gated={} handed={} durable={}", node.raft.as_ref().map(|r| r.status()), node.raft.as_ref().map(|r| r.is_rejoining()), node.raft.as_ref().map(|r| r.log().last_term()), node.pending.len(), node.gated.len(), node.handed, node.durable);
        }
    }
    assert_eq!(
        sim.leader_count(),
        1,
        "seed {seed}: one leader after healing"
    );
    let before = sim.acked.len();
    for _ in 0..20 {
        sim.propose();
        sim.step_time();
    }
    for _ in 0..2000 {
        sim.step_time();
    }
    assert!(
        sim.acked.len() >= before + 20,
        "seed {seed}: proposals after healing were not all acknowledged ({} -> {})",
        before,
        sim.acked.len()
    );
    eprintln!(
        "seed {seed}: {} acked, {} terms with a leader, {} log indexes committed",
        sim.acked.len(),
        sim.leaders.len(),
        sim.global.len()
    );
    if std::env::var("SIM_TRACE").is_ok() {
        for (id, node) in &sim.nodes {
            eprintln!("node {id}: {:?}", node.raft.as_ref().map(|r| r.status()));
        }
    }
    for (&id, node) in &sim.nodes {
        let mut seen = BTreeSet::new();
        for op in &node.applied {
            assert!(
                seen.insert(*op),
                "seed {seed}: node {id} applied {op} twice"
            );
        }
        for op in &sim.acked {
            assert!(
                seen.contains(op),
                "seed {seed}: acknowledged {op} missing on node {id}"
            );
        }
    }
}

/// Seeds to run: `SIM_SEED=n` replays one; `SIM_SEEDS=a..b` runs a range (long sweeps);
/// otherwise `default`.
fn seeds(default: std::ops::RangeInclusive<u64>) -> std::ops::RangeInclusive<u64> {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return seed..=seed;
    }
    std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|r| {
            let (a, b) = r.split_once("..")?;
            Some(a.parse().ok()?..=b.parse().ok()?)
        })
        .unwrap_or(default)
}

#[test]
fn three_nodes_survive_crashes_partitions_loss_wipes_and_compaction() {
    for seed in seeds(1..=400) {
        run(seed, 3, 6_000);
    }
}

#[test]
fn five_nodes_survive_crashes_partitions_loss_wipes_and_compaction() {
    for seed in seeds(1000..=1150) {
        run(seed, 5, 6_000);
    }
}

#[test]
fn a_single_voter_commits_on_its_own() {
    let mut sim = Sim::new(7, 1);
    for _ in 0..300 {
        sim.step_time();
    }
    for _ in 0..50 {
        sim.propose();
        sim.step_time();
    }
    for _ in 0..50 {
        sim.step_time();
    }
    assert_eq!(sim.acked.len(), 50);
}
