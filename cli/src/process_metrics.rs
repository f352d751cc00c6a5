//! What every Prometheus-scraped process is expected to export beside its own metrics:
//! `shoal_build_info` (1, labelled with the version and role) and the standard `process_*`
//! series, read from `/proc/self` every few seconds; and histogram buckets, so that
//! latencies aggregate across nodes (without buckets they are exported as summaries).

use std::time::Duration;

/// Buckets of every latency histogram, seconds: from a loopback hit to a slow registry.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Clock ticks per second of the times in `/proc/self/stat`: USER_HZ, which the kernel fixes
/// at 100 for user space on every Linux architecture.
const USER_HZ: f64 = 100.0;

/// How often the `process_*` series are refreshed.
const EVERY: Duration = Duration::from_secs(5);

/// Sets `shoal_build_info` and keeps the `process_*` series fresh until the process ends.
pub fn start(role: &'static str) {
    metrics::describe_gauge!(
        "shoal_build_info",
        "1, labelled with the version and role of this process"
    );
    metrics::describe_counter!(
        "process_cpu_seconds_total",
        "User and system CPU time spent, seconds"
    );
    metrics::describe_gauge!("process_resident_memory_bytes", "Resident memory, bytes");
    metrics::describe_gauge!("process_open_fds", "Open file descriptors");
    metrics::describe_gauge!(
        "process_start_time_seconds",
        "Start time since the Unix epoch, seconds"
    );
    record(role);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(EVERY).await;
            record(role);
        }
    });
}

fn record(role: &'static str) {
    // Set again each time: the coordinator's exporter drops gauges left unset for a while.
    metrics::gauge!("shoal_build_info", "version" => env!("CARGO_PKG_VERSION"), "role" => role)
        .set(1.0);
    let ticks = USER_HZ;
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may hold spaces) in parentheses.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // utime, stime are fields 14 and 15 of stat(5), starttime 22; `fields` starts at 3.
        let at = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        if let (Some(user), Some(system)) = (at(14), at(15)) {
            // A counter of whole seconds: the exporter's counters are integers.
            metrics::counter!("process_cpu_seconds_total")
                .absolute(((user + system) / ticks) as u64);
        }
        if let (Some(start), Some(boot)) = (at(22), boot_time()) {
            metrics::gauge!("process_start_time_seconds").set(boot + start / ticks);
        }
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
        if let Some(kib) = rss_kib {
            metrics::gauge!("process_resident_memory_bytes").set(kib * 1024.0);
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!("process_open_fds").set(fds.count() as f64);
    }
}

/// The boot time, seconds since the Unix epoch (`btime` in /proc/stat).
fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}
