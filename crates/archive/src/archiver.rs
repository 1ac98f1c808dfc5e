//! The archiver: on each group's leader (every group, on a single node), copy durable but
//! unarchived events to the archive in large idempotent batches, paced so that what is pending
//! drains over about one flush interval, then log an archive acknowledgement per session so
//! every replica advances its archive mark (over a contiguous prefix only) and trims memory
//! down to `keep_hot` archived events. In a
//! cluster without a shared archive, every replica does this for its own file and applies its
//! marks locally (see `starcite_cluster::ArchiveReader`).
//!
//! It is never on the append path: appends and tails keep working while the archive is down;
//! the archiver retries with exponential backoff and catches up when it returns. Inserts are
//! idempotent, so a batch re-sent after a failure (or by a new leader) is harmless.

use crate::{Archive, ArchiveError, ArchivedEvent, ArchivedSession};
use starcite_cluster::{ArchiveBacklog, Node};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Events per round trip to the archive. Small batches spread the archive's work evenly: every
/// replica archives the same events at about the same moment, and 5,000-event batches took the
/// two-core benchmark machine in bursts that the appends queued behind (docs/benchmarks.md,
/// fifteenth session). A turn over the groups still visits each session once, so smaller
/// batches do not make shorter runs.
pub const BATCH_EVENTS: usize = 1_000;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct ArchiverConfig {
    pub flush_interval: Duration,
    pub keep_hot: u64,
    /// The runtime the node's request path runs on. The archiver's own thread runs below the
    /// request path (the server lowers it); everything that takes the node's locks
    /// (collecting a batch, recording marks, proposing them) runs here instead, so a request
    /// never waits for a lock held by a thread that is itself waiting for the CPU.
    pub node_runtime: tokio::runtime::Handle,
}

pub const PENDING_ROWS: &str = "starcite_archive_pending_rows";
pub const PENDING_SESSIONS: &str = "starcite_archive_pending_sessions";
pub const FLUSH_DURATION: &str = "starcite_archive_flush_duration_ms";
pub const ATTEMPTED: &str = "starcite_archive_attempted_total";
pub const INSERTED: &str = "starcite_archive_inserted_total";
pub const BYTES_ATTEMPTED: &str = "starcite_archive_bytes_attempted_total";
pub const BYTES_INSERTED: &str = "starcite_archive_bytes_inserted_total";
pub const LAG: &str = "starcite_archive_lag";
pub const TAIL_SIZE: &str = "starcite_archive_tail_size";
pub const TRIMMED: &str = "starcite_archive_trimmed_total";
pub const FAILURES: &str = "starcite_archive_failures_total";

/// Registers every archive metric at zero so they are visible before the first flush.
pub fn describe_metrics() {
    metrics::describe_gauge!(PENDING_ROWS, "Durable events not yet archived");
    metrics::describe_gauge!(
        PENDING_SESSIONS,
        "Sessions with events or a header not yet archived"
    );
    metrics::describe_histogram!(
        FLUSH_DURATION,
        "Duration of one archive flush round trip, ms"
    );
    metrics::describe_counter!(ATTEMPTED, "Event rows sent to the archive");
    metrics::describe_counter!(
        INSERTED,
        "Event rows the archive newly stored (re-sent rows are not counted)"
    );
    metrics::describe_counter!(BYTES_ATTEMPTED, "Event bytes sent to the archive");
    metrics::describe_counter!(BYTES_INSERTED, "Event bytes the archive newly stored");
    metrics::describe_gauge!(LAG, "Events behind: the most unarchived events of any one flush backlog (same unit as pending rows)");
    metrics::describe_gauge!(TAIL_SIZE, "Events held hot in memory (archived or not)");
    metrics::describe_counter!(TRIMMED, "Archived events dropped from memory");
    metrics::describe_counter!(FAILURES, "Archive flushes that failed and will be retried");
    for name in [
        ATTEMPTED,
        INSERTED,
        BYTES_ATTEMPTED,
        BYTES_INSERTED,
        TRIMMED,
        FAILURES,
    ] {
        metrics::counter!(name).absolute(0);
    }
    for name in [PENDING_ROWS, PENDING_SESSIONS, LAG, TAIL_SIZE] {
        metrics::gauge!(name).set(0.0);
    }
}

/// Sets the lag gauges from the node's current state (called at scrape time, so never stale).
pub fn record_lag(node: &Node) {
    let lag = node.archive_lag();
    metrics::gauge!(PENDING_ROWS).set(lag.pending_events as f64);
    metrics::gauge!(PENDING_SESSIONS).set(lag.pending_sessions as f64);
    metrics::gauge!(LAG).set(lag.pending_events as f64);
    metrics::gauge!(TAIL_SIZE).set(lag.hot_events as f64);
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs until `stop` turns true; then makes one last attempt to flush what is durable.
///
/// Batches go out one at a time, paced so that whatever is pending drains over about one
/// flush interval ([`pause_after_batch`]): under a steady load the archive then copies a
/// steady trickle, and a backlog (after a burst of appends, or an outage) is spread over an
/// interval instead of being copied in one burst that takes a core and the disk away from
/// appends. Nothing pending, or less than a batch: the next flush is one interval away.
pub async fn run(
    node: Arc<Node>,
    archive: Arc<Archive>,
    config: ArchiverConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut pause = config.flush_interval;
    let mut backoff = config.flush_interval;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {},
            _ = stopped(&mut stop) => {
                // Last copy before stopping: rows only. The marks would go through Raft,
                // which may have no quorum while a whole cluster stops; re-sending is harmless.
                if let Err(e) = flush_next(&node, &archive, &config, false).await {
                    tracing::warn!(error = %e, "final archive flush failed; the log still holds everything");
                }
                return;
            }
        }
        match flush_next(&node, &archive, &config, true).await {
            Ok(()) => {
                backoff = config.flush_interval;
                let pending = on_node(&config, {
                    let node = node.clone();
                    async move { node.archive_pending_events().await }
                })
                .await;
                let Ok(pending) = pending else {
                    return; // The node's runtime is shutting down.
                };
                pause = pause_after_batch(config.flush_interval, pending);
            }
            Err(e) => {
                metrics::counter!(FAILURES).increment(1);
                backoff = (backoff * 2).clamp(Duration::from_millis(100), MAX_BACKOFF);
                pause = backoff;
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "archive flush failed; will retry");
            }
        }
    }
}

/// Copies the next batch of durable, unarchived events (if any) to the archive; with
/// `acknowledge`, then replicates the archive marks (which lets replicas trim memory). The
/// last flush while stopping copies rows only: the marks would go through Raft, and without
/// them moving the same rows come back, harmlessly, next time.
async fn flush_next(
    node: &Arc<Node>,
    archive: &Archive,
    config: &ArchiverConfig,
    acknowledge: bool,
) -> Result<(), ArchiveError> {
    let backlog = on_node(config, {
        let node = node.clone();
        async move { node.archive_backlog(BATCH_EVENTS).await }
    })
    .await?;
    if !backlog.is_empty() {
        flush_batch(node, archive, config, backlog, acknowledge).await?;
    }
    Ok(())
}

/// Runs `work` on the node's runtime (see [`ArchiverConfig::node_runtime`]) and waits for it.
async fn on_node<T: Send + 'static>(
    config: &ArchiverConfig,
    work: impl Future<Output = T> + Send + 'static,
) -> Result<T, ArchiveError> {
    config
        .node_runtime
        .spawn(work)
        .await
        .map_err(|_| ArchiveError::NodeStopping)
}

/// The pause before the next batch when `pending` events are still unarchived: the interval
/// shared by the batches they make, so a backlog drains over about one interval whatever its
/// size. A steady load of `r` events/s settles at about `r × interval` pending, a batch every
/// `BATCH_EVENTS / r` seconds; less than a batch pending waits the whole interval.
fn pause_after_batch(interval: Duration, pending: u64) -> Duration {
    let batches = pending.div_ceil(BATCH_EVENTS as u64).max(1);
    interval / batches.min(u32::MAX as u64) as u32
}

async fn flush_batch(
    node: &Arc<Node>,
    archive: &Archive,
    config: &ArchiverConfig,
    backlog: ArchiveBacklog,
    acknowledge: bool,
) -> Result<(), ArchiveError> {
    let started = Instant::now();
    if !backlog.sessions.is_empty() {
        let sessions: Vec<ArchivedSession> = backlog
            .sessions
            .iter()
            .map(|v| ArchivedSession {
                id: v.id.clone(),
                title: v.title.clone(),
                metadata: v.metadata.clone(),
                created_at_millis: v.created_at.millis(),
            })
            .collect();
        archive.upsert_sessions(&sessions).await?;
    }
    let events: Vec<ArchivedEvent> = backlog
        .runs
        .iter()
        .flat_map(|run| {
            run.events
                .iter()
                .enumerate()
                .map(|(i, frame)| ArchivedEvent {
                    session_id: run.session_id.clone(),
                    seq: run.first_seq + i as u64,
                    frame: frame.clone(),
                })
        })
        .collect();
    if !events.is_empty() {
        let stats = archive.insert_events(&events).await?;
        metrics::counter!(ATTEMPTED).increment(stats.attempted);
        metrics::counter!(INSERTED).increment(stats.inserted);
        metrics::counter!(BYTES_ATTEMPTED).increment(stats.bytes_attempted);
        metrics::counter!(BYTES_INSERTED).increment(stats.bytes_inserted);
    }
    metrics::histogram!(FLUSH_DURATION).record(started.elapsed().as_secs_f64() * 1000.0);
    let marks: Vec<(String, u64)> = backlog
        .runs
        .iter()
        .map(|run| (run.session_id.clone(), run.last_seq()))
        .collect();
    let keep_hot = config.keep_hot;
    let node = node.clone();
    let acknowledged = on_node(config, async move {
        node.headers_archived(&backlog.sessions);
        if !acknowledge {
            return None;
        }
        Some(node.acknowledge_archived(&marks, keep_hot).await)
    })
    .await?;
    match acknowledged {
        None => {}
        Some(Ok(trimmed)) => metrics::counter!(TRIMMED).increment(trimmed),
        // The rows are in the archive; the marks advance on the next round (re-sending is
        // harmless).
        Some(Err(e)) => tracing::warn!(error = %e, "archive acknowledgements not logged"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(5);

    #[test]
    fn a_backlog_is_spread_over_one_interval() {
        // 150,000 events: 150 batches over 5 s, one every ~33 ms.
        assert_eq!(
            pause_after_batch(INTERVAL, 150_000),
            Duration::from_millis(5_000) / 150
        );
        // A huge backlog: pauses far shorter than a batch takes, so it drains at full speed.
        assert!(pause_after_batch(INTERVAL, 50_000_000) < Duration::from_millis(1));
    }

    #[test]
    fn less_than_a_batch_pending_waits_the_whole_interval() {
        assert_eq!(pause_after_batch(INTERVAL, 0), INTERVAL);
        assert_eq!(pause_after_batch(INTERVAL, 10), INTERVAL);
        assert_eq!(pause_after_batch(INTERVAL, BATCH_EVENTS as u64), INTERVAL);
        assert_eq!(
            pause_after_batch(INTERVAL, BATCH_EVENTS as u64 + 1),
            INTERVAL / 2
        );
    }

    #[test]
    fn a_steady_load_is_archived_as_fast_as_it_comes() {
        // 7,000 events/s: simulate batch by batch; the backlog settles near rate × interval
        // and the archive keeps up (no unbounded growth, no idle stretches of seconds).
        let rate = 7_000.0;
        let mut pending = 0.0f64;
        let mut archived = 0.0;
        let mut elapsed = 0.0;
        for _ in 0..1_000 {
            archived += pending.min(BATCH_EVENTS as f64);
            pending -= pending.min(BATCH_EVENTS as f64);
            let pause = pause_after_batch(INTERVAL, pending as u64).as_secs_f64();
            pending += rate * pause;
            elapsed += pause;
        }
        assert!(pending < rate * INTERVAL.as_secs_f64() * 1.2, "{pending}");
        let archived_rate = archived / elapsed;
        assert!(
            (archived_rate - rate).abs() < rate * 0.05,
            "{archived_rate}"
        );
    }
}
