//! Node-to-node transport: one long-lived TCP connection per pair of nodes, multiplexing every
//! group's Raft traffic and forwarded client requests in both directions.
//!
//! The node with the lower id dials; the other accepts. Each side can send requests and
//! answers on the connection; answers are matched to requests by id. A writer task coalesces
//! everything queued into one write. Frames larger than [`FRAGMENT`] (snapshots, big appends)
//! are cut into fragments on a second, lower-priority lane, interleaved with small frames, so a
//! snapshot transfer never holds up heartbeats or appends.
//!
//! Wire format: `[u32 length][u8 kind][body]` where `length` counts kind and body. Kind 0 is a
//! whole postcard-encoded [`Frame`]; kind 1 is a fragment `[u64 stream][u8 last][data]`.
//!
//! The reader takes a peer's frames in the batches they arrive in: while more whole frames are
//! already buffered it holds the node log's writer (see [`WalHolder`]), and it starts forwarded
//! writes itself (their proposal runs before it reads on), so the log records a batch causes —
//! follower entries, the leader's proposals — share one fsync.

use crate::placement::ClusterMap;
use crate::rpc::{ClientOp, Frame, RaftMessage, Request, Response};
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use serde::Serialize;
use starcite_raft::NodeId;
use starcite_storage::{WalHold, WalHolder};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

/// Frames at least this big go on the bulk lane, in fragments of this size.
const FRAGMENT: usize = 64 * 1024;
/// Largest frame a peer may send, whole or reassembled.
const MAX_FRAME: usize = 1024 * 1024 * 1024;
/// Most bytes of small frames merged into one socket write.
const WRITE_BATCH: usize = 1024 * 1024;
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Answers a peer's request.
pub type Handler =
    Arc<dyn Fn(NodeId, Request) -> BoxFuture<'static, Result<Response, String>> + Send + Sync>;
/// Takes a peer's Raft message for a group; runs on the connection's reader, so it must not
/// block.
pub type RaftHandler = Arc<dyn Fn(NodeId, u32, RaftMessage) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nothing was sent: safe to retry anywhere.
    #[error("no connection to node {0}")]
    NotConnected(String),
    /// The request may or may not have been executed.
    #[error("connection to node {0} lost before it answered")]
    Lost(String),
    #[error("node {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("node {0} failed the request: {1}")]
    Remote(String, String),
    #[error("cannot encode the request: {0}")]
    Encode(String),
}

/// Same layout as [`Frame`], borrowing what it sends.
#[derive(Serialize)]
enum FrameRef<'a> {
    #[allow(dead_code)]
    Hello {
        cluster: u64,
        from: u64,
    },
    Request {
        id: u64,
        request: &'a Request,
    },
    Response {
        id: u64,
        result: &'a Result<Response, String>,
    },
    Raft {
        group: u32,
        message: &'a RaftMessage,
    },
}

/// Bytes queued on one connection and not yet handed to the socket. Past this, sends are
/// refused: Raft resends what it could not send, a forwarded request fails as unavailable.
/// The queue is fed by bounded producers (Raft pipelines, write slots), so this is only
/// reached when the peer stops reading.
const MAX_QUEUED_BYTES: usize = if cfg!(test) {
    2 * 1024 * 1024
} else {
    256 * 1024 * 1024
};

struct Conn {
    /// Bytes in `urgent` and `bulk`.
    queued: Arc<AtomicUsize>,
    urgent: mpsc::UnboundedSender<Vec<u8>>,
    bulk: mpsc::UnboundedSender<Vec<u8>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<Response, String>>>>,
    next_id: AtomicU64,
    closed: watch::Sender<bool>,
}

impl Conn {
    /// Queues an encoded frame; false if the connection is gone or its queue is full.
    fn send(&self, frame: Vec<u8>) -> bool {
        if *self.closed.borrow() {
            return false;
        }
        let len = frame.len();
        // An empty queue takes any frame, so one big frame (a large answer) always goes.
        let before = self.queued.fetch_add(len, Ordering::Relaxed);
        if before > 0 && before + len > MAX_QUEUED_BYTES {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        let lane = if frame.len() >= FRAGMENT {
            &self.bulk
        } else {
            &self.urgent
        };
        if lane.send(frame).is_ok() {
            true
        } else {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            false
        }
    }

    fn close(&self) {
        self.closed.send_replace(true);
        // Dropping the senders wakes every caller waiting for an answer.
        self.pending.lock().clear();
    }
}

struct Peer {
    id: NodeId,
    name: String,
    addr: String,
    conn: watch::Sender<Option<Arc<Conn>>>,
    /// Connections made to this peer so far: a change means whatever was in flight on the
    /// previous one is lost.
    epoch: AtomicU64,
}

#[derive(Debug, Default)]
pub struct TransportStats {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub connects: AtomicU64,
}

pub struct Transport {
    me: NodeId,
    fingerprint: u64,
    peers: HashMap<NodeId, Arc<Peer>>,
    handler: OnceLock<Handler>,
    raft_handler: OnceLock<RaftHandler>,
    log_holder: OnceLock<WalHolder>,
    stop: watch::Sender<bool>,
    pub stats: TransportStats,
}

fn encode(frame: &FrameRef<'_>) -> Result<Vec<u8>, CallError> {
    postcard::to_allocvec(frame).map_err(|e| CallError::Encode(e.to_string()))
}

impl Transport {
    /// Starts accepting on `listener` and dialing the peers this node dials. Requests from
    /// peers are answered once [`Transport::set_handler`] is called. `agreed`: settings beyond
    /// the node list and group count that every node must share; a peer introducing itself
    /// with other settings is refused, as one with another node list is.
    pub fn start(map: &ClusterMap, listener: TcpListener, agreed: &str) -> Arc<Transport> {
        let me = map.me();
        let peers = map
            .nodes()
            .iter()
            .filter(|n| n.id != me)
            .map(|n| {
                (
                    n.id,
                    Arc::new(Peer {
                        id: n.id,
                        name: n.name.clone(),
                        addr: n.addr.clone(),
                        conn: watch::Sender::new(None),
                        epoch: AtomicU64::new(0),
                    }),
                )
            })
            .collect();
        let transport = Arc::new(Transport {
            me,
            fingerprint: xxhash_rust::xxh3::xxh3_64(
                format!("{:016x};{agreed}", map.fingerprint()).as_bytes(),
            ),
            peers,
            handler: OnceLock::new(),
            raft_handler: OnceLock::new(),
            log_holder: OnceLock::new(),
            stop: watch::Sender::new(false),
            stats: TransportStats::default(),
        });
        tokio::spawn(accept_loop(transport.clone(), listener));
        for peer in transport.peers.values() {
            if me < peer.id {
                tokio::spawn(dial_loop(transport.clone(), peer.clone()));
            }
        }
        transport
    }

    pub fn set_handler(&self, handler: Handler) {
        let _ = self.handler.set(handler);
    }

    pub fn set_raft_handler(&self, handler: RaftHandler) {
        let _ = self.raft_handler.set(handler);
    }

    /// The node log the handlers append to, held while a batch of frames is taken in.
    pub fn set_log_holder(&self, holder: WalHolder) {
        let _ = self.log_holder.set(holder);
    }

    /// Sends a group's Raft message if there is a connection to `to`; Raft retransmits what
    /// gets lost. Returns whether it was queued.
    pub fn send_raft(&self, to: NodeId, group: u32, message: &RaftMessage) -> bool {
        let Some(conn) = self.peers.get(&to).and_then(|p| p.conn.borrow().clone()) else {
            return false;
        };
        let Ok(bytes) = encode(&FrameRef::Raft { group, message }) else {
            return false;
        };
        let len = bytes.len() as u64;
        let sent = conn.send(bytes);
        if sent {
            self.stats.bytes_sent.fetch_add(len, Ordering::Relaxed);
        }
        sent
    }

    /// How many connections to `to` have been made so far.
    pub fn connection_epoch(&self, to: NodeId) -> u64 {
        self.peers
            .get(&to)
            .map_or(0, |p| p.epoch.load(Ordering::Relaxed))
    }

    pub fn is_connected(&self, to: NodeId) -> bool {
        self.peers
            .get(&to)
            .is_some_and(|p| p.conn.borrow().is_some())
    }

    /// Drops every connection; they are made again at once. Peers learn from the new
    /// connection that whatever they sent on the old one is lost, and send it again.
    pub fn reconnect_all(&self) {
        for peer in self.peers.values() {
            if let Some(conn) = peer.conn.send_replace(None) {
                conn.close();
            }
        }
    }

    /// Closes every connection and stops dialing and accepting.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
        for peer in self.peers.values() {
            if let Some(conn) = peer.conn.send_replace(None) {
                conn.close();
            }
        }
    }

    fn peer_name(&self, to: NodeId) -> String {
        self.peers
            .get(&to)
            .map(|p| p.name.clone())
            .unwrap_or_else(|| to.to_string())
    }

    /// Sends `request` to node `to` and waits up to `timeout` for its answer.
    pub async fn call(
        &self,
        to: NodeId,
        request: &Request,
        timeout: Duration,
    ) -> Result<Response, CallError> {
        let name = || self.peer_name(to);
        let conn = self
            .peers
            .get(&to)
            .and_then(|p| p.conn.borrow().clone())
            .ok_or_else(|| CallError::NotConnected(name()))?;
        let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = encode(&FrameRef::Request { id, request })?;
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().insert(id, tx);
        let len = bytes.len() as u64;
        if !conn.send(bytes) {
            conn.pending.lock().remove(&id);
            return Err(CallError::NotConnected(name()));
        }
        self.stats.bytes_sent.fetch_add(len, Ordering::Relaxed);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(response))) => Ok(response),
            Ok(Ok(Err(message))) => Err(CallError::Remote(name(), message)),
            Ok(Err(_)) => Err(CallError::Lost(name())),
            Err(_) => {
                conn.pending.lock().remove(&id);
                Err(CallError::Timeout(name(), timeout))
            }
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn dial_loop(transport: Arc<Transport>, peer: Arc<Peer>) {
    let mut stop = transport.stop.subscribe();
    let mut backoff = Duration::from_millis(50);
    loop {
        if *stop.borrow() {
            return;
        }
        let attempt = async {
            let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&peer.addr))
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| e.to_string())?;
            let hello = encode(&FrameRef::Hello {
                cluster: transport.fingerprint,
                from: transport.me,
            })
            .map_err(|e| e.to_string())?;
            write_whole(&mut stream, &hello)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<TcpStream, String>(stream)
        };
        let result = tokio::select! {
            r = attempt => r,
            _ = stopped(&mut stop) => return,
        };
        match result {
            Ok(stream) => {
                backoff = Duration::from_millis(50);
                tracing::info!(peer = %peer.name, addr = %peer.addr, "connected to peer");
                run_connection(transport.clone(), peer.clone(), stream).await;
                tracing::warn!(peer = %peer.name, "connection to peer closed; reconnecting");
            }
            Err(e) => {
                tracing::debug!(peer = %peer.name, addr = %peer.addr, error = %e, "cannot reach peer yet");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped(&mut stop) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn accept_loop(transport: Arc<Transport>, listener: TcpListener) {
    let mut stop = transport.stop.subscribe();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopped(&mut stop) => return,
        };
        let (mut stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a peer connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let transport = transport.clone();
        tokio::spawn(async move {
            let hello = tokio::time::timeout(HELLO_TIMEOUT, read_message(&mut stream)).await;
            let peer = match hello {
                Ok(Ok(Message::Whole(bytes))) => match Frame::decode(&bytes) {
                    Ok(Frame::Hello { cluster, from }) if cluster == transport.fingerprint => {
                        transport
                            .peers
                            .get(&from)
                            .filter(|p| p.id < transport.me)
                            .cloned()
                    }
                    Ok(Frame::Hello { .. }) => {
                        tracing::error!(%remote, "a peer with a different cluster configuration (CLUSTER_NODES, STARCITE_RAFT_GROUPS, or DATABASE_URL set on some nodes only) tried to connect; refused");
                        None
                    }
                    _ => None,
                },
                _ => None,
            };
            match peer {
                Some(peer) => {
                    tracing::info!(peer = %peer.name, "peer connected");
                    run_connection(transport, peer, stream).await;
                }
                None => {
                    tracing::debug!(%remote, "refused a connection that did not introduce itself as a peer")
                }
            }
        });
    }
}

/// Serves one connection until it fails, then forgets it.
async fn run_connection(transport: Arc<Transport>, peer: Arc<Peer>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    let (urgent_tx, urgent_rx) = mpsc::unbounded_channel();
    let (bulk_tx, bulk_rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let conn = Arc::new(Conn {
        queued: queued.clone(),
        urgent: urgent_tx,
        bulk: bulk_tx,
        pending: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        closed: watch::Sender::new(false),
    });
    if let Some(old) = peer.conn.send_replace(Some(conn.clone())) {
        old.close();
    }
    transport.stats.connects.fetch_add(1, Ordering::Relaxed);
    peer.epoch.fetch_add(1, Ordering::Relaxed);
    let writer = tokio::spawn(write_loop(
        write,
        queued,
        urgent_rx,
        bulk_rx,
        conn.closed.subscribe(),
    ));
    let mut stop = transport.stop.subscribe();
    tokio::select! {
        r = read_loop(transport.clone(), peer.id, conn.clone(), read) => {
            if let Err(e) = r {
                tracing::debug!(peer = %peer.name, error = %e, "peer connection ended");
            }
        }
        _ = stopped(&mut stop) => {}
    }
    conn.close();
    writer.abort();
    peer.conn.send_if_modified(|current| match current {
        Some(c) if Arc::ptr_eq(c, &conn) => {
            *current = None;
            true
        }
        _ => false,
    });
}

enum Message {
    Whole(Vec<u8>),
    Fragment {
        stream: u64,
        last: bool,
        data: Vec<u8>,
    },
}

async fn read_message<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<Message> {
    let len = r.read_u32_le().await? as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("peer frame of {len} bytes"),
        ));
    }
    let kind = r.read_u8().await?;
    match kind {
        0 => {
            let mut body = vec![0u8; len - 1];
            r.read_exact(&mut body).await?;
            Ok(Message::Whole(body))
        }
        1 if len > 10 => {
            let stream = r.read_u64_le().await?;
            let last = r.read_u8().await? != 0;
            let mut data = vec![0u8; len - 10];
            r.read_exact(&mut data).await?;
            Ok(Message::Fragment { stream, last, data })
        }
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unknown peer frame kind {kind}"),
        )),
    }
}

/// Whether `buf` starts with a whole message (so reading it will not wait).
fn has_whole_message(buf: &[u8]) -> bool {
    match buf.get(..4) {
        Some(len) => {
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            buf.len() - 4 >= len
        }
        None => false,
    }
}

async fn write_whole(stream: &mut TcpStream, frame: &[u8]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(frame.len() + 5);
    push_whole(&mut buf, frame);
    stream.write_all(&buf).await
}

fn push_whole(buf: &mut Vec<u8>, frame: &[u8]) {
    buf.extend_from_slice(&((frame.len() + 1) as u32).to_le_bytes());
    buf.push(0);
    buf.extend_from_slice(frame);
}

fn push_fragment(buf: &mut Vec<u8>, stream: u64, last: bool, data: &[u8]) {
    buf.extend_from_slice(&((data.len() + 10) as u32).to_le_bytes());
    buf.push(1);
    buf.extend_from_slice(&stream.to_le_bytes());
    buf.push(u8::from(last));
    buf.extend_from_slice(data);
}

/// Returns once the tasks already queued on this worker have run: it wakes itself, which puts
/// it behind them, without the I/O driver poll of `tokio::task::yield_now` (one more
/// `epoll_wait` per write, which cost what the coalescing saved).
#[derive(Default)]
struct YieldToQueued {
    yielded: bool,
}

impl std::future::Future for YieldToQueued {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.yielded {
            return std::task::Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

async fn write_loop(
    mut write: OwnedWriteHalf,
    queued: Arc<AtomicUsize>,
    mut urgent: mpsc::UnboundedReceiver<Vec<u8>>,
    mut bulk: mpsc::UnboundedReceiver<Vec<u8>>,
    mut closed: watch::Receiver<bool>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(256 * 1024);
    let mut current: Option<(u64, Vec<u8>, usize)> = None;
    let mut next_stream = 0u64;
    loop {
        if current.is_none() {
            tokio::select! {
                biased;
                m = urgent.recv() => match m {
                    Some(frame) => {
                        queued.fetch_sub(frame.len(), Ordering::Relaxed);
                        push_whole(&mut buf, &frame);
                    }
                    None => return,
                },
                m = bulk.recv() => match m {
                    Some(frame) => {
                        queued.fetch_sub(frame.len(), Ordering::Relaxed);
                        next_stream += 1;
                        current = Some((next_stream, frame, 0));
                    }
                    None => return,
                },
                _ = closed.wait_for(|c| *c) => return,
            }
            // The tasks ready on this worker (other groups' drives, other requests) often
            // queue frames for this peer too: they go out in this write, and the peer wakes
            // once for all of them (docs/benchmarks.md, eleventh session).
            YieldToQueued::default().await;
        }
        while buf.len() < WRITE_BATCH {
            match urgent.try_recv() {
                Ok(frame) => {
                    queued.fetch_sub(frame.len(), Ordering::Relaxed);
                    push_whole(&mut buf, &frame);
                }
                Err(_) => break,
            }
        }
        if current.is_none() {
            if let Ok(frame) = bulk.try_recv() {
                queued.fetch_sub(frame.len(), Ordering::Relaxed);
                next_stream += 1;
                current = Some((next_stream, frame, 0));
            }
        }
        if let Some((stream, data, offset)) = &mut current {
            let end = (*offset + FRAGMENT).min(data.len());
            push_fragment(&mut buf, *stream, end == data.len(), &data[*offset..end]);
            *offset = end;
            if end == data.len() {
                current = None;
            }
        }
        if write.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
    }
}

async fn read_loop(
    transport: Arc<Transport>,
    from: NodeId,
    conn: Arc<Conn>,
    read: OwnedReadHalf,
) -> std::io::Result<()> {
    let mut read = BufReader::with_capacity(256 * 1024, read);
    let mut assembling: HashMap<u64, Vec<u8>> = HashMap::new();
    let holder = transport.log_holder.get().cloned();
    let mut held: Option<WalHold> = None;
    loop {
        if !has_whole_message(read.buffer()) {
            // The batch is taken in: the log may write (before this task waits for more).
            held = None;
        }
        let message = read_message(&mut read).await?;
        if held.is_none() && has_whole_message(read.buffer()) {
            held = holder.as_ref().map(WalHolder::hold);
        }
        let bytes = match message {
            Message::Whole(bytes) => bytes,
            Message::Fragment { stream, last, data } => {
                if assembling.len() >= 64 && !assembling.contains_key(&stream) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "peer interleaved too many fragmented frames",
                    ));
                }
                let buf = assembling.entry(stream).or_default();
                if buf.len() + data.len() > MAX_FRAME {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "peer sent an oversized fragmented frame",
                    ));
                }
                buf.extend_from_slice(&data);
                if !last {
                    continue;
                }
                assembling.remove(&stream).unwrap_or_default()
            }
        };
        transport
            .stats
            .bytes_received
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let frame = Frame::decode(&bytes).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("peer frame: {e}"))
        })?;
        match frame {
            Frame::Response { id, result } => {
                if let Some(tx) = conn.pending.lock().remove(&id) {
                    let _ = tx.send(result);
                }
            }
            Frame::Request { id, request } => {
                let Some(handler) = transport.handler.get().cloned() else {
                    let refused: Result<Response, String> = Err("node is starting".into());
                    if let Ok(bytes) = encode(&FrameRef::Response {
                        id,
                        result: &refused,
                    }) {
                        conn.send(bytes);
                    }
                    continue;
                };
                let starts_a_write = matches!(
                    &request,
                    Request::Client { op, .. }
                        if matches!(**op, ClientOp::Append { .. } | ClientOp::Create { .. })
                );
                let conn = conn.clone();
                let transport = transport.clone();
                let mut answer = Box::pin(async move {
                    let result = handler(from, request).await;
                    let bytes = match encode(&FrameRef::Response {
                        id,
                        result: &result,
                    }) {
                        Ok(b) => b,
                        Err(e) => {
                            let failed: Result<Response, String> = Err(e.to_string());
                            match encode(&FrameRef::Response {
                                id,
                                result: &failed,
                            }) {
                                Ok(b) => b,
                                Err(_) => return,
                            }
                        }
                    };
                    let len = bytes.len() as u64;
                    if conn.send(bytes) {
                        transport.stats.bytes_sent.fetch_add(len, Ordering::Relaxed);
                    }
                });
                // A write's first step (checks, then proposing) runs here, inside the batch;
                // a task waits for its answer. A spawned task would propose after the batch.
                // Polling once with a no-op waker is fine: the task polls again.
                let pending = !starts_a_write || {
                    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                    answer.as_mut().poll(&mut cx).is_pending()
                };
                if pending {
                    tokio::spawn(answer);
                }
            }
            Frame::Raft { group, message } => {
                if let Some(handler) = transport.raft_handler.get() {
                    handler(from, group, message);
                }
            }
            Frame::Hello { .. } => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "unexpected hello",
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::{ClientOp, ClientReply};

    fn two_nodes() -> (ClusterMap, ClusterMap, TcpListener, TcpListener) {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let nodes = vec![
            ("a".to_string(), a.local_addr().unwrap().to_string()),
            ("b".to_string(), b.local_addr().unwrap().to_string()),
        ];
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (
            ClusterMap::new(&nodes, "a", 4).unwrap(),
            ClusterMap::new(&nodes, "b", 4).unwrap(),
            TcpListener::from_std(a).unwrap(),
            TcpListener::from_std(b).unwrap(),
        )
    }

    /// Answers `ReadEvents` with `limit` events of `after` bytes each, so tests can ask for
    /// big and small answers.
    fn echo_handler() -> Handler {
        Arc::new(|_from, request| {
            Box::pin(async move {
                match request {
                    Request::Client { op, .. } => match *op {
                        ClientOp::ReadEvents { after, limit, .. } => {
                            Ok(Response::Client(ClientReply::Events(
                                (0..limit)
                                    .map(|i| bytes::Bytes::from(vec![i as u8; after as usize]))
                                    .collect(),
                            )))
                        }
                        _ => Err("unexpected".into()),
                    },
                    _ => Err("unexpected".into()),
                }
            })
        })
    }

    fn read(after: u64, limit: u32) -> Request {
        Request::Client {
            group: 0,
            op: Box::new(ClientOp::ReadEvents {
                session_id: "s".into(),
                after,
                limit,
            }),
        }
    }

    async fn connected(t: &Transport, to: NodeId) {
        for _ in 0..200 {
            if t.is_connected(to) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never connected");
    }

    /// Two transports with echo handlers, connected to each other.
    async fn connected_pair() -> (Arc<Transport>, Arc<Transport>, ClusterMap, ClusterMap) {
        let (ma, mb, la, lb) = two_nodes();
        let a = Transport::start(&ma, la, "");
        let b = Transport::start(&mb, lb, "");
        a.set_handler(echo_handler());
        b.set_handler(echo_handler());
        connected(&a, mb.me()).await;
        connected(&b, ma.me()).await;
        (a, b, ma, mb)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_yielding_writer_runs_after_the_tasks_already_queued() {
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = |step: &'static str| {
            let order = order.clone();
            move || order.lock().expect("not poisoned").push(step)
        };
        let (start, end) = (record("writer starts"), record("writer writes"));
        let writer = tokio::spawn(async move {
            start();
            YieldToQueued::default().await;
            end();
        });
        let queued = record("queued task runs");
        let other = tokio::spawn(async move { queued() });
        writer.await.expect("writer ran");
        other.await.expect("other task ran");
        assert_eq!(
            *order.lock().expect("not poisoned"),
            ["writer starts", "queued task runs", "writer writes"]
        );
    }

    #[tokio::test]
    async fn both_sides_call_over_one_connection_and_big_answers_interleave() {
        let (a, b, ma, mb) = connected_pair().await;
        // A 5 MB answer (fragmented) while small calls go the other way and this way.
        let big_request = read(1024 * 1024, 5);
        let big = a.call(mb.me(), &big_request, Duration::from_secs(10));
        let small = async {
            for _ in 0..50 {
                let r = b.call(ma.me(), &read(10, 1), Duration::from_secs(5)).await;
                assert!(
                    matches!(r, Ok(Response::Client(ClientReply::Events(e))) if e[0].len() == 10)
                );
            }
        };
        let (big, ()) = tokio::join!(big, small);
        match big {
            Ok(Response::Client(ClientReply::Events(events))) => {
                assert_eq!(events.len(), 5);
                assert!(events.iter().all(|e| e.len() == 1024 * 1024));
                assert!(events[3].iter().all(|&b| b == 3));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(a.stats.connects.load(Ordering::Relaxed), 1);
        a.shutdown();
        b.shutdown();
    }

    /// Nodes that disagree on a setting they must share (whether the archive is shared) never
    /// connect, so they cannot replicate anything to each other.
    #[tokio::test]
    async fn peers_that_disagree_on_shared_settings_are_refused() {
        let (ma, mb, la, lb) = two_nodes();
        let a = Transport::start(&ma, la, "archive=shared");
        let b = Transport::start(&mb, lb, "archive=per-node");
        a.set_handler(echo_handler());
        b.set_handler(echo_handler());
        // The dialer may believe it is connected until the other side drops the connection;
        // no call ever gets through either way.
        for _ in 0..10 {
            let there = a.call(mb.me(), &read(1, 1), Duration::from_secs(1)).await;
            let back = b.call(ma.me(), &read(1, 1), Duration::from_secs(1)).await;
            assert!(there.is_err() && back.is_err(), "{there:?} {back:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        a.shutdown();
        b.shutdown();
    }

    #[tokio::test]
    async fn unreachable_peers_fail_fast_and_reconnect_later() {
        let (ma, mb, la, lb) = two_nodes();
        let a = Transport::start(&ma, la, "");
        a.set_handler(echo_handler());
        let r = a.call(mb.me(), &read(1, 1), Duration::from_secs(1)).await;
        assert!(matches!(r, Err(CallError::NotConnected(_))), "{r:?}");
        // The peer comes up later: the dialer finds it.
        let b = Transport::start(&mb, lb, "");
        b.set_handler(echo_handler());
        connected(&a, mb.me()).await;
        assert!(a
            .call(mb.me(), &read(1, 1), Duration::from_secs(5))
            .await
            .is_ok());
        // The peer goes away: callers learn it instead of hanging.
        b.shutdown();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = a.call(mb.me(), &read(1, 1), Duration::from_secs(2)).await;
        assert!(
            matches!(r, Err(CallError::NotConnected(_)) | Err(CallError::Lost(_))),
            "{r:?}"
        );
        a.shutdown();
    }

    #[tokio::test]
    async fn reconnect_all_makes_fresh_connections_both_sides_notice() {
        let (a, b, ma, mb) = connected_pair().await;
        let (ea, eb) = (a.connection_epoch(mb.me()), b.connection_epoch(ma.me()));
        assert_eq!((ea, eb), (1, 1));
        // Either side may be the one that starts over (the acceptor or the dialer).
        b.reconnect_all();
        for _ in 0..300 {
            if a.connection_epoch(mb.me()) > ea && b.connection_epoch(ma.me()) > eb {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            a.connection_epoch(mb.me()) > ea,
            "the peer saw a new connection"
        );
        assert!(b.connection_epoch(ma.me()) > eb);
        connected(&a, mb.me()).await;
        connected(&b, ma.me()).await;
        assert!(b
            .call(ma.me(), &read(1, 1), Duration::from_secs(5))
            .await
            .is_ok());
        a.shutdown();
        b.shutdown();
    }

    #[tokio::test]
    async fn a_peer_that_stops_reading_fills_a_bounded_queue_then_drains_it() {
        let (ma, mb, la, lb) = two_nodes();
        // Only the dialing side runs a transport; the other side is a socket nobody reads.
        let (map, me_listener, silent, peer) = if ma.me() < mb.me() {
            (ma, la, lb, mb.me())
        } else {
            (mb, lb, la, ma.me())
        };
        let t = Transport::start(&map, me_listener, "");
        let (socket, _) = silent.accept().await.expect("the transport dials");
        connected(&t, peer).await;
        let snapshot = RaftMessage::Snapshot {
            term: 1,
            index: 1,
            snapshot_term: 1,
            data: bytes::Bytes::from(vec![1u8; 1024 * 1024]),
            sent_at: 0,
        };
        // Kernel buffers take some megabytes; then the queue fills to its bound and refuses.
        let mut accepted = 0usize;
        let mut refused = false;
        for _ in 0..256 {
            if t.send_raft(peer, 0, &snapshot) {
                accepted += 1;
            } else {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(refused, "256 MiB queued for a peer that reads nothing");
        assert!(accepted > 1, "some went out before the queue filled");
        // The peer reads again: the queue drains and sends are accepted again.
        tokio::spawn(async move {
            let mut socket = socket;
            let mut buf = vec![0u8; 1024 * 1024];
            while let Ok(n) = socket.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        let mut accepted_again = false;
        for _ in 0..500 {
            if t.send_raft(peer, 0, &snapshot) {
                accepted_again = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(accepted_again, "the queue drained once the peer read");
        t.shutdown();
    }

    #[tokio::test]
    async fn a_batch_of_frames_and_the_writes_it_starts_share_one_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Arc::new(
            starcite_storage::Wal::open(
                starcite_storage::WalOptions {
                    dir: dir.path().to_path_buf(),
                    segment_bytes: 1 << 20,
                    segment_header: None,
                    // Long, so the test does not race the writer.
                    hold_wait: Duration::from_secs(1),
                    write_spacing: starcite_storage::WriteSpacing::NONE,
                },
                |_, _| {},
            )
            .unwrap(),
        );
        let (ma, mb, la, lb) = two_nodes();
        let a = Transport::start(&ma, la, "");
        let b = Transport::start(&mb, lb, "");
        a.set_log_holder(wal.holder());
        // On A, a forwarded append's first step queues a log record (as proposing does), then
        // it waits until the record is durable; a Raft message queues one too. Both take a
        // while first, far longer than the writer takes to start on a record nobody holds.
        let slow = || std::thread::sleep(Duration::from_millis(20));
        let log = wal.clone();
        a.set_handler(Arc::new(move |_from, _request| {
            slow();
            let (tx, rx) = oneshot::channel();
            log.append(
                b"proposal",
                Box::new(move |r| {
                    let _ = tx.send(r.is_ok());
                }),
            );
            Box::pin(async move {
                match rx.await {
                    Ok(true) => Ok(Response::HasData(true)),
                    _ => Err("not durable".into()),
                }
            })
        }));
        let log = wal.clone();
        a.set_raft_handler(Arc::new(move |_from, _group, _message| {
            slow();
            log.append(b"entry", Box::new(|_| {}));
        }));
        b.set_handler(echo_handler());
        connected(&a, mb.me()).await;
        connected(&b, ma.me()).await;

        // B queues a forwarded append, then a Raft message, before its writer runs (this
        // test's runtime has one thread), so they reach A in one write.
        let append = Request::Client {
            group: 0,
            op: Box::new(ClientOp::Append {
                session_id: "s".into(),
                request: starcite_core::AppendRequest::parse(
                    br#"{"type":"t","actor":"a","payload":{}}"#,
                )
                .unwrap(),
            }),
        };
        let call = b.call(ma.me(), &append, Duration::from_secs(5));
        tokio::pin!(call);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(call.as_mut().poll(&mut cx).is_pending());
        let heartbeat = RaftMessage::AppendResponse {
            term: 1,
            success: true,
            match_index: 0,
            hint: 0,
            sent_at: 0,
        };
        assert!(b.send_raft(ma.me(), 0, &heartbeat));
        assert!(matches!(call.await, Ok(Response::HasData(true))));
        let stats = wal.stats();
        assert_eq!(stats.records_written.load(Ordering::Relaxed), 2);
        assert_eq!(
            stats.fsyncs.load(Ordering::Relaxed),
            1,
            "the Raft message's record and the append's proposal went into one fsync"
        );
    }
}
