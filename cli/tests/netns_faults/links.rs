//! Links that fail: pulled for seconds, cut past the lease, a rack partitioned, one slowed to
//! a twentieth of the others.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use shoal_proto::pb::v1::{FailureReason, JobState, TargetState};
use shoal_tests::netns::Fabric;

use super::{SIZE, Setup, distribute, end_of, start, start_with, workdir};

/// A short lease, so that losing a host is decided within seconds.
const SHORT_LEASE: &str = "lease_ms = 2000\nheartbeat_ms = 500\n";

#[test]
fn a_host_whose_link_is_pulled_for_seconds_catches_up_and_the_others_route_around_it() -> Result<()>
{
    let (_tmp, dir) = workdir()?;
    let fabric = Fabric::new(&[100; 4])?;
    let run = start(&fabric, &dir)?;
    run.wait_progress(0.25)?;
    // Shorter than the lease (10 s): the coordinator keeps host 1, its peers stop asking it.
    fabric.set_link(1, false)?;
    std::thread::sleep(Duration::from_secs(4));
    fabric.set_link(1, true)?;
    run.finish()?;
    Ok(())
}

#[test]
fn a_host_cut_off_past_its_lease_fails_its_target_and_the_others_finish() -> Result<()> {
    let (_tmp, dir) = workdir()?;
    let fabric = Fabric::new(&[100; 4])?;
    let setup = Setup {
        coordinator_toml: SHORT_LEASE,
        ..Setup::default()
    };
    let run = start_with(&fabric, &dir, setup)?;
    run.wait_progress(0.2)?;
    fabric.set_link(1, false)?;
    // Past the lease: the coordinator gives host 1 up while the others finish.
    let job = run.end()?;
    fabric.set_link(1, true)?;
    run.expect_failed_on(&job, &[1], FailureReason::AgentLost)?;
    for h in 2..4 {
        run.check_copy(h)?;
    }
    Ok(())
}

#[test]
fn a_rack_partitioned_past_the_lease_fails_its_targets_and_catches_up_once_healed() -> Result<()> {
    let (_tmp, dir) = workdir()?;
    let fabric = Fabric::new(&[100; 5])?;
    let setup = Setup {
        coordinator_toml: SHORT_LEASE,
        ..Setup::default()
    };
    let run = start_with(&fabric, &dir, setup)?;
    run.wait_progress(0.2)?;
    // Hosts 3 and 4 still reach each other, not the coordinator nor the other hosts.
    let (rack, rest) = ([3, 4], [0, 1, 2]);
    fabric.partition(&rack, &rest, true)?;
    let job = run.end();
    fabric.partition(&rack, &rest, false)?;
    run.expect_failed_on(&job?, &rack, FailureReason::AgentLost)?;
    for h in rest.into_iter().skip(1) {
        run.check_copy(h)?;
    }
    // Healed: the rack's agents come back, and a new job completes their copies.
    run.wait_ready(&rack, Duration::from_secs(60))?;
    let again = distribute(&run.cluster, &run.digest, "role=target")?;
    let job = end_of(&run.cluster, &again, &dir)?;
    ensure!(job.state() == JobState::Done, "after the heal: {job:?}");
    for h in rack {
        run.check_copy(h)?;
    }
    Ok(())
}

#[test]
fn a_host_on_a_twentieth_of_the_link_does_not_hold_back_the_others() -> Result<()> {
    let (_tmp, dir) = workdir()?;
    // Host 3 downloads and uploads at 10 Mbit/s: its own copy takes ~20 s, the others' ~1 s.
    let fabric = Fabric::new(&[200, 200, 200, 10])?;
    let run = start(&fabric, &dir)?;
    let started = Instant::now();
    run.wait_done(&[1, 2])?;
    let fast = started.elapsed();
    let slow_bound = Duration::from_secs_f64(SIZE as f64 / fabric.rate_bytes(3));
    let states = run.target_states()?;
    ensure!(
        !states.contains(&(3, TargetState::Done)),
        "the slow host finished with the fast ones ({fast:?}): the link is not slow"
    );
    // The fast hosts' bound is a twentieth of the slow one's; waiting on the slow host (as a
    // source they keep asking, or an order that waits for it) would take them near its bound.
    // Half of it leaves room for a loaded machine.
    ensure!(
        fast < slow_bound / 2,
        "the fast hosts took {fast:?}, against the slow host's own bound {slow_bound:?}"
    );
    run.finish()?;
    Ok(())
}
