//! `starcite-bench`: drives the real Starcite HTTP API, and peers with the same workload, and
//! reports throughput and latency percentiles side by side.

mod chart;
mod drill;
mod history;
mod http;
mod nats;
mod pacer;
mod redis;
mod scenario;
mod stats;

use clap::{Args, Parser, Subcommand};
use scenario::Load;
use stats::RunResult;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "starcite-bench",
    version,
    about = "Load generator for Starcite with peer baselines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Appends to a running Starcite node.
    Append(Common),
    /// Appends with expected_seq, one writer per session: every append must get exactly the
    /// next seq (no conflicts, no gaps).
    Ordered(Common),
    /// Every append sent twice with the same idempotency key: the second must be deduped with
    /// the same seq.
    Retries(Common),
    /// Tail delivery latency: many WebSocket tailers per session, one writer per session at a
    /// fixed rate; time from the writer's ack to delivery on every tailer.
    Tail {
        /// Base URL of a running Starcite node.
        #[arg(long, default_value = "http://127.0.0.1:4000", env = "STARCITE_URL")]
        url: String,
        /// Sessions (one writer each).
        #[arg(long, default_value_t = 10)]
        sessions: usize,
        /// WebSocket tailers in total, spread evenly over the sessions.
        #[arg(long, default_value_t = 1000)]
        tailers: usize,
        /// Appends per second per session.
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        /// Seconds of appending.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Approximate size of each event's JSON in bytes.
        #[arg(long, default_value_t = 200)]
        payload_bytes: usize,
    },
    /// The same workload as XADD on a private redis-server (appendfsync always) it starts.
    RedisAppend(Common),
    /// The same workload as JetStream publishes with acknowledgement on a private nats-server
    /// it starts (file storage; fsync setting reported).
    NatsAppend(Common),
    /// Starcite, then Redis, then NATS JetStream, same workload; prints all and the ratios.
    Compare(Common),
    /// Starcite and its peers at several concurrencies; writes JSON, Markdown and SVG charts
    /// (throughput vs connections, latency percentiles) into --out-dir.
    Sweep {
        #[command(flatten)]
        common: Common,
        /// Comma-separated connection counts.
        #[arg(long, default_value = "1,4,16,64,128", value_delimiter = ',')]
        levels: Vec<usize>,
        /// Directory for results.json, results.md, throughput.svg and latency.svg.
        #[arg(long, default_value = "docs/bench")]
        out_dir: std::path::PathBuf,
        /// Also run the NATS JetStream baseline.
        #[arg(long)]
        with_nats: bool,
    },
    /// Read/write mix: reads of recent events and optimistic writes with expected_seq.
    Mix {
        #[command(flatten)]
        common: Common,
        /// Share of operations that are reads, in percent.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
        read_percent: u32,
    },
    /// Restart recovery: fills a fresh node with N events over HTTP, kills it with SIGKILL,
    /// restarts it and reports the time from start to ready (and checks every event is back).
    Recovery {
        /// The starcite binary to run.
        #[arg(long, default_value = "target/release/starcite")]
        binary: std::path::PathBuf,
        /// Events to write before the restart.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Sessions they are spread over.
        #[arg(long, default_value_t = 500)]
        sessions: usize,
    },
    /// Fills one session, waits for the archive to hold it, then times a WebSocket replay of
    /// the whole session from cursor 0 (cold tier, then hot).
    Replay {
        /// Base URL of a running Starcite node.
        #[arg(long, default_value = "http://127.0.0.1:4000", env = "STARCITE_URL")]
        url: String,
        /// Events in the session.
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        /// Approximate size of each event's JSON in bytes.
        #[arg(long, default_value_t = 200)]
        payload_bytes: usize,
    },
    /// A short run of every scenario that fails on any error or ordering violation (for CI;
    /// it never judges timings).
    Smoke {
        /// Base URL of a running Starcite node.
        #[arg(long, default_value = "http://127.0.0.1:4000")]
        url: String,
    },
    /// Fault-injection drill: starts a local cluster of real `starcite serve` processes, drives
    /// retrying writers and reconnecting tailers while a seeded schedule kills (-9), pauses
    /// (SIGSTOP) and wipes nodes and stops Postgres, then checks every node's history, the
    /// tails and the archive against what was acknowledged. Exits non-zero on any violation.
    Drill(Box<drill::DrillArgs>),
}

#[derive(Args, Clone)]
struct Common {
    /// Base URL of a running Starcite node; several comma-separated URLs (a cluster's nodes)
    /// spread the connections over them.
    #[arg(long, default_value = "http://127.0.0.1:4000", env = "STARCITE_URL")]
    url: String,
    /// Concurrent connections (one worker each).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Sessions (streams) the appends spread over, round-robin.
    #[arg(long, default_value_t = 500)]
    sessions: usize,
    /// Approximate size of each event's JSON in bytes.
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// Measured duration in seconds.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Unmeasured warm-up before it, in seconds.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Open loop: total requests per second (latency from the intended send time).
    /// Default: closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Write the results as a Markdown table to this file.
    #[arg(long)]
    markdown: Option<std::path::PathBuf>,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

impl Common {
    fn load(&self) -> Result<Load, String> {
        if self.connections == 0 || self.sessions == 0 {
            return Err("--connections and --sessions must be at least 1".into());
        }
        if !(self.duration > 0.0 && self.warmup >= 0.0) {
            return Err("--duration must be positive and --warmup not negative".into());
        }
        if self.rate.is_some_and(|r| r <= 0.0) {
            return Err("--rate must be positive".into());
        }
        Ok(Load {
            connections: self.connections,
            sessions: self.sessions,
            payload_bytes: self.payload_bytes,
            duration: Duration::from_secs_f64(self.duration),
            warmup: Duration::from_secs_f64(self.warmup),
            rate: self.rate,
            quiet: self.quiet,
        })
    }
}

fn report(common: &Common, results: &[RunResult]) -> Result<(), String> {
    let mut text = stats::markdown_table(results);
    if let [ours, peers @ ..] = results {
        for peer in peers {
            text.push('\n');
            text.push_str(&stats::ratio_table(ours, peer));
        }
    }
    println!("{text}");
    if let Some(path) = &common.json {
        let json = serde_json::to_string_pretty(results).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    if let Some(path) = &common.markdown {
        std::fs::write(path, &text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Append(common) => {
            let r = scenario::starcite_append(&common.url, &common.load()?).await?;
            report(&common, &[r])
        }
        Command::Ordered(common) => {
            let r = scenario::starcite_ordered(&common.url, &common.load()?).await?;
            report(&common, &[r])
        }
        Command::Retries(common) => {
            let r = scenario::starcite_retries(&common.url, &common.load()?).await?;
            report(&common, &[r])
        }
        Command::Tail {
            url,
            sessions,
            tailers,
            rate,
            duration,
            payload_bytes,
        } => {
            if sessions == 0 || tailers == 0 || rate <= 0.0 || duration <= 0.0 {
                return Err("--sessions, --tailers, --rate and --duration must be positive".into());
            }
            let r = scenario::tail_latency(
                &url,
                sessions,
                tailers,
                rate,
                Duration::from_secs_f64(duration),
                payload_bytes,
            )
            .await?;
            println!("{}", stats::markdown_table(&[r]));
            Ok(())
        }
        Command::NatsAppend(common) => {
            let r = scenario::nats_append(&common.load()?).await?;
            eprintln!("{}", r.notes);
            report(&common, &[r])
        }
        Command::RedisAppend(common) => {
            let r = scenario::redis_append(&common.load()?).await?;
            report(&common, &[r])
        }
        Command::Compare(common) => {
            let load = common.load()?;
            eprintln!(
                "starcite append ({} connections, {} sessions)…",
                load.connections, load.sessions
            );
            let ours = scenario::starcite_append(&common.url, &load).await?;
            eprintln!("redis XADD, appendfsync always…");
            let redis = scenario::redis_append(&load).await?;
            eprintln!("NATS JetStream publish with ack…");
            let nats = scenario::nats_append(&load).await?;
            eprintln!("nats: {}", nats.notes);
            report(&common, &[ours, redis, nats])
        }
        Command::Replay {
            url,
            events,
            payload_bytes,
        } => {
            let r = scenario::replay(&url, events, payload_bytes).await?;
            println!(
                "replay: {} events in {:.2}s = {:.0} events/s over one WebSocket ({} from the archive, {} hot), {} ordering violations",
                r.events, r.seconds, r.events_per_sec, r.archived_before_replay, r.hot_before_replay, r.ordering_violations
            );
            if r.ordering_violations > 0 {
                return Err("ordering violations in the replay".into());
            }
            Ok(())
        }
        Command::Sweep {
            common,
            levels,
            out_dir,
            with_nats,
        } => sweep(&common, &levels, &out_dir, with_nats).await,
        Command::Mix {
            common,
            read_percent,
        } => {
            let r = scenario::starcite_mix(&common.url, &common.load()?, read_percent).await?;
            eprintln!("{}", r.notes);
            report(&common, &[r])
        }
        Command::Recovery {
            binary,
            events,
            sessions,
        } => {
            if sessions == 0 || events < 64 {
                return Err("--sessions must be positive and --events at least 64".into());
            }
            let (ready, fill) = scenario::recovery(&binary, events, sessions).await?;
            println!(
                "recovery: wrote {events} events in {fill:.1}s; after kill -9 the node was ready {ready:.2}s after start, with every event present"
            );
            Ok(())
        }
        Command::Smoke { url } => smoke(&url).await,
        Command::Drill(args) => drill::run(*args).await,
    }
}

async fn sweep(
    common: &Common,
    levels: &[usize],
    out_dir: &std::path::Path,
    with_nats: bool,
) -> Result<(), String> {
    if levels.is_empty() || levels.contains(&0) {
        return Err("--levels must list positive connection counts".into());
    }
    let base = common.load()?;
    let mut results = Vec::new();
    for &connections in levels {
        let load = Load {
            connections,
            ..base.clone()
        };
        eprintln!("{connections} connections: starcite…");
        results.push(scenario::starcite_append(&common.url, &load).await?);
        eprintln!("{connections} connections: redis…");
        results.push(scenario::redis_append(&load).await?);
        if with_nats {
            eprintln!("{connections} connections: nats…");
            results.push(scenario::nats_append(&load).await?);
        }
    }
    std::fs::create_dir_all(out_dir).map_err(|e| format!("creating {}: {e}", out_dir.display()))?;
    let write = |name: &str, text: &str| {
        let path = out_dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))
    };
    write(
        "results.json",
        &serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?,
    )?;
    let table = stats::markdown_table(&results);
    write("results.md", &table)?;
    write(
        "throughput.svg",
        &chart::throughput_vs_concurrency(
            &results,
            &format!(
                "Durable appends/s vs connections ({} sessions, ~{} B events)",
                base.sessions, base.payload_bytes
            ),
        ),
    )?;
    let at = levels
        .iter()
        .copied()
        .min_by_key(|l| l.abs_diff(64))
        .unwrap_or(64);
    let at_level: Vec<RunResult> = results
        .iter()
        .filter(|r| r.connections == at)
        .cloned()
        .collect();
    write(
        "latency.svg",
        &chart::latency_percentiles(&at_level, &format!("Append latency at {at} connections")),
    )?;
    println!("{table}");
    println!(
        "wrote results.json, results.md, throughput.svg, latency.svg to {}",
        out_dir.display()
    );
    Ok(())
}

async fn smoke(url: &str) -> Result<(), String> {
    let load = Load {
        connections: 8,
        sessions: 20,
        payload_bytes: 200,
        duration: Duration::from_secs(3),
        warmup: Duration::from_millis(200),
        rate: None,
        quiet: true,
    };
    let mut results = vec![
        scenario::starcite_append(url, &load).await?,
        scenario::redis_append(&load).await?,
        scenario::nats_append(&load).await?,
    ];
    let open = Load {
        rate: Some(500.0),
        ..load.clone()
    };
    results.push(scenario::starcite_append(url, &open).await?);
    results.push(scenario::starcite_ordered(url, &load).await?);
    results.push(scenario::starcite_retries(url, &load).await?);
    results.push(scenario::starcite_mix(url, &load, 50).await?);
    results.push(scenario::tail_latency(url, 4, 40, 50.0, Duration::from_secs(3), 200).await?);
    println!("{}", stats::markdown_table(&results));
    let replay = scenario::replay(url, 2_000, 200).await?;
    println!(
        "replay: {} events, {:.0} events/s, {} ordering violations",
        replay.events, replay.events_per_sec, replay.ordering_violations
    );
    if replay.ordering_violations > 0 {
        return Err("smoke: replay delivered events out of order".into());
    }
    let bad: Vec<&RunResult> = results
        .iter()
        .filter(|r| r.errors > 0 || r.ordering_violations > 0 || r.ops == 0)
        .collect();
    if bad.is_empty() {
        println!("smoke: {} passed, 0 failed", results.len());
        Ok(())
    } else {
        Err(format!(
            "smoke: {} passed, {} failed (errors, ordering violations or no operations)",
            results.len() - bad.len(),
            bad.len()
        ))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("starcite-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("starcite-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
