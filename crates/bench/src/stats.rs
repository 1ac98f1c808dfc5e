//! Latency histograms and the result of one run.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::time::Duration;

/// Microsecond histogram up to 60 s.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub system: String,
    pub scenario: String,
    pub connections: usize,
    pub sessions: usize,
    pub payload_bytes: usize,
    pub seconds: f64,
    pub ops: u64,
    pub ops_per_sec: f64,
    pub errors: u64,
    pub ordering_violations: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub notes: String,
    /// Open loop: how late the load generator released the 99th percentile send, which the
    /// latencies above include (they count from when each send was due).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pacer_late_p99_ms: Option<f64>,
}

impl RunResult {
    #[allow(clippy::too_many_arguments)]
    pub fn from_histogram(
        system: &str,
        scenario: &str,
        connections: usize,
        sessions: usize,
        payload_bytes: usize,
        elapsed: Duration,
        hist: &Histogram<u64>,
        errors: u64,
        ordering_violations: u64,
        notes: &str,
    ) -> RunResult {
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        let ops = hist.len();
        RunResult {
            system: system.into(),
            scenario: scenario.into(),
            connections,
            sessions,
            payload_bytes,
            seconds: elapsed.as_secs_f64(),
            ops,
            ops_per_sec: ops as f64 / elapsed.as_secs_f64().max(1e-9),
            errors,
            ordering_violations,
            p50_ms: ms(0.50),
            p90_ms: ms(0.90),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: hist.max() as f64 / 1000.0,
            notes: notes.into(),
            pacer_late_p99_ms: None,
        }
    }
}

pub fn markdown_table(results: &[RunResult]) -> String {
    let mut out = String::from(
        "| system | scenario | conns | sessions | ops/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors | order violations |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |\n",
            r.system,
            r.scenario,
            r.connections,
            r.sessions,
            r.ops_per_sec,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.p999_ms,
            r.max_ms,
            r.errors,
            r.ordering_violations
        ));
    }
    out
}

/// `ours / peer` for throughput and p99, as a Markdown table.
pub fn ratio_table(ours: &RunResult, peer: &RunResult) -> String {
    format!(
        "| ratio {} / {} | value |\n| --- | ---: |\n| throughput | {:.2} |\n| p50 latency | {:.2} |\n| p99 latency | {:.2} |\n",
        ours.system,
        peer.system,
        ours.ops_per_sec / peer.ops_per_sec.max(1e-9),
        ours.p50_ms / peer.p50_ms.max(1e-9),
        ours.p99_ms / peer.p99_ms.max(1e-9),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_tables() {
        let mut h = histogram();
        for us in 1..=1000u64 {
            h.record(us * 10).unwrap();
        }
        let r = RunResult::from_histogram(
            "x",
            "append",
            4,
            10,
            200,
            Duration::from_secs(2),
            &h,
            0,
            0,
            "",
        );
        assert_eq!(r.ops, 1000);
        assert!((r.ops_per_sec - 500.0).abs() < 1e-6);
        assert!((r.p50_ms - 5.0).abs() < 0.05, "{}", r.p50_ms);
        assert!((r.p99_ms - 9.9).abs() < 0.05, "{}", r.p99_ms);
        let table = markdown_table(std::slice::from_ref(&r));
        assert!(table.contains("| x | append | 4 | 10 | 500 |"), "{table}");
        let ratio = ratio_table(&r, &r);
        assert!(ratio.contains("| throughput | 1.00 |"));
    }
}
