//! CPU priority of the archive's threads: the archiver's own and the SQLite thread of the
//! embedded archive's writer connection (which inherits the archiver's, being opened from it).
//!
//! The archive is write-behind: nothing waits for it but memory. So it runs on CPU time the
//! request path leaves over (`SCHED_IDLE`), and competes for time (at `nice` 10, below the
//! request path) only once the node has had to spill events to disk to stay in its memory
//! budget: the archive is what lets it free them, and on a machine that is never idle it
//! would otherwise fall behind without bound. A burst of archive work (after a burst of
//! appends, or an outage) then no longer queues requests behind it (docs/benchmarks.md,
//! tenth session). Where the process may not raise a thread out of `SCHED_IDLE` again (no
//! `CAP_SYS_NICE`), the archive stays in the background throughout instead.

use std::io;

/// Where the archive's threads stand against the request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchivePriority {
    /// Runs only when nothing else wants the CPU.
    Idle,
    /// Competes for the CPU, at `nice` [`BACKGROUND_NICE`].
    Background,
}

/// How much lower than the request path the archive runs when it competes (a `nice`
/// increment). Under a load that keeps both cores busy it still kept up with the appends
/// (docs/benchmarks.md, fourth session).
pub const BACKGROUND_NICE: i32 = 10;

impl ArchivePriority {
    /// Idle while the node keeps every event it has not archived in memory; background once
    /// some are spilled to disk (`spilled_bytes` on disk).
    pub fn for_spilled_bytes(spilled_bytes: u64) -> Self {
        if spilled_bytes > 0 {
            ArchivePriority::Background
        } else {
            ArchivePriority::Idle
        }
    }
}

/// Whether this process may move a thread out of `SCHED_IDLE` again: Linux allows it only
/// with `CAP_SYS_NICE` or an `RLIMIT_NICE` that reaches [`BACKGROUND_NICE`]. Without that
/// the archive must not start idle (it could never compete again), so it runs in the
/// background throughout. Tried on a thread of its own.
pub fn idle_is_reversible() -> bool {
    std::thread::Builder::new()
        .name("starcite-prio".into())
        .spawn(|| {
            set_current_thread(ArchivePriority::Idle).is_ok()
                && set_current_thread(ArchivePriority::Background).is_ok()
        })
        .ok()
        .and_then(|probe| probe.join().ok())
        .unwrap_or(false)
}

/// Sets the calling thread's priority; threads it starts afterwards inherit it.
pub fn set_current_thread(priority: ArchivePriority) -> io::Result<()> {
    // 0: the calling thread (scheduling policy and nice are per thread on Linux).
    set_thread(0, priority)
}

/// Sets the priority of every archive thread of this process: the archiver's and the SQLite
/// threads it started (told apart from the readers', opened by the request path, by their
/// `nice`, which is always [`BACKGROUND_NICE`]).
/// Returns how many threads it set.
pub fn set_archive_threads(priority: ArchivePriority) -> io::Result<usize> {
    let mut set = 0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let task = task?;
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        // A thread may end between the listing and these reads: skip it.
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
            continue;
        };
        let archive_thread = comm.starts_with("starcite-archiv")
            || (comm.starts_with("sqlx-sqlite")
                && thread_nice(&task.path()).is_some_and(|n| n >= i64::from(BACKGROUND_NICE)));
        if archive_thread {
            set_thread(tid, priority)?;
            set += 1;
        }
    }
    Ok(set)
}

/// The `nice` of a thread, from its `/proc/…/task/<tid>/stat`.
fn thread_nice(task: &std::path::Path) -> Option<i64> {
    let stat = std::fs::read_to_string(task.join("stat")).ok()?;
    // `tid (comm) state …`: comm may hold spaces, so count fields after its last `)`;
    // nice is field 19, the 17th after the name.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(16)?.parse().ok()
}

#[cfg(target_os = "linux")]
fn set_thread(tid: i32, priority: ArchivePriority) -> io::Result<()> {
    let policy = match priority {
        ArchivePriority::Idle => libc::SCHED_IDLE,
        ArchivePriority::Background => libc::SCHED_OTHER,
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid `sched_param` for the duration of the call, which only reads
    // it; the call has no other memory effects.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Kept under `SCHED_IDLE` too (where it does not count): it marks the archive's threads.
    let pid = (tid != 0)
        .then(|| rustix::process::Pid::from_raw(tid))
        .flatten();
    rustix::process::setpriority_process(pid, BACKGROUND_NICE).map_err(io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn set_thread(_tid: i32, _priority: ArchivePriority) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "thread scheduling policies are set on Linux only",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_competes_only_once_events_are_spilled() {
        assert_eq!(ArchivePriority::for_spilled_bytes(0), ArchivePriority::Idle);
        assert_eq!(
            ArchivePriority::for_spilled_bytes(1),
            ArchivePriority::Background
        );
    }
}
