//! Which nodes replicate which group, and which of them should lead it. Pure functions of the
//! cluster's node list, so every node computes the same answer without talking to the others.

use starcite_raft::NodeId;
use xxhash_rust::xxh3::xxh3_64;

/// Replicas per group (fewer when the cluster has fewer nodes).
pub const REPLICAS: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub id: NodeId,
    pub name: String,
    /// Internal (node-to-node) address, `host:port`.
    pub addr: String,
}

/// A node's id: a stable hash of its name, so ids survive adding or reordering nodes.
pub fn node_id(name: &str) -> NodeId {
    xxh3_64(format!("starcite-node:{name}").as_bytes()).max(1)
}

#[derive(Debug, Clone)]
pub struct ClusterMap {
    /// Sorted by name.
    nodes: Vec<NodeSpec>,
    me: NodeId,
    /// Per group: its replicas, best rendezvous score first.
    members: Vec<Vec<NodeId>>,
    /// Per group: the member that should lead it when it is healthy.
    preferred: Vec<NodeId>,
}

impl ClusterMap {
    /// `nodes` are `(name, addr)`; `me` must be one of the names.
    pub fn new(nodes: &[(String, String)], me: &str, groups: u32) -> Result<ClusterMap, String> {
        let mut specs: Vec<NodeSpec> = nodes
            .iter()
            .map(|(name, addr)| NodeSpec {
                id: node_id(name),
                name: name.clone(),
                addr: addr.clone(),
            })
            .collect();
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        for pair in specs.windows(2) {
            if pair[0].id == pair[1].id {
                return Err(format!(
                    "node names {:?} and {:?} collide; rename one",
                    pair[0].name, pair[1].name
                ));
            }
        }
        let me = specs
            .iter()
            .find(|n| n.name == me)
            .map(|n| n.id)
            .ok_or_else(|| format!("node {me:?} is not in the cluster's node list"))?;
        let members: Vec<Vec<NodeId>> = (0..groups).map(|g| rendezvous(&specs, g)).collect();
        let preferred = balance_leaders(&members, &specs);
        Ok(ClusterMap {
            nodes: specs,
            me,
            members,
            preferred,
        })
    }

    pub fn me(&self) -> NodeId {
        self.me
    }

    pub fn nodes(&self) -> &[NodeSpec] {
        &self.nodes
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.id == id)
    }

    pub fn name_of(&self, id: NodeId) -> &str {
        self.node(id).map(|n| n.name.as_str()).unwrap_or("?")
    }

    pub fn is_single_node(&self) -> bool {
        self.nodes.len() == 1
    }

    pub fn members(&self, group: u32) -> &[NodeId] {
        &self.members[group as usize]
    }

    pub fn is_member(&self, group: u32) -> bool {
        self.members(group).contains(&self.me)
    }

    pub fn preferred_leader(&self, group: u32) -> NodeId {
        self.preferred[group as usize]
    }

    /// `node`'s turn to stand for election when the group's leader goes silent: the preferred
    /// leader first, then the other members in placement order (which differs from group to
    /// group, so a dead node's groups pass to the survivors about evenly). `None` for a node
    /// that is not a member.
    pub fn election_rank(&self, group: u32, node: NodeId) -> Option<u32> {
        let preferred = self.preferred_leader(group);
        if node == preferred {
            return Some(0);
        }
        self.members(group)
            .iter()
            .filter(|&&m| m != preferred)
            .position(|&m| m == node)
            .map(|p| p as u32 + 1)
    }

    /// Identifies the configuration, so that nodes started with different node lists or group
    /// counts refuse to talk to each other rather than disagree about placement.
    pub fn fingerprint(&self) -> u64 {
        let mut text = format!("groups={};", self.members.len());
        for n in &self.nodes {
            text.push_str(&format!("{}@{};", n.name, n.addr));
        }
        xxh3_64(text.as_bytes())
    }
}

/// The group's replicas: the `REPLICAS` nodes with the highest hash of (node, group).
fn rendezvous(nodes: &[NodeSpec], group: u32) -> Vec<NodeId> {
    let mut scored: Vec<(u64, NodeId)> = nodes
        .iter()
        .map(|n| {
            let key = format!("{}:{group}", n.name);
            (xxh3_64(key.as_bytes()), n.id)
        })
        .collect();
    scored.sort_by(|a, b| b.cmp(a));
    scored
        .into_iter()
        .take(REPLICAS)
        .map(|(_, id)| id)
        .collect()
}

/// Preferred leaders spread evenly: each group goes to the member that leads the fewest
/// groups so far (ties to the better rendezvous score).
fn balance_leaders(members: &[Vec<NodeId>], nodes: &[NodeSpec]) -> Vec<NodeId> {
    let mut load: Vec<(NodeId, usize)> = nodes.iter().map(|n| (n.id, 0)).collect();
    members
        .iter()
        .map(|group| {
            let mut best = group[0];
            let mut best_load = usize::MAX;
            for id in group {
                let l = load.iter().find(|(n, _)| n == id).map_or(0, |(_, l)| *l);
                if l < best_load {
                    best = *id;
                    best_load = l;
                }
            }
            if let Some(entry) = load.iter_mut().find(|(n, _)| *n == best) {
                entry.1 += 1;
            }
            best
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<(String, String)> {
        (1..=n)
            .map(|i| (format!("n{i}"), format!("127.0.0.1:{}", 7100 + i)))
            .collect()
    }

    #[test]
    fn three_nodes_replicate_every_group_everywhere_with_balanced_leaders() {
        let map = ClusterMap::new(&nodes(3), "n2", 256).unwrap();
        let mut led = std::collections::HashMap::new();
        for g in 0..256 {
            assert_eq!(map.members(g).len(), 3);
            assert!(map.is_member(g));
            assert!(map.members(g).contains(&map.preferred_leader(g)));
            *led.entry(map.preferred_leader(g)).or_insert(0) += 1;
        }
        let counts: Vec<i32> = led.values().copied().collect();
        assert_eq!(counts.len(), 3);
        assert!(counts.iter().all(|&c| (85..=86).contains(&c)), "{counts:?}");
    }

    #[test]
    fn every_group_has_an_order_of_succession_that_spreads_a_dead_nodes_groups() {
        let map = ClusterMap::new(&nodes(3), "n1", 256).unwrap();
        let mut next_after = std::collections::HashMap::new();
        for g in 0..256 {
            let mut ranks: Vec<u32> = map
                .members(g)
                .iter()
                .map(|&m| map.election_rank(g, m).unwrap())
                .collect();
            ranks.sort_unstable();
            assert_eq!(ranks, vec![0, 1, 2]);
            assert_eq!(map.election_rank(g, map.preferred_leader(g)), Some(0));
            let next = *map
                .members(g)
                .iter()
                .find(|&&m| map.election_rank(g, m) == Some(1))
                .unwrap();
            *next_after
                .entry((map.preferred_leader(g), next))
                .or_insert(0) += 1;
        }
        // Each node's ~85 groups go about half to each of the other two.
        assert_eq!(next_after.len(), 6, "{next_after:?}");
        assert!(next_after.values().all(|&c| c >= 25), "{next_after:?}");
        assert_eq!(map.election_rank(0, node_id("n9")), None);
    }

    #[test]
    fn placement_is_the_same_on_every_node_and_in_any_order() {
        let a = ClusterMap::new(&nodes(5), "n1", 64).unwrap();
        let mut reversed = nodes(5);
        reversed.reverse();
        let b = ClusterMap::new(&reversed, "n4", 64).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        for g in 0..64 {
            assert_eq!(a.members(g), b.members(g));
            assert_eq!(a.members(g).len(), 3);
            assert_eq!(a.preferred_leader(g), b.preferred_leader(g));
        }
    }

    #[test]
    fn five_nodes_share_groups_and_leadership() {
        let map = ClusterMap::new(&nodes(5), "n1", 256).unwrap();
        let mut replicas = std::collections::HashMap::new();
        let mut led = std::collections::HashMap::new();
        for g in 0..256 {
            for m in map.members(g) {
                *replicas.entry(*m).or_insert(0) += 1;
            }
            *led.entry(map.preferred_leader(g)).or_insert(0) += 1;
        }
        assert!(
            replicas.values().all(|&c| c > 100 && c < 220),
            "{replicas:?}"
        );
        assert!(led.values().all(|&c| (50..=53).contains(&c)), "{led:?}");
    }

    #[test]
    fn bad_configurations_are_refused() {
        assert!(ClusterMap::new(&nodes(3), "n9", 8).is_err());
        let single = ClusterMap::new(&nodes(1), "n1", 8).unwrap();
        assert!(single.is_single_node());
        assert_eq!(single.members(3), &[node_id("n1")]);
        let other = ClusterMap::new(&nodes(1), "n1", 16).unwrap();
        assert_ne!(single.fingerprint(), other.fingerprint());
    }
}
