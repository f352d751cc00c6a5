//! Faults during a real distribution on shaped links (network namespaces, `tbf`, one `shoal`
//! process per role and host; `shoal_tests::netns`). Each case runs a real distribution and
//! asserts that the job ends in bounded time (no target waits forever), that every live
//! target ends with a bit-identical copy, and that nothing corrupt was stored or served more
//! than the case allows. The cases, by what fails:
//! - `links`: a host's link pulled for seconds, or past its lease; a rack of two hosts
//!   partitioned from the rest past the lease; a host whose link drops to a twentieth.
//! - `processes`: a target SIGKILLed and restarted; a source frozen with SIGSTOP; every agent
//!   drained and restarted in turn, as a rolling upgrade; the coordinator killed and
//!   restarted, or down for 60 s while the transfers go on.
//! - `disks`: a target's disk too small for the blob; a chunk flipped on disk at the only
//!   complete holder.
//! - `liar`: a joined agent that claims the blob and answers every request NotFound.
//!
//! Needs root and iproute2 (`apt-get install iproute2`; scripts/test-all.sh does).
//! Correctness only; time bounds are generous (many times the physical bound) so that a
//! loaded machine does not fail them, while a target that waits forever does. Slow on
//! purpose (the coordinator case waits its 60 s, the slow-link case moves a blob at
//! 10 Mbit/s): about 5 minutes for the whole suite, in CI.

mod disks;
mod liar;
mod links;
mod processes;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use shoal_proto::pb::v1::{self as pb, JobState, TargetState};
use shoal_tests::netns::Fabric;
use shoal_tests::netns::shoal::{Cluster, Options};

/// 24 chunks: 2 s per copy at 100 Mbit/s.
const SIZE: usize = 24 << 20;
/// Far beyond the bound (~2 s per host's copy), well before CI's per-test limit.
const JOB_LIMIT: Duration = Duration::from_secs(90);

fn content(size: usize, seed: u32) -> Vec<u8> {
    (0..size)
        .map(|i| ((i as u32 ^ seed).wrapping_mul(2_246_822_519) >> 11) as u8)
        .collect()
}

/// A temporary directory, or `SHOAL_KEEP_TEST_DIR` (kept, with the processes' logs).
fn workdir() -> Result<(tempfile::TempDir, PathBuf)> {
    let tmp = tempfile::tempdir()?;
    let path = match std::env::var_os("SHOAL_KEEP_TEST_DIR") {
        Some(p) => {
            let p = PathBuf::from(p).join(format!("{}", std::process::id()));
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

/// A cluster on a fresh fabric with a blob pushed on host 0, and a job distributing it to
/// every other host, started.
struct Run<'a> {
    dir: &'a Path,
    cluster: Cluster<'a>,
    content: Vec<u8>,
    digest: String,
    job: String,
}

/// How to start a [`Run`].
struct Setup<'a> {
    coordinator_toml: &'a str,
    size: usize,
    /// Called after the blob is pushed and before the job starts.
    before_job: &'a dyn Fn(&Cluster<'_>, &str) -> Result<()>,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            coordinator_toml: "",
            size: SIZE,
            before_job: &|_, _| Ok(()),
        }
    }
}

fn start<'a>(fabric: &'a Fabric, dir: &'a Path) -> Result<Run<'a>> {
    start_with(fabric, dir, Setup::default())
}

fn start_with<'a>(fabric: &'a Fabric, dir: &'a Path, setup: Setup<'a>) -> Result<Run<'a>> {
    let cluster = Cluster::start(
        fabric,
        Options {
            shoal: env!("CARGO_BIN_EXE_shoal").into(),
            dir: dir.join("cluster"),
            agent_toml: &no_extra,
            coordinator_toml: setup.coordinator_toml,
            wrap: &as_is,
        },
    )?;
    let content = content(setup.size, 0);
    let digest = push(&cluster, dir, "blob", &content)?;
    (setup.before_job)(&cluster, &digest)?;
    let job = distribute(&cluster, &digest, "role=target")?;
    Ok(Run {
        dir,
        cluster,
        content,
        digest,
        job,
    })
}

/// Pushes `content` on host 0 (from `<dir>/<name>`); its digest.
fn push(cluster: &Cluster<'_>, dir: &Path, name: &str, content: &[u8]) -> Result<String> {
    let file = dir.join(name);
    std::fs::write(&file, content)?;
    cluster.push(&file)
}

/// Starts a job distributing `digest` to the agents `selector` picks; its id.
fn distribute(cluster: &Cluster<'_>, digest: &str, selector: &str) -> Result<String> {
    let out = cluster
        .shoal(0)
        .args(["distribute", digest, "--to", selector, "--detach"])
        .arg("--coordinator")
        .arg(cluster.coordinator_url())
        .output()?;
    ensure!(
        out.status.success(),
        "distribute: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// Waits for job `job` to end, whichever way, within [`JOB_LIMIT`].
fn end_of(cluster: &Cluster<'_>, job: &str, dir: &Path) -> Result<pb::Job> {
    let started = Instant::now();
    loop {
        // The coordinator may be restarting: an error is not an answer yet.
        if let Ok(job) = cluster.job(job)
            && matches!(
                job.state(),
                JobState::Done | JobState::Failed | JobState::Cancelled
            )
        {
            return Ok(job);
        }
        if started.elapsed() > JOB_LIMIT {
            let job = cluster.job(job).ok();
            let targets = job.and_then(|j| j.progress).map(|p| p.targets);
            bail!(
                "the job did not end within {JOB_LIMIT:?}: a target waits forever; \
                 targets {targets:?}; logs in {}",
                dir.join("cluster").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Run<'_> {
    fn hosts(&self) -> usize {
        self.cluster.hosts.len()
    }

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

    /// The state of each target of the job, by host.
    fn target_states(&self) -> Result<Vec<(usize, TargetState)>> {
        let job = self.cluster.job(&self.job)?;
        let mut states: Vec<_> = job
            .progress
            .map(|p| p.targets)
            .unwrap_or_default()
            .iter()
            .filter_map(|t| Some((*self.cluster.hosts.get(&t.agent_id)?, t.state())))
            .collect();
        states.sort_unstable_by_key(|(h, _)| *h);
        Ok(states)
    }

    /// Waits, at most [`JOB_LIMIT`], until the targets on `hosts` are done.
    fn wait_done(&self, hosts: &[usize]) -> Result<()> {
        let started = Instant::now();
        loop {
            let states = self.target_states()?;
            let done = |h: &usize| states.contains(&(*h, TargetState::Done));
            if hosts.iter().all(done) {
                return Ok(());
            }
            ensure!(
                started.elapsed() < JOB_LIMIT,
                "hosts {hosts:?} never finished: {states:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits, at most `within`, until the coordinator lists the agents of `hosts` as ready
    /// (back after a restart or a heal).
    fn wait_ready(&self, hosts: &[usize], within: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            let ready = self.cluster.ready_hosts().unwrap_or_default();
            if hosts.iter().all(|h| ready.contains(h)) {
                return Ok(());
            }
            ensure!(
                started.elapsed() < within,
                "hosts {hosts:?} never came back: ready {ready:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every target of the job is done (not only the job).
    fn all_targets_done(&self) -> Result<()> {
        let states = self.target_states()?;
        let done: Vec<_> = (1..self.hosts()).map(|h| (h, TargetState::Done)).collect();
        ensure!(states == done, "{states:?}");
        Ok(())
    }

    /// Waits for the job to end, then checks every target's copy and that nothing corrupt
    /// reached a target.
    fn finish(&self) -> Result<pb::Job> {
        let job = self.end()?;
        ensure!(job.state() == JobState::Done, "the job ended {job:?}");
        for h in 1..self.hosts() {
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
        std::fs::remove_file(&copy)?;
        let rejected = self
            .cluster
            .metric(h, "shoal_agent_chunks_rejected_total")?;
        ensure!(rejected == 0.0, "host {h} rejected {rejected} chunks");
        Ok(())
    }

    /// Waits for the job to end, whichever way, within [`JOB_LIMIT`].
    fn end(&self) -> Result<pb::Job> {
        end_of(&self.cluster, &self.job, self.dir)
    }

    /// Each target of the ended `job`: failed with `reason` on `failed` hosts, done elsewhere.
    fn expect_failed_on(
        &self,
        job: &pb::Job,
        failed: &[usize],
        reason: pb::FailureReason,
    ) -> Result<()> {
        let targets = job.progress.clone().map(|p| p.targets).unwrap_or_default();
        ensure!(targets.len() == self.hosts() - 1, "{targets:?}");
        for t in &targets {
            let h = self.cluster.hosts.get(&t.agent_id).copied();
            if h.is_some_and(|h| failed.contains(&h)) {
                ensure!(
                    t.state() == TargetState::Failed && t.reason() == reason,
                    "host {h:?} should have failed with {reason:?}: {t:?}"
                );
            } else {
                ensure!(t.state() == TargetState::Done, "{t:?}");
            }
        }
        ensure!(job.state() == JobState::Failed, "{job:?}");
        Ok(())
    }
}
