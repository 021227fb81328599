//! A throwaway PostgreSQL cluster for the PostgreSQL scenarios (`store-compare`, `replicas`).
//!
//! `scripts/pg-cluster start DIR` creates and starts it with the tests' settings (fsync, full-page writes and
//! synchronous commit off: fast, and unsafe on a crash). A benchmark compared with SQLite must not run on those,
//! so the cluster is then restarted with PostgreSQL's own defaults (all three on); what a session wants beyond
//! that (e.g. `synchronous_commit = off`) it sets itself. Dropping the handle stops the cluster and removes DIR.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's cluster script.
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/pg-cluster");

/// A running throwaway cluster.
pub struct PgCluster {
    dir: PathBuf,
    /// `host=DIR port=PORT user=postgres` (libpq key=value form; add `dbname=...`).
    pub conn: String,
}

/// Runs `cmd` through the shell as the `postgres` OS user when we are root (PostgreSQL refuses to run as root),
/// as ourselves otherwise, as the script does.
fn as_postgres(cmd: &str) -> anyhow::Result<std::process::Output> {
    let mut c = if nix::unistd::getuid().is_root() {
        let mut c = Command::new("su");
        c.args(["postgres", "-s", "/bin/sh", "-c", cmd]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", cmd]);
        c
    };
    c.output().with_context(|| format!("running {cmd}"))
}

/// The directory holding pg_ctl (the newest /usr/lib/postgresql/*/bin, else the one on PATH).
fn bindir() -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).filter(|b| b.join("pg_ctl").exists()).collect())
        .unwrap_or_default();
    found.sort();
    if let Some(b) = found.pop() {
        return Ok(b);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .find(|p| p.join("pg_ctl").exists())
        .context("no PostgreSQL binaries (pg_ctl) under /usr/lib/postgresql/*/bin or on PATH; install postgresql")
}

impl PgCluster {
    /// Starts a fresh cluster in `dir` (one left there by an earlier run is stopped and removed first), then
    /// restarts it with PostgreSQL's default durability.
    pub fn start(dir: &Path) -> anyhow::Result<PgCluster> {
        let _ = Command::new(SCRIPT).arg("stop").arg(dir).output();
        let out = Command::new(SCRIPT).arg("start").arg(dir).output().with_context(|| format!("running {SCRIPT}"))?;
        if !out.status.success() {
            bail!("{SCRIPT} start {} failed: {}", dir.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
        let conn = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let cluster = PgCluster { dir: dir.to_path_buf(), conn: conn.clone() };
        let port = conn
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("port="))
            .with_context(|| format!("{SCRIPT} printed no port: {conn:?}"))?
            .to_string();
        let d = dir.display();
        let restart = format!(
            "{}/pg_ctl -D '{d}' -l '{d}/server.log' -o \"-p {port} -k '{d}' -c listen_addresses=127.0.0.1 -c \
             max_connections=300\" -w -t 60 restart",
            bindir()?.display()
        );
        let out = as_postgres(&restart)?;
        if !out.status.success() {
            bail!(
                "restarting PostgreSQL in {d} with its default durability failed: {} (see {d}/server.log)",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(cluster)
    }

    /// The connection string of database `dbname`.
    pub fn url(&self, dbname: &str) -> String {
        format!("{} dbname={dbname}", self.conn)
    }

    /// Runs `sql` on database `dbname` on a thread of its own (the synchronous client must not run on a tokio
    /// worker); returns the first column of every row of the last statement, as text.
    pub fn query(&self, dbname: &str, sql: &str) -> anyhow::Result<Vec<String>> {
        let url = self.url(dbname);
        let sql = sql.to_string();
        std::thread::spawn(move || -> anyhow::Result<Vec<String>> {
            let mut c = postgres::Client::connect(&url, postgres::NoTls).context("connecting to PostgreSQL")?;
            let rows = c.simple_query(&sql).with_context(|| format!("running {sql:?}"))?;
            Ok(rows
                .iter()
                .filter_map(|m| match m {
                    postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or_default().to_string()),
                    _ => None,
                })
                .collect())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the PostgreSQL client thread panicked"))?
    }

    /// Creates database `name` (owned by `postgres`).
    pub fn create_database(&self, name: &str) -> anyhow::Result<()> {
        self.query("postgres", &format!("CREATE DATABASE {name}")).map(drop)
    }

    /// A server setting as the server reports it (`SHOW name`).
    pub fn show(&self, name: &str) -> String {
        self.query("postgres", &format!("SHOW {name}")).ok().and_then(|v| v.into_iter().next()).unwrap_or_default()
    }

    /// CPU ticks the server has used so far: the postmaster's own and those of its exited children (reaped by it),
    /// plus every live child's (backends, WAL writer, checkpointer, ...).
    pub fn cpu_ticks(&self) -> u64 {
        let Some(pm) = std::fs::read_to_string(self.dir.join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
        else {
            return 0;
        };
        let mut total = 0;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            let Some(f) = stat_fields(&stat) else { continue };
            if pid == pm {
                total += f.own + f.children;
            } else if f.ppid == pm {
                total += f.own;
            }
        }
        total
    }
}

/// The fields of `/proc/PID/stat` read here.
struct StatFields {
    ppid: u32,
    /// utime + stime.
    own: u64,
    /// cutime + cstime (children waited for).
    children: u64,
}

/// Parses `/proc/PID/stat` after the command name (which may hold spaces and parentheses).
fn stat_fields(stat: &str) -> Option<StatFields> {
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(StatFields { ppid: f.get(1)?.parse().ok()?, own: n(11)? + n(12)?, children: n(13)? + n(14)? })
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = Command::new(SCRIPT).arg("stop").arg(&self.dir).output();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_the_command_name() {
        let stat = "77 (postgres: wal (x)) S 42 77 77 0 -1 4194560 500 0 0 0 250 70 9 4 20 0 1 0 100 1000 200";
        let f = stat_fields(stat).expect("parsed");
        assert_eq!((f.ppid, f.own, f.children), (42, 320, 13));
        assert!(stat_fields("garbage").is_none());
    }
}
