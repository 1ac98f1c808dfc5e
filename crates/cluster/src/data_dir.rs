//! The node's data directory: a lock against a second process, and a small meta file that
//! pins what must never change under existing data (group count, node name) and whether this
//! node joined a cluster that already had data (so it must catch up before it votes).

use crate::NodeError;
use std::fs::File;
use std::path::Path;

const META_FILE: &str = "starcite.meta";
const FORMAT: &str = "3";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub groups: u32,
    /// This node started without data in a cluster that had some.
    pub rejoin: bool,
}

/// Locks the directory (creating it) and reads its meta file. `Ok((lock, None))` for a new
/// directory: the caller decides how the node joins, then calls [`write_meta`].
pub fn open(dir: &Path, groups: u32, node_name: &str) -> Result<(File, Option<Meta>), NodeError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        NodeError::Startup(format!(
            "cannot create data directory {}: {e}",
            dir.display()
        ))
    })?;
    let lock_path = dir.join("LOCK");
    let lock = File::create(&lock_path)
        .map_err(|e| NodeError::Startup(format!("cannot open {}: {e}", lock_path.display())))?;
    lock.try_lock().map_err(|_| {
        NodeError::Startup(format!(
            "data directory {} is in use by another starcite process",
            dir.display()
        ))
    })?;
    let meta_path = dir.join(META_FILE);
    let text = match std::fs::read_to_string(&meta_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((lock, None)),
        Err(e) => {
            return Err(NodeError::Startup(format!(
                "cannot read {}: {e}",
                meta_path.display()
            )))
        }
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .map(|v| v.trim().to_owned())
    };
    let damaged = || NodeError::Startup(format!("{} is damaged", meta_path.display()));
    if field("format").as_deref() != Some(FORMAT) {
        return Err(NodeError::Startup(format!(
            "data directory {} was written by another starcite version (format {}); \
             start with an empty data directory",
            dir.display(),
            field("format").unwrap_or_else(|| "unknown".into())
        )));
    }
    let stored_groups: u32 = field("groups")
        .and_then(|v| v.parse().ok())
        .ok_or_else(damaged)?;
    if stored_groups != groups {
        return Err(NodeError::Startup(format!(
            "data directory {} was created with {stored_groups} raft groups; \
             STARCITE_RAFT_GROUPS={groups} would move sessions between groups. \
             Set STARCITE_RAFT_GROUPS={stored_groups} or use a new data directory",
            dir.display()
        )));
    }
    let node = field("node").ok_or_else(damaged)?;
    if node != node_name {
        return Err(NodeError::Startup(format!(
            "data directory {} belongs to node {node:?}, not NODE_NAME={node_name:?}",
            dir.display()
        )));
    }
    let rejoin = field("rejoin").as_deref() == Some("1");
    Ok((
        lock,
        Some(Meta {
            groups: stored_groups,
            rejoin,
        }),
    ))
}

/// Writes the meta file durably (temp file, fsync, rename, directory fsync).
pub fn write_meta(dir: &Path, node_name: &str, meta: Meta) -> Result<(), NodeError> {
    let meta_path = dir.join(META_FILE);
    let tmp = meta_path.with_extension("tmp");
    let text = format!(
        "format={FORMAT}\ngroups={}\nnode={node_name}\nrejoin={}\n",
        meta.groups,
        u8::from(meta.rejoin)
    );
    std::fs::write(&tmp, text)
        .and_then(|_| File::open(&tmp)?.sync_all())
        .and_then(|_| std::fs::rename(&tmp, &meta_path))
        .and_then(|_| File::open(dir)?.sync_all())
        .map_err(|e| NodeError::Startup(format!("cannot write {}: {e}", meta_path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_pins_groups_and_node_and_keeps_the_rejoin_flag() {
        let dir = tempfile::tempdir().unwrap();
        let (lock, meta) = open(dir.path(), 16, "n1").unwrap();
        assert_eq!(meta, None);
        assert!(open(dir.path(), 16, "n1").is_err(), "locked");
        write_meta(
            dir.path(),
            "n1",
            Meta {
                groups: 16,
                rejoin: true,
            },
        )
        .unwrap();
        drop(lock);
        let (_lock, meta) = open(dir.path(), 16, "n1").unwrap();
        assert_eq!(
            meta,
            Some(Meta {
                groups: 16,
                rejoin: true
            })
        );
        drop(_lock);
        let err = open(dir.path(), 32, "n1").unwrap_err().to_string();
        assert!(err.contains("STARCITE_RAFT_GROUPS=16"), "{err}");
        let err = open(dir.path(), 16, "n2").unwrap_err().to_string();
        assert!(err.contains("belongs to node"), "{err}");
    }
}
