//! Workloads. Each runs the same way against Starcite and against a peer: `connections`
//! workers, each with its own connection, appending `payload_bytes` events to `sessions`
//! streams round-robin, closed-loop (next request when the last is acknowledged) or open-loop
//! at a fixed total rate (latency measured from the intended send time, which corrects for
//! coordinated omission).

use crate::http::Conn;
use crate::pacer::{Pacer, Schedule};
use crate::redis::{PrivateRedis, Reply, Resp};
use crate::stats::{histogram, RunResult};
use bytes::Bytes;
use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Load {
    pub connections: usize,
    pub sessions: usize,
    pub payload_bytes: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Total requests per second across all connections (open loop); `None` = closed loop.
    pub rate: Option<f64>,
    pub quiet: bool,
}

impl Load {
    fn payload_text(&self) -> String {
        // The event's JSON is about `payload_bytes` long.
        "x".repeat(self.payload_bytes.saturating_sub(60).max(1))
    }
}

/// What one worker reports back.
struct WorkerResult {
    hist: Histogram<u64>,
    errors: u64,
    violations: u64,
    /// (stream, seq) pairs acknowledged, for the ordering check.
    acked: Vec<(usize, u64)>,
}

/// What the workers have done so far, for the progress line.
#[derive(Default)]
struct Progress {
    done: AtomicU64,
    errors: AtomicU64,
    /// The slowest acknowledged request since the last progress line, in microseconds: a
    /// stall shows up in the second it happened, not only in the run's tail percentiles.
    slowest_us: AtomicU64,
}

/// Progress line on stderr once a second.
fn spawn_progress(progress: Arc<Progress>, quiet: bool) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if quiet {
            return;
        }
        let mut last = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = progress.done.load(Ordering::Relaxed);
            let slowest = progress.slowest_us.swap(0, Ordering::Relaxed);
            eprintln!(
                "  {:>8} ops/s  slowest {:>7.1} ms  (errors so far: {})",
                now - last,
                slowest as f64 / 1000.0,
                progress.errors.load(Ordering::Relaxed)
            );
            last = now;
        }
    })
}

/// One worker's connection to the system under test.
pub trait Target: Send {
    /// Performs one operation on `stream`; returns the position an append was acknowledged at,
    /// or 0 for an operation without one (a read, a refused optimistic write).
    fn append(
        &mut self,
        stream: usize,
    ) -> impl std::future::Future<Output = Result<u64, String>> + Send;

    /// Scenario-specific ordering violations seen by this worker.
    fn violations(&self) -> u64 {
        0
    }
}

/// When a run starts measuring and ends, shared by its workers.
#[derive(Clone, Copy)]
struct Window {
    measure_from: Instant,
    end: Instant,
}

/// Schedules requests for one worker and measures them. Open loop (`pacer`): each request
/// starts when the pacer releases it, and its latency counts from when it was due.
async fn drive<T: Target>(
    load: &Load,
    worker: usize,
    window: Window,
    pacer: Option<&Pacer>,
    progress: &Progress,
    target: &mut T,
) -> WorkerResult {
    let mut hist = histogram();
    let mut errors = 0;
    let mut acked = Vec::new();
    let Window { measure_from, end } = window;
    let mut i = 0usize;
    loop {
        let intended = match pacer {
            Some(pacer) => {
                let schedule = pacer.schedule();
                let due = schedule.due(schedule.send_number(worker, i as u64));
                if due >= end {
                    break;
                }
                pacer.released(worker, i as u64).await;
                due
            }
            None => Instant::now(),
        };
        if intended >= end {
            break;
        }
        let stream = (worker + i * load.connections) % load.sessions;
        i += 1;
        let result = target.append(stream).await;
        let finished = Instant::now();
        if intended >= measure_from {
            match result {
                Ok(seq) => {
                    let us = finished.saturating_duration_since(intended).as_micros() as u64;
                    let _ = hist.record(us.max(1));
                    acked.push((stream, seq));
                    progress.done.fetch_add(1, Ordering::Relaxed);
                    progress.slowest_us.fetch_max(us, Ordering::Relaxed);
                }
                Err(e) => {
                    if errors < 3 {
                        eprintln!("  worker {worker}: {e}");
                    }
                    errors += 1;
                    progress.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    WorkerResult {
        hist,
        errors,
        violations: target.violations(),
        acked,
    }
}

/// Counts seqs acknowledged more than once for the same stream (must be zero).
fn ordering_violations(results: &[WorkerResult]) -> u64 {
    let mut per_stream: HashMap<usize, Vec<u64>> = HashMap::new();
    for r in results {
        for (s, seq) in r.acked.iter().filter(|(_, seq)| *seq != 0) {
            per_stream.entry(*s).or_default().push(*seq);
        }
    }
    let mut violations = 0;
    for seqs in per_stream.values_mut() {
        seqs.sort_unstable();
        violations += seqs.windows(2).filter(|w| w[0] == w[1]).count() as u64;
    }
    violations
}

fn merge(
    system: &str,
    scenario: &str,
    load: &Load,
    (results, pacer_late): (Vec<WorkerResult>, Option<Histogram<u64>>),
    notes: &str,
) -> RunResult {
    let mut hist = histogram();
    let mut errors = 0;
    for r in &results {
        let _ = hist.add(&r.hist);
        errors += r.errors;
    }
    let violations =
        ordering_violations(&results) + results.iter().map(|r| r.violations).sum::<u64>();
    let mut result = RunResult::from_histogram(
        system,
        scenario,
        load.connections,
        load.sessions,
        load.payload_bytes,
        load.duration,
        &hist,
        errors,
        violations,
        notes,
    );
    result.pacer_late_p99_ms = pacer_late.map(|h| h.value_at_quantile(0.99) as f64 / 1000.0);
    result
}

fn session_id(run: &str, i: usize) -> String {
    format!("bench-{run}-{i}")
}

fn run_id() -> String {
    format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    )
}

/// Creates the sessions the workload appends to.
async fn create_sessions(url: &str, run: &str, sessions: usize) -> Result<(), String> {
    let mut conn = Conn::connect(url).await?;
    for i in 0..sessions {
        let body = format!(r#"{{"id":"{}"}}"#, session_id(run, i));
        let (status, answer) = conn
            .request("POST", "/v1/sessions", Bytes::from(body))
            .await?;
        if status != 201 {
            return Err(format!(
                "creating a session got {status}: {}",
                String::from_utf8_lossy(&answer)
            ));
        }
    }
    Ok(())
}

fn parse_seq(body: &[u8]) -> Result<u64, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("bad ack: {e}"))?;
    v["seq"]
        .as_u64()
        .ok_or_else(|| format!("ack without seq: {v}"))
}

struct StarciteTarget {
    conn: Conn,
    run: String,
    text: String,
    n: u64,
}

impl Target for StarciteTarget {
    async fn append(&mut self, stream: usize) -> Result<u64, String> {
        self.n += 1;
        let path = format!("/v1/sessions/{}/append", session_id(&self.run, stream));
        let body = Bytes::from(format!(
            r#"{{"type":"content","actor":"agent:bench","payload":{{"text":"{}","n":{}}}}}"#,
            self.text, self.n
        ));
        let (status, answer) = self.conn.request("POST", &path, body).await?;
        if status != 201 {
            return Err(format!(
                "append got {status}: {}",
                String::from_utf8_lossy(&answer)
            ));
        }
        parse_seq(&answer)
    }
}

struct RedisTarget {
    conn: Resp,
    text: String,
    n: u64,
}

impl Target for RedisTarget {
    async fn append(&mut self, stream: usize) -> Result<u64, String> {
        self.n += 1;
        let key = format!("bench-{stream}");
        let event = format!(
            r#"{{"type":"content","actor":"agent:bench","payload":{{"text":"{}","n":{}}}}}"#,
            self.text, self.n
        );
        match self
            .conn
            .command(&[b"XADD", key.as_bytes(), b"*", b"event", event.as_bytes()])
            .await?
        {
            // Stream ids are `<ms>-<n>`; fold them into one number for the ordering check.
            Reply::Bulk(Some(id)) => {
                let id = String::from_utf8_lossy(&id).into_owned();
                let (ms, n) = id.split_once('-').ok_or("bad stream id")?;
                let ms: u64 = ms.parse().map_err(|_| "bad stream id")?;
                let n: u64 = n.parse().map_err(|_| "bad stream id")?;
                Ok(ms * 1_000_000 + n)
            }
            other => Err(format!("XADD answered {other:?}")),
        }
    }
}

/// Appends with `expected_seq`: every session is written by exactly one worker, which knows its
/// last seq, so every append must succeed with exactly `expected_seq + 1`; a conflict or any
/// other seq is an ordering violation.
struct OrderedTarget {
    conn: Conn,
    run: String,
    text: String,
    last: HashMap<usize, u64>,
    violations: u64,
}

impl Target for OrderedTarget {
    async fn append(&mut self, stream: usize) -> Result<u64, String> {
        let expected = *self.last.get(&stream).unwrap_or(&0);
        let path = format!("/v1/sessions/{}/append", session_id(&self.run, stream));
        let body = Bytes::from(format!(
            r#"{{"type":"content","actor":"agent:bench","payload":{{"text":"{}"}},"expected_seq":{expected}}}"#,
            self.text
        ));
        let (status, answer) = self.conn.request("POST", &path, body).await?;
        if status == 409 {
            self.violations += 1;
            return Err(format!(
                "expected_seq conflict on a single-writer session: {}",
                String::from_utf8_lossy(&answer)
            ));
        }
        if status != 201 {
            return Err(format!(
                "append got {status}: {}",
                String::from_utf8_lossy(&answer)
            ));
        }
        let seq = parse_seq(&answer)?;
        if seq != expected + 1 {
            self.violations += 1;
        }
        self.last.insert(stream, seq);
        Ok(seq)
    }

    fn violations(&self) -> u64 {
        self.violations
    }
}

/// Every event is sent twice with the same idempotency key: the first must be appended, the
/// second answered `deduped` with the same seq. Anything else is a violation.
struct RetryTarget {
    conn: Conn,
    run: String,
    text: String,
    n: u64,
    worker: usize,
    violations: u64,
}

impl Target for RetryTarget {
    async fn append(&mut self, stream: usize) -> Result<u64, String> {
        self.n += 1;
        let path = format!("/v1/sessions/{}/append", session_id(&self.run, stream));
        let body = Bytes::from(format!(
            r#"{{"type":"content","actor":"agent:bench","payload":{{"text":"{}"}},"idempotency_key":"w{}-{}"}}"#,
            self.text, self.worker, self.n
        ));
        let mut seqs = [0u64; 2];
        for (attempt, seq) in seqs.iter_mut().enumerate() {
            let (status, answer) = self.conn.request("POST", &path, body.clone()).await?;
            if status != 201 {
                return Err(format!(
                    "append got {status}: {}",
                    String::from_utf8_lossy(&answer)
                ));
            }
            let v: serde_json::Value =
                serde_json::from_slice(&answer).map_err(|e| format!("bad ack: {e}"))?;
            if v["deduped"].as_bool() != Some(attempt == 1) {
                self.violations += 1;
            }
            *seq = v["seq"].as_u64().ok_or("ack without seq")?;
        }
        if seqs[0] != seqs[1] {
            self.violations += 1;
        }
        Ok(seqs[0])
    }

    fn violations(&self) -> u64 {
        self.violations
    }
}

/// `expected_seq` appends, one writer per session.
pub async fn starcite_ordered(url: &str, load: &Load) -> Result<RunResult, String> {
    // At least one session per worker and a multiple of the workers, so that round-robin
    // gives every session exactly one writer.
    let sessions = load.sessions.max(load.connections);
    let load = Load {
        sessions: sessions - sessions % load.connections,
        ..load.clone()
    };
    let text = load.payload_text();
    run_starcite(
        url,
        &load,
        "ordered (expected_seq)",
        "one writer per session",
        |conn, run, _| OrderedTarget {
            conn,
            run,
            text: text.clone(),
            last: HashMap::new(),
            violations: 0,
        },
    )
    .await
}

/// Every append sent twice with the same idempotency key (latency per pair).
pub async fn starcite_retries(url: &str, load: &Load) -> Result<RunResult, String> {
    let text = load.payload_text();
    run_starcite(
        url,
        load,
        "idempotent retries (x2)",
        "ops = pairs; second of each pair must be deduped",
        |conn, run, worker| RetryTarget {
            conn,
            run,
            text: text.clone(),
            n: 0,
            worker,
            violations: 0,
        },
    )
    .await
}

struct NatsTarget {
    conn: crate::nats::NatsConn,
    text: String,
    n: u64,
}

impl Target for NatsTarget {
    async fn append(&mut self, stream: usize) -> Result<u64, String> {
        self.n += 1;
        let event = format!(
            r#"{{"type":"content","actor":"agent:bench","payload":{{"text":"{}","n":{}}}}}"#,
            self.text, self.n
        );
        let ack = self
            .conn
            .request(&format!("bench.s{stream}"), event.as_bytes())
            .await?;
        let v: serde_json::Value =
            serde_json::from_str(&ack).map_err(|e| format!("bad JetStream ack {ack:?}: {e}"))?;
        // JetStream seqs are per stream (here: one stream for all sessions), still unique.
        v["seq"]
            .as_u64()
            .map(|seq| seq * 1_000_000 + stream as u64)
            .ok_or_else(|| format!("JetStream refused: {ack}"))
    }
}

/// The same workload as publishes with acknowledgement to a private JetStream.
pub async fn nats_append(load: &Load) -> Result<RunResult, String> {
    let nats = crate::nats::PrivateNats::start().await?;
    let mut targets = Vec::new();
    for w in 0..load.connections {
        targets.push(NatsTarget {
            conn: crate::nats::NatsConn::connect(nats.port, w + 2).await?,
            text: load.payload_text(),
            n: 0,
        });
    }
    let results = run_load(load, targets).await?;
    let note = nats.sync_note.clone();
    drop(nats);
    Ok(merge("nats-jetstream", "append", load, results, &note))
}

/// Runs `load` with one target per connection. Open loop: also how late the pacer released
/// sends (µs), which the measured latencies include.
async fn run_load<T: Target + 'static>(
    load: &Load,
    targets: Vec<T>,
) -> Result<(Vec<WorkerResult>, Option<Histogram<u64>>), String> {
    let progress = Arc::new(Progress::default());
    let printer = spawn_progress(progress.clone(), load.quiet);
    let start = Instant::now();
    let window = Window {
        measure_from: start + load.warmup,
        end: start + load.warmup + load.duration,
    };
    let pacer = match load.rate {
        Some(rate) => Some(Arc::new(Pacer::start(
            Schedule::new(start, rate, load.connections),
            window.end,
        )?)),
        None => None,
    };
    let mut tasks = Vec::new();
    for (w, mut target) in targets.into_iter().enumerate() {
        let load = load.clone();
        let progress = progress.clone();
        let pacer = pacer.clone();
        tasks.push(tokio::spawn(async move {
            drive(&load, w, window, pacer.as_deref(), &progress, &mut target).await
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.map_err(|e| format!("worker crashed: {e}"))?);
    }
    printer.abort();
    let late = match pacer.and_then(|p| Arc::try_unwrap(p).ok()) {
        Some(pacer) => Some(pacer.finish().await?),
        None => None,
    };
    Ok((results, late))
}

/// Creates the sessions, opens one connection per worker, builds each worker's target with
/// `make(connection, run id, worker)` and runs the load.
async fn run_starcite<T, F>(
    url: &str,
    load: &Load,
    scenario: &str,
    notes: &str,
    make: F,
) -> Result<RunResult, String>
where
    T: Target + 'static,
    F: Fn(Conn, String, usize) -> T,
{
    let run = run_id();
    // Several comma-separated URLs (the nodes of a cluster): connections spread over them.
    let urls: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    let first = urls.first().copied().unwrap_or(url);
    create_sessions(first, &run, load.sessions).await?;
    let mut targets = Vec::new();
    for worker in 0..load.connections {
        let url = urls.get(worker % urls.len().max(1)).copied().unwrap_or(url);
        targets.push(make(Conn::connect(url).await?, run.clone(), worker));
    }
    let results = run_load(load, targets).await?;
    Ok(merge("starcite", scenario, load, results, notes))
}

/// Hot-path appends against a Starcite node.
pub async fn starcite_append(url: &str, load: &Load) -> Result<RunResult, String> {
    let text = load.payload_text();
    run_starcite(
        url,
        load,
        "append",
        "ack after fsync (group commit)",
        |conn, run, _| StarciteTarget {
            conn,
            run,
            text: text.clone(),
            n: 0,
        },
    )
    .await
}

/// The same workload as `XADD` on a private Redis with `appendfsync always`.
pub async fn redis_append(load: &Load) -> Result<RunResult, String> {
    let redis = PrivateRedis::start().await?;
    let mut targets = Vec::new();
    for _ in 0..load.connections {
        targets.push(RedisTarget {
            conn: Resp::connect(redis.port).await?,
            text: load.payload_text(),
            n: 0,
        });
    }
    let results = run_load(load, targets).await?;
    drop(redis);
    Ok(merge(
        "redis-streams",
        "append",
        load,
        results,
        "XADD, appendonly yes, appendfsync always",
    ))
}

/// Result of a replay run: how fast one WebSocket receives a large session from cursor 0.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplayResult {
    pub events: u64,
    pub seconds: f64,
    pub events_per_sec: f64,
    pub archived_before_replay: u64,
    pub hot_before_replay: u64,
    pub ordering_violations: u64,
}

async fn metric(url: &str, name: &str) -> Result<f64, String> {
    let mut conn = Conn::connect(url).await?;
    let (_, body) = conn.request("GET", "/metrics", Bytes::new()).await?;
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("{name} not in /metrics"))
}

/// Fills one session with `events` events (64 writers), waits until the archive holds them
/// (so most of the replay comes from the cold tier), then times a WebSocket replay from 0.
pub async fn replay(url: &str, events: u64, payload_bytes: usize) -> Result<ReplayResult, String> {
    use futures_util::StreamExt;
    let run = run_id();
    create_sessions(url, &run, 1).await?;
    let session = session_id(&run, 0);
    let writers = 64u64;
    let mut tasks = Vec::new();
    let text = "x".repeat(payload_bytes.saturating_sub(60).max(1));
    for w in 0..writers {
        let url = url.to_owned();
        let session = session.clone();
        let text = text.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(&url).await?;
            let mut i = w;
            while i < events {
                let body = Bytes::from(format!(
                    r#"{{"type":"content","actor":"agent:bench","payload":{{"text":"{text}","i":{i}}}}}"#
                ));
                let (status, answer) = conn
                    .request("POST", &format!("/v1/sessions/{session}/append"), body)
                    .await?;
                if status != 201 {
                    return Err(format!("append got {status}: {}", String::from_utf8_lossy(&answer)));
                }
                i += writers;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| format!("writer crashed: {e}"))??;
    }
    // Let the archiver catch up so the replay really reads the cold tier.
    let deadline = Instant::now() + Duration::from_secs(120);
    while metric(url, "starcite_archive_pending_rows").await? > 0.0 {
        if Instant::now() > deadline {
            return Err("the archive did not catch up within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let hot = metric(url, "starcite_archive_tail_size")
        .await
        .unwrap_or(0.0) as u64;
    let ws_url = format!(
        "ws://{}/v1/sessions/{session}/tail?cursor=0",
        crate::http::authority(url)?
    );
    let started = Instant::now();
    let mut ws = crate::http::ws_connect(&ws_url)
        .await
        .map_err(|e| format!("WebSocket connect: {e}"))?;
    let mut received = 0u64;
    let mut violations = 0u64;
    while received < events {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .map_err(|_| format!("no frame for 30 s after {received} events"))?
            .ok_or("tail closed")?
            .map_err(|e| format!("tail failed: {e}"))?;
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            received += 1;
            let seq = t
                .as_str()
                .strip_prefix("{\"seq\":")
                .and_then(|r| r.split(',').next())
                .and_then(|n| n.parse::<u64>().ok());
            if seq != Some(received) {
                violations += 1;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(ReplayResult {
        events,
        seconds,
        events_per_sec: events as f64 / seconds,
        archived_before_replay: events.saturating_sub(hot.min(events)),
        hot_before_replay: hot,
        ordering_violations: violations,
    })
}

/// Tail delivery latency: `tailers` WebSocket tails spread over `sessions` sessions, one writer
/// per session appending at `rate_per_session` events/s; for every (event, tailer) the time
/// from the writer receiving its ack to the tailer receiving the event (0 if the event arrives
/// first, which happens: tails are woken when the event becomes durable, like the ack).
pub async fn tail_latency(
    url: &str,
    sessions: usize,
    tailers: usize,
    rate_per_session: f64,
    duration: Duration,
    payload_bytes: usize,
) -> Result<RunResult, String> {
    use futures_util::StreamExt;
    let run = run_id();
    create_sessions(url, &run, sessions).await?;
    let authority = crate::http::authority(url)?;
    let base = Instant::now();
    // Tailers connect first (cursor 0) and record (session, seq, arrival).
    let mut tail_tasks = Vec::new();
    let mut ready = Vec::new();
    for t in 0..tailers {
        let session = t % sessions;
        let ws_url = format!(
            "ws://{authority}/v1/sessions/{}/tail?cursor=0",
            session_id(&run, session)
        );
        let ws = crate::http::ws_connect(&ws_url)
            .await
            .map_err(|e| format!("tailer {t} cannot connect: {e}"))?;
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        ready.push(stop_tx);
        tail_tasks.push(tokio::spawn(async move {
            let mut ws = ws;
            let mut seen: Vec<(usize, u64, Duration)> = Vec::new();
            let mut violations = 0u64;
            let mut last = 0u64;
            loop {
                tokio::select! {
                    msg = ws.next() => match msg {
                        Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                            let seq = t
                                .as_str()
                                .strip_prefix("{\"seq\":")
                                .and_then(|r| r.split(',').next())
                                .and_then(|n| n.parse::<u64>().ok())
                                .unwrap_or(0);
                            if seq != last + 1 {
                                violations += 1;
                            }
                            last = seq;
                            seen.push((session, seq, base.elapsed()));
                        }
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                    _ = &mut stop_rx => break,
                }
            }
            (seen, violations)
        }));
    }
    // Writers: one per session, fixed rate, record ack times.
    let interval = Duration::from_secs_f64(1.0 / rate_per_session.max(0.001));
    let text = "x".repeat(payload_bytes.saturating_sub(60).max(1));
    let mut writer_tasks = Vec::new();
    for s in 0..sessions {
        let mut conn = Conn::connect(url).await?;
        let path = format!("/v1/sessions/{}/append", session_id(&run, s));
        let text = text.clone();
        writer_tasks.push(tokio::spawn(async move {
            let mut acks: Vec<(u64, Duration)> = Vec::new();
            let mut errors = 0u64;
            let start = Instant::now();
            let mut next = start;
            while next < start + duration {
                tokio::time::sleep_until(next.into()).await;
                let body = Bytes::from(format!(
                    r#"{{"type":"content","actor":"agent:bench","payload":{{"text":"{text}"}}}}"#
                ));
                match conn.request("POST", &path, body).await {
                    Ok((201, answer)) => match parse_seq(&answer) {
                        Ok(seq) => acks.push((seq, base.elapsed())),
                        Err(_) => errors += 1,
                    },
                    _ => errors += 1,
                }
                next += interval;
            }
            (s, acks, errors)
        }));
    }
    let mut ack_times: HashMap<(usize, u64), Duration> = HashMap::new();
    let mut errors = 0;
    let mut expected_per_session: HashMap<usize, u64> = HashMap::new();
    for t in writer_tasks {
        let (s, acks, e) = t.await.map_err(|e| format!("writer crashed: {e}"))?;
        errors += e;
        expected_per_session.insert(s, acks.len() as u64);
        for (seq, at) in acks {
            ack_times.insert((s, seq), at);
        }
    }
    // Give the last events time to arrive, then stop the tailers.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for stop in ready {
        let _ = stop.send(());
    }
    let mut hist = histogram();
    let mut violations = 0;
    for t in tail_tasks {
        let (seen, v) = t.await.map_err(|e| format!("tailer crashed: {e}"))?;
        violations += v;
        let session = seen.first().map(|s| s.0);
        if let Some(session) = session {
            if seen.len() as u64 != expected_per_session.get(&session).copied().unwrap_or(0) {
                violations += 1; // a tailer missed events (or got extra ones)
            }
        }
        for (session, seq, arrived) in seen {
            if let Some(acked) = ack_times.get(&(session, seq)) {
                let us = arrived.saturating_sub(*acked).as_micros() as u64;
                let _ = hist.record(us.max(1));
            }
        }
    }
    let load = Load {
        connections: tailers,
        sessions,
        payload_bytes,
        duration,
        warmup: Duration::ZERO,
        rate: Some(rate_per_session * sessions as f64),
        quiet: true,
    };
    let mut r = RunResult::from_histogram(
        "starcite",
        "tail delivery (ack → tailer)",
        load.connections,
        load.sessions,
        load.payload_bytes,
        load.duration,
        &hist,
        errors,
        violations,
        &format!("{tailers} tailers, {rate_per_session}/s per session; ops = deliveries"),
    );
    r.ops_per_sec = r.ops as f64 / duration.as_secs_f64();
    Ok(r)
}

/// Read/write mix: each operation is a read (`GET /v1/sessions/:id/events` of the last events)
/// with probability `read_percent`, otherwise an optimistic write: read the session's
/// `last_seq`, then append with that `expected_seq`. Losing the race is a `409` the client is
/// meant to handle; it is counted in the notes, not as an error.
struct MixTarget {
    conn: Conn,
    run: String,
    text: String,
    read_percent: u32,
    n: u64,
    conflicts: Arc<AtomicU64>,
}

impl Target for MixTarget {
    async fn append(&mut self, stream: usize) -> Result<u64, String> {
        self.n += 1;
        let session = session_id(&self.run, stream);
        // A cheap deterministic spread of reads and writes per worker.
        let is_read = (self.n.wrapping_mul(2_654_435_761) % 100) < u64::from(self.read_percent);
        let (status, answer) = self
            .conn
            .request("GET", &format!("/v1/sessions/{session}"), Bytes::new())
            .await?;
        if status != 200 {
            return Err(format!("session read got {status}"));
        }
        let last: u64 = serde_json::from_slice::<serde_json::Value>(&answer)
            .map_err(|e| format!("bad session: {e}"))?["last_seq"]
            .as_u64()
            .ok_or("session without last_seq")?;
        if is_read {
            let path = format!(
                "/v1/sessions/{session}/events?cursor={}&limit=10",
                last.saturating_sub(10)
            );
            let (status, _) = self.conn.request("GET", &path, Bytes::new()).await?;
            return if status == 200 {
                Ok(0)
            } else {
                Err(format!("events read got {status}"))
            };
        }
        let body = Bytes::from(format!(
            r#"{{"type":"content","actor":"agent:bench","payload":{{"text":"{}"}},"expected_seq":{last}}}"#,
            self.text
        ));
        let (status, answer) = self
            .conn
            .request("POST", &format!("/v1/sessions/{session}/append"), body)
            .await?;
        match status {
            201 => parse_seq(&answer),
            409 => {
                self.conflicts.fetch_add(1, Ordering::Relaxed);
                Ok(0)
            }
            other => Err(format!(
                "append got {other}: {}",
                String::from_utf8_lossy(&answer)
            )),
        }
    }
}

pub async fn starcite_mix(url: &str, load: &Load, read_percent: u32) -> Result<RunResult, String> {
    let text = load.payload_text();
    let conflicts = Arc::new(AtomicU64::new(0));
    let mut result = run_starcite(
        url,
        load,
        &format!("read/write mix ({read_percent}% reads)"),
        "",
        |conn, run, _| MixTarget {
            conn,
            run,
            text: text.clone(),
            read_percent,
            n: 0,
            conflicts: conflicts.clone(),
        },
    )
    .await?;
    result.notes = format!(
        "writes use expected_seq from a fresh read; {} lost races answered 409 expected_seq_conflict",
        conflicts.load(Ordering::Relaxed)
    );
    Ok(result)
}

/// Restart recovery: starts `binary serve` on a fresh data directory, fills it with `events`
/// events over HTTP, kills it with SIGKILL, starts it again and measures the time from process
/// start to `/health/ready` answering 200; then checks that every event is there.
pub async fn recovery(
    binary: &std::path::Path,
    events: u64,
    sessions: usize,
) -> Result<(f64, f64), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))?;
    let url = format!("http://127.0.0.1:{port}");
    let start = |dir: &std::path::Path| {
        std::process::Command::new(binary)
            .arg("serve")
            .env("PORT", port.to_string())
            .env("STARCITE_RAFT_DATA_DIR", dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))
    };
    let wait_ready = |url: String| async move {
        let started = Instant::now();
        loop {
            if let Ok(mut conn) = Conn::connect(&url).await {
                if let Ok((200, _)) = conn.request("GET", "/health/ready", Bytes::new()).await {
                    return Ok(started.elapsed().as_secs_f64());
                }
            }
            if started.elapsed() > Duration::from_secs(120) {
                return Err("not ready within 120 s".to_string());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let mut child = start(dir.path())?;
    wait_ready(url.clone()).await?;
    let load = Load {
        connections: 64,
        sessions,
        payload_bytes: 200,
        duration: Duration::from_secs(3600),
        warmup: Duration::ZERO,
        rate: None,
        quiet: true,
    };
    let run = run_id();
    create_sessions(&url, &run, sessions).await?;
    let fill_started = Instant::now();
    let per_worker = events / load.connections as u64;
    let mut tasks = Vec::new();
    for w in 0..load.connections {
        let mut conn = Conn::connect(&url).await?;
        let run = run.clone();
        let text = load.payload_text();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_worker {
                let stream = (w + i as usize * 64) % sessions;
                let body = Bytes::from(format!(
                    r#"{{"type":"content","actor":"agent:bench","payload":{{"text":"{text}"}}}}"#
                ));
                let path = format!("/v1/sessions/{}/append", session_id(&run, stream));
                let (status, _) = conn.request("POST", &path, body).await?;
                if status != 201 {
                    return Err(format!("append got {status}"));
                }
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| format!("writer crashed: {e}"))??;
    }
    let fill_secs = fill_started.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    let mut child = start(dir.path())?;
    let ready = wait_ready(url.clone()).await;
    let mut total = 0u64;
    if ready.is_ok() {
        let mut conn = Conn::connect(&url).await?;
        for s in 0..sessions {
            let (_, body) = conn
                .request(
                    "GET",
                    &format!("/v1/sessions/{}", session_id(&run, s)),
                    Bytes::new(),
                )
                .await?;
            total += serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["last_seq"].as_u64())
                .unwrap_or(0);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let ready = ready?;
    if total != per_worker * load.connections as u64 {
        return Err(format!(
            "after the restart the sessions hold {total} events, {} were acknowledged",
            per_worker * load.connections as u64
        ));
    }
    Ok((ready, fill_secs))
}
