//! Session ids: `SessionId::parse` and the validating deserialisers (JSON and the postcard
//! wire format) agree with the documented alphabet and length rules and never panic; group
//! placement stays in range.
//!
//! Cursor parsing (`?cursor=N`) lives in `starcite-server`, which has no library target, so it
//! is not reachable from here.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starcite_core::ids::{SessionIdError, MAX_SESSION_ID_LEN};
use starcite_core::{group_of, SessionId};

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@')
}

fuzz_target!(|data: &[u8]| {
    // Untrusted encodings: whatever they accept must be a valid id.
    if let Ok(id) = postcard::from_bytes::<SessionId>(data) {
        assert!(SessionId::parse(id.as_str()).is_ok());
    }
    if let Ok(id) = serde_json::from_slice::<SessionId>(data) {
        assert!(SessionId::parse(id.as_str()).is_ok());
    }

    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let expected = if raw.is_empty() {
        Err(SessionIdError::Empty)
    } else if raw.len() > MAX_SESSION_ID_LEN {
        Err(SessionIdError::TooLong)
    } else if !raw.bytes().all(allowed) {
        Err(SessionIdError::BadCharacter)
    } else {
        Ok(())
    };
    let parsed = SessionId::parse(raw);
    assert_eq!(parsed.as_ref().map(|_| ()), expected.as_ref().map(|_| ()));
    assert_eq!(parsed.as_ref().err(), expected.as_ref().err());

    // The JSON string holding the same text deserialises exactly when it parses.
    let quoted = serde_json::to_string(raw).unwrap();
    let from_json = serde_json::from_str::<SessionId>(&quoted);
    assert_eq!(from_json.is_ok(), parsed.is_ok());

    if let Ok(id) = parsed {
        assert_eq!(id.as_str(), raw);
        assert_eq!(id.to_string(), raw);
        assert_eq!(from_json.unwrap(), id);
        let wire = postcard::to_allocvec(&id).unwrap();
        assert_eq!(postcard::from_bytes::<SessionId>(&wire).unwrap(), id);
        let groups = u32::from(data[0]) + 1;
        for n in [1, 3, 256, groups] {
            let g = group_of(id.as_str(), n);
            assert!(g < n);
            assert_eq!(g, group_of(id.as_str(), n));
        }
        assert_eq!(id.into_string(), raw);
    }
});
