//! A Starcite node's groups. Sessions hash into `groups` openraft groups, each replicated on
//! up to three nodes; every group's log records go through the one node-wide log (group
//! commit), and readers see only what a quorum of the group's replicas has made durable.

mod error;
pub mod log_store;
mod network;
mod node;
pub mod placement;
pub mod rpc;
pub mod state_machine;
pub mod transport;
pub mod types;

pub use error::NodeError;
pub use node::{
    AppendOutcome, ArchiveBacklog, ArchiveLag, ArchiveRun, Node, NodeConfig, NodeStats,
    Subscription,
};
