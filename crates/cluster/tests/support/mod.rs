//! Shared by the node-level tests.

use starcite_cluster::{Node, NodeConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Opens a node and waits (at most 10 s) until it can serve appends.
pub async fn open_ready(config: NodeConfig) -> Arc<Node> {
    let node = Node::open(config, None).await.expect("node opens");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.is_ready() {
        assert!(Instant::now() < deadline, "node never became ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node
}
