//! Zero-filled log segments, made ahead of time on a helper thread.
//!
//! A write that grows a file changes its size, and `fdatasync` must then also make the inode
//! durable: on ext4 without a journal that is a second synchronous write on every commit (with
//! a journal, a journal commit). Writing into space that already holds durable zeroes changes
//! no metadata, so a commit is one data write and a cache flush (`fdatasync` of a 6 KiB write
//! took 0.13 ms instead of 0.18 ms on the benchmark machine). The zeroes are written, not
//! `fallocate`d: unwritten extents need a metadata update on their first write, the very cost
//! this avoids. Zeroes are never a valid frame (the header checksum of zeroes is not zero), so
//! recovery reads them as the end of the log.

use crate::StorageError;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

/// The file being prepared; never mistaken for a segment (`wal-<n>.log`).
const SPARE_NAME: &str = "wal-spare.tmp";
/// Zeroes are written and flushed 128 KiB at a time, so the fill never builds a writeback
/// burst that the log's own commits would queue behind: a commit's `fdatasync` waits for the
/// chunk in the disk's queue, and MiB chunks (about 3 ms each here) made about ten commits a
/// second take over 2 ms while a segment was being filled.
const CHUNK: usize = 128 * 1024;
/// After each chunk the helper rests this many times as long as the chunk took: the disk
/// spends at most a third of its time on zeroes, so commits never queue behind a run of
/// them (unpaced, the 64 MiB fill was a 0.3 s burst of 4 ms commits every segment). At
/// this disk's speed a segment is still ready long before the current one fills.
const REST_PER_BUSY: u32 = 2;

enum State {
    Idle,
    Making,
    Ready,
}

pub(crate) struct Preallocator {
    path: PathBuf,
    bytes: u64,
    requests: Option<mpsc::Sender<()>>,
    done: mpsc::Receiver<Result<(), StorageError>>,
    state: State,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Preallocator {
    /// Starts the helper for segments of `bytes` bytes in `dir`. A spare left by a crash may be
    /// partly written, so it is deleted; nothing is prepared until [`Self::request`].
    pub fn start(dir: &Path, bytes: u64) -> Result<Preallocator, StorageError> {
        let path = dir.join(SPARE_NAME);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io(&path)(e)),
        }
        let (requests, requested) = mpsc::channel::<()>();
        let (finished, done) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let path = path.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("starcite-wal-prep".into())
                .spawn(move || {
                    while requested.recv().is_ok() {
                        if finished.send(zero_fill(&path, bytes, &stop)).is_err() {
                            return;
                        }
                    }
                })
                .map_err(StorageError::io(dir))?
        };
        Ok(Preallocator {
            path,
            bytes,
            requests: Some(requests),
            done,
            state: State::Idle,
            stop,
            thread: Some(thread),
        })
    }

    /// Size of every spare.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Asks for a spare unless one is ready or on its way.
    pub fn request(&mut self) {
        if matches!(self.state, State::Idle) {
            if let Some(requests) = &self.requests {
                if requests.send(()).is_ok() {
                    self.state = State::Making;
                }
            }
        }
    }

    /// The path of a finished spare, now the caller's to rename; `None` if none is ready.
    pub fn take(&mut self) -> Option<PathBuf> {
        if matches!(self.state, State::Making) {
            match self.done.try_recv() {
                Ok(Ok(())) => self.state = State::Ready,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not prepare the next log segment; it will grow as it is written");
                    self.state = State::Idle;
                }
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => self.state = State::Idle,
            }
        }
        if matches!(self.state, State::Ready) {
            self.state = State::Idle;
            return Some(self.path.clone());
        }
        None
    }
}

impl Drop for Preallocator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn zero_fill(path: &Path, bytes: u64, stop: &AtomicBool) -> Result<(), StorageError> {
    let io = || StorageError::io(path);
    let mut file = File::create(path).map_err(io())?;
    let zeroes = vec![0u8; CHUNK];
    let mut written = 0u64;
    while written < bytes {
        if stop.load(Ordering::Relaxed) {
            return Err(StorageError::Closed);
        }
        let n = (bytes - written).min(CHUNK as u64) as usize;
        let started = Instant::now();
        file.write_all(&zeroes[..n])
            .and_then(|_| file.sync_data())
            .map_err(io())?;
        written += n as u64;
        if written < bytes {
            std::thread::sleep(started.elapsed() * REST_PER_BUSY);
        }
    }
    Ok(())
}
