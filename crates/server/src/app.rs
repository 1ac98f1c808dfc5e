//! Routes and handlers: thin adapters that parse at the boundary and call the node.

use crate::config::ServeConfig;
use crate::error::ApiError;
use crate::metrics as m;
use crate::tail;
use axum::body::Body;
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::value::RawValue;
use starcite_cluster::Node;
use starcite_core::{AppendRequest, CreateRequest, SessionView};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

pub struct AppState {
    /// Set once recovery finishes; until then the API answers `unavailable`.
    pub node: OnceLock<Arc<Node>>,
    pub config: ServeConfig,
    pub metrics: Option<PrometheusHandle>,
    /// Closed on shutdown so that tails end with close code 1001.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Upgraded WebSocket tails outlive their HTTP connection; shutdown waits for them here.
    pub tails: crate::listener::ConnectionTracker,
    /// The cold archive, once connected.
    pub archive: Arc<OnceLock<Arc<starcite_archive::Archive>>>,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    pub fn node(&self) -> Result<&Arc<Node>, ApiError> {
        self.node
            .get()
            .ok_or_else(|| ApiError::unavailable("the node is still starting up"))
    }

    /// Reads events across memory and the archive.
    pub fn reader(&self) -> Result<crate::reader::EventReader, ApiError> {
        Ok(crate::reader::EventReader {
            node: self.node()?.clone(),
            archive: self.archive.clone(),
        })
    }
}

/// CORS for browsers (EventSource, fetch) when `STARCITE_CORS_ORIGINS` is set.
fn cors(origins: Option<&str>) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    let origins = origins?.trim();
    let allow = if origins == "*" {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .split(',')
                .filter_map(|o| o.trim().parse::<axum::http::HeaderValue>().ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers(Any)
            .expose_headers(Any),
    )
}

pub fn router(state: SharedState) -> Router {
    let cors = cors(state.config.cors_origins.as_deref());
    let router = Router::new()
        .route("/v1/sessions", post(create_session))
        .route("/v1/sessions/{id}", get(get_session))
        .route("/v1/sessions/{id}/append", post(append_event))
        .route("/v1/sessions/{id}/tail", get(tail::tail))
        .route("/v1/sessions/{id}/events", get(list_events))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(track_requests))
        .with_state(state);
    match cors {
        Some(layer) => router.layer(layer),
        None => router,
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found_route()
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}

/// Per-route request counts and latencies, labelled by the route template (never the raw
/// path, which would give every session its own series).
async fn track_requests(mut req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().clone();
    let request_id = request_id(req.headers());
    if let Ok(value) = header::HeaderValue::from_str(&request_id) {
        req.headers_mut().insert(REQUEST_ID, value);
    }
    let started = Instant::now();
    let mut response = next.run(req).await;
    let status = response.status();
    let elapsed = started.elapsed();
    // One event per request carrying its id (no span: the fmt layer would format a span's
    // fields for every request even when nothing inside it logs).
    // A 503 from the readiness probe is its answer, not a failure worth a warning.
    if status.is_server_error() && !route.starts_with("/health/") {
        tracing::warn!(request_id = %request_id, %method, %route, status = status.as_u16(), ms = elapsed.as_millis() as u64, "request failed");
    } else {
        tracing::debug!(request_id = %request_id, %method, %route, status = status.as_u16(), ms = elapsed.as_millis() as u64, "request");
    }
    if let Ok(value) = header::HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    m::record_request(&route, &method, status, elapsed);
    response
}

const REQUEST_ID: &str = "x-request-id";

/// The client's `x-request-id` when it sent a sane one (so ids can be followed across
/// services), else a new one: a per-process random prefix and a counter.
fn request_id(headers: &HeaderMap) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    static PREFIX: OnceLock<String> = OnceLock::new();
    if let Some(id) = headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
    {
        return id.to_owned();
    }
    let prefix = PREFIX.get_or_init(|| {
        let id = starcite_core::SessionId::generate();
        id.as_str()["ses_".len().."ses_".len() + 8].to_owned()
    });
    format!("{prefix}-{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Past the limit, up to this much more of a body is read and dropped before the 413 goes
/// out: a connection closed with unread data in it is reset, and the client, still sending,
/// would see a broken pipe instead of the answer.
const DRAIN_BYTES: u64 = 16 * 1024 * 1024;
/// And for at most this long.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads a body up to the configured limit.
async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<bytes::Bytes, ApiError> {
    use futures_util::StreamExt;
    let limit = state.config.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut stream = body.into_data_stream();
    if let Some(declared) = declared.filter(|&n| n > limit) {
        if declared - limit <= DRAIN_BYTES {
            drain(stream).await;
        }
        return Err(ApiError::payload_too_large(limit));
    }
    let mut chunks: Vec<bytes::Bytes> = Vec::new();
    let mut len = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| ApiError::payload_too_large(limit))?;
        len += chunk.len() as u64;
        if len > limit {
            drain(stream).await;
            return Err(ApiError::payload_too_large(limit));
        }
        chunks.push(chunk);
    }
    Ok(match chunks.len() {
        1 => chunks.pop().unwrap_or_default(),
        _ => chunks.concat().into(),
    })
}

/// Reads and drops the rest of a refused body, bounded by [`DRAIN_BYTES`] and [`DRAIN_TIME`].
async fn drain(mut stream: axum::body::BodyDataStream) {
    use futures_util::StreamExt;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut read = 0u64;
        while let Some(Ok(chunk)) = stream.next().await {
            read += chunk.len() as u64;
            if read > DRAIN_BYTES {
                return;
            }
        }
    })
    .await;
}

/// A path id that breaks the id rules cannot name an existing session.
pub(crate) fn path_session(id: &str) -> Result<&str, ApiError> {
    starcite_core::SessionId::parse(id)
        .map(|_| id)
        .map_err(|_| ApiError::session_not_found(id))
}

fn session_json(view: &SessionView) -> serde_json::Value {
    let metadata: Box<RawValue> = RawValue::from_string(view.metadata.clone())
        .unwrap_or_else(|_| RawValue::from_string("{}".into()).expect("valid literal"));
    serde_json::json!({
        "id": view.id,
        "title": view.title,
        "metadata": metadata,
        "last_seq": view.last_seq,
        "created_at": view.created_at.to_string(),
        "updated_at": view.updated_at.to_string(),
    })
}

#[utoipa::path(post, path = "/v1/sessions", tag = "sessions",
    request_body = crate::openapi::CreateSessionBody,
    responses(
        (status = 201, description = "Created", body = crate::openapi::SessionBody),
        (status = 400, description = "invalid_session or invalid_json", body = crate::openapi::ErrorBody),
        (status = 409, description = "session_exists", body = crate::openapi::ErrorBody),
        (status = 413, description = "payload_too_large", body = crate::openapi::ErrorBody),
        (status = 503, description = "unavailable", body = crate::openapi::ErrorBody)))]
pub(crate) async fn create_session(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let node = state.node()?;
    let body = read_body(&state, &headers, body).await?;
    let req =
        CreateRequest::parse(&body).map_err(|e| ApiError::from_validation(e, "invalid_session"))?;
    let view = node.create_session(req).await?;
    Ok((StatusCode::CREATED, Json(session_json(&view))).into_response())
}

#[utoipa::path(post, path = "/v1/sessions/{id}/append", tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    request_body = crate::openapi::AppendBody,
    responses(
        (status = 201, description = "Appended (or deduped); sent once durable", body = crate::openapi::AppendAck),
        (status = 400, description = "invalid_event or invalid_json", body = crate::openapi::ErrorBody),
        (status = 404, description = "session_not_found", body = crate::openapi::ErrorBody),
        (status = 409, description = "expected_seq_conflict or idempotency_conflict", body = crate::openapi::ErrorBody),
        (status = 413, description = "payload_too_large", body = crate::openapi::ErrorBody),
        (status = 503, description = "unavailable; retry with the same idempotency key", body = crate::openapi::ErrorBody)))]
pub(crate) async fn append_event(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let node = state.node()?;
    let body = read_body(&state, &headers, body).await?;
    let session_id = path_session(&id)?;
    let req =
        AppendRequest::parse(&body).map_err(|e| ApiError::from_validation(e, "invalid_event"))?;
    let payload_len = req.payload.len();
    let outcome = node.append(session_id, req).await?;
    m::record_append(outcome.deduped, payload_len, started.elapsed());
    let body = format!(
        r#"{{"seq":{},"last_seq":{},"deduped":{}}}"#,
        outcome.seq, outcome.last_seq, outcome.deduped
    );
    Ok((
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "The session header", body = crate::openapi::SessionBody),
        (status = 404, description = "session_not_found", body = crate::openapi::ErrorBody)))]
pub(crate) async fn get_session(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let node = state.node()?;
    let view = node.session(path_session(&id)?).await?;
    Ok(Json(session_json(&view)).into_response())
}

/// `?cursor=N&limit=M` for the events page.
fn parse_events_query(query: Option<&str>) -> Result<(u64, usize), ApiError> {
    let cursor = tail::parse_cursor(query)?.unwrap_or(0);
    let limit = match tail::query_param(query, "limit") {
        None => 100,
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n) && raw.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_limit",
                    "limit must be an integer from 1 to 1000",
                )
            })?,
    };
    Ok((cursor, limit))
}

#[utoipa::path(get, path = "/v1/sessions/{id}/events", tag = "sessions",
    params(
        ("id" = String, Path, description = "Session id"),
        ("cursor" = Option<u64>, Query, description = "Return events with seq > cursor (default 0)"),
        ("limit" = Option<u32>, Query, description = "1–1000, default 100")),
    responses(
        (status = 200, description = "A page of events", body = crate::openapi::EventsPage),
        (status = 400, description = "invalid_cursor or invalid_limit", body = crate::openapi::ErrorBody),
        (status = 404, description = "session_not_found", body = crate::openapi::ErrorBody)))]
pub(crate) async fn list_events(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let node = state.node()?;
    let (cursor, limit) = parse_events_query(query.as_deref())?;
    let session_id = path_session(&id)?;
    // A linearizable check first: the page includes every event acknowledged before it.
    node.session(session_id).await?;
    let events = state.reader()?.read(session_id, cursor, limit).await?;
    let next_cursor = cursor + events.len() as u64;
    let mut body = Vec::with_capacity(events.iter().map(|e| e.len() + 1).sum::<usize>() + 32);
    body.extend_from_slice(b"{\"events\":[");
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(event);
    }
    body.extend_from_slice(format!("],\"next_cursor\":{next_cursor}}}").as_bytes());
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[utoipa::path(get, path = "/health/live", tag = "operations",
    responses((status = 200, description = "The process serves HTTP", body = crate::openapi::StatusBody)))]
pub(crate) async fn live() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

#[utoipa::path(get, path = "/health/ready", tag = "operations",
    responses(
        (status = 200, description = "This node can take appends", body = crate::openapi::StatusBody),
        (status = 503, description = "Starting, failed or shutting down", body = crate::openapi::ErrorBody)))]
pub(crate) async fn ready(State(state): State<SharedState>) -> Response {
    match state.node.get() {
        Some(node) if node.is_ready() && !*state.shutdown.borrow() => {
            Json(serde_json::json!({"status": "ok"})).into_response()
        }
        Some(node) => {
            let leaderless = node.groups_without_leader();
            let reason = if *state.shutdown.borrow() {
                "the node is shutting down".to_string()
            } else if leaderless > 0 {
                format!("{leaderless} of this node's groups have no leader yet")
            } else {
                "the node's log failed; it takes no writes until restarted".to_string()
            };
            ApiError::unavailable(reason).into_response()
        }
        None => ApiError::unavailable("the node is still starting up").into_response(),
    }
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub(crate) async fn metrics_text(State(state): State<SharedState>) -> Response {
    if let Some(node) = state.node.get() {
        m::record_node_stats(&node.stats());
        starcite_archive::record_lag(node);
    }
    match &state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => ApiError::unavailable("metrics are not enabled").into_response(),
    }
}

#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "This document", content_type = "application/json", body = Object)))]
pub(crate) async fn openapi_json() -> Response {
    Json(crate::openapi::document()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn test_state() -> SharedState {
        use clap::Parser;
        #[derive(Parser)]
        struct Args {
            #[command(flatten)]
            serve: ServeConfig,
        }
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        Arc::new(AppState {
            node: OnceLock::new(),
            config: Args::parse_from(["starcite"]).serve,
            metrics: None,
            shutdown,
            tails: Default::default(),
            archive: Default::default(),
        })
    }

    /// Every operation in the OpenAPI document is served by the router (a documented route
    /// that does not exist answers 404 not_found or 405), and the document names every
    /// contract route.
    #[tokio::test]
    async fn openapi_document_matches_the_router() {
        let doc = serde_json::to_value(crate::openapi::document()).unwrap();
        let paths = doc["paths"].as_object().expect("paths");
        for required in [
            "/v1/sessions",
            "/v1/sessions/{id}",
            "/v1/sessions/{id}/append",
            "/v1/sessions/{id}/tail",
            "/v1/sessions/{id}/events",
            "/health/live",
            "/health/ready",
            "/metrics",
            "/openapi.json",
        ] {
            assert!(
                paths.contains_key(required),
                "{required} missing from the document"
            );
        }
        let mut operations = 0;
        for (path, item) in paths {
            for method in item.as_object().unwrap().keys() {
                operations += 1;
                let uri = path.replace("{id}", "some-session");
                let req = Request::builder()
                    .method(method.to_uppercase().as_str())
                    .uri(&uri)
                    .body(Body::empty())
                    .unwrap();
                let response = router(test_state()).oneshot(req).await.unwrap();
                let status = response.status();
                let body = axum::body::to_bytes(response.into_body(), 1 << 20)
                    .await
                    .unwrap();
                let text = String::from_utf8_lossy(&body);
                assert!(
                    status != StatusCode::METHOD_NOT_ALLOWED && !text.contains("\"not_found\""),
                    "{method} {path} is documented but not routed ({status} {text})"
                );
            }
        }
        assert_eq!(operations, 9);
    }

    #[test]
    fn events_query_rules() {
        assert_eq!(parse_events_query(None).unwrap(), (0, 100));
        assert_eq!(
            parse_events_query(Some("cursor=5&limit=1000")).unwrap(),
            (5, 1000)
        );
        for bad in [
            "limit=0",
            "limit=1001",
            "limit=x",
            "limit=",
            "limit=+5",
            "limit=-1",
        ] {
            assert_eq!(
                parse_events_query(Some(bad)).unwrap_err().code,
                "invalid_limit",
                "{bad}"
            );
        }
        assert_eq!(
            parse_events_query(Some("cursor=-1")).unwrap_err().code,
            "invalid_cursor"
        );
    }
}
