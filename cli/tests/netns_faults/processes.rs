//! Processes that fail: a target SIGKILLed, a source frozen, every agent restarted in turn,
//! the coordinator killed or down for a minute.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use shoal_proto::pb::v1::JobState;
use shoal_tests::netns::Fabric;

use super::{SIZE, Setup, start, start_with, workdir};

#[test]
fn a_target_killed_mid_transfer_restarts_and_ends_bit_identical() -> Result<()> {
    let (_tmp, dir) = workdir()?;
    let fabric = Fabric::new(&[100; 4])?;
    let mut run = start(&fabric, &dir)?;
    run.wait_progress(0.3)?;
    // Host 2 is a target and, by now, a source of chunks for the others.
    run.cluster.restart_agent(2)?;
    run.finish()?;
    Ok(())
}

#[test]
fn a_source_frozen_with_sigstop_is_routed_around_and_finishes_once_thawed() -> Result<()> {
    let (_tmp, dir) = workdir()?;
    let fabric = Fabric::new(&[100; 4])?;
    // A lease longer than the freeze: the coordinator keeps host 2 as a holder all along,
    // so only the data path can notice that it stopped answering.
    let setup = Setup {
        coordinator_toml: "lease_ms = 120000\n",
        ..Setup::default()
    };
    let run = start_with(&fabric, &dir, setup)?;
    run.wait_progress(0.3)?;
    // Host 2 is a target and, by now, a source of chunks for the others.
    run.cluster.signal_agent(2, "STOP")?;
    let frozen = std::time::Instant::now();
    let others = run.wait_done(&[1, 3]);
    eprintln!(
        "the others finished {:?} after the freeze",
        frozen.elapsed()
    );
    run.cluster.signal_agent(2, "CONT")?;
    others?;
    run.finish()?;
    Ok(())
}

#[test]
fn every_agent_drained_and_restarted_in_turn_during_a_job_ends_bit_identical() -> Result<()> {
    let (_tmp, dir) = workdir()?;
    // Slow links (24 MiB take ~6.5 s per copy), so the job outlasts several restarts.
    let fabric = Fabric::new(&[30; 4])?;
    let mut run = start(&fabric, &dir)?;
    run.wait_progress(0.1)?;
    let mut restarted_mid_job = 0;
    // The seeder last, as a DaemonSet's rolling update reaches it at some point.
    for h in [1, 2, 3, 0] {
        if run.cluster.job(&run.job)?.state() != JobState::Running {
            break;
        }
        // The chart's preStop, then the pod's replacement.
        let drained = run
            .cluster
            .shoal(h)
            .args(["drain", "--timeout", "5s", "--socket"])
            .arg(run.cluster.socket(h))
            .output()?;
        ensure!(
            drained.status.success(),
            "drain on host {h}: {}",
            String::from_utf8_lossy(&drained.stderr)
        );
        run.cluster.restart_agent(h)?;
        restarted_mid_job += 1;
        run.wait_ready(&[h], Duration::from_secs(30))?;
    }
    ensure!(
        restarted_mid_job >= 3,
        "the job ended after {restarted_mid_job} restarts: too fast to test a rolling restart"
    );
    run.finish()?;
    Ok(())
}

#[test]
fn the_coordinator_killed_mid_transfer_restarts_and_the_job_ends() -> Result<()> {
    let (_tmp, dir) = workdir()?;
    let fabric = Fabric::new(&[100; 4])?;
    let mut run = start(&fabric, &dir)?;
    run.wait_progress(0.3)?;
    run.cluster.restart_coordinator()?;
    run.finish()?;
    run.all_targets_done()
}

#[test]
fn with_the_coordinator_down_for_a_minute_transfers_finish_peer_to_peer() -> Result<()> {
    const DOWN: Duration = Duration::from_secs(60);
    let (_tmp, dir) = workdir()?;
    let fabric = Fabric::new(&[100; 4])?;
    let mut run = start(&fabric, &dir)?;
    run.wait_progress(0.3)?;
    run.cluster.stop_coordinator();
    let stopped = Instant::now();
    // Every target verifies every chunk while nobody plans anything.
    let chunks = SIZE.div_ceil(shoal_proto::CHUNK_SIZE as usize) as f64;
    for h in 1..4 {
        while run.cluster.metric(h, "shoal_agent_chunks_verified_total")? < chunks {
            ensure!(
                stopped.elapsed() < DOWN,
                "host {h} did not finish its copy while the coordinator was down: {} of \
                 {chunks} chunks",
                run.cluster.metric(h, "shoal_agent_chunks_verified_total")?
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    std::thread::sleep(DOWN.saturating_sub(stopped.elapsed()));
    run.cluster.start_coordinator()?;
    // Back: the agents reconnect and the job is seen done, every target with it.
    run.finish()?;
    run.all_targets_done()
}
