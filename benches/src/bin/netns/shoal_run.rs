//! The Shoal systems of the netns benchmark: real `shoal` processes, one per role and host,
//! as a user runs them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::coordinator_client::CoordinatorClient;
use shoal_tests::netns::CpuGroup;

use super::{Bench, Outcome, Procs, sha_of, wall_us};

const TOKEN: &str = "netns-bench";
const COORDINATOR_PORT: u16 = 7000;

/// Runs `f` with a coordinator client, on a thread in host 0's namespace.
fn with_client<T: Send + 'static>(
    bench: &Bench,
    f: impl AsyncFnOnce(CoordinatorClient<tonic::transport::Channel>) -> Result<T> + Send + 'static,
) -> Result<T> {
    let url = format!("http://{}:{COORDINATOR_PORT}", bench.fabric.ip(0));
    bench.fabric.run_in(0, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            let client = loop {
                match CoordinatorClient::connect(url.clone()).await {
                    Ok(c) => break c,
                    Err(_) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(e).context("connecting to the coordinator"),
                }
            };
            f(client).await
        })
    })?
}

/// A Prometheus series summed over its labels, from `addr`, scraped in host `host`'s namespace.
fn scrape(bench: &Bench, host: usize, port: u16, series: &'static str) -> Result<f64> {
    let addr = std::net::SocketAddr::new(bench.fabric.ip(host).into(), port);
    bench.fabric.run_in(host, move || -> Result<f64> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr)?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body
            .lines()
            .filter(|l| l.starts_with(series))
            .filter(|l| matches!(l.as_bytes().get(series.len()), Some(b' ' | b'{')))
            .filter(|l| !l.contains("source=\"origin\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    })?
}

impl Bench {
    /// `shoal distribute` (or, with `pull`, a `shoal pull` on every target at once) of the
    /// blob pushed on host 0.
    pub(super) fn shoal(&self, pull: bool) -> Result<Outcome> {
        let name = if pull { "pull" } else { "distribute" };
        let run = self.dir.join(format!("shoal-{name}"));
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run)?;
        let cpu = CpuGroup::new(name)?;
        let mut procs = Procs::default();
        let coordinator_url = format!("http://{}:{COORDINATOR_PORT}", self.fabric.ip(0));

        let config = run.join("coordinator.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{ip}:{COORDINATOR_PORT}\"\nstate_dir = \"{dir}\"\njoin_token = \"{TOKEN}\"\nmetrics_listen = \"{ip}:9000\"\n",
                ip = self.fabric.ip(0),
                dir = run.join("coordinator").display(),
            ),
        )?;
        let mut c = self.fabric.command(0, &self.shoal);
        c.args(["coordinator", "--config"]).arg(&config);
        let c = cpu.wrap(c);
        procs.spawn(c, &self.log(&format!("{name}-coordinator")))?;

        for h in 0..self.fabric.hosts() {
            let dir = run.join(format!("h{h}"));
            std::fs::create_dir_all(&dir)?;
            let mut toml = format!(
                "coordinator = \"{coordinator_url}\"\njoin_token = \"{TOKEN}\"\ndata_dir = \"{}\"\nquic_listen = \"{ip}:7001\"\nmetrics_listen = \"{ip}:9100\"\nquota_bytes = {}\n",
                dir.display(),
                4 * self.size.max(1 << 30),
                ip = self.fabric.ip(h),
            );
            if self.args.shoal_rate_fraction > 0.0 {
                let rate = (self.fabric.rate_bytes(h) * self.args.shoal_rate_fraction) as u64;
                toml += &format!(
                    "upload_limit_bytes_per_sec = {rate}\ndownload_limit_bytes_per_sec = {rate}\n"
                );
            }
            let config = dir.join("agent.toml");
            std::fs::write(&config, toml)?;
            let role = if h == 0 { "seed" } else { "target" };
            let mut c = self.fabric.command(h, &self.shoal);
            c.args(["agent", "--config"]).arg(&config).args([
                "--label",
                &format!("role={role}"),
                "--label",
                &format!("host=h{h}"),
            ]);
            let c = cpu.wrap(c);
            procs.spawn(c, &self.log(&format!("{name}-agent-{h}")))?;
        }

        // Every agent joined; which agent id is which host.
        let hosts = self.fabric.hosts();
        let ids: BTreeMap<String, usize> = with_client(self, async move |mut client| {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let agents = client
                    .list_agents(pb::ListAgentsRequest::default())
                    .await?
                    .into_inner()
                    .agents;
                if agents.len() >= hosts {
                    return Ok(agents
                        .into_iter()
                        .filter_map(|a| {
                            let host = a.labels.get("host")?.strip_prefix('h')?.parse().ok()?;
                            Some((a.agent_id, host))
                        })
                        .collect());
                }
                ensure!(
                    Instant::now() < deadline,
                    "only {} of {hosts} agents joined",
                    agents.len()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })?;
        ensure!(ids.len() == hosts, "agents by host: {ids:?}");

        let socket = |h: usize| run.join(format!("h{h}/agent.sock"));
        let pushed = self
            .fabric
            .command(0, &self.shoal)
            .arg("push")
            .arg(&self.blob)
            .arg("--socket")
            .arg(socket(0))
            .output()?;
        ensure!(
            pushed.status.success(),
            "push: {}",
            String::from_utf8_lossy(&pushed.stderr)
        );
        let digest = format!("sha256:{}", hex(&self.sha));
        let known = digest.clone();
        with_client(self, async move |mut client| {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let blob = client
                    .get_blob(pb::GetBlobRequest {
                        digest: known.clone(),
                        include_manifest: false,
                    })
                    .await;
                if blob.is_ok_and(|b| b.into_inner().blob.is_some_and(|b| b.complete_holders > 0)) {
                    return Ok(());
                }
                ensure!(
                    Instant::now() < deadline,
                    "the coordinator never learnt of the push"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })?;

        let before = cpu.seconds()?;
        let t0 = wall_us();
        let started = Instant::now();
        let limit = Duration::from_secs_f64(self.bound(1) * 20.0 + 60.0);
        let mut done = BTreeMap::new();
        if pull {
            let mut pulls = Vec::new();
            for h in self.targets() {
                let mut c = self.fabric.command(h, &self.shoal);
                c.args(["pull", &digest, "-o"])
                    .arg(run.join(format!("h{h}.out")))
                    .arg("--socket")
                    .arg(socket(h));
                let c = cpu.wrap(c);
                pulls.push((h, procs.spawn(c, &self.log(&format!("pull-{h}")))?));
            }
            while done.len() < pulls.len() {
                ensure!(started.elapsed() < limit, "the pulls did not finish");
                for &(h, p) in &pulls {
                    if done.contains_key(&h) {
                        continue;
                    }
                    if let Some(status) = procs.0[p].try_wait()? {
                        ensure!(status.success(), "pull on host {h} failed (see its log)");
                        done.insert(h, started.elapsed().as_secs_f64());
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        } else {
            let mut c = self.fabric.command(0, &self.shoal);
            c.args([
                "distribute",
                &digest,
                "--to",
                "role=target",
                "--coordinator",
                &coordinator_url,
            ]);
            let c = cpu.wrap(c);
            let cli = procs.spawn(c, &self.log("distribute-cli"))?;
            let targets = self.args.targets;
            let times: BTreeMap<String, u64> = with_client(self, async move |mut client| {
                let mut times = BTreeMap::new();
                let deadline = Instant::now() + limit;
                while times.len() < targets {
                    ensure!(Instant::now() < deadline, "the job did not finish");
                    let jobs = client
                        .list_jobs(pb::ListJobsRequest::default())
                        .await?
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
                let host = *ids.get(&id).context("a target of another agent")?;
                done.insert(host, end.saturating_sub(t0) as f64 / 1e6);
            }
            let status = procs.0[cli].wait()?;
            ensure!(status.success(), "shoal distribute failed (see its log)");
        }
        let cpu_seconds = cpu.seconds()? - before;

        // What the seeder served, and what peers sent in all, in copies of the blob.
        let seeder = scrape(self, 0, 9100, "shoal_agent_bytes_out_total")? / self.size as f64;
        let mut received = 0.0;
        for h in self.targets() {
            received += scrape(self, h, 9100, "shoal_agent_bytes_in_total")?;
        }
        let kept = (self.args.targets as u64 * self.size) as f64;
        // Every copy, bit for bit, out of each target's store.
        for h in self.targets() {
            let out = run.join(format!("h{h}.out"));
            if !pull {
                let status = self
                    .fabric
                    .command(h, &self.shoal)
                    .args(["pull", &digest, "-o"])
                    .arg(&out)
                    .arg("--socket")
                    .arg(socket(h))
                    .output()?;
                ensure!(status.status.success(), "reading host {h}'s copy failed");
            }
            ensure!(sha_of(&out)? == self.sha, "host {h}'s copy differs");
        }
        drop(procs);
        let _ = std::fs::remove_dir_all(&run);
        drop(cpu);
        Ok(Outcome {
            done,
            cpu_seconds,
            note: format!(
                "seeder sent {seeder:.2} copies; peers sent {:.2}× what targets kept",
                received / kept
            ),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
