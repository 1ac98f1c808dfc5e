//! openraft's network for every group, over the shared [`Transport`]: each RPC is tagged with
//! its group and travels on the one connection to the target node (openraft-multi binds the
//! target and group; this router does the sending).

use crate::rpc::{RaftRequest, Request, Response};
use crate::transport::{CallError, Transport};
use crate::types::{NodeId, Snapshot, SnapshotData, TypeConfig, Vote};
use openraft::error::{
    NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft_multi::{GroupNetworkAdapter, GroupNetworkFactory, GroupRouter};
use std::sync::Arc;

#[derive(Clone)]
pub struct Router {
    me: NodeId,
    transport: Arc<Transport>,
}

impl Router {
    pub fn new(me: NodeId, transport: Arc<Transport>) -> Self {
        Router { me, transport }
    }

    async fn call(
        &self,
        target: NodeId,
        group: u32,
        rpc: RaftRequest,
        action: RPCTypes,
        option: &RPCOption,
    ) -> Result<Response, CallFailure> {
        let timeout = option.hard_ttl();
        self.transport
            .call(target, &Request::Raft { group, rpc }, timeout)
            .await
            .map_err(|e| match e {
                CallError::Timeout(..) => CallFailure::Timeout(Timeout {
                    action,
                    id: self.me,
                    target,
                    timeout,
                }),
                CallError::NotConnected(_) | CallError::Lost(_) => {
                    CallFailure::Unreachable(Unreachable::new(&e))
                }
                CallError::Remote(..) | CallError::Encode(_) => {
                    CallFailure::Network(NetworkError::new(&e))
                }
            })
    }
}

enum CallFailure {
    Timeout(Timeout<TypeConfig>),
    Unreachable(Unreachable<TypeConfig>),
    Network(NetworkError<TypeConfig>),
}

impl From<CallFailure> for RPCError<TypeConfig> {
    fn from(f: CallFailure) -> Self {
        match f {
            CallFailure::Timeout(t) => RPCError::Timeout(t),
            CallFailure::Unreachable(u) => RPCError::Unreachable(u),
            CallFailure::Network(n) => RPCError::Network(n),
        }
    }
}

impl From<CallFailure> for StreamingError<TypeConfig> {
    fn from(f: CallFailure) -> Self {
        match f {
            CallFailure::Timeout(t) => StreamingError::Timeout(t),
            CallFailure::Unreachable(u) => StreamingError::Unreachable(u),
            CallFailure::Network(n) => StreamingError::Network(n),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("peer answered {0} with the wrong message type")]
struct WrongAnswer(&'static str);

fn wrong(what: &'static str) -> NetworkError<TypeConfig> {
    NetworkError::new(&WrongAnswer(what))
}

impl GroupRouter<TypeConfig, u32> for Router {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &self,
        target: NodeId,
        group: u32,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .call(
                target,
                group,
                RaftRequest::Append(rpc),
                RPCTypes::AppendEntries,
                &option,
            )
            .await?
        {
            Response::Append(r) => Ok(r),
            _ => Err(RPCError::Network(wrong("append"))),
        }
    }

    async fn vote(
        &self,
        target: NodeId,
        group: u32,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .call(
                target,
                group,
                RaftRequest::Vote(rpc),
                RPCTypes::Vote,
                &option,
            )
            .await?
        {
            Response::Vote(r) => Ok(r),
            _ => Err(RPCError::Network(wrong("vote"))),
        }
    }

    async fn pre_vote(
        &self,
        target: NodeId,
        group: u32,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .call(
                target,
                group,
                RaftRequest::PreVote(rpc),
                RPCTypes::Vote,
                &option,
            )
            .await?
        {
            Response::Vote(r) => Ok(r),
            _ => Err(RPCError::Network(wrong("pre-vote"))),
        }
    }

    async fn full_snapshot(
        &self,
        target: NodeId,
        group: u32,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let rpc = RaftRequest::Snapshot {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot,
        };
        let send = self.call(target, group, rpc, RPCTypes::InstallSnapshot, &option);
        tokio::select! {
            r = send => match r? {
                Response::Snapshot(r) => Ok(r),
                _ => Err(StreamingError::Network(wrong("snapshot"))),
            },
            closed = cancel => Err(StreamingError::Closed(closed)),
        }
    }

    async fn transfer_leader(
        &self,
        target: NodeId,
        group: u32,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .call(
                target,
                group,
                RaftRequest::TransferLeader(req),
                RPCTypes::TransferLeader,
                &option,
            )
            .await?
        {
            Response::TransferLeader(r) => Ok(r),
            _ => Err(RPCError::Network(wrong("transfer-leader"))),
        }
    }
}

pub type NetworkFactory = GroupNetworkFactory<Router, u32>;

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = GroupNetworkAdapter<TypeConfig, u32, Router>;

    async fn new_client(&mut self, target: NodeId, _node: &openraft::BasicNode) -> Self::Network {
        GroupNetworkAdapter::new(self.factory.clone(), target, self.group_id)
    }
}

/// The network of a single-node cluster: there is nobody to talk to.
#[derive(Clone, Default)]
pub struct NoPeers;

#[derive(Debug, thiserror::Error)]
#[error("a single-node cluster has no peers")]
struct NoPeer;

impl GroupRouter<TypeConfig, u32> for NoPeers {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &self,
        _: NodeId,
        _: u32,
        _: AppendEntriesRequest<TypeConfig>,
        _: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(RPCError::Unreachable(Unreachable::new(&NoPeer)))
    }

    async fn vote(
        &self,
        _: NodeId,
        _: u32,
        _: VoteRequest<TypeConfig>,
        _: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(RPCError::Unreachable(Unreachable::new(&NoPeer)))
    }

    async fn pre_vote(
        &self,
        _: NodeId,
        _: u32,
        _: VoteRequest<TypeConfig>,
        _: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(RPCError::Unreachable(Unreachable::new(&NoPeer)))
    }

    async fn full_snapshot(
        &self,
        _: NodeId,
        _: u32,
        _: Vote,
        _: Snapshot,
        _: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        _: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        Err(StreamingError::Unreachable(Unreachable::new(&NoPeer)))
    }
}

pub type SoloNetworkFactory = GroupNetworkFactory<NoPeers, u32>;

impl RaftNetworkFactory<TypeConfig> for SoloNetworkFactory {
    type Network = GroupNetworkAdapter<TypeConfig, u32, NoPeers>;

    async fn new_client(&mut self, target: NodeId, _node: &openraft::BasicNode) -> Self::Network {
        GroupNetworkAdapter::new(self.factory.clone(), target, self.group_id)
    }
}
