//! Record framing: `[len: u32 LE][crc32c(body): u32 LE][body]`.

pub const FRAME_HEADER_LEN: usize = 8;
/// Refuse absurd lengths when decoding so a corrupt header cannot make us allocate gigabytes.
pub const MAX_RECORD_LEN: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The buffer ends inside a frame (a torn write if it is at the end of the log).
    Truncated { offset: usize },
    /// The checksum does not match, or the length is impossible.
    Corrupt { offset: usize, reason: String },
}

pub fn encode_frame(body: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
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
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len > MAX_RECORD_LEN {
            return Err((
                offset,
                FrameError::Corrupt {
                    offset,
                    reason: format!("record length {len} is impossible"),
                },
            ));
        }
        if rest.len() < FRAME_HEADER_LEN + len {
            return Err((offset, FrameError::Truncated { offset }));
        }
        let body = &rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
        if crc32c::crc32c(body) != crc {
            return Err((
                offset,
                FrameError::Corrupt {
                    offset,
                    reason: "checksum mismatch".into(),
                },
            ));
        }
        each(body);
        offset += FRAME_HEADER_LEN + len;
    }
    Ok(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(seen, vec![b"hello".to_vec(), b"".to_vec(), b"world".to_vec()]);

        let torn = &buf[..buf.len() - 2];
        let mut count = 0;
        let err = decode_frames(torn, |_| count += 1).unwrap_err();
        assert_eq!(count, 2);
        assert!(matches!(err.1, FrameError::Truncated { .. }));

        let mut flipped = buf.clone();
        flipped[FRAME_HEADER_LEN + 1] ^= 0xff;
        let err = decode_frames(&flipped, |_| {}).unwrap_err();
        assert_eq!(err.0, 0);
        assert!(matches!(err.1, FrameError::Corrupt { .. }));
    }
}
