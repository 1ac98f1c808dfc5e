//! A Starcite node's groups. Sessions hash into `groups` Raft groups, each replicated on up to
//! three nodes (the engine is `starcite-raft`); every group's log records go through the one
//! node-wide log (group commit), and readers see only what a quorum of the group's replicas
//! has made durable.

mod archive_api;
mod background;
mod data_dir;
mod error;
mod group;
mod node;
pub mod node_log;
mod peer;
pub mod placement;
pub mod priority;
mod reclaim;
pub mod rpc;
mod spill;
pub mod state_machine;
pub mod transport;

pub use archive_api::{
    read_archived, ArchiveBacklog, ArchiveLag, ArchiveReadError, ArchiveReader, ArchiveRun,
};
pub use error::NodeError;
pub use node::{AppendOutcome, ClusterState, Node, NodeConfig, NodeStats, Subscription};
