//! Prometheus metrics. Histograms get explicit buckets (otherwise the exporter renders
//! summaries).

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use starcite_cluster::NodeStats;

pub const APPEND_TOTAL: &str = "starcite_events_append_total";
pub const APPEND_DEDUPED_TOTAL: &str = "starcite_events_deduped_total";
pub const PAYLOAD_BYTES: &str = "starcite_events_payload_bytes";
pub const APPEND_LATENCY: &str = "starcite_append_latency_seconds";
pub const HTTP_REQUESTS: &str = "starcite_http_requests_total";
pub const HTTP_LATENCY: &str = "starcite_http_request_duration_seconds";
pub const TAILS_ACTIVE: &str = "starcite_tails_active";
pub const TAIL_EVENTS_SENT: &str = "starcite_tail_events_sent_total";
pub const TAIL_SLOW_CLOSED: &str = "starcite_tail_slow_consumer_closed_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];
const MILLISECOND_BUCKETS: &[f64] = &[
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];
const BYTE_BUCKETS: &[f64] = &[
    64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
];

pub fn install() -> Result<PrometheusHandle, String> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(APPEND_LATENCY.into()), LATENCY_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(HTTP_LATENCY.into()), LATENCY_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(PAYLOAD_BYTES.into()), BYTE_BUCKETS))
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(starcite_archive::FLUSH_DURATION_METRIC.into()),
                MILLISECOND_BUCKETS,
            )
        })
        .map_err(|e| e.to_string())?;
    let handle = builder.install_recorder().map_err(|e| e.to_string())?;
    metrics::describe_counter!(APPEND_TOTAL, "Events appended (acknowledged, not deduped)");
    metrics::describe_counter!(
        APPEND_DEDUPED_TOTAL,
        "Appends answered from the idempotency window"
    );
    metrics::describe_histogram!(PAYLOAD_BYTES, "Size of appended event payloads in bytes");
    metrics::describe_histogram!(
        APPEND_LATENCY,
        "Append latency from request to durable ack, seconds"
    );
    metrics::describe_counter!(HTTP_REQUESTS, "HTTP requests by route, method and status");
    metrics::describe_histogram!(HTTP_LATENCY, "HTTP request latency by route, seconds");
    metrics::describe_gauge!(TAILS_ACTIVE, "Open tail connections (WebSocket and SSE)");
    metrics::describe_counter!(TAIL_EVENTS_SENT, "Events delivered to tails");
    metrics::describe_counter!(
        TAIL_SLOW_CLOSED,
        "Tails closed because the client could not keep up"
    );
    // Register the counters at zero so they are visible before the first append.
    metrics::counter!(APPEND_TOTAL).absolute(0);
    metrics::counter!(APPEND_DEDUPED_TOTAL).absolute(0);
    metrics::gauge!(TAILS_ACTIVE).set(0.0);
    starcite_archive::describe_metrics();
    // Histograms appear on /metrics (with zero counts) from the start, not only after the
    // first sample.
    for name in [
        APPEND_LATENCY,
        PAYLOAD_BYTES,
        starcite_archive::FLUSH_DURATION_METRIC,
    ] {
        drop(metrics::histogram!(name));
    }
    Ok(handle)
}

/// Node-level figures are read at scrape time rather than counted on the hot path.
pub fn record_node_stats(stats: &NodeStats) {
    metrics::gauge!("starcite_sessions").set(stats.sessions as f64);
    metrics::counter!("starcite_log_bytes_written_total").absolute(stats.log_bytes_written);
    metrics::counter!("starcite_log_records_written_total").absolute(stats.log_records_written);
    metrics::counter!("starcite_log_fsyncs_total").absolute(stats.log_fsyncs);
    metrics::counter!("starcite_snapshots_taken_total").absolute(stats.snapshots_taken);
    metrics::gauge!("starcite_recovery_records_replayed")
        .set(stats.recovery_records_replayed as f64);
    metrics::gauge!("starcite_recovery_duration_ms").set(stats.recovery_millis as f64);
    metrics::gauge!("starcite_log_disk_bytes").set(stats.log_disk_bytes as f64);
    metrics::gauge!("starcite_raft_groups_replicated").set(stats.groups_replicated as f64);
    metrics::gauge!("starcite_raft_groups_led").set(stats.groups_led as f64);
    metrics::gauge!("starcite_raft_groups_rejoining").set(stats.groups_rejoining as f64);
    metrics::counter!("starcite_raft_elections_total").absolute(stats.terms_total);
    metrics::gauge!("starcite_raft_replication_lag_max").set(stats.replication_lag_max as f64);
    metrics::gauge!("starcite_raft_replication_lag_entries")
        .set(stats.replication_lag_total as f64);
    metrics::counter!("starcite_forwarded_requests_total", "direction" => "out")
        .absolute(stats.forwarded_out);
    metrics::counter!("starcite_forwarded_requests_total", "direction" => "in")
        .absolute(stats.forwarded_in);
    metrics::counter!("starcite_peer_bytes_sent_total").absolute(stats.peer_bytes_sent);
    metrics::counter!("starcite_peer_bytes_received_total").absolute(stats.peer_bytes_received);
    metrics::gauge!("starcite_hot_bytes").set(stats.hot_bytes as f64);
    metrics::gauge!("starcite_spill_disk_bytes").set(stats.spill_disk_bytes as f64);
    metrics::counter!("starcite_spilled_events_total").absolute(stats.spilled_events);
}

/// Metric handles resolved once: the hot path records without hashing a key per call.
struct AppendMetrics {
    appended: metrics::Counter,
    deduped: metrics::Counter,
    payload: metrics::Histogram,
    latency: metrics::Histogram,
}

fn append_metrics() -> &'static AppendMetrics {
    static HANDLES: std::sync::OnceLock<AppendMetrics> = std::sync::OnceLock::new();
    HANDLES.get_or_init(|| AppendMetrics {
        appended: metrics::counter!(APPEND_TOTAL),
        deduped: metrics::counter!(APPEND_DEDUPED_TOTAL),
        payload: metrics::histogram!(PAYLOAD_BYTES),
        latency: metrics::histogram!(APPEND_LATENCY),
    })
}

pub fn record_append(deduped: bool, payload_bytes: usize, elapsed: std::time::Duration) {
    let m = append_metrics();
    if deduped {
        m.deduped.increment(1);
    } else {
        m.appended.increment(1);
        m.payload.record(payload_bytes as f64);
        m.latency.record(elapsed.as_secs_f64());
    }
}

type RequestKey = (String, axum::http::Method, u16);

/// The label for any non-standard method.
fn other_method() -> &'static axum::http::Method {
    static OTHER: std::sync::OnceLock<axum::http::Method> = std::sync::OnceLock::new();
    OTHER.get_or_init(|| {
        axum::http::Method::from_bytes(b"OTHER").unwrap_or(axum::http::Method::TRACE)
    })
}

/// Per-route request count and latency, with handles cached per (route, method, status).
pub fn record_request(
    route: &str,
    method: &axum::http::Method,
    status: axum::http::StatusCode,
    elapsed: std::time::Duration,
) {
    use parking_lot::RwLock;
    use std::collections::HashMap;
    static HANDLES: std::sync::OnceLock<
        RwLock<HashMap<RequestKey, (metrics::Counter, metrics::Histogram)>>,
    > = std::sync::OnceLock::new();
    let handles = HANDLES.get_or_init(Default::default);
    // Only standard methods get their own series, so clients cannot grow the map.
    let method = match *method {
        axum::http::Method::GET
        | axum::http::Method::POST
        | axum::http::Method::PUT
        | axum::http::Method::DELETE
        | axum::http::Method::HEAD
        | axum::http::Method::OPTIONS
        | axum::http::Method::PATCH => method,
        _ => other_method(),
    };
    let key = (route.to_owned(), method.clone(), status.as_u16());
    if let Some((count, latency)) = handles.read().get(&key) {
        count.increment(1);
        latency.record(elapsed.as_secs_f64());
        return;
    }
    let count = metrics::counter!(HTTP_REQUESTS, "route" => route.to_owned(), "method" => method.to_string(), "status" => status.as_u16().to_string());
    let latency = metrics::histogram!(HTTP_LATENCY, "route" => route.to_owned());
    count.increment(1);
    latency.record(elapsed.as_secs_f64());
    handles.write().insert(key, (count, latency));
}
