//! What the drill, the benchmarks and the tests need from the machine they start processes
//! on: loopback ports, and the PostgreSQL server binaries for throwaway clusters.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// A free loopback port below the kernel's ephemeral range, each one handed out once per
/// process. A port from `bind(0)` lies inside that range, so while a killed server is down
/// any outgoing connection on the machine may take its port as a source port, and the
/// restart fails with "address in use".
pub fn free_port() -> Result<u16, String> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(32768);
    let (first, span) = (10_000u64, low.saturating_sub(10_000));
    if span >= 1_000 {
        // Start somewhere different in every process, then walk.
        let _ = NEXT.compare_exchange(
            0,
            u64::from(std::process::id()) * 7919 % span + 1,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        for _ in 0..span {
            let port = (first + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

/// The newest `/usr/lib/postgresql/*/bin` holding `initdb` and `pg_ctl`.
pub fn postgres_bin_dir() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    candidates.sort();
    candidates.reverse();
    candidates
        .into_iter()
        .find(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
}

#[cfg(test)]
mod tests {
    use super::free_port;

    #[test]
    fn ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().expect("a port")).collect();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ports.len(), "each port handed out once");
        for p in &ports {
            assert!(std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok());
            assert!(*p < 32768, "{p} is in the ephemeral range");
        }
    }
}
