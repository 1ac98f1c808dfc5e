//! Record framing: `[len: u32 LE][crc32c(body): u32 LE][crc32c(len ++ body crc): u32 LE][body]`.
//!
//! The header has its own checksum so that a damaged length is recognised as damage: without
//! it, a flipped bit that makes a length run past the end of the file would look exactly like
//! a torn final write, and recovery would silently cut off acknowledged records after it.

pub const FRAME_HEADER_LEN: usize = 12;
/// Refuse absurd lengths when decoding so a corrupt header cannot make us allocate gigabytes.
pub const MAX_RECORD_LEN: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The buffer ends inside a frame (a torn write if it is at the end of the log).
    Truncated { offset: usize },
    /// The header's own checksum does not match: the length cannot be trusted.
    BadHeader { offset: usize },
    /// The header is intact but the body's checksum does not match.
    BadBody { offset: usize, end: usize },
}

fn header_crc(len: [u8; 4], body_crc: [u8; 4]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len), &body_crc)
}

pub fn encode_frame(body: &[u8], out: &mut Vec<u8>) {
    let len = (body.len() as u32).to_le_bytes();
    let body_crc = crc32c::crc32c(body).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&body_crc);
    out.extend_from_slice(&header_crc(len, body_crc).to_le_bytes());
    out.extend_from_slice(body);
}

/// Calls `each` for every whole, valid frame in `buf`, in order. Stops at the first problem
/// and reports where it is; returns the length of the valid prefix otherwise.
pub fn decode_frames(
    buf: &[u8],
    mut each: impl FnMut(&[u8]),
) -> Result<usize, (usize, FrameError)> {
    let mut offset = 0usize;
    while offset < buf.len() {
        let rest = &buf[offset..];
        if rest.len() < FRAME_HEADER_LEN {
            return Err((offset, FrameError::Truncated { offset }));
        }
        let len_bytes = [rest[0], rest[1], rest[2], rest[3]];
        let body_crc = [rest[4], rest[5], rest[6], rest[7]];
        let stored_header_crc = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]);
        if header_crc(len_bytes, body_crc) != stored_header_crc {
            return Err((offset, FrameError::BadHeader { offset }));
        }
        let len = u32::from_le_bytes(len_bytes) as usize;
        if len > MAX_RECORD_LEN {
            return Err((offset, FrameError::BadHeader { offset }));
        }
        if rest.len() < FRAME_HEADER_LEN + len {
            return Err((offset, FrameError::Truncated { offset }));
        }
        let body = &rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
        if crc32c::crc32c(body) != u32::from_le_bytes(body_crc) {
            let end = offset + FRAME_HEADER_LEN + len;
            return Err((offset, FrameError::BadBody { offset, end }));
        }
        each(body);
        offset += FRAME_HEADER_LEN + len;
    }
    Ok(offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Arbitrary bytes never panic the decoder, and it never yields a record that was not
        /// written: valid frames before the damage come back intact.
        #[test]
        fn decoding_garbage_is_safe(
            records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8),
            garbage in proptest::collection::vec(any::<u8>(), 0..64),
            flip in any::<prop::sample::Index>(),
        ) {
            let mut buf = Vec::new();
            for r in &records {
                encode_frame(r, &mut buf);
            }
            let clean = buf.len();
            buf.extend_from_slice(&garbage);
            let mut seen = Vec::new();
            let result = decode_frames(&buf, |b| seen.push(b.to_vec()));
            prop_assert!(seen.len() >= records.len());
            prop_assert_eq!(&seen[..records.len()], &records[..]);
            if garbage.is_empty() {
                prop_assert_eq!(result, Ok(clean));
            }
            if !buf.is_empty() {
                let i = flip.index(buf.len());
                buf[i] ^= 0x5a;
                let mut seen = Vec::new();
                let _ = decode_frames(&buf, |b| seen.push(b.to_vec()));
                // Whatever decodes before the damage is exactly what was written: a flipped
                // byte stops decoding, it never yields a different record.
                for (got, want) in seen.iter().zip(records.iter()) {
                    prop_assert_eq!(got, want);
                }
            }
        }
    }

    #[test]
    fn round_trips_and_detects_damage() {
        let mut buf = Vec::new();
        encode_frame(b"hello", &mut buf);
        encode_frame(b"", &mut buf);
        encode_frame(b"world", &mut buf);
        let mut seen = Vec::new();
        assert_eq!(
            decode_frames(&buf, |b| seen.push(b.to_vec())),
            Ok(buf.len())
        );
        assert_eq!(
            seen,
            vec![b"hello".to_vec(), b"".to_vec(), b"world".to_vec()]
        );

        let torn = &buf[..buf.len() - 2];
        let mut count = 0;
        let err = decode_frames(torn, |_| count += 1).unwrap_err();
        assert_eq!(count, 2);
        assert!(matches!(err.1, FrameError::Truncated { .. }));

        let mut flipped = buf.clone();
        flipped[FRAME_HEADER_LEN + 1] ^= 0xff;
        let err = decode_frames(&flipped, |_| {}).unwrap_err();
        assert_eq!(err.0, 0);
        assert!(matches!(err.1, FrameError::BadBody { offset: 0, end: 17 }));

        // A damaged length is caught by the header checksum, even when it would point past
        // the end of the buffer (which would otherwise look like a torn write).
        let mut long = buf.clone();
        long[3] = 0x7f;
        let err = decode_frames(&long, |_| {}).unwrap_err();
        assert!(matches!(err.1, FrameError::BadHeader { offset: 0 }));
    }
}
