//! One HTTP/1.1 keep-alive connection per worker, so "64 connections" means exactly 64 TCP
//! connections.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;

pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

/// `http://host:port` → `host:port`.
pub fn authority(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("only http:// URLs are supported, got {url:?}"))?;
    Ok(rest.trim_end_matches('/').to_owned())
}

impl Conn {
    pub async fn connect(url: &str) -> Result<Conn, String> {
        let host = authority(url)?;
        let stream = tokio::net::TcpStream::connect(&host)
            .await
            .map_err(|e| format!("cannot connect to {host}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake with {host}: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Conn { sender, host })
    }

    /// Sends a request and returns the status and body.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<(u16, Bytes), String> {
        self.sender
            .ready()
            .await
            .map_err(|e| format!("connection lost: {e}"))?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host)
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| format!("bad request: {e}"))?;
        let response = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the response: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
}

/// A WebSocket client connection with a small read buffer. tungstenite's default (128 KiB) is
/// zero-filled on every read: with a thousand tailers that memset was 15% of the machine's CPU,
/// inflating the very latencies the harness measures.
pub async fn ws_connect(
    url: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    tokio_tungstenite::tungstenite::Error,
> {
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER);
    tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .map(|(ws, _)| ws)
}

/// Events are a few hundred bytes; a bigger frame is read in several steps.
const WS_READ_BUFFER: usize = 8 * 1024;

#[cfg(test)]
mod tests {
    use super::authority;

    #[test]
    fn parses_urls() {
        assert_eq!(
            authority("http://127.0.0.1:4000/").unwrap(),
            "127.0.0.1:4000"
        );
        assert!(authority("https://x").is_err());
    }
}
