//! A Starcite node's groups. Sessions hash into `groups` independent state machines; every
//! group's commands go through the one node-wide log (group commit), and a command's effects
//! become visible to readers only once the log has fsync'd it.
//!
//! Today every group has a single voter: this node. The group is the unit that replication
//! will work on, so the routing, the per-group log records and the "visible only when durable"
//! rule are already in the shape a replicated group needs.

mod error;
mod node;
mod recovery;

pub use error::NodeError;
pub use node::{
    AppendOutcome, ArchiveBacklog, ArchiveLag, ArchiveRun, Node, NodeConfig, NodeStats,
};
