//! The archiver: on each group's leader (every group, on a single node), every flush
//! interval, copy durable but unarchived events to the archive in large idempotent batches,
//! then log an archive acknowledgement per session so every replica advances its archive mark
//! (over a contiguous prefix only) and trims memory down to `keep_hot` archived events. In a
//! cluster without a shared archive, every replica does this for its own file and applies its
//! marks locally (see `starcite_cluster::ArchiveReader`).
//!
//! It is never on the append path: appends and tails keep working while the archive is down;
//! the archiver retries with exponential backoff and catches up when it returns. Inserts are
//! idempotent, so a batch re-sent after a failure (or by a new leader) is harmless.

use crate::{Archive, ArchiveError, ArchivedEvent, ArchivedSession};
use starcite_cluster::{ArchiveBacklog, Node};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Events per round trip to the archive.
pub const BATCH_EVENTS: usize = 5_000;
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Share of the flush interval a round's batches are spread over (see `flush_rows`).
const SPREAD: f64 = 0.6;

#[derive(Debug, Clone)]
pub struct ArchiverConfig {
    pub flush_interval: Duration,
    pub keep_hot: u64,
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
pub async fn run(
    node: Arc<Node>,
    archive: Arc<Archive>,
    config: ArchiverConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = config.flush_interval;
    loop {
        let wait = tokio::time::sleep(backoff);
        tokio::select! {
            _ = wait => {},
            _ = stopped(&mut stop) => {
                // Last copy before stopping: rows only. The marks would go through Raft,
                // which may have no quorum while a whole cluster stops; re-sending is harmless.
                if let Err(e) = flush_rows(&node, &archive, &config, None).await {
                    tracing::warn!(error = %e, "final archive flush failed; the log still holds everything");
                }
                return;
            }
        }
        match flush_rows(&node, &archive, &config, Some(&mut stop)).await {
            Ok(_) => backoff = config.flush_interval,
            Err(e) => {
                metrics::counter!(FAILURES).increment(1);
                backoff = (backoff * 2).clamp(Duration::from_millis(100), MAX_BACKOFF);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "archive flush failed; will retry");
            }
        }
    }
}

/// Copies batches to the archive until nothing durable is left unarchived, and replicates
/// the archive marks (which lets replicas trim memory); returns the events archived. A stop
/// signal ends the round at its next pause (the caller makes the last flush). Without `stop`
/// (the last flush while stopping) it copies one batch of rows only: the marks would go
/// through Raft, and without them moving the same rows would come back.
async fn flush_rows(
    node: &Node,
    archive: &Archive,
    config: &ArchiverConfig,
    mut stop: Option<&mut watch::Receiver<bool>>,
) -> Result<u64, ArchiveError> {
    let acknowledge = stop.is_some();
    let mut total = 0;
    // A round's batches are spread over most of the flush interval instead of running back to
    // back: the disk then takes the archive's writes a little at a time rather than as one
    // burst that the log's commits queue behind. With a per-replica archive (every replica
    // archiving every event at about the same moment) that matters three times over.
    let pacer = RoundPacer::new(Instant::now(), config.flush_interval, BATCH_EVENTS);
    loop {
        let backlog = node.archive_backlog(BATCH_EVENTS).await;
        if backlog.is_empty() {
            return Ok(total);
        }
        let full = backlog.event_count() >= BATCH_EVENTS;
        total += flush_batch(node, archive, config, backlog, acknowledge).await?;
        let Some(stop) = stop.as_deref_mut().filter(|_| full) else {
            return Ok(total);
        };
        let gap = pacer.gap(Instant::now(), node.archive_lag().pending_events);
        tokio::select! {
            _ = tokio::time::sleep(gap) => {}
            // A spread round can have seconds of pauses left: shutting down should not wait
            // for them.
            _ = stopped(stop) => return Ok(total),
        }
    }
}

/// Spreads one round's batches over [`SPREAD`] of the flush interval. The pause before each
/// batch is planned anew from what is pending then: the backlog grows while a round runs, and
/// a pause fixed at the round's start (from a backlog that happened to be small) let the
/// archive fall behind a steady load for good.
struct RoundPacer {
    deadline: Instant,
    batch: u64,
}

impl RoundPacer {
    fn new(started: Instant, interval: Duration, batch: usize) -> Self {
        RoundPacer {
            deadline: started + interval.mul_f64(SPREAD),
            batch: batch.max(1) as u64,
        }
    }

    /// The pause before the next batch: the time left until the deadline shared by the
    /// batches `pending` still needs; none once the deadline has passed (a backlog too large
    /// to spread, after an outage or under a load the spread cannot keep up with, drains at
    /// full speed).
    fn gap(&self, now: Instant, pending: u64) -> Duration {
        let left = self.deadline.saturating_duration_since(now);
        let batches = pending.div_ceil(self.batch).max(1);
        left / batches.min(u32::MAX as u64) as u32
    }
}

async fn flush_batch(
    node: &Node,
    archive: &Archive,
    config: &ArchiverConfig,
    backlog: ArchiveBacklog,
    acknowledge: bool,
) -> Result<u64, ArchiveError> {
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
    let count = events.len() as u64;
    if !events.is_empty() {
        let stats = archive.insert_events(&events).await?;
        metrics::counter!(ATTEMPTED).increment(stats.attempted);
        metrics::counter!(INSERTED).increment(stats.inserted);
        metrics::counter!(BYTES_ATTEMPTED).increment(stats.bytes_attempted);
        metrics::counter!(BYTES_INSERTED).increment(stats.bytes_inserted);
    }
    metrics::histogram!(FLUSH_DURATION).record(started.elapsed().as_secs_f64() * 1000.0);
    node.headers_archived(&backlog.sessions);
    if !acknowledge {
        return Ok(count);
    }
    let marks: Vec<(String, u64)> = backlog
        .runs
        .iter()
        .map(|run| (run.session_id.clone(), run.last_seq()))
        .collect();
    match node.acknowledge_archived(&marks, config.keep_hot).await {
        Ok(trimmed) => metrics::counter!(TRIMMED).increment(trimmed),
        // The rows are in the archive; the marks advance on the next round (re-sending is
        // harmless).
        Err(e) => tracing::warn!(error = %e, "archive acknowledgements not logged"),
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_is_spread_over_most_of_the_interval() {
        let start = Instant::now();
        let pacer = RoundPacer::new(start, Duration::from_secs(5), 5_000);
        // 150,000 events at the start: 30 batches over 3 s, one every 100 ms.
        assert_eq!(pacer.gap(start, 150_000), Duration::from_millis(100));
        // One batch left: it may wait for the rest of the spread.
        assert_eq!(pacer.gap(start, 10), Duration::from_secs(3));
        // A huge backlog: gaps shorter than a batch takes, so it drains at full speed.
        assert!(pacer.gap(start, 50_000_000) < Duration::from_millis(1));
    }

    #[test]
    fn the_pause_follows_a_backlog_that_grows_during_the_round() {
        let start = Instant::now();
        let pacer = RoundPacer::new(start, Duration::from_secs(5), 5_000);
        // The round began with a small backlog (two batches: 1.5 s apart)...
        assert_eq!(pacer.gap(start, 6_000), Duration::from_millis(1_500));
        // ...but a steady load grew it: a second later the 2 s left are shared by 20
        // batches, not spent 1.5 s per batch (which archived 3,300 events/s whatever came in).
        let later = start + Duration::from_secs(1);
        assert_eq!(pacer.gap(later, 100_000), Duration::from_millis(100));
        // Past the spread's deadline, what is still pending drains without pauses.
        let past = start + Duration::from_secs(4);
        assert_eq!(pacer.gap(past, 100_000), Duration::ZERO);
    }
}
