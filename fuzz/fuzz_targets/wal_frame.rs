//! The log's frame decoder, then recovery of a write-ahead log whose segment holds the input.
//!
//! `decode_frames` must never panic and must only yield frames that `encode_frame` would have
//! written at that place. `Wal::open` on a directory holding the input as a segment must return
//! `Ok` or a clean error: damage in a segment that is not the last is always an error, a torn
//! tail of the last one is cut off, and a second recovery of what the first left behind gives
//! back exactly the same records without cutting anything.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starcite_storage::{decode_frames, encode_frame, StorageError, Wal, WalOptions};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One scratch directory for the whole run (on tmpfs when there is one: fsync is free there).
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("starcite-fuzz-wal")
                .tempdir_in(shm)
                .unwrap()
        } else {
            tempfile::tempdir().unwrap()
        }
    })
    .path()
}

fn segment(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("wal-{n:020}.log"))
}

fn open(dir: &Path) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
    let mut seen = Vec::new();
    let wal = Wal::open(
        WalOptions {
            dir: dir.to_path_buf(),
            segment_bytes: 1 << 20,
            segment_header: None,
        },
        |segment, body| seen.push((segment, body.to_vec())),
    )?;
    wal.close();
    Ok(seen)
}

fuzz_target!(|data: &[u8]| {
    // The decoder alone.
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let result = decode_frames(data, |body| frames.push(body.to_vec()));
    let mut reencoded = Vec::new();
    for body in &frames {
        encode_frame(body, &mut reencoded);
    }
    assert!(
        data.starts_with(&reencoded),
        "decoded a frame that was not written"
    );
    match &result {
        Ok(end) => assert_eq!(*end, data.len()),
        Err((valid, _)) => {
            assert_eq!(*valid, reencoded.len());
            assert!(*valid < data.len());
        }
    }

    // Recovery of a log holding it. The input is either the only segment, or the last one
    // after a valid segment, or a segment followed by a valid one (so not the last).
    let dir = scratch();
    for entry in std::fs::read_dir(dir).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let mut valid = Vec::new();
    encode_frame(b"before", &mut valid);
    encode_frame(b"", &mut valid);
    let mode = data.first().map_or(0, |b| b % 3);
    let (input_segment, other) = match mode {
        0 => (1, None),
        1 => (2, Some(1)),
        _ => (1, Some(2)),
    };
    std::fs::write(segment(dir, input_segment), data).unwrap();
    if let Some(n) = other {
        std::fs::write(segment(dir, n), &valid).unwrap();
    }
    let input_is_last = other.is_none_or(|n| n < input_segment);

    match open(dir) {
        Ok(seen) => {
            if !input_is_last {
                assert!(
                    result.is_ok(),
                    "damage in a segment that is not the last was accepted"
                );
            }
            let from_input: Vec<Vec<u8>> = seen
                .iter()
                .filter(|(s, _)| *s == input_segment)
                .map(|(_, b)| b.clone())
                .collect();
            assert_eq!(from_input, frames);
            // What is left on disk is the valid prefix, and recovering again changes nothing.
            let kept = std::fs::read(segment(dir, input_segment)).unwrap();
            assert_eq!(kept, reencoded);
            assert_eq!(open(dir).expect("second recovery"), seen);
        }
        Err(StorageError::Corrupt { .. }) => {
            assert!(result.is_err(), "a cleanly decoding log was refused");
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
});
