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

use crate::wal::WalStats;
use crate::StorageError;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The file being prepared; never mistaken for a segment (`wal-<n>.log`).
const SPARE_NAME: &str = "wal-spare.tmp";
/// Zeroes are written and flushed 128 KiB at a time, so the fill never builds a writeback
/// burst that the log's own commits would queue behind: a commit's `fdatasync` waits for the
/// chunk in the disk's queue, and MiB chunks (about 3 ms each here) made about ten commits a
/// second take over 2 ms while a segment was being filled.
const CHUNK: usize = 128 * 1024;
/// After each chunk the helper rests this many times as long as the chunk took: the disk
/// spends at most a third of its time on zeroes, so commits never queue behind a run of
/// them (unpaced, the 64 MiB fill was a 0.3 s burst of 4 ms commits every segment).
const REST_PER_BUSY: u32 = 2;
/// The fill keeps to this many times the log's own writes since the spare was asked for: the
/// spare a 64 MiB segment asks for at 4 MiB is ready after 16 MiB more, and filling never
/// becomes a burst of its own. A third of the disk's time was still too much where several
/// logs share a disk (three nodes on one machine filled their spares at the same moment, as
/// they write the same entries: about a second of a saturated disk every segment).
const PACE: u64 = 4;
/// Longest pause between looks at the log's progress while the fill is ahead of it.
const MAX_POLL: Duration = Duration::from_millis(100);

enum State {
    Idle,
    Making,
    Ready,
}

pub(crate) struct Preallocator {
    path: PathBuf,
    bytes: u64,
    /// Each request carries the log's bytes written at the time, where the pacing starts.
    requests: Option<mpsc::Sender<u64>>,
    log: Arc<WalStats>,
    done: mpsc::Receiver<Result<(), StorageError>>,
    state: State,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Preallocator {
    /// Starts the helper for segments of `bytes` bytes in `dir`, paced by what the log (`log`)
    /// writes. A spare left by a crash may be partly written, so it is deleted; nothing is
    /// prepared until [`Self::request`].
    pub fn start(dir: &Path, bytes: u64, log: Arc<WalStats>) -> Result<Preallocator, StorageError> {
        let path = dir.join(SPARE_NAME);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io(&path)(e)),
        }
        let (requests, requested) = mpsc::channel::<u64>();
        let (finished, done) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let path = path.clone();
            let stop = stop.clone();
            let log = log.clone();
            std::thread::Builder::new()
                .name("starcite-wal-prep".into())
                .spawn(move || {
                    while let Ok(start) = requested.recv() {
                        let allowed = || {
                            let written = log.bytes_written.load(Ordering::Relaxed);
                            written.saturating_sub(start).saturating_mul(PACE)
                        };
                        if finished
                            .send(zero_fill(&path, bytes, &stop, allowed))
                            .is_err()
                        {
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
            log,
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
                let start = self.log.bytes_written.load(Ordering::Relaxed);
                if requests.send(start).is_ok() {
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

/// Writes `bytes` zeroes to `path`, never more than `allowed()` of them.
fn zero_fill(
    path: &Path,
    bytes: u64,
    stop: &AtomicBool,
    allowed: impl Fn() -> u64,
) -> Result<(), StorageError> {
    let io = || StorageError::io(path);
    let mut file = File::create(path).map_err(io())?;
    let zeroes = vec![0u8; CHUNK];
    let mut written = 0u64;
    let mut poll = Duration::from_millis(5);
    while written < bytes {
        if stop.load(Ordering::Relaxed) {
            return Err(StorageError::Closed);
        }
        let n = (bytes - written).min(CHUNK as u64) as usize;
        if allowed() < written + n as u64 {
            // Ahead of the log: look again later, less often while the log stays quiet.
            std::thread::sleep(poll);
            poll = (poll * 2).min(MAX_POLL);
            continue;
        }
        poll = Duration::from_millis(5);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spare_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join(SPARE_NAME)).map_or(0, |m| m.len())
    }

    /// Waits (up to 10 s) for `done`.
    fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what} never happened");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_fill_keeps_pace_with_the_log_instead_of_running_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(WalStats::default());
        let bytes = 4 * CHUNK as u64;
        let mut spare = Preallocator::start(dir.path(), bytes, log.clone()).unwrap();
        log.bytes_written.store(1_000_000, Ordering::Relaxed);
        spare.request();
        // The log writes nothing more: nothing is filled.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(spare_len(dir.path()), 0);
        assert!(spare.take().is_none());
        // One chunk's worth of pace: one chunk, and no more while the log stays quiet.
        log.bytes_written
            .fetch_add(CHUNK as u64 / PACE, Ordering::Relaxed);
        eventually("the first chunk", || spare_len(dir.path()) == CHUNK as u64);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(spare_len(dir.path()), CHUNK as u64);
        assert!(spare.take().is_none());
        // The log writes on: the spare is finished, all zeroes.
        log.bytes_written.fetch_add(bytes / PACE, Ordering::Relaxed);
        let mut ready = None;
        eventually("a finished spare", || {
            ready = spare.take();
            ready.is_some()
        });
        let zeroes = std::fs::read(ready.unwrap()).unwrap();
        assert_eq!(zeroes.len() as u64, bytes);
        assert!(zeroes.iter().all(|&b| b == 0));
    }
}
