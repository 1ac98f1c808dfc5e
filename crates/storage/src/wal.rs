//! The write-ahead log: numbered segment files `wal-<n>.log`, one writer thread, group commit.

use crate::frame::{decode_frames, encode_frame, FrameError};
use crate::prealloc::Preallocator;
use crate::spacing::{RecordRate, WriteSpacing};
use crate::{sync_dir, StorageError};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Called once a record (or barrier) is durable, with the number of the segment it went into,
/// or with the reason it never will be. Callbacks run on the writer thread in log order, so
/// they must be quick.
pub type Durable = Box<dyn FnOnce(Result<u64, StorageError>) + Send>;

/// Produces the record written first in every new segment: whatever a reader needs so that
/// the segments before it can be deleted once nothing else in them is needed.
pub type SegmentHeader = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;
type RollDone = Box<dyn FnOnce(Result<u64, StorageError>) + Send>;

/// Most bytes merged into one write + fsync; bigger bursts are split into several batches.
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// How long the writer waits for a holder (see [`WalHolder`]) at most before writing what it
/// has: about what a peer's batch of Raft messages takes to handle, well under an fsync.
pub const HOLD_WAIT: std::time::Duration = std::time::Duration::from_micros(100);
/// A segment that has taken this much gets its successor zero-filled (half the segment size if
/// that is smaller): a node that writes little never spends a segment's worth of zeroes.
const SPARE_AFTER_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Clone)]
pub struct WalOptions {
    pub dir: PathBuf,
    /// A segment is closed and a new one started once it grows past this size.
    pub segment_bytes: u64,
    /// Written (and synced) as the first record of each segment the log starts.
    pub segment_header: Option<SegmentHeader>,
    /// Longest wait for a holder before a write ([`HOLD_WAIT`] unless a test needs longer).
    pub hold_wait: std::time::Duration,
    /// After a write that carried several records (several writers are active), the next
    /// write starts no sooner than this policy's wait after it, so that more records share
    /// each fsync. A write of a single record (a lone writer) never delays the next.
    pub write_spacing: WriteSpacing,
}

#[derive(Debug, Default)]
pub struct WalStats {
    pub bytes_written: AtomicU64,
    pub records_written: AtomicU64,
    pub fsyncs: AtomicU64,
    /// The segment being written.
    pub current_segment: AtomicU64,
}

enum Msg {
    Append(Vec<u8>, Durable),
    Barrier(Durable),
    Roll(RollDone),
}

pub struct Wal {
    tx: mpsc::Sender<Msg>,
    stats: Arc<WalStats>,
    holds: WalHolder,
    writer: Option<JoinHandle<()>>,
}

/// Lets a producer that is about to queue several records in a row (a peer's batch of Raft
/// messages, each appending to the log) ask the writer to wait for the rest before it writes,
/// so they share one write + fsync instead of the first going alone. The writer waits at most
/// `WalOptions::hold_wait`, so a holder that stalls only delays the log that long.
#[derive(Clone, Default)]
pub struct WalHolder(Arc<AtomicUsize>);

/// While alive, the log's writer holds off writing (within `WalOptions::hold_wait`).
pub struct WalHold(Arc<AtomicUsize>);

impl WalHolder {
    pub fn hold(&self) -> WalHold {
        self.0.fetch_add(1, Ordering::AcqRel);
        WalHold(self.0.clone())
    }

    fn is_held(&self) -> bool {
        self.0.load(Ordering::Acquire) > 0
    }
}

impl Drop for WalHold {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("wal-{n:020}.log"))
}

/// Segment numbers present in `dir`, ascending.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<u64>, StorageError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(StorageError::io(dir))? {
        let entry = entry.map_err(StorageError::io(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_prefix("wal-")
            .and_then(|r| r.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

impl Wal {
    /// Opens the log in `opts.dir`, replaying every record of every segment into
    /// `on_record`, in order, with the segment it is in. A torn tail at the end of the last
    /// segment (a crash mid-write) is cut off; damage anywhere else is an error, because
    /// serving from a log with a hole in it would serve wrong data.
    pub fn open(
        opts: WalOptions,
        mut on_record: impl FnMut(u64, &[u8]),
    ) -> Result<Wal, StorageError> {
        std::fs::create_dir_all(&opts.dir).map_err(StorageError::io(&opts.dir))?;
        let live = list_segments(&opts.dir)?;
        let mut buf = Vec::new();
        // Where the last segment's records end (appends continue there), and its length.
        let mut end = 0u64;
        let mut length = 0u64;
        for (i, &n) in live.iter().enumerate() {
            let path = segment_path(&opts.dir, n);
            buf.clear();
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut buf))
                .map_err(StorageError::io(&path))?;
            let is_last = i + 1 == live.len();
            end = buf.len() as u64;
            length = end;
            match decode_frames(&buf, |body| on_record(n, body)) {
                Ok(_) => {}
                // The zeroes of a preallocated segment: the clean end of the log.
                Err((valid, _)) if is_last && buf[valid..].iter().all(|&b| b == 0) => {
                    end = valid as u64;
                }
                Err((valid, err)) => {
                    let torn_tail = is_last && is_torn_tail(&buf[valid..], &err);
                    if !torn_tail {
                        let reason = match err {
                            FrameError::Truncated { .. } => "truncated record".to_string(),
                            FrameError::BadHeader { .. } => "damaged record header".to_string(),
                            FrameError::BadBody { .. } => "record checksum mismatch".to_string(),
                        };
                        return Err(StorageError::Corrupt {
                            path,
                            offset: valid as u64,
                            reason,
                        });
                    }
                    tracing::warn!(
                        segment = %path.display(),
                        offset = valid,
                        dropped_bytes = buf.len() - valid,
                        "truncating torn write at the end of the log"
                    );
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(StorageError::io(&path))?;
                    f.set_len(valid as u64)
                        .and_then(|_| f.sync_all())
                        .map_err(StorageError::io(&path))?;
                    end = valid as u64;
                    length = end;
                }
            }
        }
        let current = live.last().copied().unwrap_or(1);
        let path = segment_path(&opts.dir, current);
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(StorageError::io(&path))?;
        sync_dir(&opts.dir)?;
        let segment_bytes = opts.segment_bytes.max(1);
        let stats = Arc::new(WalStats::default());
        let spare = Preallocator::start(&opts.dir, segment_bytes, stats.clone())?;

        let (tx, rx) = mpsc::channel();
        let holds = WalHolder::default();
        stats.current_segment.store(current, Ordering::Relaxed);
        let mut writer = Writer {
            dir: opts.dir.clone(),
            segment_header: opts.segment_header.clone(),
            segment_bytes,
            file,
            segment: current,
            segment_size: end,
            allocated: length,
            spare,
            buf: Vec::with_capacity(1024 * 1024),
            pending: Vec::new(),
            poisoned: false,
            stats: stats.clone(),
            holds: holds.clone(),
            hold_wait: opts.hold_wait,
            write_spacing: opts.write_spacing,
            rate: RecordRate::default(),
        };
        let handle = std::thread::Builder::new()
            .name("starcite-wal".into())
            .spawn(move || writer.run(rx))
            .map_err(StorageError::io(&opts.dir))?;
        Ok(Wal {
            tx,
            stats,
            holds,
            writer: Some(handle),
        })
    }

    /// Queues `body` to be appended; `done` runs once it is fsync'd. Records are written in
    /// the order of `append` calls.
    pub fn append(&self, body: &[u8], done: Durable) {
        let mut frame = Vec::with_capacity(body.len() + crate::FRAME_HEADER_LEN);
        encode_frame(body, &mut frame);
        if let Err(mpsc::SendError(Msg::Append(_, done))) = self.tx.send(Msg::Append(frame, done)) {
            done(Err(StorageError::Closed));
        }
    }

    /// `done` runs once everything appended before this call is durable.
    pub fn barrier(&self, done: Durable) {
        if let Err(mpsc::SendError(Msg::Barrier(done))) = self.tx.send(Msg::Barrier(done)) {
            done(Err(StorageError::Closed));
        }
    }

    /// Closes the current segment and starts a new one; `done` gets the new segment's number.
    /// Every record appended before this call is in a lower-numbered segment.
    pub fn roll(&self, done: impl FnOnce(Result<u64, StorageError>) + Send + 'static) {
        if let Err(mpsc::SendError(Msg::Roll(done))) = self.tx.send(Msg::Roll(Box::new(done))) {
            done(Err(StorageError::Closed));
        }
    }

    /// Bytes the segments in `dir` take on disk (zero-filled space included, the spare being
    /// prepared not).
    pub fn segments_disk_bytes(dir: &Path) -> Result<u64, StorageError> {
        let mut total = 0;
        for n in list_segments(dir)? {
            let path = segment_path(dir, n);
            match std::fs::metadata(&path) {
                Ok(m) => total += m.len(),
                // Deleted since the listing (a concurrent garbage collection): no bytes.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io(&path)(e)),
            }
        }
        Ok(total)
    }

    /// Deletes segments numbered below `segment` (they are covered by a snapshot).
    pub fn remove_segments_before(dir: &Path, segment: u64) -> Result<usize, StorageError> {
        let mut removed = 0;
        for n in list_segments(dir)? {
            if n < segment {
                let path = segment_path(dir, n);
                std::fs::remove_file(&path).map_err(StorageError::io(&path))?;
                removed += 1;
            }
        }
        if removed > 0 {
            sync_dir(dir)?;
        }
        Ok(removed)
    }

    /// Hands out holds on this log's writer (see [`WalHolder`]).
    pub fn holder(&self) -> WalHolder {
        self.holds.clone()
    }

    pub fn stats(&self) -> &WalStats {
        &self.stats
    }

    /// Stops the writer after everything queued so far is written.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let (tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(handle) = self.writer.take() {
            // The last owner may be a durability callback running on the writer itself; it
            // finishes on its own once the channel is closed.
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A crash mid-write (`kill -9`, a full disk) leaves a frame cut short as the very last thing
/// in the log. After a power loss the last, never-fsync'd write may also hold garbage or
/// zeroes. Anything else — a damaged frame with intact data after it — is damage in the
/// middle, and recovery must not skip it.
fn is_torn_tail(rest: &[u8], err: &FrameError) -> bool {
    match err {
        FrameError::Truncated { .. } => true,
        // The last frame (followed by nothing, or by zeroes) is complete but its body is
        // wrong: an unsynced final write.
        FrameError::BadBody { offset, end } => rest[(end - offset).min(rest.len())..]
            .iter()
            .all(|&b| b == 0),
        // A garbage header followed only by zeroes: space the crash never filled.
        FrameError::BadHeader { .. } => rest[crate::FRAME_HEADER_LEN.min(rest.len())..]
            .iter()
            .all(|&b| b == 0),
    }
}

struct Writer {
    dir: PathBuf,
    segment_header: Option<SegmentHeader>,
    segment_bytes: u64,
    file: File,
    segment: u64,
    /// Where the next write goes: the end of the segment's records.
    segment_size: u64,
    /// The file's length; past `segment_size` it holds zeroes written ahead of time (see
    /// `prealloc`).
    allocated: u64,
    spare: Preallocator,
    buf: Vec<u8>,
    pending: Vec<Durable>,
    poisoned: bool,
    stats: Arc<WalStats>,
    holds: WalHolder,
    hold_wait: std::time::Duration,
    write_spacing: WriteSpacing,
    rate: RecordRate,
}

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<Msg>) {
        // When the last write started, and whether it carried several records.
        let mut last_write: Option<(std::time::Instant, bool)> = None;
        while let Ok(first) = rx.recv() {
            self.handle(first);
            if let Some((started, true)) = last_write {
                let due = started + self.write_spacing.wait_at(self.rate.per_second());
                let now = std::time::Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
            self.wait_while_held();
            // Group commit: everything that queued up while the last fsync ran goes into the
            // next one.
            while self.buf.len() < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(msg) => self.handle(msg),
                    Err(_) => break,
                }
            }
            if !self.pending.is_empty() {
                let now = std::time::Instant::now();
                self.rate.note_write(self.pending.len(), now);
                last_write = Some((now, self.pending.len() > 1));
            }
            self.flush();
        }
        self.flush();
    }

    /// Spins (yielding now and then: the holder may be on this core) while a producer holds
    /// the log, for at most `hold_wait`. Sleeping instead would cost a wake-up per batch, which
    /// is what holding saves.
    fn wait_while_held(&self) {
        if !self.holds.is_held() {
            return;
        }
        let start = std::time::Instant::now();
        let mut spins = 0u32;
        while self.holds.is_held() && start.elapsed() < self.hold_wait {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(16) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Append(frame, done) => {
                if self.poisoned {
                    done(Err(StorageError::Poisoned));
                } else {
                    self.buf.extend_from_slice(&frame);
                    self.pending.push(done);
                }
            }
            Msg::Barrier(done) => {
                self.flush();
                done(if self.poisoned {
                    Err(StorageError::Poisoned)
                } else {
                    Ok(self.segment)
                });
            }
            Msg::Roll(done) => {
                self.flush();
                done(self.roll());
            }
        }
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let result = self
            .file
            .write_all_at(&self.buf, self.segment_size)
            .and_then(|_| self.file.sync_data());
        let callbacks = std::mem::take(&mut self.pending);
        match result {
            Ok(()) => {
                let n = self.buf.len() as u64;
                self.segment_size += n;
                self.allocated = self.allocated.max(self.segment_size);
                self.stats.bytes_written.fetch_add(n, Ordering::Relaxed);
                self.stats
                    .records_written
                    .fetch_add(callbacks.len() as u64, Ordering::Relaxed);
                self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
                self.buf.clear();
                for done in callbacks {
                    done(Ok(self.segment));
                }
                self.prepare_next_segment();
            }
            Err(e) => {
                // After a failed write or fsync the file's contents are unknown (fsyncgate):
                // refuse all further writes rather than acknowledge anything more.
                tracing::error!(error = %e, segment = self.segment, "log write failed; the log is now read-only");
                self.poisoned = true;
                self.buf.clear();
                for done in callbacks {
                    done(Err(StorageError::Poisoned));
                }
            }
        }
    }

    /// Rolls once the segment is full, or as soon as a zero-filled one is ready while the
    /// current one grows as it is written (a new log, or a spare that was not ready in time);
    /// asks for the next spare once the segment is clearly in use.
    fn prepare_next_segment(&mut self) {
        let full = self.segment_size >= self.segment_bytes;
        if self.segment_size >= (self.segment_bytes / 2).min(SPARE_AFTER_BYTES) {
            self.spare.request();
        }
        let writing_into_zeroes = self.allocated > self.segment_size;
        let spare = if full || !writing_into_zeroes {
            self.spare.take()
        } else {
            None
        };
        if full || spare.is_some() {
            if let Err(e) = self.roll_into(spare) {
                tracing::error!(error = %e, "could not start a new log segment");
            }
        }
    }

    fn roll(&mut self) -> Result<u64, StorageError> {
        let spare = self.spare.take();
        self.roll_into(spare)
    }

    /// Starts the next segment in `spare` (a zero-filled file) or, without one, in a new
    /// empty file.
    fn roll_into(&mut self, spare: Option<PathBuf>) -> Result<u64, StorageError> {
        if self.poisoned {
            return Err(StorageError::Poisoned);
        }
        let old = segment_path(&self.dir, self.segment);
        if self.allocated > self.segment_size {
            // Zeroes at the end of a segment that is not the last would read as damage.
            self.file
                .set_len(self.segment_size)
                .and_then(|_| self.file.sync_data())
                .map_err(StorageError::io(&old))?;
            self.allocated = self.segment_size;
        }
        let next = self.segment + 1;
        let path = segment_path(&self.dir, next);
        let (file, allocated) = match spare {
            Some(spare) => {
                std::fs::rename(&spare, &path).map_err(StorageError::io(&path))?;
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(StorageError::io(&path))?;
                (file, self.spare.bytes())
            }
            None => {
                let file = OpenOptions::new()
                    .create_new(true)
                    .write(true)
                    .open(&path)
                    .map_err(StorageError::io(&path))?;
                (file, 0)
            }
        };
        let mut size = 0;
        if let Some(header) = &self.segment_header {
            let mut frame = Vec::new();
            encode_frame(&header(), &mut frame);
            file.write_all_at(&frame, 0)
                .and_then(|_| file.sync_data())
                .map_err(StorageError::io(&path))?;
            size = frame.len() as u64;
        }
        sync_dir(&self.dir)?;
        self.file = file;
        self.segment = next;
        self.segment_size = size;
        self.allocated = allocated.max(size);
        self.stats.current_segment.store(next, Ordering::Relaxed);
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc::channel;

    fn opts(dir: &Path) -> WalOptions {
        WalOptions {
            dir: dir.to_path_buf(),
            segment_bytes: 1024,
            segment_header: None,
            // Long, so tests tell waiting from not waiting without racing the writer.
            hold_wait: TEST_HOLD_WAIT,
            write_spacing: WriteSpacing::NONE,
        }
    }

    const TEST_HOLD_WAIT: std::time::Duration = std::time::Duration::from_millis(300);

    fn append_sync(wal: &Wal, body: &[u8]) -> Result<u64, StorageError> {
        append_notify(wal, body).recv().expect("writer answered")
    }

    fn replay(dir: &Path) -> Result<Vec<Vec<u8>>, StorageError> {
        let mut seen = Vec::new();
        let wal = Wal::open(opts(dir), |_, b| seen.push(b.to_vec()))?;
        wal.close();
        Ok(seen)
    }

    #[test]
    fn records_survive_reopen_in_order_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(opts(dir.path()), |_, _| {}).unwrap();
        let bodies: Vec<Vec<u8>> = (0..200)
            .map(|i| format!("record-{i:04}").into_bytes())
            .collect();
        for b in &bodies {
            append_sync(&wal, b).unwrap();
        }
        assert!(wal.stats().fsyncs.load(Ordering::Relaxed) >= 1);
        wal.close();
        assert!(
            list_segments(dir.path()).unwrap().len() > 1,
            "segments rolled"
        );
        assert_eq!(replay(dir.path()).unwrap(), bodies);
    }

    #[test]
    fn a_backlog_past_the_batch_bound_is_written_in_several_batches() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = opts(dir.path());
        options.segment_bytes = 256 * 1024 * 1024;
        let wal = Wal::open(options, |_, _| {}).unwrap();
        // Hold the writer thread inside the first append's callback while 24 MiB queue up.
        let (release_tx, release_rx) = channel::<()>();
        let (held_tx, held_rx) = channel::<()>();
        wal.append(
            b"first",
            Box::new(move |r| {
                r.unwrap();
                let _ = held_tx.send(());
                let _ = release_rx.recv();
            }),
        );
        held_rx.recv().unwrap();
        let before = wal.stats().fsyncs.load(Ordering::Relaxed);
        let record = vec![7u8; 1024 * 1024];
        let (tx, rx) = channel();
        for i in 0..24u32 {
            let tx = tx.clone();
            wal.append(
                &record,
                Box::new(move |r| {
                    let _ = tx.send((i, r.is_ok()));
                }),
            );
        }
        release_tx.send(()).unwrap();
        let done: Vec<(u32, bool)> = (0..24).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(done, (0..24).map(|i| (i, true)).collect::<Vec<_>>());
        let batches = wal.stats().fsyncs.load(Ordering::Relaxed) - before;
        assert!(
            batches >= 3,
            "24 MiB went out in {batches} batch(es); the bound is {MAX_BATCH_BYTES} bytes"
        );
        wal.close();
        let replayed = replay(dir.path()).unwrap();
        assert_eq!(replayed.len(), 25);
        assert!(replayed[1..].iter().all(|r| *r == record));
    }

    #[test]
    fn concurrent_appends_share_fsyncs_and_complete_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Arc::new(Wal::open(opts(dir.path()), |_, _| {}).unwrap());
        let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (tx, rx) = channel();
        for i in 0..500u32 {
            let order = order.clone();
            let tx = tx.clone();
            wal.append(
                &i.to_le_bytes(),
                Box::new(move |r| {
                    r.unwrap();
                    order.lock().push(i);
                    let _ = tx.send(());
                }),
            );
        }
        for _ in 0..500 {
            rx.recv().unwrap();
        }
        assert_eq!(*order.lock(), (0..500).collect::<Vec<_>>());
        assert!(
            wal.stats().fsyncs.load(Ordering::Relaxed) < 500,
            "group commit merged fsyncs"
        );
    }

    /// Appends `body`; the receiver gets the result once it is durable.
    fn append_notify(
        wal: &Wal,
        body: &[u8],
    ) -> std::sync::mpsc::Receiver<Result<u64, StorageError>> {
        let (tx, rx) = channel();
        wal.append(
            body,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx
    }

    #[test]
    fn records_queued_under_a_hold_share_one_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(opts(dir.path()), |_, _| {}).unwrap();
        let hold = wal.holder().hold();
        let first = append_notify(&wal, b"first");
        // Unheld, the writer would have written `first` alone long before this.
        std::thread::sleep(std::time::Duration::from_millis(30));
        let second = append_notify(&wal, b"second");
        drop(hold);
        first.recv().unwrap().unwrap();
        second.recv().unwrap().unwrap();
        assert_eq!(wal.stats().fsyncs.load(Ordering::Relaxed), 1);
        assert_eq!(wal.stats().records_written.load(Ordering::Relaxed), 2);
    }

    /// Eight writers append 20 records each; returns the fsyncs and the time they took.
    fn eight_busy_writers(wal: &Arc<Wal>) -> (u64, std::time::Duration) {
        let before = wal.stats().fsyncs.load(Ordering::Relaxed);
        let started = std::time::Instant::now();
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let wal = wal.clone();
                std::thread::spawn(move || {
                    for i in 0..20 {
                        append_sync(&wal, format!("busy-{w}-{i}").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        (
            wal.stats().fsyncs.load(Ordering::Relaxed) - before,
            started.elapsed(),
        )
    }

    /// After a write of several records the next starts a spacing later, so the fsyncs are at
    /// most about one per spacing (and one-record writes, which do not wait, at most as many
    /// again).
    fn assert_spaced(fsyncs: u64, elapsed: std::time::Duration, spacing: std::time::Duration) {
        let spaced = (elapsed.as_millis() / spacing.as_millis()) as u64 + 1;
        assert!(
            fsyncs <= 2 * spaced,
            "{fsyncs} fsyncs for 160 records in {elapsed:?}: the writes were not spaced"
        );
    }

    #[test]
    fn with_write_spacing_busy_writers_share_fsyncs_and_a_lone_writer_never_waits() {
        let dir = tempfile::tempdir().unwrap();
        let spacing = std::time::Duration::from_millis(40);
        let o = WalOptions {
            write_spacing: WriteSpacing::fixed(spacing),
            ..opts(dir.path())
        };
        let wal = Arc::new(Wal::open(o, |_, _| {}).unwrap());
        // A lone writer: every write carries one record, so none waits for the spacing.
        let started = std::time::Instant::now();
        for i in 0..10 {
            append_sync(&wal, format!("lone-{i}").as_bytes()).unwrap();
        }
        let lone = started.elapsed();
        assert!(lone < spacing * 5, "a lone writer waited: {lone:?}");
        let (fsyncs, elapsed) = eight_busy_writers(&wal);
        assert_spaced(fsyncs, elapsed, spacing);
        assert_eq!(wal.stats().records_written.load(Ordering::Relaxed), 170);
    }

    #[test]
    fn an_adaptive_spacing_waits_by_the_measured_rate() {
        let dir = tempfile::tempdir().unwrap();
        let busy = std::time::Duration::from_millis(40);
        // No wait while the log is quiet; from 1 record/s on, which any busy writer exceeds,
        // the full one. Were the rate not measured, no write would wait.
        let o = WalOptions {
            write_spacing: WriteSpacing {
                quiet: std::time::Duration::ZERO,
                busy,
                quiet_rate: 0.5,
                busy_rate: 1.0,
            },
            ..opts(dir.path())
        };
        let wal = Arc::new(Wal::open(o, |_, _| {}).unwrap());
        let (fsyncs, elapsed) = eight_busy_writers(&wal);
        assert_spaced(fsyncs, elapsed, busy);
        assert_eq!(wal.stats().records_written.load(Ordering::Relaxed), 160);
    }

    #[test]
    fn a_hold_never_released_delays_the_log_only_briefly() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(opts(dir.path()), |_, _| {}).unwrap();
        let _stuck = wal.holder().hold();
        let started = std::time::Instant::now();
        let durable = append_notify(&wal, b"record");
        let waited = durable
            .recv_timeout(TEST_HOLD_WAIT * 10)
            .expect("a hold must not stop the log")
            .map(|_| started.elapsed());
        let waited = waited.unwrap();
        assert!(
            waited >= TEST_HOLD_WAIT,
            "the writer waited for the holder ({waited:?})"
        );
    }

    #[test]
    fn torn_tail_is_truncated_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(opts(dir.path()), |_, _| {}).unwrap();
        append_sync(&wal, b"one").unwrap();
        append_sync(&wal, b"two").unwrap();
        wal.close();
        let seg = *list_segments(dir.path()).unwrap().last().unwrap();
        let path = segment_path(dir.path(), seg);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap(); // half a header
        drop(f);
        assert_eq!(
            replay(dir.path()).unwrap(),
            vec![b"one".to_vec(), b"two".to_vec()]
        );
        let wal = Wal::open(opts(dir.path()), |_, _| {}).unwrap();
        append_sync(&wal, b"three").unwrap();
        wal.close();
        assert_eq!(replay(dir.path()).unwrap().len(), 3);
    }

    #[test]
    fn corruption_in_the_middle_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(opts(dir.path()), |_, _| {}).unwrap();
        for b in [b"aaaa", b"bbbb", b"cccc"] {
            append_sync(&wal, b).unwrap();
        }
        wal.close();
        let seg = *list_segments(dir.path()).unwrap().last().unwrap();
        let path = segment_path(dir.path(), seg);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[crate::FRAME_HEADER_LEN + 12 + 1] ^= 0x55; // inside the second record's body
        std::fs::write(&path, &bytes).unwrap();
        match replay(dir.path()) {
            Err(StorageError::Corrupt { offset, .. }) => {
                assert_eq!(offset, (crate::FRAME_HEADER_LEN + 4) as u64)
            }
            other => panic!("expected corruption error, got {other:?}"),
        }
    }

    #[test]
    fn a_damaged_length_in_the_middle_is_not_mistaken_for_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(opts(dir.path()), |_, _| {}).unwrap();
        for b in [b"aaaa", b"bbbb", b"cccc"] {
            append_sync(&wal, b).unwrap();
        }
        wal.close();
        let seg = *list_segments(dir.path()).unwrap().last().unwrap();
        let path = segment_path(dir.path(), seg);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[crate::FRAME_HEADER_LEN + 4 + 3] = 0x7f; // second record's length: huge
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            replay(dir.path()),
            Err(StorageError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_garbled_final_record_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(opts(dir.path()), |_, _| {}).unwrap();
        for b in [b"aaaa", b"bbbb"] {
            append_sync(&wal, b).unwrap();
        }
        wal.close();
        let seg = *list_segments(dir.path()).unwrap().last().unwrap();
        let path = segment_path(dir.path(), seg);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff; // body of the last record never fully reached the disk
        bytes.extend_from_slice(&[0u8; 64]); // and zeroes after it
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(replay(dir.path()).unwrap(), vec![b"aaaa".to_vec()]);
    }

    #[test]
    fn roll_and_remove_old_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.segment_bytes = u64::MAX;
        let wal = Wal::open(o.clone(), |_, _| {}).unwrap();
        append_sync(&wal, b"old").unwrap();
        let (tx, rx) = channel();
        wal.roll(move |r| drop(tx.send(r)));
        let next = rx.recv().unwrap().unwrap();
        append_sync(&wal, b"new").unwrap();
        wal.close();
        assert_eq!(Wal::remove_segments_before(dir.path(), next).unwrap(), 1);
        assert_eq!(replay(dir.path()).unwrap(), vec![b"new".to_vec()]);
    }

    #[test]
    fn barrier_waits_for_earlier_appends() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(opts(dir.path()), |_, _| {}).unwrap();
        let flag = Arc::new(AtomicU64::new(0));
        let f = flag.clone();
        wal.append(b"x", Box::new(move |_| f.store(1, Ordering::SeqCst)));
        let (tx, rx) = channel();
        let f = flag.clone();
        wal.barrier(Box::new(move |r| {
            let _ = tx.send((r.is_ok(), f.load(Ordering::SeqCst)));
        }));
        assert_eq!(rx.recv().unwrap(), (true, 1));
    }

    #[test]
    fn every_new_segment_starts_with_the_header_and_records_know_their_segment() {
        let dir = tempfile::tempdir().unwrap();
        let counter = Arc::new(AtomicU64::new(0));
        let c = counter.clone();
        let o = WalOptions {
            segment_header: Some(Arc::new(move || {
                format!("header-{}", c.fetch_add(1, Ordering::SeqCst)).into_bytes()
            })),
            ..opts(dir.path())
        };
        let wal = Wal::open(o.clone(), |_, _| {}).unwrap();
        let first = append_sync(&wal, b"a").unwrap();
        let (tx, rx) = channel();
        wal.roll(move |r| drop(tx.send(r)));
        let second = rx.recv().unwrap().unwrap();
        assert_eq!(append_sync(&wal, b"b").unwrap(), second);
        assert_eq!(second, first + 1);
        assert_eq!(wal.stats().current_segment.load(Ordering::Relaxed), second);
        wal.close();
        let mut seen = Vec::new();
        Wal::open(o, |segment, body| seen.push((segment, body.to_vec())))
            .unwrap()
            .close();
        assert_eq!(
            seen,
            vec![
                (first, b"a".to_vec()),
                (second, b"header-0".to_vec()),
                (second, b"b".to_vec())
            ]
        );
    }

    fn file_len(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().len()
    }

    /// Appends records until the log rolls into a zero-filled segment (the spare is made on
    /// another thread, so this waits for it); returns the records written.
    fn fill_until_preallocated(wal: &Wal, dir: &Path, segment_bytes: u64) -> Vec<Vec<u8>> {
        let mut written = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let body = format!("record-{:06}-{}", written.len(), "x".repeat(200)).into_bytes();
            append_sync(wal, &body).unwrap();
            written.push(body);
            let last = *list_segments(dir).unwrap().last().unwrap();
            if last > 1 && file_len(&segment_path(dir, last)) == segment_bytes {
                return written;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no zero-filled segment after {} records",
                written.len()
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    const PREALLOCATED_SEGMENT_BYTES: u64 = 256 * 1024;

    /// A log in a fresh directory, already writing into a zero-filled segment; with the
    /// records written to get there.
    fn log_in_a_zero_filled_segment() -> (tempfile::TempDir, WalOptions, Wal, Vec<Vec<u8>>) {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.segment_bytes = PREALLOCATED_SEGMENT_BYTES;
        let wal = Wal::open(o.clone(), |_, _| {}).unwrap();
        let written = fill_until_preallocated(&wal, dir.path(), PREALLOCATED_SEGMENT_BYTES);
        (dir, o, wal, written)
    }

    #[test]
    fn appends_go_into_zero_filled_segments_without_growing_them() {
        let (dir, o, wal, mut written) = log_in_a_zero_filled_segment();
        let segment_bytes = PREALLOCATED_SEGMENT_BYTES;
        let current = *list_segments(dir.path()).unwrap().last().unwrap();
        let path = segment_path(dir.path(), current);
        // The commits land inside the zeroes: the file's size never changes.
        for i in 0..20 {
            let body = format!("in-the-zeroes-{i}").into_bytes();
            append_sync(&wal, &body).unwrap();
            written.push(body);
        }
        assert_eq!(file_len(&path), segment_bytes);
        wal.close();
        // Recovery stops at the zeroes without calling them damage, and appends continue
        // right after the last record, still inside the preallocated file.
        assert_eq!(replay(dir.path()).unwrap(), written);
        assert_eq!(file_len(&path), segment_bytes);
        let wal = Wal::open(o.clone(), |_, _| {}).unwrap();
        append_sync(&wal, b"after-reopen").unwrap();
        written.push(b"after-reopen".to_vec());
        wal.close();
        assert_eq!(file_len(&path), segment_bytes);
        assert_eq!(replay(dir.path()).unwrap(), written);
    }

    #[test]
    fn rolling_early_cuts_the_zeroes_off_the_closed_segment() {
        let (dir, _, wal, mut written) = log_in_a_zero_filled_segment();
        let closed = *list_segments(dir.path()).unwrap().last().unwrap();
        append_sync(&wal, b"last-before-roll").unwrap();
        written.push(b"last-before-roll".to_vec());
        let (tx, rx) = channel();
        wal.roll(move |r| drop(tx.send(r)));
        let next = rx.recv().unwrap().unwrap();
        append_sync(&wal, b"first-after-roll").unwrap();
        written.push(b"first-after-roll".to_vec());
        wal.close();
        assert_eq!(next, closed + 1);
        assert!(
            file_len(&segment_path(dir.path(), closed)) < PREALLOCATED_SEGMENT_BYTES,
            "the closed segment still holds its zeroes"
        );
        // A segment that is not the last may not end in zeroes; reading it back proves it
        // does not.
        assert_eq!(replay(dir.path()).unwrap(), written);
    }

    #[test]
    fn a_spare_left_by_a_crash_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let segment_bytes = PREALLOCATED_SEGMENT_BYTES;
        // A whole spare's worth of something other than zeroes: used as it is, the bytes
        // after the last record would read as damage.
        std::fs::write(
            dir.path().join("wal-spare.tmp"),
            vec![0xab; segment_bytes as usize],
        )
        .unwrap();
        let mut o = opts(dir.path());
        o.segment_bytes = segment_bytes;
        let wal = Wal::open(o, |_, _| {}).unwrap();
        let written = fill_until_preallocated(&wal, dir.path(), segment_bytes);
        wal.close();
        assert_eq!(replay(dir.path()).unwrap(), written);
    }
}
