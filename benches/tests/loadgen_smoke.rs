//! The load generator (issue 17's benchmark) end to end, small: a real `shoal coordinator`
//! process, 200 simulated agents over the real session protocol, a Distribute to all, then
//! the coordinator killed and restarted. What its report says must hold: every agent joined
//! and came back, the job done and read back done after the restart, the API timed on both
//! sides, each phase's scrape kept. Its timings are the benchmark's to judge, not this
//! test's.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, ensure};

#[test]
fn the_load_generator_takes_a_small_swarm_through_a_restart() -> Result<()> {
    let loadgen = PathBuf::from(env!("CARGO_BIN_EXE_loadgen"));
    let shoal = loadgen.with_file_name("shoal");
    ensure!(
        shoal.exists(),
        "{} not found: build it with `cargo build -p shoal` (scripts/test-all.sh builds the whole workspace first)",
        shoal.display()
    );
    let dir = tempfile::tempdir()?;
    let out = Command::new(&loadgen)
        .arg("--shoal")
        .arg(&shoal)
        .args([
            "--agents",
            "200",
            "--steady-secs",
            "1",
            "--blob-size",
            "4MiB",
        ])
        .args(["--phase-timeout-secs", "120", "--restart", "--work-dir"])
        .arg(dir.path())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "loadgen failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().context("no report")?;
    let report: serde_json::Value = serde_json::from_str(last)
        .with_context(|| format!("the report's last line is not JSON: {last}"))?;
    let field = |k: &str| report.get(k).cloned().unwrap_or_default();
    assert_eq!(field("agents_joined"), 200, "{report}");
    assert_eq!(field("job_state"), "Done", "{report}");
    assert_eq!(
        field("recv_fetch_order"),
        199,
        "every agent but the holder was ordered"
    );
    assert_eq!(
        field("restart_job_on_start"),
        "Done, 200 done, 0 running, 0 pending, 0 failed of 200",
        "the restarted coordinator read the job back whole"
    );
    assert!(
        field("restart_all_ready_s")
            .as_f64()
            .is_some_and(|s| s > 0.0),
        "{report}"
    );
    for key in [
        "api_restart_p99_ms",
        "api_server_restart_p99_ms",
        "session_wait_distribute_p99_ms",
    ] {
        assert!(field(key).as_f64().is_some(), "{key} missing: {report}");
    }
    for phase in ["joins", "steady", "distribute", "restart"] {
        let kept = std::fs::read_to_string(dir.path().join(format!("metrics-{phase}.txt")))
            .with_context(|| format!("the {phase} phase's scrape was not kept"))?;
        assert!(
            kept.contains(shoal_coordinator::metrics::REQUEST_WAIT_SECONDS),
            "{phase}: {kept}"
        );
    }
    Ok(())
}
