//! The Shoal systems of the netns benchmark: real `shoal` processes, one per role and host,
//! as a user runs them (`shoal_tests::netns::shoal`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use shoal_proto::pb::v1 as pb;
use shoal_tests::netns::CpuGroup;
use shoal_tests::netns::shoal::{Cluster, Options};

use super::{Bench, Outcome, sha_of, wall_us};

/// Which Shoal path a run takes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Mode {
    Distribute,
    Pull,
    /// `Pull` with `--copy`: each output its own writable copy, as before outputs were linked.
    PullCopy,
    PullUrl,
    /// `PullUrl` with `--digest`.
    PullUrlDigest,
    /// `PullUrl` from an origin that announces the content's SHA-256 (`Repr-Digest`).
    PullUrlAnnounced,
    /// `shoal distribute DIGEST --from-url URL` to every target: the job's targets arrive
    /// together, so a large blob may be seeded in ranges.
    DistributeUrl,
}

impl Mode {
    const ALL: [Mode; 7] = [
        Mode::Distribute,
        Mode::Pull,
        Mode::PullCopy,
        Mode::PullUrl,
        Mode::PullUrlDigest,
        Mode::PullUrlAnnounced,
        Mode::DistributeUrl,
    ];

    /// The system's name on the command line and in the table.
    pub(super) fn name(self) -> &'static str {
        match self {
            Mode::Distribute => "distribute",
            Mode::Pull => "pull",
            Mode::PullCopy => "pull-copy",
            Mode::PullUrl => "pull-url",
            Mode::PullUrlDigest => "pull-url-digest",
            Mode::PullUrlAnnounced => "pull-url-announced",
            Mode::DistributeUrl => "distribute-url",
        }
    }

    pub(super) fn of_system(name: &str) -> Option<Mode> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

impl Bench {
    /// `shoal distribute` of the blob pushed on host 0, or a `shoal pull` of it on every
    /// target at once, or (`PullUrl`) a `shoal pull URL` on every target at once of the blob
    /// served by a plain HTTP origin on host 0 that no agent holds yet (a model rollout).
    pub(super) fn shoal(&self, mode: Mode) -> Result<Outcome> {
        let name = mode.name();
        let by_url = matches!(
            mode,
            Mode::PullUrl | Mode::PullUrlDigest | Mode::PullUrlAnnounced | Mode::DistributeUrl
        );
        let pull = matches!(
            mode,
            Mode::Pull
                | Mode::PullCopy
                | Mode::PullUrl
                | Mode::PullUrlDigest
                | Mode::PullUrlAnnounced
        );
        let sha: String = self.sha.iter().map(|b| format!("{b:02x}")).collect();
        let sha = format!("sha256:{sha}");
        let run = self.dir.join(format!("shoal-{name}"));
        let _ = std::fs::remove_dir_all(&run);
        let cpu = CpuGroup::new(name)?;
        let fraction = self.args.shoal_rate_fraction;
        let extra = self.args.agent_toml.replace("\\n", "\n");
        let coordinator_toml = self.args.coordinator_toml.replace("\\n", "\n");
        let rates = |h: usize| {
            let mut toml = format!("{extra}\n");
            if fraction > 0.0 {
                let rate = (self.fabric.rate_bytes(h) * fraction) as u64;
                toml += &format!(
                    "upload_limit_bytes_per_sec = {rate}\ndownload_limit_bytes_per_sec = {rate}\n"
                );
            }
            toml
        };
        let wrap = |c| cpu.wrap(c);
        let mut cluster = Cluster::start(
            &self.fabric,
            Options {
                shoal: self.shoal.clone(),
                dir: run.clone(),
                agent_toml: &rates,
                coordinator_toml: &coordinator_toml,
                wrap: &wrap,
            },
        )?;
        let mut origin = super::Procs::default();
        let digest = if by_url {
            let mut c = self.fabric.command(0, &self.exe);
            c.args(["serve", "8080"]).arg(&self.blob);
            c.args(["--conn-mbit", &self.args.origin_conn_mbit.to_string()]);
            if mode == Mode::PullUrlAnnounced {
                use base64::Engine;
                let b64 = base64::engine::general_purpose::STANDARD.encode(self.sha);
                c.args(["--repr-digest", &b64]);
            }
            // The pulls' first step is a HEAD to it: they start once it listens.
            let p = origin.spawn(cpu.wrap(c), &run.join("origin.log"))?;
            ensure!(origin.line(p)? == "listening", "the origin did not start");
            format!("http://{}:8080/blob.bin", self.fabric.ip(0))
        } else {
            cluster.push(&self.blob)?
        };

        let before = cpu.usage()?;
        let t0 = wall_us();
        let started = Instant::now();
        let limit = Duration::from_secs_f64(self.bound(1) * 20.0 + 60.0);
        let mut done = BTreeMap::new();
        if pull {
            let mut pulls = Vec::new();
            for h in self.targets() {
                let mut c = cluster.shoal(h);
                c.args(["pull", &digest, "-o"])
                    .arg(run.join(format!("h{h}.out")));
                if mode == Mode::PullCopy {
                    c.arg("--copy");
                }
                if mode == Mode::PullUrlDigest {
                    c.args(["--digest", &sha]);
                }
                c.arg("--socket").arg(cluster.socket(h));
                pulls.push((h, cluster.spawn(c, &format!("pull-{h}"))?));
            }
            while done.len() < pulls.len() {
                ensure!(started.elapsed() < limit, "the pulls did not finish");
                for &(h, p) in &pulls {
                    if done.contains_key(&h) {
                        continue;
                    }
                    if let Some(status) = cluster.proc(p).try_wait()? {
                        ensure!(status.success(), "pull on host {h} failed (see its log)");
                        done.insert(h, started.elapsed().as_secs_f64());
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        } else {
            let mut c = cluster.shoal(0);
            if mode == Mode::DistributeUrl {
                c.args(["distribute", &sha, "--from-url", &digest]);
            } else {
                c.args(["distribute", &digest]);
            }
            c.args(["--to", "role=target", "--coordinator"])
                .arg(cluster.coordinator_url());
            let cli = cluster.spawn(c, "distribute-cli")?;
            let targets = self.args.targets;
            let times: BTreeMap<String, u64> = cluster.with_client(async move |mut client| {
                let mut times = BTreeMap::new();
                let deadline = Instant::now() + limit;
                while times.len() < targets {
                    ensure!(Instant::now() < deadline, "the job did not finish");
                    let jobs = (client.list_jobs(pb::ListJobsRequest::default()).await?)
                        .into_inner()
                        .jobs;
                    if let Some(job) = jobs.first() {
                        let job = client
                            .get_job(pb::GetJobRequest {
                                job_id: job.job_id.clone(),
                                include_targets: true,
                            })
                            .await?
                            .into_inner()
                            .job
                            .context("no job")?;
                        for t in job.progress.iter().flat_map(|p| p.targets.iter()) {
                            ensure!(
                                t.state() != pb::TargetState::Failed,
                                "a target failed: {}",
                                t.message
                            );
                            if t.state() == pb::TargetState::Done {
                                times.entry(t.agent_id.clone()).or_insert_with(wall_us);
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(times)
            })?;
            for (id, end) in times {
                let host = *cluster
                    .hosts
                    .get(&id)
                    .context("a target of another agent")?;
                done.insert(host, end.saturating_sub(t0) as f64 / 1e6);
            }
            let status = cluster.proc(cli).wait()?;
            ensure!(status.success(), "shoal distribute failed (see its log)");
        }
        let used = cpu.usage()? - before;

        // What the seeder served (for a URL, the busiest agent: whichever was elected),
        // and what peers sent in all, in copies of the blob.
        let mut seeder = cluster.metric(0, "shoal_agent_served_bytes_total")? / self.size as f64;
        if by_url {
            for h in self.targets() {
                seeder = seeder
                    .max(cluster.metric(h, "shoal_agent_served_bytes_total")? / self.size as f64);
            }
        }
        let mut received = 0.0;
        for h in self.targets() {
            received += cluster.metric(h, "shoal_agent_received_bytes_total")?;
        }
        let kept = (self.args.targets as u64 * self.size) as f64;
        // QUIC's own view of the links (sampled every second by each agent).
        let (mut sent, mut lost) = (0.0, 0.0);
        for h in 0..self.fabric.hosts() {
            sent += cluster.metric(h, "shoal_agent_quic_sent_packets_total")?;
            lost += cluster.metric(h, "shoal_agent_quic_lost_packets_total")?;
        }
        for h in self.targets() {
            let out = run.join(format!("h{h}.out"));
            if !pull {
                cluster.copy_out(h, &digest, &out)?;
            }
            ensure!(sha_of(&out)? == self.sha, "host {h}'s copy differs");
        }
        drop(cluster);
        // The stores and copies go; the logs stay (in --work-dir) for a look afterwards.
        for h in 0..self.fabric.hosts() {
            let _ = std::fs::remove_dir_all(run.join(format!("h{h}/store")));
            let _ = std::fs::remove_file(run.join(format!("h{h}.out")));
        }
        drop(cpu);
        Ok(Outcome {
            done,
            used,
            note: format!(
                "seeder sent {seeder:.2} copies; peers sent {:.2}× what targets kept; \
                 QUIC lost {:.1}% of packets",
                received / kept,
                100.0 * lost / sent.max(1.0)
            ),
        })
    }
}
