//! Session identifiers: 1–256 characters of `A-Z a-z 0-9 _ - . : @`.

use base64::Engine;
use std::fmt;

pub const MAX_SESSION_ID_LEN: usize = 256;

/// Deserialising validates, so an id that crossed the network is as trustworthy as a parsed one.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct SessionId(String);

impl TryFrom<String> for SessionId {
    type Error = SessionIdError;
    fn try_from(raw: String) -> Result<Self, SessionIdError> {
        SessionId::parse(&raw)
    }
}

impl From<SessionId> for String {
    fn from(id: SessionId) -> String {
        id.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionIdError {
    #[error("session id must not be empty")]
    Empty,
    #[error("session id is longer than {MAX_SESSION_ID_LEN} characters")]
    TooLong,
    #[error("session id may contain only A-Z a-z 0-9 _ - . : @")]
    BadCharacter,
}

impl SessionId {
    pub fn parse(raw: &str) -> Result<Self, SessionIdError> {
        if raw.is_empty() {
            return Err(SessionIdError::Empty);
        }
        if raw.len() > MAX_SESSION_ID_LEN {
            return Err(SessionIdError::TooLong);
        }
        if !raw.bytes().all(is_id_byte) {
            return Err(SessionIdError::BadCharacter);
        }
        Ok(SessionId(raw.to_owned()))
    }

    /// `ses_` followed by 22 characters of URL-safe base64 encoding 128 random bits.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 16];
        // getrandom only fails when the OS has no entropy source at all; fall back to the
        // clock mixed with a counter rather than refusing to create sessions.
        if getrandom::fill(&mut bytes).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            bytes = nanos.to_le_bytes();
        }
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        SessionId(format!("ses_{encoded}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@')
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet() {
        assert!(SessionId::parse("ses_demo").is_ok());
        assert!(SessionId::parse("a-b.c:d@e_F9").is_ok());
        assert!(SessionId::parse(&"x".repeat(256)).is_ok());
    }

    #[test]
    fn rejects_bad_ids() {
        assert_eq!(SessionId::parse(""), Err(SessionIdError::Empty));
        assert_eq!(
            SessionId::parse(&"x".repeat(257)),
            Err(SessionIdError::TooLong)
        );
        for bad in ["a b", "a/b", "é", "a?b", "a%20"] {
            assert_eq!(SessionId::parse(bad), Err(SessionIdError::BadCharacter));
        }
    }

    #[test]
    fn generated_ids_have_the_contract_shape() {
        let id = SessionId::generate();
        let s = id.as_str();
        assert!(s.starts_with("ses_"));
        assert_eq!(s.len(), 4 + 22);
        assert!(SessionId::parse(s).is_ok());
        assert_ne!(SessionId::generate(), SessionId::generate());
    }
}
