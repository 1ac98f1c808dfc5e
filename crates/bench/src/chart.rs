//! Minimal SVG charts drawn by the harness itself: throughput vs concurrency (a line per
//! system) and latency percentiles (grouped bars), so results can be committed as images.

use crate::stats::RunResult;
use std::fmt::Write;

const W: f64 = 720.0;
const H: f64 = 400.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 160.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if step * mag >= v {
            return step * mag;
        }
    }
    10.0 * mag
}

fn header(out: &mut String, title: &str) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"#,
        W / 2.0,
        escape(title)
    );
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn y_axis(out: &mut String, max: f64, label: &str) {
    let plot_h = H - TOP - BOTTOM;
    for i in 0..=5 {
        let v = max * i as f64 / 5.0;
        let y = H - BOTTOM - plot_h * i as f64 / 5.0;
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            if max >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="18" y="{}" transform="rotate(-90 18 {})" text-anchor="middle">{}</text>"#,
        H / 2.0,
        H / 2.0,
        escape(label)
    );
}

fn legend(out: &mut String, names: &[String]) {
    for (i, name) in names.iter().enumerate() {
        let y = TOP + 10.0 + i as f64 * 20.0;
        let _ = writeln!(
            out,
            r#"<rect x="{}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            W - RIGHT + 15.0,
            y - 10.0,
            COLORS[i % COLORS.len()],
            W - RIGHT + 32.0,
            y,
            escape(name)
        );
    }
}

fn systems(results: &[RunResult]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for r in results {
        if !names.contains(&r.system) {
            names.push(r.system.clone());
        }
    }
    names
}

/// Throughput (y) against connections (x, evenly spaced), one line per system.
pub fn throughput_vs_concurrency(results: &[RunResult], title: &str) -> String {
    let names = systems(results);
    let mut conns: Vec<usize> = results.iter().map(|r| r.connections).collect();
    conns.sort_unstable();
    conns.dedup();
    let max = nice_max(results.iter().map(|r| r.ops_per_sec).fold(0.0, f64::max));
    let mut out = String::new();
    header(&mut out, title);
    y_axis(&mut out, max, "acknowledged appends / s");
    let plot_w = W - LEFT - RIGHT;
    let x_of = |i: usize| LEFT + plot_w * (i as f64 + 0.5) / conns.len().max(1) as f64;
    for (i, c) in conns.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{c}</text>"#,
            x_of(i),
            H - BOTTOM + 18.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">connections</text>"#,
        LEFT + plot_w / 2.0,
        H - 15.0
    );
    let plot_h = H - TOP - BOTTOM;
    for (s, name) in names.iter().enumerate() {
        let mut points = Vec::new();
        for (i, c) in conns.iter().enumerate() {
            if let Some(r) = results
                .iter()
                .find(|r| &r.system == name && r.connections == *c)
            {
                points.push((x_of(i), H - BOTTOM - plot_h * r.ops_per_sec / max));
            }
        }
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect();
        let color = COLORS[s % COLORS.len()];
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for (x, y) in points {
            let _ = writeln!(
                out,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{color}"/>"#
            );
        }
    }
    legend(&mut out, &names);
    out.push_str("</svg>\n");
    out
}

/// A percentile's label and how to read it from a result.
type Quantile = (&'static str, fn(&RunResult) -> f64);

/// p50 / p90 / p99 / p99.9 latency bars, one colour per system.
pub fn latency_percentiles(results: &[RunResult], title: &str) -> String {
    let names: Vec<String> = results.iter().map(|r| r.system.clone()).collect();
    let quantiles: [Quantile; 4] = [
        ("p50", |r| r.p50_ms),
        ("p90", |r| r.p90_ms),
        ("p99", |r| r.p99_ms),
        ("p99.9", |r| r.p999_ms),
    ];
    let max = nice_max(results.iter().map(|r| r.p999_ms).fold(0.0, f64::max));
    let mut out = String::new();
    header(&mut out, title);
    y_axis(&mut out, max, "latency (ms)");
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let group_w = plot_w / quantiles.len() as f64;
    let bar_w = (group_w * 0.8) / results.len().max(1) as f64;
    for (q, (label, get)) in quantiles.iter().enumerate() {
        let gx = LEFT + group_w * q as f64 + group_w * 0.1;
        for (s, r) in results.iter().enumerate() {
            let v = get(r);
            let h = plot_h * v / max;
            let _ = writeln!(
                out,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {label}: {v:.2} ms</title></rect>"#,
                gx + bar_w * s as f64,
                H - BOTTOM - h,
                bar_w - 2.0,
                h,
                COLORS[s % COLORS.len()],
                escape(&r.system)
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"#,
            gx + group_w * 0.4,
            H - BOTTOM + 18.0
        );
    }
    legend(&mut out, &names);
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{histogram, RunResult};
    use std::time::Duration;

    fn result(system: &str, conns: usize, ops: u64) -> RunResult {
        let mut h = histogram();
        for i in 1..=ops {
            h.record(i).unwrap();
        }
        RunResult::from_histogram(
            system,
            "append",
            conns,
            10,
            200,
            Duration::from_secs(1),
            &h,
            0,
            0,
            "",
        )
    }

    #[test]
    fn charts_are_well_formed_svg() {
        let results = vec![
            result("a", 1, 100),
            result("b", 1, 50),
            result("a", 8, 400),
            result("b", 8, 300),
        ];
        let svg = throughput_vs_concurrency(&results, "t <&>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2, "one line per system");
        assert!(svg.contains("t &lt;&amp;&gt;"));
        let bars = latency_percentiles(&results[2..], "latency");
        assert_eq!(
            bars.matches("<rect x=").count(),
            4 * 2 + 2,
            "bars plus legend swatches"
        );
        assert_eq!(nice_max(4200.0), 5000.0);
        assert_eq!(nice_max(0.0), 1.0);
    }
}
