//! The real-network benchmark stopped by a signal (Ctrl-C, `kill`, a closed terminal): it
//! must not leave its network namespaces, CPU groups or processes behind, where they would
//! hold the fabric's addresses and the machine's CPU until the next run cleaned them up.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};

/// This run's namespaces (the fabric's names start with `shoalfab`, then the owner's pid).
fn namespaces(tag: &str) -> Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(tag))
        .map(str::to_string)
        .collect())
}

fn pids_in(namespace: &str) -> Result<Vec<i32>> {
    let out = Command::new("ip")
        .args(["netns", "pids", namespace])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// Running, not a zombie waiting for a parent (an orphan's parent may never reap it here).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// CPU groups named after process `pid` under any cgroup hierarchy the fabric may use.
fn groups_of(pid: u32) -> Vec<String> {
    let prefix = format!("shoalfab-{pid:x}-");
    [
        "/sys/fs/cgroup/cpuacct",
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/unified",
    ]
    .iter()
    .filter_map(|base| std::fs::read_dir(Path::new(base)).ok())
    .flat_map(|entries| entries.flatten())
    .map(|e| e.file_name().to_string_lossy().into_owned())
    .filter(|name| name.starts_with(&prefix))
    .collect()
}

#[test]
fn a_benchmark_stopped_by_a_signal_leaves_no_namespace_group_or_process() -> Result<()> {
    shoal_tests::netns::require()?;
    let dir = tempfile::tempdir()?;
    let log = std::fs::File::create(dir.path().join("netns.log"))?;
    // The TCP floor of one target: 64 MiB at 8 Mbit/s runs about a minute, long after the
    // signal.
    let mut bench = Command::new(env!("CARGO_BIN_EXE_netns"))
        .args(["--systems", "floor", "--targets", "1", "--size-mib", "64"])
        .args(["--rate-mbit", "8", "--work-dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let log = || std::fs::read_to_string(dir.path().join("netns.log")).unwrap_or_default();
    let tag = format!("shoalfab{:x}-", bench.id());
    let deadline = Instant::now() + Duration::from_secs(60);
    // Wait until both hosts' namespaces run the floor's sender and receiver.
    let running = loop {
        let mut pids = Vec::new();
        for ns in namespaces(&tag)? {
            pids.extend(pids_in(&ns)?);
        }
        if pids.len() >= 2 && groups_of(bench.id()).len() == 1 {
            break pids;
        }
        if let Some(status) = bench.try_wait()? {
            anyhow::bail!(
                "the benchmark ended ({status}) before its fabric ran:\n{}",
                log()
            );
        }
        if Instant::now() > deadline {
            let _ = bench.kill();
            anyhow::bail!("the fabric never ran the floor's processes:\n{}", log());
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(bench.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = bench.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = bench.kill();
            anyhow::bail!(
                "the benchmark did not end within 30 s of SIGTERM:\n{}",
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(
        status.code() == Some(128 + 15),
        "the benchmark ended with {status}, not by its own cleanup (exit 143):\n{}",
        log()
    );
    ensure!(
        namespaces(&tag)?.is_empty(),
        "namespaces left behind: {:?}",
        namespaces(&tag)?
    );
    ensure!(
        groups_of(bench.id()).is_empty(),
        "CPU groups left behind: {:?}",
        groups_of(bench.id())
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while running.iter().any(|&p| alive(p)) {
        ensure!(
            Instant::now() < deadline,
            "processes of the fabric still run: {:?}",
            running.iter().filter(|&&p| alive(p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
