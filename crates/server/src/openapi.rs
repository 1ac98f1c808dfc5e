//! The OpenAPI document of the HTTP surface, generated from the handlers' annotations and
//! served at `GET /openapi.json`. The types here only describe the wire shapes; the handlers
//! parse bodies with `starcite_core`'s validators.

#![allow(dead_code)] // fields are read by the schema derive, not by code

use serde_json::Value;
use utoipa::{OpenApi, ToSchema};

/// `POST /v1/sessions` body; every field optional.
#[derive(ToSchema)]
pub struct CreateSessionBody {
    /// 1–256 chars of `A-Z a-z 0-9 _ - . : @`; generated (`ses_…`) when omitted.
    pub id: Option<String>,
    pub title: Option<String>,
    /// JSON object, default `{}`.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
}

/// A session header.
#[derive(ToSchema)]
pub struct SessionBody {
    pub id: String,
    pub title: Option<String>,
    #[schema(value_type = Object)]
    pub metadata: Value,
    pub last_seq: u64,
    /// RFC 3339 UTC, e.g. `2026-02-08T15:00:01.123Z`.
    pub created_at: String,
    pub updated_at: String,
}

/// `refs` of an event; other keys are allowed and kept.
#[derive(ToSchema)]
pub struct RefsBody {
    pub to_seq: Option<u64>,
    pub step: Option<u64>,
    pub request_id: Option<String>,
    pub sequence_id: Option<String>,
}

/// `POST /v1/sessions/{id}/append` body.
#[derive(ToSchema)]
pub struct AppendBody {
    /// Non-empty.
    #[schema(rename = "type")]
    pub event_type: String,
    /// JSON object, stored and returned exactly as sent.
    #[schema(value_type = Object)]
    pub payload: Value,
    /// Non-empty, e.g. `agent:drafter`.
    pub actor: String,
    pub source: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    pub refs: Option<RefsBody>,
    pub idempotency_key: Option<String>,
    pub expected_seq: Option<u64>,
}

/// The append acknowledgement, sent once the event is durable.
#[derive(ToSchema)]
pub struct AppendAck {
    pub seq: u64,
    pub last_seq: u64,
    pub deduped: bool,
}

/// One event, as delivered by tails and reads.
#[derive(ToSchema)]
pub struct EventBody {
    pub seq: u64,
    #[schema(rename = "type")]
    pub event_type: String,
    #[schema(value_type = Object)]
    pub payload: Value,
    pub actor: String,
    pub source: Option<String>,
    #[schema(value_type = Object)]
    pub metadata: Value,
    #[schema(value_type = Object)]
    pub refs: Value,
    pub idempotency_key: Option<String>,
    pub inserted_at: String,
}

#[derive(ToSchema)]
pub struct EventsPage {
    pub events: Vec<EventBody>,
    /// Pass as `cursor` to get the next page.
    pub next_cursor: u64,
}

/// Every error: a stable code and a message for people.
#[derive(ToSchema)]
pub struct ErrorBody {
    /// One of the contract's codes, e.g. `expected_seq_conflict`.
    pub error: String,
    pub message: String,
}

#[derive(ToSchema)]
pub struct StatusBody {
    /// `ok`
    pub status: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Starcite",
        description = "Durable, low-latency session event storage for LLM applications."
    ),
    paths(
        crate::app::create_session,
        crate::app::get_session,
        crate::app::append_event,
        crate::tail::tail,
        crate::app::list_events,
        crate::app::live,
        crate::app::ready,
        crate::app::metrics_text,
        crate::app::openapi_json,
    )
)]
pub struct ApiDoc;

pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
