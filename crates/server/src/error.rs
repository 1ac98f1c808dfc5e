//! The one place where failures become wire errors: `{"error": code, "message": text}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use starcite_cluster::NodeError;
use starcite_core::ValidationError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn not_found_route() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }

    pub fn session_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "session_not_found",
            format!("session {id} not found"),
        )
    }

    pub fn invalid_cursor(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_cursor", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    pub fn payload_too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than the {limit}-byte limit"),
        )
    }

    /// Validation failures of a body; `field_code` is the endpoint's own code
    /// (`invalid_event` or `invalid_session`).
    pub fn from_validation(err: ValidationError, field_code: &'static str) -> Self {
        match err {
            ValidationError::Json(m) => Self::new(StatusCode::BAD_REQUEST, "invalid_json", m),
            ValidationError::Field(m) => Self::new(StatusCode::BAD_REQUEST, field_code, m),
            ValidationError::SessionId(e) => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_session", e.to_string())
            }
        }
    }
}

impl From<NodeError> for ApiError {
    fn from(err: NodeError) -> Self {
        let message = err.to_string();
        let (status, code) = match err {
            NodeError::SessionNotFound(_) => (StatusCode::NOT_FOUND, "session_not_found"),
            NodeError::SessionExists(_) => (StatusCode::CONFLICT, "session_exists"),
            NodeError::ExpectedSeqConflict { .. } => {
                (StatusCode::CONFLICT, "expected_seq_conflict")
            }
            NodeError::IdempotencyConflict { .. } => (StatusCode::CONFLICT, "idempotency_conflict"),
            NodeError::Unavailable(_)
            | NodeError::Trimmed { .. }
            | NodeError::Storage(_)
            | NodeError::Startup(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        ApiError::new(status, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.code, "message": self.message});
        (self.status, axum::Json(body)).into_response()
    }
}
