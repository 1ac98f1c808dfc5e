//! Recovery of the node's Raft log from records of arbitrary content.
//!
//! The record type is private to `starcite-cluster`; it is decoded (postcard) and replayed by
//! `NodeLog::open`, so the target writes a log segment whose frames are intact (valid
//! checksums) but whose record bodies come from the input, and opens it. Recovery must answer
//! `Ok` or a clean startup error, never panic; what it recovers is a contiguous log per group
//! above the group's snapshot point, and recovering the same log again gives the same result.
//!
//! Input: `[groups: u8]` then records, each `[len: u16 LE][body]` (a short last record takes
//! the rest).
#![no_main]

use libfuzzer_sys::fuzz_target;
use starcite_cluster::node_log::{NodeLog, RecoveredGroup};
use starcite_cluster::NodeError;
use starcite_storage::encode_frame;
use std::path::Path;
use std::sync::OnceLock;

fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("starcite-fuzz-nodelog")
                .tempdir_in(shm)
                .unwrap()
        } else {
            tempfile::tempdir().unwrap()
        }
    })
    .path()
}

type Summary = Vec<(String, Vec<(u64, u64, bool)>)>;

fn summary(groups: &[RecoveredGroup]) -> Summary {
    groups
        .iter()
        .map(|g| {
            (
                format!("{:?}", g.marks),
                g.entries
                    .iter()
                    .map(|e| (e.index, e.term, e.payload.is_some()))
                    .collect(),
            )
        })
        .collect()
}

fn open(dir: &Path, groups: u32) -> Result<Summary, NodeError> {
    let (log, recovered, _stats) = NodeLog::open(dir, groups, 1 << 20)?;
    drop(log);
    assert_eq!(recovered.len(), groups as usize);
    for g in &recovered {
        let mut next = g.marks.snapshot.0.checked_add(1);
        for e in &g.entries {
            assert_eq!(Some(e.index), next, "recovered log is not contiguous");
            next = e.index.checked_add(1);
        }
    }
    Ok(summary(&recovered))
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let groups = u32::from(first % 4) + 1;
    let mut segment = Vec::new();
    while !rest.is_empty() {
        let len = if rest.len() >= 2 {
            let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
            rest = &rest[2..];
            len.min(rest.len())
        } else {
            rest.len()
        };
        encode_frame(&rest[..len], &mut segment);
        rest = &rest[len..];
    }

    let dir = scratch();
    for entry in std::fs::read_dir(dir).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    std::fs::write(dir.join(format!("wal-{:020}.log", 1)), &segment).unwrap();
    match open(dir, groups) {
        Ok(recovered) => {
            let again = open(dir, groups).expect("a log that recovered once recovers again");
            assert_eq!(again, recovered, "recovery is not deterministic");
        }
        Err(NodeError::Startup(_)) => {}
        Err(e) => panic!("unexpected error: {e}"),
    }
});
