//! Background threads below the request path: the archiver's and the one freeing what
//! budget passes take out of memory. Their work can wait; appends and tails cannot
//! (architecture.md, "Threads and priorities").

/// How much lower than the request path background threads run (a `nice` increment). Under a
/// load that keeps both cores busy the archiver still kept up with the appends at this level
/// (docs/benchmarks.md, fourth session); `SCHED_IDLE` instead deferred the archive out of a
/// maximum-load run into the next one (tenth session).
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread to [`BACKGROUND_NICE`]; threads it starts afterwards inherit
/// that. If it cannot, says so: `what` then runs at the request path's priority.
pub fn lower_this_thread(what: &str) {
    // `None` is the calling thread on Linux (nice is per thread there).
    if let Err(e) = rustix::process::setpriority_process(None, BACKGROUND_NICE) {
        tracing::warn!(error = %e, "cannot lower the priority of {what}; it runs at the request path's");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowers_only_the_calling_thread() {
        let before = rustix::process::getpriority_process(None).expect("own priority");
        let inside = std::thread::spawn(|| {
            lower_this_thread("a test thread");
            rustix::process::getpriority_process(None).expect("own priority")
        })
        .join()
        .expect("thread");
        assert_eq!(inside, (before + BACKGROUND_NICE).min(19));
        assert_eq!(
            rustix::process::getpriority_process(None).expect("own priority"),
            before,
            "the caller's thread keeps its priority"
        );
    }
}
