//! The cold tier end to end: events flow to the archive (embedded SQLite or a real Postgres),
//! memory is trimmed, and tails and pages still return every event once, in order, across
//! tiers — also after a restart and through a Postgres outage.

mod support;

#[path = "../../archive/tests/support/mod.rs"]
mod pg;

use futures_util::StreamExt;
use serde_json::{json, Value};
use starcite_archive::BATCH_EVENTS;
use std::time::Duration;
use support::{all_events, create, metric, ws_events, Server};
use tokio_tungstenite::tungstenite::Message;

const FAST_ARCHIVE: [(&str, &str); 2] = [
    ("STARCITE_ARCHIVE_FLUSH_INTERVAL_MS", "100"),
    ("STARCITE_TAIL_KEEP", "10"),
];

async fn append_n(
    client: &reqwest::Client,
    server: &Server,
    id: &str,
    from: u64,
    to: u64,
) -> Vec<String> {
    let mut frames = Vec::new();
    for i in from..=to {
        let body = json!({"type": "t", "actor": "a", "payload": {"i": i, "pad": "x".repeat(50)}, "idempotency_key": format!("k{i}")});
        let r = client
            .post(format!("{}/v1/sessions/{id}/append", server.url()))
            .json(&body)
            .send()
            .await
            .expect("append");
        assert_eq!(r.status(), 201);
        let ack: Value = r.json().await.expect("json");
        assert_eq!(ack["seq"].as_u64(), Some(i));
        frames.push(body.to_string());
    }
    frames
}

/// Waits until the archive holds every durable event.
async fn wait_archived(server: &Server) {
    wait_metric(
        server,
        "starcite_archive_pending_rows",
        |v| v == 0.0,
        Duration::from_secs(60),
    )
    .await;
}

async fn wait_metric(server: &Server, name: &str, ok: impl Fn(f64) -> bool, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let v = metric(server, name).await;
        if ok(v) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} = {v} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_contiguous(events: &[Value], from: u64) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            e["seq"].as_u64(),
            Some(from + i as u64),
            "no gap, no duplicate"
        );
        assert_eq!(e["payload"]["i"].as_u64(), Some(from + i as u64));
    }
}

async fn tiers_round_trip(mut server: Server) -> Server {
    let client = reqwest::Client::new();
    create(&client, &server, "cold").await;
    append_n(&client, &server, "cold", 1, 300).await;
    wait_archived(&server).await;
    wait_metric(
        &server,
        "starcite_archive_trimmed_total",
        |v| v >= 290.0,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        metric(&server, "starcite_archive_inserted_total").await,
        300.0
    );

    let tail = ws_events(&server, "cold", 0, 300).await;
    assert_contiguous(&tail, 1);
    assert_contiguous(&all_events(&client, &server, "cold").await, 1);
    assert_contiguous(&ws_events(&server, "cold", 150, 150).await, 151);

    // Idempotency keys outlive trimming.
    let retry = json!({"type": "t", "actor": "a", "payload": {"i": 1, "pad": "x".repeat(50)}, "idempotency_key": "k1"});
    let r: Value = client
        .post(format!("{}/v1/sessions/cold/append", server.url()))
        .json(&retry)
        .send()
        .await
        .expect("retry")
        .json()
        .await
        .expect("json");
    assert_eq!(
        (r["seq"].as_u64(), r["deduped"].as_bool()),
        (Some(1), Some(true))
    );

    // After a crash the archive marks come back from the log; replay still spans both tiers.
    server.restart().await;
    assert_contiguous(&ws_events(&server, "cold", 0, 300).await, 1);
    append_n(&client, &server, "cold", 301, 310).await;
    let all = ws_events(&server, "cold", 0, 310).await;
    assert_contiguous(&all, 1);
    wait_archived(&server).await;
    server
}

#[tokio::test]
async fn sqlite_archive_serves_replay_across_tiers() {
    let server = Server::start(&FAST_ARCHIVE).await;
    let server = tiers_round_trip(server).await;
    assert!(server.dir().join("data/archive.sqlite3").exists());
}

#[tokio::test]
async fn postgres_archive_holds_the_full_history() {
    let pg = pg::Postgres::start().await;
    let mut env = FAST_ARCHIVE.to_vec();
    env.push(("DATABASE_URL", pg.url.as_str()));
    let server = Server::start(&env).await;
    let _server = tiers_round_trip(server).await;
    let pool = sqlx::PgPool::connect(&pg.url).await.expect("connect");
    let rows: Vec<(i64, Value)> = sqlx::query_as(
        "SELECT seq, payload::text::jsonb FROM events WHERE session_id = $1 ORDER BY seq",
    )
    .bind("cold")
    .fetch_all(&pool)
    .await
    .map(|rows: Vec<(i64, sqlx::types::Json<Value>)>| {
        rows.into_iter().map(|(s, j)| (s, j.0)).collect()
    })
    .expect("select");
    assert_eq!(rows.len(), 310, "every event once");
    for (i, (seq, payload)) in rows.iter().enumerate() {
        assert_eq!(*seq, i as i64 + 1);
        assert_eq!(payload["i"].as_i64(), Some(i as i64 + 1));
    }
}

#[tokio::test]
async fn postgres_outage_keeps_appends_working_and_catches_up_exactly_once() {
    let pg = pg::Postgres::start().await;
    if !pg.can_stop() {
        eprintln!(
            "DATABASE_URL is set: the outage test needs the throwaway cluster and runs there"
        );
        return;
    }
    let mut env = FAST_ARCHIVE.to_vec();
    env.push(("DATABASE_URL", pg.url.as_str()));
    let server = Server::start(&env).await;
    let client = reqwest::Client::new();
    create(&client, &server, "o").await;
    append_n(&client, &server, "o", 1, 50).await;
    wait_archived(&server).await;

    pg.stop();
    // Appends, and tails of what memory holds, keep working while the archive is down.
    append_n(&client, &server, "o", 51, 250).await;
    assert_contiguous(&ws_events(&server, "o", 40, 210).await, 41);
    // A replay that needs the archive waits for it instead of failing or skipping.
    let url = server.ws_url("/v1/sessions/o/tail?cursor=0");
    let waiting = tokio::spawn(async move {
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
        let mut seqs = Vec::new();
        while seqs.len() < 250 {
            match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).expect("json");
                    seqs.push(v["seq"].as_u64().expect("seq"));
                }
                Ok(Some(Ok(Message::Close(f)))) => panic!("closed: {f:?}"),
                Ok(Some(Ok(_))) => {}
                other => panic!("tail failed: {other:?}"),
            }
        }
        seqs
    });
    wait_metric(
        &server,
        "starcite_archive_failures_total",
        |v| v >= 1.0,
        Duration::from_secs(20),
    )
    .await;
    assert!(
        metric(&server, "starcite_archive_pending_rows").await >= 150.0,
        "the lag is visible"
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "nothing can be sent before the archive is back"
    );

    pg.restart();
    assert_eq!(
        waiting.await.expect("tail"),
        (1..=250).collect::<Vec<u64>>()
    );
    wait_archived(&server).await;
    let pool = sqlx::PgPool::connect(&pg.url).await.expect("connect");
    let (count, distinct, max): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT seq), max(seq) FROM events WHERE session_id = 'o'",
    )
    .fetch_one(&pool)
    .await
    .expect("counts");
    assert_eq!(
        (count, distinct, max),
        (250, 250, 250),
        "every event archived exactly once"
    );
    assert_contiguous(&ws_events(&server, "o", 0, 250).await, 1);
}

/// Appends events `from..=to` of `id`, each with a payload padded to `pad` bytes.
async fn append_padded(
    client: reqwest::Client,
    url: String,
    id: String,
    from: u64,
    to: u64,
    pad: usize,
) {
    let pad = "x".repeat(pad);
    for i in from..=to {
        let body = json!({"type": "t", "actor": "a", "payload": {"i": i, "pad": pad}});
        let r = client
            .post(format!("{url}/v1/sessions/{id}/append"))
            .json(&body)
            .send()
            .await
            .expect("append");
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    }
}

/// One writer per session at once, appending `from..=to` with `pad`-byte payloads.
async fn append_concurrently(server: &Server, ids: &[String], from: u64, to: u64, pad: usize) {
    let client = reqwest::Client::new();
    let writers: Vec<_> = ids
        .iter()
        .map(|id| {
            let (client, url, id) = (client.clone(), server.url(), id.clone());
            tokio::spawn(append_padded(client, url, id, from, to, pad))
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
}

/// A round spread over the flush interval can have seconds of pauses left; a stop must not
/// wait for them: it ends the round at its next pause, and one last batch is copied.
#[tokio::test]
async fn a_stop_during_a_spread_round_does_not_wait_for_its_pauses() {
    // An 8 s interval: the first batch comes after 8 s, and the rest of what is pending is
    // spread over the next 8 s.
    let mut server = Server::start(&[("STARCITE_ARCHIVE_FLUSH_INTERVAL_MS", "8000")]).await;
    let client = reqwest::Client::new();
    let ids: Vec<String> = (0..20).map(|i| format!("ses_stop{i}")).collect();
    for id in &ids {
        create(&client, &server, id).await;
    }
    // 3,000 events: three batches, so after its first the round pauses for about 4 s.
    append_concurrently(&server, &ids, 1, 150, 20).await;
    wait_metric(
        &server,
        "starcite_archive_attempted_total",
        |v| v >= BATCH_EVENTS as f64,
        Duration::from_secs(30),
    )
    .await;
    drop(client);
    let stopping = std::time::Instant::now();
    server.signal("TERM");
    let code = server.wait_exit(Duration::from_secs(30)).await;
    let took = stopping.elapsed();
    assert_eq!(code, Some(0), "{}", server.log());
    assert!(
        took < Duration::from_millis(2_500),
        "stopping took {took:?}: it waited for the round's pauses\n{}",
        server.log()
    );
}

/// Budget for events held in memory in the spill test: far below what it appends.
const SMALL_HOT_BUDGET: &str = "65536";

/// Waits (at most 10 s: a spill pass runs every 100 ms) until memory is within the budget.
async fn wait_hot_within_budget(server: &Server) {
    let budget: f64 = SMALL_HOT_BUDGET.parse().expect("budget");
    let within = |v: f64| v <= budget;
    wait_metric(
        server,
        "starcite_hot_bytes",
        within,
        Duration::from_secs(10),
    )
    .await;
}

#[tokio::test]
async fn a_long_outage_spills_to_local_disk_and_loses_nothing() {
    const LAST: u64 = 1800;
    let pg = pg::Postgres::start().await;
    if !pg.can_stop() {
        eprintln!("DATABASE_URL is set: the spill test needs the throwaway cluster and runs there");
        return;
    }
    let mut env = FAST_ARCHIVE.to_vec();
    env.extend([
        ("DATABASE_URL", pg.url.as_str()),
        ("STARCITE_HOT_MAX_BYTES", SMALL_HOT_BUDGET),
        // Snapshots refer to spilled runs: take some during the test.
        ("STARCITE_SNAPSHOT_EVERY_ENTRIES", "50"),
        ("STARCITE_RAFT_GROUPS", "4"),
    ]);
    let mut server = Server::start(&env).await;
    let client = reqwest::Client::new();
    let ids: Vec<String> = ["sp0", "sp1", "sp2"].map(String::from).to_vec();
    for id in &ids {
        create(&client, &server, id).await;
    }
    append_concurrently(&server, &ids, 1, 20, 64).await;
    wait_archived(&server).await;

    pg.stop();
    append_concurrently(&server, &ids, 21, LAST, 1000).await;
    // ~5.5 MB appended while the archive is down: memory holds at most the budget.
    wait_hot_within_budget(&server).await;
    assert!(metric(&server, "starcite_spilled_events_total").await >= 5000.0);
    assert!(metric(&server, "starcite_spill_disk_bytes").await >= 5_000_000.0);
    // More than one archive batch (1,000 events) waits for the archive.
    assert!(metric(&server, "starcite_archive_pending_rows").await >= 5340.0);
    // Tails past the archive read the spilled events back, in order, then memory, then live.
    for id in &ids {
        assert_contiguous(&ws_events(&server, id, 20, LAST as usize - 20).await, 21);
        assert_contiguous(&ws_events(&server, id, LAST - 67, 67).await, LAST - 66);
    }

    // A crash: snapshots refer to spilled runs, the log replays the rest.
    server.restart().await;
    for id in &ids {
        assert_contiguous(&ws_events(&server, id, 20, LAST as usize - 20).await, 21);
    }
    append_concurrently(&server, &ids[..1], LAST + 1, LAST + 10, 64).await;
    wait_hot_within_budget(&server).await;

    pg.restart();
    wait_archived(&server).await;
    let pool = sqlx::PgPool::connect(&pg.url).await.expect("connect");
    let last = LAST as i64;
    for (id, last) in [("sp0", last + 10), ("sp1", last), ("sp2", last)] {
        let (count, distinct, max): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT seq), max(seq) FROM events WHERE session_id = $1",
        )
        .bind(id)
        .fetch_one(&pool)
        .await
        .expect("counts");
        assert_eq!(
            (count, distinct, max),
            (last, last, last),
            "{id}: every event archived exactly once"
        );
        assert_contiguous(&ws_events(&server, id, 0, last as usize).await, 1);
    }
    // Once the archive has everything, the spill segments go (checked every 10 s).
    let empty = |v: f64| v == 0.0;
    wait_metric(
        &server,
        "starcite_spill_disk_bytes",
        empty,
        Duration::from_secs(40),
    )
    .await;
    server.restart().await;
    assert_contiguous(&ws_events(&server, "sp1", 0, LAST as usize).await, 1);
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

#[tokio::test]
async fn memory_stays_bounded_while_the_archive_is_unreachable() {
    // An archive that never answers: nothing is ever archived, so without spilling every
    // event appended would stay in memory.
    let dead = format!(
        "postgres://postgres@127.0.0.1:{}/none",
        support::free_port()
    );
    // Measured: a round grows memory by 1-8 MB; with the budget at 10 GB instead, by ~44 MB
    // (the test fails).
    let server = Server::start(&[
        ("DATABASE_URL", dead.as_str()),
        ("STARCITE_HOT_MAX_BYTES", "1048576"),
    ])
    .await;
    let client = reqwest::Client::new();
    const WRITERS: usize = 16;
    const EACH: u64 = 250;
    const PAD: usize = 8 * 1024;
    let ids: Vec<String> = (0..WRITERS).map(|w| format!("m{w}")).collect();
    for id in &ids {
        create(&client, &server, id).await;
    }
    // A first round reaches the steady state (buffers, allocator arenas, connections, the
    // budget filled); a second one must then leave memory about where it was.
    append_concurrently(&server, &ids, 1, EACH, PAD).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_bytes(server.pid());
    append_concurrently(&server, &ids, EACH + 1, 2 * EACH, PAD).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes(server.pid());
    let appended = WRITERS as u64 * EACH * PAD as u64;
    eprintln!("resident memory {before} -> {after} while {appended} payload bytes were appended");
    assert!(
        after.saturating_sub(before) < appended / 2,
        "memory grew by {} bytes while {appended} bytes were appended and never archived",
        after.saturating_sub(before)
    );
    let pending = metric(&server, "starcite_archive_pending_rows").await;
    assert!(pending >= (WRITERS as u64 * 2 * EACH) as f64, "{pending}");
    // Every event is still there, from disk.
    let events = ws_events(&server, "m3", 0, 2 * EACH as usize).await;
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["payload"]["i"].as_u64(), Some(i as u64 + 1));
    }
}

/// Three nodes sharing one Postgres, the archive flushing every 50 ms, and the first node
/// (leader of about a third of the groups) killed while writers append: its groups' new
/// leaders resume from the replicated archive marks, re-sending whatever the old leader may
/// have inserted without acknowledging. Every acknowledged event ends up archived exactly
/// once, and replays across tiers are whole on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_change_mid_flush_archives_every_event_exactly_once() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let pg = pg::Postgres::start().await;
    let suffix = format!("{:x}", std::process::id());
    let mut cluster = support::Cluster::start(
        3,
        &[
            ("DATABASE_URL", pg.url.as_str()),
            ("STARCITE_ARCHIVE_FLUSH_INTERVAL_MS", "50"),
            ("STARCITE_TAIL_KEEP", "10"),
        ],
    )
    .await;
    let urls = cluster.urls();
    let client = reqwest::Client::new();
    let within = Duration::from_secs(30);
    let sessions: Vec<String> = (0..6).map(|i| format!("mf{i}-{suffix}")).collect();
    for s in &sessions {
        let body = json!({ "id": s });
        let (status, ack) = support::post_any(&client, &urls, "/v1/sessions", &body, within).await;
        assert_eq!(status, 201, "{ack}");
    }
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = sessions
        .iter()
        .map(|s| {
            let (client, urls, s, stop) = (client.clone(), urls.clone(), s.clone(), stop.clone());
            tokio::spawn(async move {
                let path = format!("/v1/sessions/{s}/append");
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let body = json!({"type": "t", "actor": "a", "payload": {"n": n},
                                      "idempotency_key": format!("{s}-{n}")});
                    let (status, ack) =
                        support::post_any(&client, &urls, &path, &body, within).await;
                    assert_eq!(status, 201, "{ack}");
                    assert_eq!(ack["seq"].as_u64(), Some(n), "{s}: one writer, seq = n");
                }
                (s, n)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.nodes[0].kill9();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.restart(0).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut last: Vec<(String, u64)> = Vec::new();
    for w in writers {
        let (s, n) = w.await.expect("writer");
        assert!(n > 10, "{s} made progress");
        last.push((s, n));
    }
    for node in &cluster.nodes {
        wait_archived(node).await;
    }
    let pool = sqlx::PgPool::connect(&pg.url).await.expect("connect");
    for (s, n) in &last {
        let (count, distinct, min, max): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM events WHERE session_id = $1",
        )
        .bind(s)
        .fetch_one(&pool)
        .await
        .expect("counts");
        let n = *n as i64;
        assert_eq!(
            (count, distinct, min, max),
            (n, n, 1, n),
            "{s}: every event archived exactly once"
        );
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT seq, payload->>'n' FROM events WHERE session_id = $1 ORDER BY seq",
        )
        .bind(s)
        .fetch_all(&pool)
        .await
        .expect("rows");
        for (seq, payload_n) in rows {
            assert_eq!(
                payload_n,
                seq.to_string(),
                "{s}: the event acknowledged with that seq"
            );
        }
        for node in &cluster.nodes {
            let events = all_events(&client, node, s).await;
            let seqs: Vec<u64> = events
                .iter()
                .map(|e| e["seq"].as_u64().unwrap_or(0))
                .collect();
            assert_eq!(
                seqs,
                (1..=n as u64).collect::<Vec<_>>(),
                "{s} on {}",
                node.url()
            );
        }
    }
}

/// With the archive keeping up, the memory budget is met by letting archived events go
/// (the archive serves them): nothing is written to the spill store.
#[tokio::test]
async fn a_healthy_archive_keeps_memory_in_budget_without_spilling() {
    // Spilling starts only when archived events leaving memory cannot bring it under half
    // the budget, i.e. with more than 8 MiB not yet archived: the archive (every 100 ms)
    // would have to fall ~0.3 s behind even at the 30 MB/s a release build appends here.
    // A 4 MiB budget (2 MiB) spilled there; 1 MiB spilled on a loaded machine.
    let server = Server::start(&[
        ("STARCITE_ARCHIVE_FLUSH_INTERVAL_MS", "100"),
        ("STARCITE_HOT_MAX_BYTES", "16777216"),
        ("STARCITE_TAIL_KEEP", "4000"),
    ])
    .await;
    let client = reqwest::Client::new();
    let ids: Vec<String> = (0..10).map(|i| format!("h{i}")).collect();
    for id in &ids {
        create(&client, &server, id).await;
    }
    // ~30 MB kept hot by STARCITE_TAIL_KEEP (4000 per session) without a budget.
    append_concurrently(&server, &ids, 1, 3000, 800).await;
    wait_archived(&server).await;
    let within = |v: f64| v <= 16_777_216.0;
    wait_metric(
        &server,
        "starcite_hot_bytes",
        within,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(metric(&server, "starcite_spilled_events_total").await, 0.0);
    assert_eq!(metric(&server, "starcite_spill_disk_bytes").await, 0.0);
    // What the pass that just ran took out of memory was freed below the request path
    // (`starcite-reclaim`; thread names stop at 15 characters).
    let threads = thread_priorities(server.pid());
    assert_eq!(
        nice_of(&threads, "starcite-reclai"),
        vec![10],
        "the thread freeing memory runs below the request path: {threads:?}"
    );
    for id in &ids {
        assert_contiguous(&ws_events(&server, id, 0, 3000).await, 1);
    }
}

/// `(thread name, nice)` of every thread of a running process, from `/proc`.
fn thread_priorities(pid: u32) -> Vec<(String, i64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the server's threads");
    tasks
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
            // `pid (comm) state …`: the name may hold spaces, so split after its last `)`.
            let open = stat.find('(')?;
            let close = stat.rfind(')')?;
            let name = stat[open + 1..close].to_owned();
            // After the name: state is field 3 of stat(5), nice field 19.
            let nice = stat[close + 1..].split_whitespace().nth(16)?.parse().ok()?;
            Some((name, nice))
        })
        .collect()
}

/// The `nice` of each of `threads` whose name starts with `prefix`.
fn nice_of(threads: &[(String, i64)], prefix: &str) -> Vec<i64> {
    threads
        .iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .map(|(_, nice)| *nice)
        .collect()
}

#[tokio::test]
async fn the_archive_writes_below_the_request_path_and_reads_at_its_priority() {
    let server = Server::start(&FAST_ARCHIVE).await;
    let client = reqwest::Client::new();
    create(&client, &server, "ses_niced").await;
    append_n(&client, &server, "ses_niced", 1, 50).await;
    wait_archived(&server).await;
    let threads = thread_priorities(server.pid());
    assert_eq!(
        nice_of(&threads, "starcite-archiv"),
        vec![10],
        "the archiver thread runs below the request path: {threads:?}"
    );
    assert_eq!(
        nice_of(&threads, "sqlx-sqlite"),
        vec![10],
        "the archive's writer connection inherits the archiver's priority: {threads:?}"
    );
    let workers = nice_of(&threads, "tokio-rt-worker");
    assert!(
        !workers.is_empty() && workers.iter().all(|&n| n == 0),
        "the request path keeps the normal priority: {threads:?}"
    );

    // Events 1..=40 left memory (10 kept hot): a replay from 0 reads them from the archive,
    // on a reader connection opened by the request path, at its priority.
    assert_contiguous(&ws_events(&server, "ses_niced", 0, 50).await, 1);
    let threads = thread_priorities(server.pid());
    let sqlite = nice_of(&threads, "sqlx-sqlite");
    assert!(
        sqlite.contains(&0) && sqlite.contains(&10),
        "a reader connection at the request path's priority beside the writer: {threads:?}"
    );
}
