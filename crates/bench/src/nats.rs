//! A private `nats-server -js` and the part of the NATS protocol a JetStream publisher with
//! acknowledgements needs (CONNECT, SUB, PUB with a reply inbox, MSG).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub struct PrivateNats {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
    /// What this server version does about fsync, for the report.
    pub sync_note: String,
}

fn version() -> Option<(u32, u32)> {
    let out = Command::new("nats-server").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let v = text.split('v').nth(1)?.trim();
    let mut parts = v.split('.');
    Some((
        parts.next()?.parse().ok()?,
        parts.next()?.trim().parse().ok()?,
    ))
}

impl PrivateNats {
    /// Starts `nats-server` with JetStream (file storage) on a free loopback port in a temp
    /// dir. Servers 2.10+ are configured with `sync_interval: always` (fsync per message);
    /// older ones cannot be, and the note says so.
    pub async fn start() -> Result<PrivateNats, String> {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::start_once().await {
                Ok(nats) => return Ok(nats),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn start_once() -> Result<PrivateNats, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("no free port: {e}"))?;
        let per_message_fsync = version().is_some_and(|v| v >= (2, 10));
        let sync = if per_message_fsync {
            "\n  sync_interval: always"
        } else {
            ""
        };
        let config = format!(
            "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{}\"{sync}\n}}\n",
            dir.path().join("js").display()
        );
        let config_path = dir.path().join("nats.conf");
        std::fs::write(&config_path, config).map_err(|e| format!("nats config: {e}"))?;
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start nats-server (is it installed?): {e}"))?;
        let sync_note = if per_message_fsync {
            "JetStream file store, sync_interval: always (fsync per message)".to_string()
        } else {
            format!(
                "JetStream file store; nats-server {} has no per-message fsync (sync_interval needs 2.10+): acks after the write reaches the OS, fsync is periodic",
                version().map(|(a, b)| format!("{a}.{b}")).unwrap_or_else(|| "?".into())
            )
        };
        let mut nats = PrivateNats {
            port,
            child,
            _dir: dir,
            sync_note,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = nats.child.try_wait() {
                return Err(format!("nats-server exited at start-up ({status})"));
            }
            if let Ok(mut conn) = NatsConn::connect(port, 0).await {
                let create = br#"{"name":"BENCH","subjects":["bench.>"],"storage":"file","retention":"limits","discard":"old"}"#;
                match conn.request("$JS.API.STREAM.CREATE.BENCH", create).await {
                    Ok(reply) if !reply.contains("\"error\"") => return Ok(nats),
                    Ok(reply) => {
                        return Err(format!("creating the JetStream stream failed: {reply}"))
                    }
                    Err(_) => {}
                }
            }
            if Instant::now() > deadline {
                return Err("nats-server did not answer within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct NatsConn {
    reader: BufReader<TcpStream>,
    inbox: String,
}

impl NatsConn {
    pub async fn connect(port: u16, id: usize) -> Result<NatsConn, String> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect to nats: {e}"))?;
        let _ = stream.set_nodelay(true);
        let mut conn = NatsConn {
            reader: BufReader::new(stream),
            inbox: format!("_INBOX.bench.{id}"),
        };
        let info = conn.line().await?;
        if !info.starts_with("INFO") {
            return Err(format!("unexpected greeting: {info}"));
        }
        let hello = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":false}}\r\nSUB {} 1\r\nPING\r\n",
            conn.inbox
        );
        conn.write(hello.as_bytes()).await?;
        loop {
            match conn.line().await?.as_str() {
                "PONG" => return Ok(conn),
                l if l.starts_with("-ERR") => return Err(format!("nats refused: {l}")),
                _ => {}
            }
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.reader
            .get_mut()
            .write_all(bytes)
            .await
            .map_err(|e| format!("nats write: {e}"))
    }

    async fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .await
            .map_err(|e| format!("nats read: {e}"))?;
        if n == 0 {
            return Err("nats closed the connection".into());
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }

    /// Publishes `payload` to `subject` with this connection's inbox as the reply subject and
    /// returns the reply's body.
    pub async fn request(&mut self, subject: &str, payload: &[u8]) -> Result<String, String> {
        let mut msg = format!("PUB {subject} {} {}\r\n", self.inbox, payload.len()).into_bytes();
        msg.extend_from_slice(payload);
        msg.extend_from_slice(b"\r\n");
        self.write(&msg).await?;
        loop {
            let line = self.line().await?;
            if line == "PING" {
                self.write(b"PONG\r\n").await?;
                continue;
            }
            if line.starts_with("-ERR") {
                return Err(format!("nats error: {line}"));
            }
            if let Some(rest) = line.strip_prefix("MSG ") {
                let len: usize = rest
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| format!("bad MSG line: {line}"))?;
                let mut body = vec![0u8; len + 2];
                self.reader
                    .read_exact(&mut body)
                    .await
                    .map_err(|e| format!("nats read: {e}"))?;
                body.truncate(len);
                return Ok(String::from_utf8_lossy(&body).into_owned());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn publishes_with_acks_to_a_private_jetstream() {
        let nats = PrivateNats::start().await.expect("nats-server available");
        let mut conn = NatsConn::connect(nats.port, 1).await.unwrap();
        let first = conn.request("bench.s1", b"hello").await.unwrap();
        let second = conn.request("bench.s1", b"again").await.unwrap();
        let seq =
            |ack: &str| serde_json::from_str::<serde_json::Value>(ack).unwrap()["seq"].as_u64();
        assert_eq!(seq(&first), Some(1), "{first}");
        assert_eq!(seq(&second), Some(2), "{second}");
        assert!(!nats.sync_note.is_empty());
    }
}
