//! The client half of the binary: `starcite create | append | tail` against a running server.

use clap::Args;
use futures_util::StreamExt;
use serde_json::Value;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// Base URL of a Starcite node.
    #[arg(
        long,
        env = "STARCITE_URL",
        default_value = "http://127.0.0.1:4000",
        global = true
    )]
    pub url: String,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Session id (1–256 chars of A-Z a-z 0-9 _ - . : @); generated when omitted.
    #[arg(long)]
    pub id: Option<String>,
    /// Session title.
    #[arg(long)]
    pub title: Option<String>,
    /// Session metadata as a JSON object, e.g. '{"tenant_id":"acme"}'.
    #[arg(long, value_parser = parse_json_object)]
    pub metadata: Option<Value>,
}

#[derive(Debug, Args)]
pub struct AppendArgs {
    /// Session to append to.
    pub session: String,
    /// Event type, e.g. content, state, tool_call.
    #[arg(long = "type")]
    pub event_type: String,
    /// Who produced the event, e.g. agent:drafter or user:42.
    #[arg(long)]
    pub actor: String,
    /// Event payload as a JSON object.
    #[arg(long, value_parser = parse_json_object)]
    pub payload: Value,
    /// Optional source, e.g. agent.
    #[arg(long)]
    pub source: Option<String>,
    /// Optional metadata as a JSON object.
    #[arg(long, value_parser = parse_json_object)]
    pub metadata: Option<Value>,
    /// Optional refs as a JSON object.
    #[arg(long, value_parser = parse_json_object)]
    pub refs: Option<Value>,
    /// Makes retries safe: the same key and event is appended once.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Append only if the session's last seq is this value.
    #[arg(long)]
    pub expected_seq: Option<u64>,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    /// Session to tail.
    pub session: String,
    /// Print events with seq greater than this, then follow.
    #[arg(long, default_value_t = 0)]
    pub cursor: u64,
    /// Stop after printing the events that exist now instead of following.
    #[arg(long)]
    pub no_follow: bool,
}

#[derive(serde::Deserialize)]
struct EventsPage {
    events: Vec<Box<serde_json::value::RawValue>>,
    next_cursor: u64,
}

fn parse_json_object(raw: &str) -> Result<Value, String> {
    match serde_json::from_str::<Value>(raw) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("must be a JSON object, e.g. '{\"text\":\"hi\"}'".into()),
        Err(e) => Err(format!("not valid JSON: {e}")),
    }
}

/// Exit codes: 0 success, 1 the server refused the request, 2 usage, 3 could not reach it.
const EXIT_REFUSED: u8 = 1;
const EXIT_UNREACHABLE: u8 = 3;

struct Failure {
    code: u8,
    message: String,
}

fn unreachable(url: &str, e: reqwest::Error) -> Failure {
    Failure {
        code: EXIT_UNREACHABLE,
        message: format!("cannot reach {url}: {e}"),
    }
}

fn base(opts: &ClientOpts) -> String {
    opts.url.trim_end_matches('/').to_owned()
}

async fn post_json(opts: &ClientOpts, path: &str, body: &Value) -> Result<Value, Failure> {
    let url = format!("{}{path}", base(opts));
    let response = reqwest::Client::new()
        .post(&url)
        .json(body)
        .send()
        .await
        .map_err(|e| unreachable(&url, e))?;
    read_answer(&url, response).await
}

async fn read_answer(url: &str, response: reqwest::Response) -> Result<Value, Failure> {
    let text = read_text(url, response).await?;
    Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The body of a successful answer, or the server's error as a failure.
async fn read_text(url: &str, response: reqwest::Response) -> Result<String, Failure> {
    let status = response.status();
    let text = response.text().await.map_err(|e| unreachable(url, e))?;
    if status.is_success() {
        return Ok(text);
    }
    let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let code = json["error"].as_str().unwrap_or("error");
    let message = json["message"].as_str().unwrap_or(&text);
    Err(Failure {
        code: EXIT_REFUSED,
        message: format!("{} {code}: {message}", status.as_u16()),
    })
}

fn finish(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("starcite: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure {
            code: EXIT_UNREACHABLE,
            message: format!("cannot start the async runtime: {e}"),
        })
}

pub fn create(opts: ClientOpts, args: CreateArgs) -> ExitCode {
    finish(runtime().and_then(|rt| {
        rt.block_on(async {
            let mut body = serde_json::Map::new();
            if let Some(id) = args.id {
                body.insert("id".into(), Value::String(id));
            }
            if let Some(title) = args.title {
                body.insert("title".into(), Value::String(title));
            }
            if let Some(metadata) = args.metadata {
                body.insert("metadata".into(), metadata);
            }
            let session = post_json(&opts, "/v1/sessions", &Value::Object(body)).await?;
            println!("{session}");
            Ok(())
        })
    }))
}

pub fn append(opts: ClientOpts, args: AppendArgs) -> ExitCode {
    finish(runtime().and_then(|rt| {
        rt.block_on(async {
            let mut body = serde_json::json!({
                "type": args.event_type,
                "actor": args.actor,
                "payload": args.payload,
            });
            let fields = [
                ("source", args.source.map(Value::String)),
                ("metadata", args.metadata),
                ("refs", args.refs),
                ("idempotency_key", args.idempotency_key.map(Value::String)),
                ("expected_seq", args.expected_seq.map(Value::from)),
            ];
            for (name, value) in fields {
                if let Some(v) = value {
                    body[name] = v;
                }
            }
            let path = format!("/v1/sessions/{}/append", args.session);
            let ack = post_json(&opts, &path, &body).await?;
            println!("{ack}");
            Ok(())
        })
    }))
}

/// Prints one JSON line per event. Follows over SSE; after a dropped connection it
/// reconnects from the last printed seq, so no event is printed twice or skipped.
pub fn tail(opts: ClientOpts, args: TailArgs) -> ExitCode {
    finish(runtime().and_then(|rt| rt.block_on(tail_loop(&opts, &args))))
}

async fn tail_loop(opts: &ClientOpts, args: &TailArgs) -> Result<(), Failure> {
    let client = reqwest::Client::new();
    let mut cursor = args.cursor;
    if args.no_follow {
        loop {
            let url = format!(
                "{}/v1/sessions/{}/events?cursor={cursor}&limit=1000",
                base(opts),
                args.session
            );
            let response = client
                .get(&url)
                .send()
                .await
                .map_err(|e| unreachable(&url, e))?;
            let text = read_text(&url, response).await?;
            // Raw JSON, so that events print exactly as stored.
            let raw: EventsPage = serde_json::from_str(&text).map_err(|e| Failure {
                code: EXIT_REFUSED,
                message: format!("unexpected answer from {url}: {e}"),
            })?;
            if raw.events.is_empty() {
                return Ok(());
            }
            for e in &raw.events {
                println!("{}", e.get());
            }
            cursor = raw.next_cursor;
        }
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        let url = format!(
            "{}/v1/sessions/{}/tail?cursor={cursor}",
            base(opts),
            args.session
        );
        let response = match client
            .get(&url)
            .header("accept", "text/event-stream")
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!(
                    "starcite: {}; retrying from seq {cursor}",
                    unreachable(&url, e).message
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if response.status().is_client_error() {
            // A refused request (unknown session, bad cursor) will not get better by retrying.
            read_answer(&url, response).await?;
            return Ok(());
        }
        if !response.status().is_success() {
            eprintln!("starcite: server answered {}; retrying", response.status());
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        }
        backoff = Duration::from_millis(100);
        let mut stream = response.bytes_stream();
        let mut sse = SseEvents::default();
        let mut events = Vec::new();
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else { break };
            sse.push(&chunk, &mut events);
            for data in events.drain(..) {
                let seq = serde_json::from_slice::<Value>(&data)
                    .ok()
                    .and_then(|event| event["seq"].as_u64())
                    .ok_or_else(|| Failure {
                        code: EXIT_REFUSED,
                        message: format!(
                            "the server sent something that is not an event after seq {cursor}: {}",
                            String::from_utf8_lossy(&data)
                        ),
                    })?;
                if seq > cursor {
                    // Valid JSON, hence valid UTF-8.
                    println!("{}", String::from_utf8_lossy(&data));
                    cursor = seq;
                }
            }
        }
        eprintln!("starcite: connection closed; resuming from seq {cursor}");
        tokio::time::sleep(backoff).await;
    }
}

/// Splits a server-sent-events byte stream into the `data` of each event. It works on bytes,
/// so a multi-byte character split across two network chunks is never mangled.
#[derive(Default)]
struct SseEvents {
    pending: Vec<u8>,
    data: Vec<u8>,
}

impl SseEvents {
    /// Takes the next chunk; appends the data of every event it completes to `out`.
    fn push(&mut self, chunk: &[u8], out: &mut Vec<Vec<u8>>) {
        self.pending.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(len) = self.pending[start..].iter().position(|&b| b == b'\n') {
            let mut line = &self.pending[start..start + len];
            start += len + 1;
            if let Some(stripped) = line.strip_suffix(b"\r") {
                line = stripped;
            }
            if line.is_empty() {
                if !self.data.is_empty() {
                    out.push(std::mem::take(&mut self.data));
                }
            } else if let Some(rest) = line.strip_prefix(b"data:") {
                if !self.data.is_empty() {
                    self.data.push(b'\n');
                }
                self.data
                    .extend_from_slice(rest.strip_prefix(b" ").unwrap_or(rest));
            }
        }
        self.pending.drain(..start);
    }
}

#[cfg(test)]
mod tests {
    use super::SseEvents;

    fn feed(chunks: &[&[u8]]) -> Vec<String> {
        let mut sse = SseEvents::default();
        let mut out = Vec::new();
        for chunk in chunks {
            sse.push(chunk, &mut out);
        }
        out.into_iter()
            .map(|d| String::from_utf8(d).expect("utf-8"))
            .collect()
    }

    #[test]
    fn a_character_split_across_chunks_survives() {
        let stream = "id: 1\ndata: {\"seq\":1,\"text\":\"caf\u{e9} \u{1f600}\"}\n\n".as_bytes();
        // Cut inside the two-byte é and inside the four-byte emoji.
        let e = stream.iter().position(|&b| b == 0xc3).expect("é");
        let smile = stream.iter().position(|&b| b == 0xf0).expect("emoji");
        let events = feed(&[
            &stream[..e + 1],
            &stream[e + 1..smile + 2],
            &stream[smile + 2..],
        ]);
        assert_eq!(events, vec!["{\"seq\":1,\"text\":\"caf\u{e9} \u{1f600}\"}"]);
    }

    #[test]
    fn events_comments_multi_line_data_and_crlf() {
        let events = feed(&[
            b": keep-alive\n\nid: 1\r\ndata: {\"seq\":1}\r\n\r\n",
            b"data: a\ndata: b\n",
            b"\n",
            b"data: {\"seq\":3}\n",
        ]);
        assert_eq!(events, vec!["{\"seq\":1}", "a\nb"]);
    }
}
