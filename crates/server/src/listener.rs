//! The accept loop: HTTP/1.1 with upgrades (WebSocket), a cap on open connections with a clear
//! refusal past it, a header read timeout against slow clients, `TCP_NODELAY`, and graceful
//! shutdown that lets in-flight requests finish.

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

/// Counts live connections so shutdown can wait for them.
#[derive(Clone)]
pub struct ConnectionTracker(Arc<watch::Sender<usize>>);

impl Default for ConnectionTracker {
    fn default() -> Self {
        ConnectionTracker(Arc::new(watch::Sender::new(0)))
    }
}

pub struct ConnectionGuard(Arc<watch::Sender<usize>>);

impl ConnectionTracker {
    pub fn enter(&self) -> ConnectionGuard {
        self.0.send_modify(|n| *n += 1);
        ConnectionGuard(self.0.clone())
    }

    /// Waits until nothing is tracked any more.
    pub async fn drained(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 76\r\n\r\n{\"error\":\"unavailable\",\"message\":\"too many open connections; retry shortly\"}";

async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(REFUSAL).await?;
        stream.shutdown().await
    })
    .await;
}

/// Serves `router` until `shutdown` turns true, then stops accepting and returns once every
/// connection (including upgraded tails, which close themselves on shutdown) has ended.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
    connections: ConnectionTracker,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (stream, _peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!("starcite_connections_refused_total").increment(1);
            tokio::spawn(refuse(stream));
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let mut stop = shutdown.clone();
        let guard = connections.enter();
        tokio::spawn(async move {
            let _permit = permit;
            let _guard = guard;
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn refusal_is_a_complete_http_response() {
        let text = std::str::from_utf8(super::REFUSAL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let declared: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(declared, body.len());
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "unavailable");
    }
}
