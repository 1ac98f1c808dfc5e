//! The openraft type configuration: Starcite commands go in, apply answers come out.

use crate::state_machine::GroupStateMachine;
use starcite_core::{Applied, Command};

openraft::declare_raft_types!(
    /// Starcite's openraft types. Node ids are derived from node names (see `placement`).
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
);

pub type NodeId = u64;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
/// A snapshot is one group's state, postcard-encoded.
pub type SnapshotData = Vec<u8>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotData>;
pub type Raft = openraft::Raft<TypeConfig, GroupStateMachine>;
