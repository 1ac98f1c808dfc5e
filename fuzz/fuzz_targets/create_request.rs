//! `CreateRequest::parse` on arbitrary bodies: never panics; what it accepts has a valid id,
//! an object as metadata kept verbatim, and survives the serde round trips used between nodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use starcite_core::{CreateRequest, SessionId};

fuzz_target!(|data: &[u8]| {
    let Ok(req) = CreateRequest::parse(data) else {
        return;
    };
    if data.iter().all(u8::is_ascii_whitespace) {
        assert_eq!(req.id, None);
        assert_eq!(req.title, None);
        assert_eq!(req.metadata, "{}");
        return;
    }
    let body = std::str::from_utf8(data).expect("an accepted body is UTF-8");
    if let Some(id) = &req.id {
        assert_eq!(SessionId::parse(id.as_str()).as_ref(), Ok(id));
    }
    assert!(
        matches!(
            serde_json::from_str::<Value>(&req.metadata),
            Ok(Value::Object(_))
        ),
        "metadata is not an object: {:?}",
        req.metadata
    );
    assert!(req.metadata == "{}" || body.contains(req.metadata.as_str()));
    assert_eq!(CreateRequest::parse(data).as_ref(), Ok(&req));

    let json = serde_json::to_vec(&req).unwrap();
    assert_eq!(serde_json::from_slice::<CreateRequest>(&json).unwrap(), req);
    let wire = postcard::to_allocvec(&req).unwrap();
    assert_eq!(postcard::from_bytes::<CreateRequest>(&wire).unwrap(), req);
});
