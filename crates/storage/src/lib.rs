//! Node-wide durable storage: one write-ahead log shared by every group, written by a single
//! thread that merges concurrent appends into one `fdatasync` (group commit), plus small
//! atomically replaced files (snapshots), plus the spill store for unarchived events that
//! left memory.
//!
//! The log knows nothing about what its records mean: it stores opaque byte strings, frames
//! them with a length and a CRC32C, and hands them back in order on recovery.

mod file;
mod frame;
mod prealloc;
mod spacing;
mod spill;
mod wal;

pub use file::{read_framed_file, write_framed_file};
pub use frame::{decode_frames, encode_frame, FrameError, FRAME_HEADER_LEN};
pub use spacing::WriteSpacing;
pub use spill::{SpillGuard, SpillStore};
pub use wal::{Durable, SegmentHeader, Wal, WalHold, WalHolder, WalOptions, WalStats, HOLD_WAIT};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt log segment {path} at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("the log is unavailable after an earlier write failure; restart the node")]
    Poisoned,
    #[error("the log writer has stopped")]
    Closed,
}

impl StorageError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StorageError {
        let path = path.into();
        move |source| StorageError::Io { path, source }
    }
}

/// Makes a rename or a file creation in `dir` durable.
pub(crate) fn sync_dir(dir: &std::path::Path) -> Result<(), StorageError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(StorageError::io(dir))
}
