//! Freeing the events a memory-budget pass takes out of memory, on a thread of its own below
//! the request path.
//!
//! Events that have gone cold cost about a microsecond each to free (cache misses), and every
//! node of a cluster holds the same events, so every node frees ~130 MB at once: at the
//! request path's priority that CPU came straight out of the appends (docs/benchmarks.md,
//! twelfth session). Only the freeing moves here; taking the events out of a group stays
//! where it was, at the request path's priority, because a lowered thread preempted while
//! holding a group's lock keeps every request on that group waiting (architecture.md,
//! "Threads and priorities").

use bytes::Bytes;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::{Duration, Instant};

/// Batches handed over and not yet being freed. A full queue blocks the pass (a blocking
/// thread), so memory taken out of the groups but not yet freed stays at about two groups'
/// share.
const QUEUE: usize = 1;

/// Events taken out of one group, and how long to rest after freeing them: as many times as
/// long as the freeing took (zero while memory is still over the budget), at most a second
/// (a freeing preempted for long does not stretch the pass further).
struct Batch {
    events: Vec<Bytes>,
    rest: u32,
}

/// Hands events to the freeing thread. Without one (it could not start), frees them in place.
pub(crate) struct Reclaimer {
    queue: Option<SyncSender<Batch>>,
}

impl Reclaimer {
    /// Starts the freeing thread; it ends when the reclaimer is dropped.
    pub(crate) fn start() -> Self {
        let (queue, batches) = sync_channel(QUEUE);
        let started = std::thread::Builder::new()
            .name("starcite-reclaim".into())
            .spawn(move || free_batches(batches));
        match started {
            Ok(_) => Self { queue: Some(queue) },
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the thread that frees memory; budget passes free it themselves");
                Self { queue: None }
            }
        }
    }

    /// Frees `events` on the freeing thread, which then rests `rest` times as long as that
    /// took. Blocks while the thread is behind.
    pub(crate) fn free(&self, events: Vec<Bytes>, rest: u32) {
        // Without the thread (it could not start or has gone), the events are freed here.
        if let Some(queue) = &self.queue {
            let _ = queue.send(Batch { events, rest });
        }
    }
}

fn free_batches(batches: Receiver<Batch>) {
    crate::priority::lower_this_thread("the thread that frees memory");
    for batch in batches {
        let started = Instant::now();
        drop(batch.events);
        let took = started.elapsed();
        if batch.rest > 0 {
            std::thread::sleep(took.saturating_mul(batch.rest).min(Duration::from_secs(1)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_handed_over_are_freed() {
        let reclaimer = Reclaimer::start();
        let event = Bytes::from(vec![7u8; 64]);
        // A second handle on the same buffer sees when the handed-over one is dropped.
        let witness = event.clone();
        reclaimer.free(vec![event], 0);
        // The queue holds one batch: the third is accepted only once the thread has taken
        // the second, that is, once it is done with the first.
        reclaimer.free(Vec::new(), 0);
        reclaimer.free(Vec::new(), 0);
        assert!(witness.is_unique(), "the event handed over was freed");
    }
}
