//! `GET /v1/sessions/:id/tail`: replay from a cursor, then live, over WebSocket or SSE.
//!
//! Both transports run the same pull loop: read durable events with `seq > cursor` from the
//! node, send them, advance the cursor, and when caught up wait for the session's durable seq
//! to move. Replay and live are one code path, so a tail can neither skip nor repeat an
//! event, and per-connection memory is one batch.

use crate::app::{path_session, SharedState};
use crate::error::ApiError;
use crate::metrics as m;
use crate::reader::{EventReader, ReadError};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use starcite_cluster::Subscription;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::watch;

/// Events read from the node per step of the loop.
const BATCH: usize = 256;
/// Most bytes of events handed to one socket per step (at least one event).
const BATCH_BYTES: usize = 1024 * 1024;

/// The longest prefix of `batch` within [`BATCH_BYTES`], never empty if `batch` is not.
fn take_within_bytes(batch: Vec<Bytes>) -> impl Iterator<Item = Bytes> {
    let mut total = 0usize;
    batch
        .into_iter()
        .enumerate()
        .take_while(move |(i, e)| {
            total += e.len();
            *i == 0 || total <= BATCH_BYTES
        })
        .map(|(_, e)| e)
}

/// After a slow consumer is cut off, how long we keep trying to hand it the close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(30);

pub(crate) fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn parse_seq(raw: &str) -> Option<u64> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    raw.parse().ok()
}

/// `cursor` if present: a non-negative integer, anything else is `invalid_cursor`.
pub(crate) fn parse_cursor(query: Option<&str>) -> Result<Option<u64>, ApiError> {
    match query_param(query, "cursor") {
        None => Ok(None),
        Some(raw) => parse_seq(raw).map(Some).ok_or_else(|| {
            ApiError::invalid_cursor(format!(
                "cursor must be a non-negative integer, got {raw:?}"
            ))
        }),
    }
}

fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

#[utoipa::path(get, path = "/v1/sessions/{id}/tail", tag = "sessions",
    description = "Replay events with seq > cursor, then stream new events live. WebSocket: one event \
        per text frame; slow consumers are closed with code 1013 and their last delivered seq. \
        SSE (Accept: text/event-stream): one message per event, id = seq, resumes after Last-Event-ID.",
    params(
        ("id" = String, Path, description = "Session id"),
        ("cursor" = Option<u64>, Query, description = "Deliver events with seq > cursor (default 0)")),
    responses(
        (status = 101, description = "WebSocket upgrade; frames carry events"),
        (status = 200, description = "SSE stream of events", content_type = "text/event-stream", body = crate::openapi::EventBody),
        (status = 400, description = "invalid_cursor or invalid_websocket_upgrade", body = crate::openapi::ErrorBody),
        (status = 404, description = "session_not_found", body = crate::openapi::ErrorBody)))]
pub async fn tail(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let node = state.node()?.clone();
    let reader = state.reader()?;
    let cursor = parse_cursor(query.as_deref())?;
    let session_id = path_session(&id)?.to_owned();
    let durable = node.subscribe(&session_id).await?;
    match upgrade {
        Ok(upgrade) => {
            let cursor = cursor.unwrap_or(0);
            let state = state.clone();
            // Inbound frames are read and ignored: a small limit bounds what one client can
            // make the server buffer (a bigger frame ends the connection).
            // A small read buffer too: tungstenite zero-fills the whole buffer on every read,
            // and keeps it for the life of the connection (128 KiB by default).
            let upgrade = upgrade
                .max_message_size(INBOUND_FRAME_LIMIT)
                .max_frame_size(INBOUND_FRAME_LIMIT)
                .read_buffer_size(INBOUND_READ_BUFFER);
            Ok(upgrade.on_upgrade(move |socket| async move {
                let _tracked = state.tails.enter();
                metrics::gauge!(m::TAILS_ACTIVE).increment(1.0);
                ws_tail(socket, state, reader, session_id, cursor, durable).await;
                metrics::gauge!(m::TAILS_ACTIVE).decrement(1.0);
            }))
        }
        Err(_) if wants_sse(&headers) => {
            let cursor = match cursor {
                Some(c) => c,
                None => match headers.get("last-event-id") {
                    None => 0,
                    Some(v) => v.to_str().ok().and_then(parse_seq).ok_or_else(|| {
                        ApiError::invalid_cursor("Last-Event-ID must be a non-negative integer")
                    })?,
                },
            };
            Ok(sse_tail(state, reader, session_id, cursor, durable))
        }
        Err(rejection) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_websocket_upgrade",
            format!("tail needs a WebSocket upgrade (or Accept: text/event-stream): {rejection}"),
        )),
    }
}

/// Reads the next batch; while the archive is unreachable it waits and tries again (the
/// events exist, a tail is long-lived, and skipping is never an option), until shutdown.
async fn read_retrying(
    reader: &EventReader,
    session_id: &str,
    cursor: u64,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Vec<Bytes>, ReadError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match reader.read(session_id, cursor, BATCH).await {
            Err(ReadError::ArchiveDown(reason)) => {
                tracing::warn!(session = %session_id, cursor, %reason, "tail waiting for the archive");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {},
                    _ = shutdown.wait_for(|s| *s) => {
                        return Err(ReadError::Api(ApiError::unavailable("server shutting down")));
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// Largest WebSocket message or frame a tail client may send (it is ignored anyway).
const INBOUND_FRAME_LIMIT: usize = 64 * 1024;
/// What a tail client sends is small (pongs, the odd ignored frame).
const INBOUND_READ_BUFFER: usize = 4 * 1024;

enum WsEnd {
    ClientGone,
    SlowConsumer,
    Shutdown,
    Failed(String),
}

async fn ws_tail(
    socket: WebSocket,
    state: SharedState,
    reader: EventReader,
    session_id: String,
    mut cursor: u64,
    mut durable: Subscription,
) {
    let send_timeout = Duration::from_millis(state.config.tail_send_timeout_ms);
    let mut shutdown = state.shutdown.clone();
    let (mut sink, mut inbound) = socket.split();
    // Inbound frames are ignored; reading them keeps pings answered and notices a close.
    let (gone_tx, mut gone) = tokio::sync::oneshot::channel::<()>();
    let inbound_task = tokio::spawn(async move {
        while let Some(Ok(msg)) = inbound.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
        let _ = gone_tx.send(());
    });
    let mut ping = tokio::time::interval(Duration::from_millis(state.config.tail_ping_interval_ms));
    ping.reset();
    let end = 'outer: loop {
        loop {
            if *shutdown.borrow() {
                break 'outer WsEnd::Shutdown;
            }
            // A client that leaves while we wait for the archive ends the wait too.
            let read = tokio::select! {
                read = read_retrying(&reader, &session_id, cursor, &mut shutdown) => read,
                _ = &mut gone => break 'outer WsEnd::ClientGone,
            };
            let batch = match read {
                Ok(batch) => batch,
                Err(ReadError::Api(e)) if e.code == "unavailable" && *shutdown.borrow() => {
                    break 'outer WsEnd::Shutdown
                }
                Err(e) => break 'outer WsEnd::Failed(e.to_string()),
            };
            if batch.is_empty() {
                break;
            }
            // Each step must be accepted by the socket within the send timeout. Everything
            // fed is delivered before any close frame we send later, so `cursor` counts fed
            // events: it is exactly the last seq a client that sees our close frame received.
            let mut outcome = None;
            for event in take_within_bytes(batch) {
                let text = match Utf8Bytes::try_from(event) {
                    Ok(text) => text,
                    Err(e) => {
                        outcome = Some(WsEnd::Failed(format!("stored event is not UTF-8: {e}")));
                        break;
                    }
                };
                match tokio::time::timeout(send_timeout, sink.feed(Message::Text(text))).await {
                    Ok(Ok(())) => {
                        cursor += 1;
                        metrics::counter!(m::TAIL_EVENTS_SENT).increment(1);
                    }
                    Ok(Err(_)) => {
                        outcome = Some(WsEnd::ClientGone);
                        break;
                    }
                    Err(_) => {
                        outcome = Some(WsEnd::SlowConsumer);
                        break;
                    }
                }
            }
            if let Some(end) = outcome {
                break 'outer end;
            }
            match tokio::time::timeout(send_timeout, sink.flush()).await {
                Ok(Ok(())) => ping.reset(),
                Ok(Err(_)) => break 'outer WsEnd::ClientGone,
                Err(_) => break 'outer WsEnd::SlowConsumer,
            }
        }
        tokio::select! {
            changed = durable.wait_beyond(cursor) => if let Err(e) = changed {
                break WsEnd::Failed(e.to_string());
            },
            _ = &mut gone => break WsEnd::ClientGone,
            _ = shutdown.changed() => {},
            _ = ping.tick() => {
                let ping = sink.send(Message::Ping(Bytes::from_static(b"starcite")));
                match tokio::time::timeout(send_timeout, ping).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break WsEnd::ClientGone,
                    Err(_) => break WsEnd::SlowConsumer,
                }
            }
        }
    };
    let close = |code: u16, reason: String| {
        Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        }))
    };
    let frame = match end {
        WsEnd::ClientGone => None,
        WsEnd::SlowConsumer => {
            metrics::counter!(m::TAIL_SLOW_CLOSED).increment(1);
            Some(close(
                1013,
                format!("slow consumer; last delivered seq {cursor}"),
            ))
        }
        WsEnd::Shutdown => Some(close(
            1001,
            format!("server shutting down; last delivered seq {cursor}"),
        )),
        WsEnd::Failed(reason) => {
            tracing::warn!(session = %session_id, %reason, "tail ended");
            let mut reason = format!("last delivered seq {cursor}; {reason}");
            reason.truncate(120);
            Some(close(1011, reason))
        }
    };
    if let Some(frame) = frame {
        // The close frame queues behind whatever the client has not read yet; give it a
        // bounded time to get there, and add nothing more.
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            sink.send(frame).await?;
            sink.close().await
        })
        .await;
    }
    inbound_task.abort();
}

struct SseState {
    reader: EventReader,
    session_id: String,
    cursor: u64,
    durable: Subscription,
    shutdown: watch::Receiver<bool>,
    buffered: VecDeque<Bytes>,
    done: bool,
}

fn sse_tail(
    state: SharedState,
    reader: EventReader,
    session_id: String,
    cursor: u64,
    durable: Subscription,
) -> Response {
    let start = SseState {
        reader,
        session_id,
        cursor,
        durable,
        shutdown: state.shutdown.clone(),
        buffered: VecDeque::new(),
        done: false,
    };
    let stream = futures_util::stream::unfold(start, |mut st| async move {
        loop {
            if st.done || *st.shutdown.borrow() {
                return None;
            }
            if let Some(event) = st.buffered.pop_front() {
                st.cursor += 1;
                let data = String::from_utf8_lossy(&event).into_owned();
                let sse = Event::default().id(st.cursor.to_string()).data(data);
                metrics::counter!(m::TAIL_EVENTS_SENT).increment(1);
                return Some((Ok::<Event, Infallible>(sse), st));
            }
            match read_retrying(&st.reader, &st.session_id, st.cursor, &mut st.shutdown).await {
                Ok(batch) if !batch.is_empty() => st.buffered.extend(batch),
                Ok(_) => {
                    tokio::select! {
                        changed = st.durable.wait_beyond(st.cursor) => if changed.is_err() { st.done = true },
                        _ = st.shutdown.changed() => {},
                    }
                }
                Err(e) => {
                    st.done = true;
                    let e = ApiError::from(e);
                    let msg = serde_json::json!({"error": e.code, "message": e.message});
                    return Some((
                        Ok(Event::default().event("error").data(msg.to_string())),
                        st,
                    ));
                }
            }
        }
    });
    metrics::gauge!(m::TAILS_ACTIVE).increment(1.0);
    let guard = TailGauge;
    let stream = stream.map(move |item| {
        let _ = &guard;
        item
    });
    Sse::new(stream)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("keep-alive"),
        )
        .into_response()
}

/// Decrements the active-tail gauge when an SSE stream is dropped.
struct TailGauge;

impl Drop for TailGauge {
    fn drop(&mut self) {
        metrics::gauge!(m::TAILS_ACTIVE).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_rules() {
        assert_eq!(parse_cursor(None).unwrap(), None);
        assert_eq!(parse_cursor(Some("cursor=0")).unwrap(), Some(0));
        assert_eq!(parse_cursor(Some("a=1&cursor=42")).unwrap(), Some(42));
        assert_eq!(
            parse_cursor(Some("cursor=18446744073709551615")).unwrap(),
            Some(u64::MAX)
        );
        for bad in [
            "cursor=-1",
            "cursor=abc",
            "cursor=1.5",
            "cursor=",
            "cursor",
            "cursor=+1",
            "cursor=18446744073709551616",
        ] {
            assert_eq!(
                parse_cursor(Some(bad)).unwrap_err().code,
                "invalid_cursor",
                "{bad}"
            );
        }
    }
}
