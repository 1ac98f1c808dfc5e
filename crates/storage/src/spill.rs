//! The spill store: unarchived events moved out of memory onto local disk, so that a long
//! archive outage costs disk, not memory.
//!
//! Each group has its own directory of append-only segment files. A spilled run is a
//! contiguous byte extent holding checksummed frames, one per event; the caller records the
//! extent ([`SpillExtent`]) in its state and reads it back with [`SpillStore::read`]. Writes
//! are not synced one by one: [`SpillStore::sync`] makes everything written for a group
//! durable, and must run before any durable state (a snapshot) refers to those extents.
//! Until then the events are also in the node's log, so a crash loses nothing.
//!
//! Segments are deleted only through [`SpillStore::retain`], with the set of segments still
//! referenced; a segment is never appended to after a restart (a torn end stays unreferenced).

use crate::frame::{decode_frames, encode_frame};
use crate::{sync_dir, StorageError};
use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};
use starcite_core::SpillExtent;
use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A segment is closed and a new one started past this size.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

pub struct SpillStore {
    dir: PathBuf,
    groups: Vec<Mutex<GroupSpill>>,
    /// Bytes in every group's segment files.
    disk_bytes: AtomicU64,
}

/// One group's segments. Hold it (through [`SpillStore::lock`]) across a write and the state
/// change that refers to it, so that [`SpillStore::retain`] never sees a written but not yet
/// referenced extent.
pub struct GroupSpill {
    dir: PathBuf,
    /// Segment files on disk, by number, with their sizes.
    segments: std::collections::BTreeMap<u64, u64>,
    /// The segment being appended to (created by this process).
    active: Option<(u64, File)>,
    /// Number of the next segment: numbers are never reused while the store is open.
    next_segment: u64,
    /// Whether anything written since the last sync (data or a new file) is not yet durable.
    unsynced: BTreeSet<u64>,
    dir_unsynced: bool,
}

impl SpillStore {
    /// Opens (creating) `dir` with one sub-directory per group.
    pub fn open(dir: &Path, groups: u32) -> Result<SpillStore, StorageError> {
        std::fs::create_dir_all(dir).map_err(StorageError::io(dir))?;
        let mut total = 0;
        let mut all = Vec::with_capacity(groups as usize);
        for group in 0..groups {
            let gdir = dir.join(format!("{group:05}"));
            let mut segments = std::collections::BTreeMap::new();
            match std::fs::read_dir(&gdir) {
                Ok(entries) => {
                    for entry in entries {
                        let entry = entry.map_err(StorageError::io(&gdir))?;
                        let name = entry.file_name();
                        let Some(n) = name
                            .to_str()
                            .and_then(|n| n.strip_suffix(".spill"))
                            .and_then(|n| n.parse::<u64>().ok())
                        else {
                            continue;
                        };
                        let len = entry.metadata().map_err(StorageError::io(&gdir))?.len();
                        total += len;
                        segments.insert(n, len);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io(&gdir)(e)),
            }
            let next_segment = segments.keys().next_back().map_or(1, |n| n + 1);
            all.push(Mutex::new(GroupSpill {
                dir: gdir,
                segments,
                active: None,
                next_segment,
                unsynced: BTreeSet::new(),
                dir_unsynced: false,
            }));
        }
        Ok(SpillStore {
            dir: dir.to_path_buf(),
            groups: all,
            disk_bytes: AtomicU64::new(total),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The group's segments, held until the guard is dropped.
    pub fn lock(&self, group: u32) -> Option<SpillGuard<'_>> {
        let inner = self.groups.get(group as usize)?.lock();
        Some(SpillGuard { store: self, inner })
    }

    /// Reads back the events of one extent, in the order they were written.
    pub fn read(&self, group: u32, extent: &SpillExtent) -> Result<Vec<Bytes>, StorageError> {
        let path = segment_path(&self.dir.join(format!("{group:05}")), extent.segment);
        let file = File::open(&path).map_err(StorageError::io(&path))?;
        let mut buf = vec![0u8; extent.len as usize];
        file.read_exact_at(&mut buf, extent.offset)
            .map_err(StorageError::io(&path))?;
        let buf = Bytes::from(buf);
        let mut events = Vec::new();
        decode_frames(&buf, |body| {
            // The body sits after its frame header: slice the shared buffer, no copy.
            let start = body.as_ptr() as usize - buf.as_ptr() as usize;
            events.push(buf.slice(start..start + body.len()));
        })
        .map_err(|(offset, e)| StorageError::Corrupt {
            path: path.clone(),
            offset: extent.offset + offset as u64,
            reason: format!("damaged spilled event: {e:?}"),
        })?;
        Ok(events)
    }

    /// Bytes in all segment files.
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes.load(Ordering::Relaxed)
    }
}

/// A group's segments, locked.
pub struct SpillGuard<'a> {
    store: &'a SpillStore,
    inner: MutexGuard<'a, GroupSpill>,
}

impl SpillGuard<'_> {
    /// Appends `events` as one extent. Not durable until [`SpillGuard::sync`].
    pub fn write(&mut self, events: &[Bytes]) -> Result<SpillExtent, StorageError> {
        let g = &mut *self.inner;
        let full = g
            .active
            .as_ref()
            .is_some_and(|(n, _)| g.segments.get(n).copied().unwrap_or(0) >= SEGMENT_BYTES);
        if g.active.is_none() || full {
            std::fs::create_dir_all(&g.dir).map_err(StorageError::io(&g.dir))?;
            let n = g.next_segment;
            g.next_segment += 1;
            let path = segment_path(&g.dir, n);
            let file = std::fs::OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)
                .map_err(StorageError::io(&path))?;
            g.segments.insert(n, 0);
            g.active = Some((n, file));
            g.dir_unsynced = true;
        }
        let Some((segment, file)) = g.active.as_mut() else {
            unreachable!("an active segment was just ensured");
        };
        let mut buf = Vec::with_capacity(events.iter().map(|e| e.len() + 12).sum());
        for event in events {
            encode_frame(event, &mut buf);
        }
        let size = g.segments.entry(*segment).or_insert(0);
        let offset = *size;
        if let Err(e) = file.write_all(&buf) {
            // The file's end is now unknown: never append to it again.
            let path = segment_path(&g.dir, *segment);
            g.active = None;
            return Err(StorageError::io(path)(e));
        }
        *size += buf.len() as u64;
        self.store
            .disk_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        g.unsynced.insert(*segment);
        Ok(SpillExtent {
            segment: *segment,
            offset,
            len: buf.len() as u64,
        })
    }

    /// Makes every extent written so far durable.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        let g = &mut *self.inner;
        for n in std::mem::take(&mut g.unsynced) {
            if !g.segments.contains_key(&n) {
                continue;
            }
            let path = segment_path(&g.dir, n);
            let synced = match &g.active {
                Some((active, file)) if *active == n => file.sync_data(),
                _ => File::open(&path).and_then(|f| f.sync_data()),
            };
            synced.map_err(StorageError::io(&path))?;
        }
        if std::mem::take(&mut g.dir_unsynced) {
            sync_dir(&g.dir)?;
        }
        Ok(())
    }

    /// Deletes every segment not in `referenced` (the one being appended to included: under
    /// the lock, nothing written is unreferenced). Returns how many were deleted.
    pub fn retain(&mut self, referenced: &BTreeSet<u64>) -> Result<usize, StorageError> {
        let g = &mut *self.inner;
        let doomed: Vec<u64> = g
            .segments
            .keys()
            .copied()
            .filter(|n| !referenced.contains(n))
            .collect();
        for n in &doomed {
            if g.active.as_ref().is_some_and(|(active, _)| active == n) {
                g.active = None;
            }
            let path = segment_path(&g.dir, *n);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io(path)(e)),
            }
            let len = g.segments.remove(n).unwrap_or(0);
            g.unsynced.remove(n);
            self.store.disk_bytes.fetch_sub(len, Ordering::Relaxed);
        }
        Ok(doomed.len())
    }

    /// Segment files on disk for this group.
    pub fn segment_count(&self) -> usize {
        self.inner.segments.len()
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:016}.spill"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(n: usize, tag: &str) -> Vec<Bytes> {
        (0..n)
            .map(|i| Bytes::from(format!("{{\"seq\":{i},\"tag\":\"{tag}\"}}")))
            .collect()
    }

    #[test]
    fn written_extents_read_back_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = SpillStore::open(dir.path(), 2).unwrap();
        let (a, b) = {
            let mut g = store.lock(1).unwrap();
            let a = g.write(&events(3, "a")).unwrap();
            let b = g.write(&events(5, "b")).unwrap();
            g.sync().unwrap();
            (a, b)
        };
        assert_eq!(store.read(1, &a).unwrap(), events(3, "a"));
        assert_eq!(store.read(1, &b).unwrap(), events(5, "b"));
        assert_eq!(store.disk_bytes(), a.len + b.len);
        drop(store);
        let store = SpillStore::open(dir.path(), 2).unwrap();
        assert_eq!(store.read(1, &b).unwrap(), events(5, "b"));
        assert_eq!(store.disk_bytes(), a.len + b.len);
        // A reopened store never appends to an old segment.
        let c = store.lock(1).unwrap().write(&events(1, "c")).unwrap();
        assert_ne!(c.segment, a.segment);
    }

    #[test]
    fn retain_deletes_exactly_the_unreferenced_segments() {
        let dir = tempfile::tempdir().unwrap();
        let store = SpillStore::open(dir.path(), 1).unwrap();
        let old = store.lock(0).unwrap().write(&events(2, "x")).unwrap();
        drop(store);
        let store = SpillStore::open(dir.path(), 1).unwrap();
        let new = store.lock(0).unwrap().write(&events(2, "y")).unwrap();
        let mut g = store.lock(0).unwrap();
        assert_eq!(g.segment_count(), 2);
        assert_eq!(g.retain(&BTreeSet::from([new.segment])).unwrap(), 1);
        assert_eq!(g.segment_count(), 1);
        drop(g);
        assert!(store.read(0, &old).is_err());
        assert_eq!(store.read(0, &new).unwrap(), events(2, "y"));
        assert_eq!(store.disk_bytes(), new.len);
        // The active segment goes too once nothing refers to it; writing starts a new one.
        let mut g = store.lock(0).unwrap();
        assert_eq!(g.retain(&BTreeSet::new()).unwrap(), 1);
        assert_eq!(store.disk_bytes(), 0);
        let next = g.write(&events(1, "z")).unwrap();
        assert!(next.segment > new.segment);
        drop(g);
        assert_eq!(store.read(0, &next).unwrap(), events(1, "z"));
    }

    #[test]
    fn damage_inside_an_extent_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = SpillStore::open(dir.path(), 1).unwrap();
        let extent = store.lock(0).unwrap().write(&events(4, "z")).unwrap();
        let path = segment_path(&dir.path().join("00000"), extent.segment);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(
            store.read(0, &extent),
            Err(StorageError::Corrupt { .. })
        ));
    }
}
