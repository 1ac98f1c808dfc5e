//! Snapshot files: `snap-<segment>.bin` holds every group's state as of a point at which all
//! log records in segments below `<segment>` are included, so those segments can be deleted.
//! Records at or above `<segment>` may or may not be included; applying them again must be a
//! no-op, which the state machine guarantees.

use crate::frame::{decode_frames, encode_frame};
use crate::{sync_dir, StorageError};
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"STSNAP01";
const SYNC_EVERY_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Replay the log from this segment on.
    pub segment: u64,
    /// One opaque blob per group, in group order.
    pub groups: Vec<Vec<u8>>,
}

fn snapshot_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("snap-{segment:020}.bin"))
}

fn list_snapshots(dir: &Path) -> Result<Vec<u64>, StorageError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(StorageError::io(dir))? {
        let entry = entry.map_err(StorageError::io(dir))?;
        let name = entry.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix("snap-"))
            .and_then(|s| s.strip_suffix(".bin"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Writes the snapshot atomically (temp file, fsync, rename, fsync of the directory) and then
/// removes older snapshots.
pub fn write_snapshot(dir: &Path, snapshot: &Snapshot) -> Result<(), StorageError> {
    let path = snapshot_path(dir, snapshot.segment);
    let tmp = path.with_extension("tmp");
    let mut buf = Vec::new();
    buf.extend_from_slice(MAGIC);
    let mut header = Vec::new();
    header.extend_from_slice(&snapshot.segment.to_le_bytes());
    header.extend_from_slice(&(snapshot.groups.len() as u64).to_le_bytes());
    encode_frame(&header, &mut buf);
    for group in &snapshot.groups {
        encode_frame(group, &mut buf);
    }
    let mut file = std::fs::File::create(&tmp).map_err(StorageError::io(&tmp))?;
    // Written and synced in slices: one giant fsync at the end would queue the log's own
    // small fsyncs behind hundreds of megabytes and stall every append meanwhile.
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
    std::fs::rename(&tmp, &path).map_err(StorageError::io(&path))?;
    sync_dir(dir)?;
    for older in list_snapshots(dir)? {
        if older < snapshot.segment {
            let p = snapshot_path(dir, older);
            std::fs::remove_file(&p).map_err(StorageError::io(&p))?;
        }
    }
    Ok(())
}

/// The newest snapshot, if any. A damaged newest snapshot is an error: the log segments it
/// covered may already be gone, so falling back to an older one could silently lose data.
pub fn load_latest_snapshot(dir: &Path) -> Result<Option<Snapshot>, StorageError> {
    if !dir.exists() {
        return Ok(None);
    }
    let Some(&segment) = list_snapshots(dir)?.last() else {
        return Ok(None);
    };
    let path = snapshot_path(dir, segment);
    let bytes = std::fs::read(&path).map_err(StorageError::io(&path))?;
    let corrupt = |offset: usize, reason: &str| StorageError::Corrupt {
        path: path.clone(),
        offset: offset as u64,
        reason: reason.to_string(),
    };
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(corrupt(0, "not a snapshot file"));
    }
    let mut frames = Vec::new();
    let end = decode_frames(&bytes[MAGIC.len()..], |b| frames.push(b.to_vec()))
        .map_err(|(offset, _)| corrupt(MAGIC.len() + offset, "damaged snapshot record"))?;
    debug_assert_eq!(end, bytes.len() - MAGIC.len());
    let mut frames = frames.into_iter();
    let header = frames.next().ok_or_else(|| corrupt(8, "missing header"))?;
    if header.len() != 16 {
        return Err(corrupt(8, "bad header"));
    }
    let mut word = [0u8; 8];
    word.copy_from_slice(&header[..8]);
    let recorded_segment = u64::from_le_bytes(word);
    word.copy_from_slice(&header[8..]);
    let count = u64::from_le_bytes(word) as usize;
    let groups: Vec<Vec<u8>> = frames.collect();
    if recorded_segment != segment || groups.len() != count {
        return Err(corrupt(8, "header does not match contents"));
    }
    Ok(Some(Snapshot { segment, groups }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_snapshot_wins_and_older_ones_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_latest_snapshot(dir.path()).unwrap(), None);
        let a = Snapshot {
            segment: 3,
            groups: vec![b"g0".to_vec(), vec![]],
        };
        let b = Snapshot {
            segment: 7,
            groups: vec![b"x".to_vec(), b"y".to_vec()],
        };
        write_snapshot(dir.path(), &a).unwrap();
        write_snapshot(dir.path(), &b).unwrap();
        assert_eq!(load_latest_snapshot(dir.path()).unwrap(), Some(b));
        assert_eq!(list_snapshots(dir.path()).unwrap(), vec![7]);
    }

    #[test]
    fn damaged_snapshot_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshot {
            segment: 2,
            groups: vec![b"state".to_vec()],
        };
        write_snapshot(dir.path(), &s).unwrap();
        let path = snapshot_path(dir.path(), 2);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(
            load_latest_snapshot(dir.path()),
            Err(StorageError::Corrupt { .. })
        ));
    }
}
