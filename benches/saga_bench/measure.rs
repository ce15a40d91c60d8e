//! Measures from outside the processes: CPU and memory from /proc, PostgreSQL's write
//! transactions and WAL bytes.

use super::*;

/// Clock ticks per second of the times in /proc (USER_HZ).
pub(crate) fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// (comm, utime + stime in ticks) of a process, all threads included.
pub(crate) fn proc_cpu(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    // Fields after the comm start at field 3 (state); utime and stime are fields 14 and 15.
    let rest: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// A field of /proc/<pid>/status in KiB, e.g. `VmHWM` (peak RSS) or `VmRSS`.
pub(crate) fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Busy ticks of the whole machine (all CPUs; iowait and idle excluded).
pub(crate) fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum()
}

/// CPU ticks of every process, and of the machine, at one moment.
pub(crate) struct CpuSnapshot {
    pub(crate) procs: HashMap<u32, (String, u64)>,
    pub(crate) machine: u64,
}

impl CpuSnapshot {
    pub(crate) fn take() -> CpuSnapshot {
        let mut procs = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok())
                    && let Some(v) = proc_cpu(pid)
                {
                    procs.insert(pid, v);
                }
            }
        }
        CpuSnapshot {
            procs,
            machine: machine_busy_ticks(),
        }
    }
}

/// Where the CPU went between two snapshots, in seconds.
#[derive(Debug, Clone, Default)]
pub(crate) struct CpuBreakdown {
    pub(crate) sagad: f64,
    pub(crate) demo: f64,
    pub(crate) postgres: f64,
    pub(crate) rabbitmq: f64,
    pub(crate) bench: f64,
    /// Everything else that ran on the machine meanwhile (other builds, tests...).
    pub(crate) other: f64,
    pub(crate) machine: f64,
}

impl CpuBreakdown {
    pub(crate) fn between(
        before: &CpuSnapshot,
        after: &CpuSnapshot,
        sagad: u32,
        demo: Option<u32>,
    ) -> Self {
        let hz = clk_tck();
        let me = std::process::id();
        let mut b = CpuBreakdown::default();
        for (pid, (comm, ticks)) in &after.procs {
            let prev = before
                .procs
                .get(pid)
                .filter(|(c, _)| c == comm)
                .map_or(0, |(_, t)| *t);
            let s = ticks.saturating_sub(prev) as f64 / hz;
            if *pid == sagad {
                b.sagad += s;
            } else if Some(*pid) == demo {
                b.demo += s;
            } else if *pid == me {
                b.bench += s;
            } else if comm == "postgres" {
                b.postgres += s;
            } else if comm == "beam.smp" {
                b.rabbitmq += s;
            }
        }
        b.machine = after.machine.saturating_sub(before.machine) as f64 / hz;
        b.other = (b.machine - b.sagad - b.demo - b.bench - b.postgres - b.rabbitmq).max(0.0);
        b
    }

    pub(crate) fn json(&self, per: f64) -> Value {
        let r = |x: f64| round(x / per, 6);
        json!({
            "sagad": r(self.sagad), "demo": r(self.demo), "postgres": r(self.postgres),
            "rabbitmq": r(self.rabbitmq), "bench_client": r(self.bench), "other": r(self.other),
            "machine": r(self.machine),
        })
    }
}

pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL counters: write transactions and WAL bytes (cluster-wide, read at once)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub(crate) struct PgCounters {
    pub(crate) xid: i64,
    pub(crate) wal_lsn: String,
}

pub(crate) async fn pg_counters() -> anyhow::Result<PgCounters> {
    let mut conn = PgConnection::connect(&format!("{PG}/postgres")).await?;
    let row = sqlx::query(
        "SELECT pg_current_xact_id()::text::bigint AS xid, pg_current_wal_lsn()::text AS lsn",
    )
    .fetch_one(&mut conn)
    .await?;
    let counters = PgCounters {
        xid: row.try_get("xid")?,
        wal_lsn: row.try_get("lsn")?,
    };
    conn.close().await?;
    Ok(counters)
}

/// (write transactions, WAL bytes) between two readings.
pub(crate) async fn pg_delta(before: &PgCounters) -> anyhow::Result<(i64, i64)> {
    let mut conn = PgConnection::connect(&format!("{PG}/postgres")).await?;
    let row = sqlx::query(
        "SELECT pg_current_xact_id()::text::bigint AS xid, \
         pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::bigint AS wal",
    )
    .bind(&before.wal_lsn)
    .fetch_one(&mut conn)
    .await?;
    let xid: i64 = row.try_get("xid")?;
    let wal: i64 = row.try_get("wal")?;
    conn.close().await?;
    // Minus the one this reading took.
    Ok((xid - before.xid - 1, wal))
}
