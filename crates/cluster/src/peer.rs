//! What a node answers its peers, and how a new node learns whether its cluster has data.

use crate::node::Node;
use crate::node_log::NodeLog;
use crate::placement::ClusterMap;
use crate::rpc::{Request, Response};
use crate::transport::{Handler, RaftHandler, Transport};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

/// Answers peers' requests. `HasData` is answered from the log even while the node starts
/// (a new peer may be waiting on it to decide how to join); the rest once the node is open.
pub(crate) fn request_handler(log: Arc<NodeLog>, node: Arc<OnceLock<Weak<Node>>>) -> Handler {
    Arc::new(move |_from, request| {
        let log = log.clone();
        let node = node.get().and_then(|n| n.upgrade());
        Box::pin(async move {
            match request {
                Request::HasData => Ok(Response::HasData(log.has_data())),
                Request::Client { group, op } => match node {
                    Some(node) => node.handle_client(group, *op).await,
                    None => Err("node is starting".into()),
                },
            }
        })
    })
}

/// Hands peers' Raft messages to the node's groups (dropped while it starts: Raft resends).
pub(crate) fn raft_handler(node: Arc<OnceLock<Weak<Node>>>) -> RaftHandler {
    Arc::new(move |from, group, message| {
        if let Some(node) = node.get().and_then(|n| n.upgrade()) {
            node.on_raft_message(from, group, message);
        }
    })
}

/// For a node starting with an empty data directory: does the cluster already hold data?
/// Yes as soon as one peer says it has some; no once a majority of the nodes (this one
/// included) say they have none. Until either, it keeps asking: deciding "no" too early could
/// let a node that lost its disk vote as if nothing had ever been written.
pub(crate) async fn cluster_has_data(transport: &Transport, map: &ClusterMap) -> bool {
    let peers: Vec<_> = map.nodes().iter().filter(|n| n.id != map.me()).collect();
    let majority = map.nodes().len() / 2 + 1;
    let mut rounds = 0u64;
    loop {
        let mut empty = 1; // this node
        for peer in &peers {
            match transport
                .call(peer.id, &Request::HasData, Duration::from_secs(2))
                .await
            {
                Ok(Response::HasData(true)) => return true,
                Ok(Response::HasData(false)) => empty += 1,
                _ => {}
            }
        }
        if empty >= majority {
            return false;
        }
        if rounds.is_multiple_of(25) {
            tracing::info!(
                answered_empty = empty,
                needed = majority,
                "new data directory: waiting for peers to tell whether this cluster has data"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        rounds += 1;
    }
}
