//! A PostgreSQL for tests: `DATABASE_URL` when set (each test gets its own fresh database on
//! that server), otherwise a throwaway cluster started with `initdb`/`pg_ctl` on a free port
//! and removed afterwards. Without either, tests fail with instructions: never a silent skip.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct Postgres {
    /// URL of the test's own database.
    pub url: String,
    cluster: Option<Cluster>,
}

struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    _dir: tempfile::TempDir,
    port: u16,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

/// Runs a PostgreSQL binary, as the `postgres` user when we are root (initdb refuses root).
fn pg_command(bin: &Path, tool: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

fn unique_db_name() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "starcite_test_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl Postgres {
    pub async fn start() -> Postgres {
        if let Ok(base) = std::env::var("DATABASE_URL") {
            let url = create_database(&base).await;
            return Postgres { url, cluster: None };
        }
        let Some(bin) = starcite_localhost::postgres_bin_dir() else {
            panic!(
                "these tests need PostgreSQL: set DATABASE_URL=postgres://user@host:port/db \
                 (a role that may CREATE DATABASE), or install the PostgreSQL server binaries \
                 (apt-get install postgresql) so the tests can start a throwaway cluster"
            );
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("pgdata");
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(
                status.success(),
                "chown of the throwaway cluster dir failed"
            );
        }
        let out = pg_command(&bin, "initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Cluster {
            bin,
            data,
            _dir: dir,
            port: starcite_localhost::free_port().expect("a free loopback port"),
        };
        cluster.start();
        let base = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
        let url = create_database(&base).await;
        Postgres {
            url,
            cluster: Some(cluster),
        }
    }

    /// Stops the throwaway cluster (fast shutdown), for outage tests.
    pub fn stop(&self) {
        self.cluster
            .as_ref()
            .expect("outage tests need the throwaway cluster")
            .stop();
    }

    pub fn restart(&self) {
        self.cluster
            .as_ref()
            .expect("outage tests need the throwaway cluster")
            .start();
    }

    pub fn can_stop(&self) -> bool {
        self.cluster.is_some()
    }
}

impl Cluster {
    fn start(&self) {
        let out = pg_command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "30", "-l"])
            .arg(self.data.join("server.log"))
            .arg("-o")
            .arg(format!(
                "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=200",
                self.port,
                self.data.display()
            ))
            .arg("start")
            .output()
            .expect("pg_ctl runs");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn stop(&self) {
        let _ = pg_command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"])
            .output();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn create_database(base_url: &str) -> String {
    use sqlx::Connection;
    let name = unique_db_name();
    let mut conn = sqlx::PgConnection::connect(base_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {base_url}: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    match base_url.rsplit_once('/') {
        Some((prefix, db)) if !prefix.ends_with('/') && !db.contains(':') => {
            let query = db
                .split_once('?')
                .map(|(_, q)| format!("?{q}"))
                .unwrap_or_default();
            format!("{prefix}/{name}{query}")
        }
        _ => format!("{}/{name}", base_url.trim_end_matches('/')),
    }
}
