//! Small files written atomically (temp file, fsync, rename, fsync of the directory) as a
//! magic number followed by checksummed frames, e.g. a group's snapshot. A reader sees either
//! the old file or the new one, never a mix, and a damaged file is an error, never a guess.

use crate::frame::{decode_frames, encode_frame};
use crate::{sync_dir, StorageError};
use std::io::Write;
use std::path::Path;

/// Bytes written between fsyncs: one giant fsync at the end would queue the log's own small
/// fsyncs behind it and stall every append meanwhile.
const SYNC_EVERY_BYTES: usize = 4 * 1024 * 1024;

/// Replaces `path` with a file holding `magic` and then each of `frames`.
pub fn write_framed_file(
    path: &Path,
    magic: &[u8; 8],
    frames: &[&[u8]],
) -> Result<(), StorageError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut buf = Vec::with_capacity(8 + frames.iter().map(|f| f.len() + 16).sum::<usize>());
    buf.extend_from_slice(magic);
    for frame in frames {
        encode_frame(frame, &mut buf);
    }
    let mut file = std::fs::File::create(&tmp).map_err(StorageError::io(&tmp))?;
    for (i, chunk) in buf.chunks(SYNC_EVERY_BYTES).enumerate() {
        file.write_all(chunk)
            .and_then(|_| file.sync_data())
            .map_err(StorageError::io(&tmp))?;
        if i % 4 == 3 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    file.sync_all().map_err(StorageError::io(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(StorageError::io(path))?;
    sync_dir(dir)
}

/// The frames of a file written by [`write_framed_file`], or `None` if there is no such file.
pub fn read_framed_file(
    path: &Path,
    magic: &[u8; 8],
) -> Result<Option<Vec<Vec<u8>>>, StorageError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StorageError::io(path)(e)),
    };
    let corrupt = |offset: usize, reason: &str| StorageError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason: reason.to_string(),
    };
    if bytes.len() < magic.len() || &bytes[..magic.len()] != magic {
        return Err(corrupt(0, "unexpected file type"));
    }
    let mut frames = Vec::new();
    decode_frames(&bytes[magic.len()..], |b| frames.push(b.to_vec()))
        .map_err(|(offset, _)| corrupt(magic.len() + offset, "damaged record"))?;
    Ok(Some(frames))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: &[u8; 8] = b"STTEST01";

    #[test]
    fn round_trip_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        assert_eq!(read_framed_file(&path, MAGIC).unwrap(), None);
        write_framed_file(&path, MAGIC, &[b"one", b""]).unwrap();
        write_framed_file(&path, MAGIC, &[b"two", b"three"]).unwrap();
        assert_eq!(
            read_framed_file(&path, MAGIC).unwrap(),
            Some(vec![b"two".to_vec(), b"three".to_vec()])
        );
        assert!(!path.with_extension("tmp").exists());
    }

    #[test]
    fn damage_and_wrong_magic_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        write_framed_file(&path, MAGIC, &[b"state"]).unwrap();
        assert!(read_framed_file(&path, b"OTHER001").is_err());
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(
            read_framed_file(&path, MAGIC),
            Err(StorageError::Corrupt { .. })
        ));
    }
}
