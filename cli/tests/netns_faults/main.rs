//! Faults during a real distribution on shaped links (network namespaces, `tbf`, one `shoal`
//! process per role and host; `shoal_tests::netns`): a target killed and restarted, a host's
//! link pulled and put back, the coordinator killed and restarted. Each case asserts that the
//! job ends in bounded time (no target waits forever), that every live target ends with a
//! bit-identical copy, and that no target rejected a chunk (nothing corrupt was served).
//!
//! Needs root and iproute2 (`apt-get install iproute2`; scripts/test-all.sh does).
//! Correctness only; the time bound is generous (many times the physical bound) so that a
//! loaded machine does not fail it, while a target that waits forever does.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use shoal_proto::pb::v1::{self as pb, JobState};
use shoal_tests::netns::Fabric;
use shoal_tests::netns::shoal::{Cluster, Options};

/// 24 chunks: 2 s per copy at 100 Mbit/s.
const SIZE: usize = 24 << 20;
/// Hosts: 0 seeds, 1..=3 are targets.
const HOSTS: usize = 4;
/// Far beyond the bound (~2 s per host's copy), well before CI's per-test limit.
const JOB_LIMIT: Duration = Duration::from_secs(90);

fn content() -> Vec<u8> {
    (0..SIZE)
        .map(|i| (i.wrapping_mul(2_246_822_519) >> 11) as u8)
        .collect()
}

/// A cluster on a fresh fabric with the blob pushed on host 0, and the job distributing it to
/// every target, started.
struct Run<'a> {
    dir: &'a Path,
    cluster: Cluster<'a>,
    content: Vec<u8>,
    digest: String,
    job: String,
}

/// A temporary directory, or `SHOAL_KEEP_TEST_DIR` (kept, with the processes' logs).
fn workdir() -> Result<(tempfile::TempDir, std::path::PathBuf)> {
    let tmp = tempfile::tempdir()?;
    let path = match std::env::var_os("SHOAL_KEEP_TEST_DIR") {
        Some(p) => {
            let p = std::path::PathBuf::from(p).join(format!("{}", std::process::id()));
            std::fs::create_dir_all(&p)?;
            p
        }
        None => tmp.path().to_path_buf(),
    };
    Ok((tmp, path))
}

fn no_extra(_: usize) -> String {
    String::new()
}

fn as_is(c: std::process::Command) -> std::process::Command {
    c
}

fn start<'a>(fabric: &'a Fabric, dir: &'a Path) -> Result<Run<'a>> {
    start_with(fabric, dir, "")
}

fn start_with<'a>(fabric: &'a Fabric, dir: &'a Path, coordinator_toml: &'a str) -> Result<Run<'a>> {
    let cluster = Cluster::start(
        fabric,
        Options {
            shoal: env!("CARGO_BIN_EXE_shoal").into(),
            dir: dir.join("cluster"),
            agent_toml: &no_extra,
            coordinator_toml,
            wrap: &as_is,
        },
    )?;
    let content = content();
    let file = dir.join("blob");
    std::fs::write(&file, &content)?;
    let digest = cluster.push(&file)?;
    let out = cluster
        .shoal(0)
        .args(["distribute", &digest, "--to", "role=target", "--detach"])
        .arg("--coordinator")
        .arg(cluster.coordinator_url())
        .output()?;
    ensure!(
        out.status.success(),
        "distribute: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = String::from_utf8(out.stdout)?.trim().to_string();
    Ok(Run {
        dir,
        cluster,
        content,
        digest,
        job,
    })
}

impl Run<'_> {
    /// Waits until the job has moved `fraction` of its bytes.
    fn wait_progress(&self, fraction: f64) -> Result<()> {
        let started = Instant::now();
        loop {
            let job = self.cluster.job(&self.job)?;
            let p = job.progress.unwrap_or_default();
            if p.bytes_total > 0 && p.bytes_done as f64 >= fraction * p.bytes_total as f64 {
                return Ok(());
            }
            ensure!(
                started.elapsed() < JOB_LIMIT,
                "the job never reached {fraction}: {p:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the job to end, then checks every target's copy and that nothing corrupt
    /// reached a target.
    fn finish(&self) -> Result<pb::Job> {
        let job = self.end()?;
        ensure!(job.state() == JobState::Done, "the job ended {job:?}");
        for h in 1..HOSTS {
            self.check_copy(h)?;
        }
        Ok(job)
    }

    /// Host `h` holds the blob bit-identical and rejected no chunk.
    fn check_copy(&self, h: usize) -> Result<()> {
        let copy = self.dir.join(format!("copy-{h}"));
        self.cluster.copy_out(h, &self.digest, &copy)?;
        ensure!(
            std::fs::read(&copy)? == self.content,
            "host {h}'s copy differs"
        );
        let rejected = self
            .cluster
            .metric(h, "shoal_agent_chunks_rejected_total")?;
        ensure!(rejected == 0.0, "host {h} rejected {rejected} chunks");
        Ok(())
    }

    /// Waits for the job to end, whichever way, within [`JOB_LIMIT`].
    fn end(&self) -> Result<pb::Job> {
        let started = Instant::now();
        loop {
            // The coordinator may be restarting: an error is not an answer yet.
            if let Ok(job) = self.cluster.job(&self.job) {
                if matches!(
                    job.state(),
                    JobState::Done | JobState::Failed | JobState::Cancelled
                ) {
                    return Ok(job);
                }
            }
            if started.elapsed() > JOB_LIMIT {
                let job = self.cluster.job(&self.job).ok();
                let targets = job.and_then(|j| j.progress).map(|p| p.targets);
                bail!(
                    "the job did not end within {JOB_LIMIT:?}: a target waits forever; \
                     targets {targets:?}; logs in {}",
                    self.dir.join("cluster").display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn a_target_killed_mid_transfer_restarts_and_ends_bit_identical() -> Result<()> {
    let (_tmp, dir) = workdir()?;
    let fabric = Fabric::new(&[100; HOSTS])?;
    let mut run = start(&fabric, &dir)?;
    run.wait_progress(0.3)?;
    // Host 2 is a target and, by now, a source of chunks for the others.
    run.cluster.restart_agent(2)?;
    run.finish()?;
    Ok(())
}

#[test]
fn a_host_whose_link_is_pulled_for_seconds_catches_up_and_the_others_route_around_it() -> Result<()>
{
    let (_tmp, dir) = workdir()?;
    let fabric = Fabric::new(&[100; HOSTS])?;
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
fn the_coordinator_killed_mid_transfer_restarts_and_the_job_ends() -> Result<()> {
    let (_tmp, dir) = workdir()?;
    let fabric = Fabric::new(&[100; HOSTS])?;
    let mut run = start(&fabric, &dir)?;
    run.wait_progress(0.3)?;
    run.cluster.restart_coordinator()?;
    let job = run.finish()?;
    let targets = job.progress.map(|p| p.targets).unwrap_or_default();
    ensure!(
        targets.len() == HOSTS - 1 && targets.iter().all(|t| t.state() == pb::TargetState::Done),
        "{targets:?}"
    );
    Ok(())
}

#[test]
fn a_host_cut_off_past_its_lease_fails_its_target_and_the_others_finish() -> Result<()> {
    let (_tmp, dir) = workdir()?;
    let fabric = Fabric::new(&[100; HOSTS])?;
    let run = start_with(&fabric, &dir, "lease_ms = 2000\nheartbeat_ms = 500\n")?;
    run.wait_progress(0.2)?;
    fabric.set_link(1, false)?;
    // Past the lease: the coordinator gives host 1 up while the others finish.
    let job = run.end()?;
    fabric.set_link(1, true)?;
    let targets = job.progress.clone().map(|p| p.targets).unwrap_or_default();
    for t in &targets {
        if run.cluster.hosts.get(&t.agent_id) == Some(&1) {
            ensure!(
                t.state() == pb::TargetState::Failed && t.reason() == pb::FailureReason::AgentLost,
                "{t:?}"
            );
        } else {
            ensure!(t.state() == pb::TargetState::Done, "{t:?}");
        }
    }
    ensure!(job.state() == JobState::Failed, "{job:?}");
    for h in 2..HOSTS {
        run.check_copy(h)?;
    }
    Ok(())
}
