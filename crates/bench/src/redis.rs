//! A private `redis-server` with `appendonly yes, appendfsync always`, and just enough RESP to
//! drive `XADD` and `XRANGE`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub struct PrivateRedis {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl PrivateRedis {
    /// Starts `redis-server` on a free loopback port in a fresh temp dir: every write is
    /// fsync'd before the reply (`appendfsync always`). Retries on another port if the chosen
    /// one was taken in the meantime.
    pub async fn start() -> Result<PrivateRedis, String> {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::start_once().await {
                Ok(redis) => return Ok(redis),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn start_once() -> Result<PrivateRedis, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("no free port: {e}"))?;
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start redis-server (is it installed?): {e}"))?;
        let redis = PrivateRedis {
            port,
            child,
            _dir: dir,
        };
        let mut redis = redis;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = redis.child.try_wait() {
                return Err(format!("redis-server exited at start-up ({status})"));
            }
            if let Ok(mut conn) = Resp::connect(port).await {
                if conn.command(&[b"PING"]).await.is_ok() {
                    return Ok(redis);
                }
            }
            if Instant::now() > deadline {
                return Err("redis-server did not answer within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Bulk(Option<Vec<u8>>),
    Integer(i64),
    Array(Vec<Reply>),
    Error(String),
}

pub struct Resp {
    reader: BufReader<TcpStream>,
}

pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

impl Resp {
    pub async fn connect(port: u16) -> Result<Resp, String> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect to redis: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok(Resp {
            reader: BufReader::new(stream),
        })
    }

    pub async fn command(&mut self, args: &[&[u8]]) -> Result<Reply, String> {
        self.reader
            .get_mut()
            .write_all(&encode(args))
            .await
            .map_err(|e| format!("redis write: {e}"))?;
        self.read_reply().await
    }

    async fn read_line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .await
            .map_err(|e| format!("redis read: {e}"))?;
        if n == 0 {
            return Err("redis closed the connection".into());
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }

    fn read_reply(
        &mut self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Reply, String>> + Send + '_>>
    {
        Box::pin(async move {
            let line = self.read_line().await?;
            let (kind, rest) = line.split_at(1.min(line.len()));
            match kind {
                "+" => Ok(Reply::Simple(rest.to_owned())),
                "-" => Ok(Reply::Error(rest.to_owned())),
                ":" => rest
                    .parse()
                    .map(Reply::Integer)
                    .map_err(|e| format!("bad integer: {e}")),
                "$" => {
                    let len: i64 = rest.parse().map_err(|e| format!("bad length: {e}"))?;
                    if len < 0 {
                        return Ok(Reply::Bulk(None));
                    }
                    let mut buf = vec![0u8; len as usize + 2];
                    self.reader
                        .read_exact(&mut buf)
                        .await
                        .map_err(|e| format!("redis read: {e}"))?;
                    buf.truncate(len as usize);
                    Ok(Reply::Bulk(Some(buf)))
                }
                "*" => {
                    let len: i64 = rest.parse().map_err(|e| format!("bad length: {e}"))?;
                    let mut items = Vec::new();
                    for _ in 0..len.max(0) {
                        items.push(self.read_reply().await?);
                    }
                    Ok(Reply::Array(items))
                }
                other => Err(format!("unexpected RESP type {other:?}")),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands() {
        assert_eq!(
            encode(&[b"XADD", b"s", b"*", b"p", b"hi"]),
            b"*5\r\n$4\r\nXADD\r\n$1\r\ns\r\n$1\r\n*\r\n$1\r\np\r\n$2\r\nhi\r\n".to_vec()
        );
    }

    #[tokio::test]
    async fn talks_to_a_private_redis() {
        let redis = PrivateRedis::start().await.expect("redis-server available");
        let mut conn = Resp::connect(redis.port).await.unwrap();
        assert_eq!(
            conn.command(&[b"PING"]).await.unwrap(),
            Reply::Simple("PONG".into())
        );
        let id = conn
            .command(&[b"XADD", b"s", b"*", b"p", b"x"])
            .await
            .unwrap();
        assert!(matches!(id, Reply::Bulk(Some(_))));
        assert_eq!(
            conn.command(&[b"XLEN", b"s"]).await.unwrap(),
            Reply::Integer(1)
        );
        assert!(matches!(
            conn.command(&[b"NOPE"]).await.unwrap(),
            Reply::Error(_)
        ));
    }
}
