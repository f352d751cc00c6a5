//! (Shared by the `cluster` and `oci` test binaries; each uses part of it.)
#![allow(dead_code)]
//! Starts real `shoal` processes: a coordinator and agents on loopback, each with its own
//! directories, killed and cleaned up on drop.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shoal_proto::pb::v1 as pb;

pub const TOKEN: &str = "test-token";
/// The admin API token every harness coordinator accepts (in `dir/admin-token`).
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

pub fn shoal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub struct Proc {
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the process: a peer that hangs without closing
    /// its connections.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} failed");
        Ok(())
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Agent {
    pub proc: Proc,
    pub dir: PathBuf,
    pub metrics: SocketAddr,
    /// Its OCI registry mirror.
    pub mirror: SocketAddr,
}

impl Agent {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// A counter or gauge from the agent's Prometheus endpoint (summed over labels).
    pub fn metric(&self, name: &str) -> Result<f64> {
        scrape(self.metrics, name)
    }
}

/// A metric from a Prometheus endpoint, summed over the series whose line starts with
/// `series` (a name, or a name with its first label, e.g. `jobs{state="done"`).
pub fn scrape(addr: SocketAddr, series: &str) -> Result<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(series)
                && matches!(
                    l.as_bytes().get(series.len()),
                    Some(b' ' | b'{' | b',' | b'}')
                )
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub coordinator: Proc,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub agents: Vec<Agent>,
    lease_ms: u64,
    /// `--config` files of the coordinator and of every agent, if any.
    coordinator_config: Option<PathBuf>,
    agent_config: Option<PathBuf>,
}

impl Cluster {
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The cluster CA the coordinator made in its state directory.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("coordinator").join("ca.pem")
    }

    /// The file holding [`ADMIN_TOKEN`].
    pub fn admin_token_file(&self) -> PathBuf {
        self.dir.path().join("admin-token")
    }

    pub async fn start(agents: usize, agent_env: &[(&str, &str)], lease_ms: u64) -> Result<Self> {
        Self::start_configured(agents, agent_env, lease_ms, "", "").await
    }

    /// Like [`Cluster::start`], with TOML config files for the coordinator and the agents
    /// (empty: none).
    pub async fn start_configured(
        agents: usize,
        agent_env: &[(&str, &str)],
        lease_ms: u64,
        coordinator_toml: &str,
        agent_toml: &str,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let write = |name: &str, text: &str| -> Result<Option<PathBuf>> {
            if text.is_empty() {
                return Ok(None);
            }
            let path = dir.path().join(name);
            std::fs::write(&path, text)?;
            Ok(Some(path))
        };
        // Every coordinator here is secure, as in production: TLS (agents learn the CA with
        // their join token) and an admin API token for the tests' own calls.
        let token_file = dir.path().join("admin-token");
        std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n"))?;
        let coordinator_toml = format!(
            "{coordinator_toml}\n[[api_tokens]]\nname = \"test-admin\"\nrole = \"admin\"\ntoken_file = {:?}\n",
            token_file.display().to_string()
        );
        let coordinator_config = write("coordinator.toml", &coordinator_toml)?;
        let agent_config = write("agent.toml", agent_toml)?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let coordinator = spawn_coordinator(
            dir.path(),
            addr,
            metrics,
            lease_ms,
            coordinator_config.as_deref(),
        )?;
        let mut cluster = Self {
            dir,
            coordinator,
            addr,
            metrics,
            agents: Vec::new(),
            lease_ms,
            coordinator_config,
            agent_config,
        };
        cluster.wait_for_coordinator().await?;
        for i in 0..agents {
            let agent = cluster.spawn_agent_retrying(i, agent_env).await?;
            cluster.agents.push(agent);
        }
        cluster.wait_for_agents(agents).await?;
        Ok(cluster)
    }

    pub fn restart_coordinator(&mut self) -> Result<()> {
        self.coordinator.kill();
        self.coordinator = spawn_coordinator(
            self.dir.path(),
            self.addr,
            self.metrics,
            self.lease_ms,
            self.coordinator_config.as_deref(),
        )?;
        Ok(())
    }

    /// Kills agent `i` (SIGKILL) and starts it again on the same data directory: it keeps
    /// its id and its store.
    pub fn restart_agent(&mut self, i: usize, env: &[(&str, &str)]) -> Result<()> {
        self.agents[i].proc.kill();
        self.agents[i] = self.spawn_agent(i, env)?;
        Ok(())
    }

    /// The job's current record.
    pub async fn job(&self, job_id: &str) -> Result<pb::Job> {
        let r = (self.client().await?)
            .get_job(pb::GetJobRequest {
                job_id: job_id.into(),
                include_targets: true,
            })
            .await?;
        r.into_inner().job.context("no job")
    }

    /// Starts agent `i`, again on other ports if one it was given was taken in between (ports
    /// are picked free, then bound by the agent: another test's process may win the race).
    async fn spawn_agent_retrying(&self, i: usize, env: &[(&str, &str)]) -> Result<Agent> {
        for _ in 0..5 {
            let mut agent = self.spawn_agent(i, env)?;
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(3) {
                if read(&agent.proc.log).contains("session established") {
                    return Ok(agent);
                }
                if agent.proc.exited() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let log = read(&agent.proc.log);
            if !(agent.proc.exited() && log.contains("Address already in use")) {
                return Ok(agent);
            }
        }
        bail!("agent {i}: every port tried was taken")
    }

    fn spawn_agent(&self, i: usize, env: &[(&str, &str)]) -> Result<Agent> {
        let dir = self.dir.path().join(format!("agent-{i}"));
        std::fs::create_dir_all(&dir)?;
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let mirror: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let log = dir.join("log");
        let mut cmd = shoal();
        cmd.args(["agent", "--coordinator", &self.url(), "--join-token", TOKEN]);
        if let Some(config) = &self.agent_config {
            cmd.arg("--config").arg(config);
        }
        cmd.arg("--data-dir")
            .arg(&dir)
            .args([
                "--quic-listen",
                "127.0.0.1:0",
                "--label",
                &format!("host=h{i}"),
            ])
            .env("SHOAL_METRICS_LISTEN", metrics.to_string())
            .env("SHOAL_MIRROR_LISTEN", mirror.to_string())
            .env("SHOAL_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("spawning shoal agent")?;
        Ok(Agent {
            proc: Proc { child, log },
            dir,
            metrics,
            mirror,
        })
    }

    /// A job-API client with the admin token.
    pub async fn client(&self) -> Result<shoal_pki::grpc::ApiClient> {
        self.client_as(Some(ADMIN_TOKEN)).await
    }

    /// A job-API client presenting `token` (none: no credentials), connected.
    pub async fn client_as(&self, token: Option<&str>) -> Result<shoal_pki::grpc::ApiClient> {
        let ca = std::fs::read_to_string(self.ca_file())?;
        let channel = shoal_pki::grpc::api_channel(&self.url(), Some(&ca), Duration::from_secs(5))?;
        tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await?;
        Ok(shoal_pki::grpc::api_client(channel, token)?)
    }

    async fn wait_for_coordinator(&self) -> Result<()> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if self.client().await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "coordinator did not come up; log:\n{}",
            read(&self.coordinator.log)
        )
    }

    pub async fn wait_for_agents(&self, n: usize) -> Result<()> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(mut c) = self.client().await {
                if let Ok(r) = c.list_agents(pb::ListAgentsRequest::default()).await {
                    let ready = r
                        .into_inner()
                        .agents
                        .iter()
                        .filter(|a| a.state() == pb::AgentState::Ready)
                        .count();
                    if ready >= n {
                        return Ok(());
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let logs: Vec<String> = self.agents.iter().map(|a| read(&a.proc.log)).collect();
        bail!(
            "agents did not all become ready; logs:\n{}",
            logs.join("\n---\n")
        )
    }

    /// Runs `shoal ARGS` against this cluster and returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        shoal()
            .args(args)
            .env("SHOAL_COORDINATOR", self.url())
            .env("SHOAL_CA_FILE", self.ca_file())
            .env("SHOAL_TOKEN_FILE", self.admin_token_file())
            .output()
            .expect("running shoal")
    }

    pub fn push(&self, agent: usize, file: &Path) -> Result<String> {
        let out = shoal()
            .arg("push")
            .arg(file)
            .arg("--socket")
            .arg(self.agents[agent].socket())
            .output()?;
        if !out.status.success() {
            bail!("push failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    pub fn pull(&self, agent: usize, digest: &str, output: &Path) -> Result<()> {
        let out = shoal()
            .args(["pull", digest, "-o"])
            .arg(output)
            .arg("--socket")
            .arg(self.agents[agent].socket())
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("pull failed: {stderr}");
        }
        // The agent says how it wrote the file: a reflink where the filesystem can clone,
        // a read-only hard link on the store's filesystem, else a copy.
        if !["(cloned)", "(linked)", "(copied)"]
            .iter()
            .any(|how| stderr.contains(how))
        {
            bail!(
                "pull did not say how it wrote {}: {stderr}",
                output.display()
            );
        }
        Ok(())
    }

    /// Polls the job until it is terminal.
    pub async fn wait_job(&self, job_id: &str, limit: Duration) -> Result<pb::Job> {
        let started = Instant::now();
        loop {
            if let Ok(mut c) = self.client().await {
                if let Ok(r) = c
                    .get_job(pb::GetJobRequest {
                        job_id: job_id.into(),
                        include_targets: true,
                    })
                    .await
                {
                    let job = r.into_inner().job.context("no job")?;
                    if matches!(
                        job.state(),
                        pb::JobState::Done | pb::JobState::Failed | pb::JobState::Cancelled
                    ) {
                        return Ok(job);
                    }
                }
            }
            if started.elapsed() > limit {
                bail!(
                    "job {job_id} not finished after {limit:?}; coordinator log:\n{}",
                    read(&self.coordinator.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn spawn_coordinator(
    dir: &Path,
    addr: SocketAddr,
    metrics: SocketAddr,
    lease_ms: u64,
    config: Option<&Path>,
) -> Result<Proc> {
    static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = dir.join(format!("coordinator-{n}.log"));
    let mut cmd = shoal();
    if let Some(config) = config {
        cmd.args(["coordinator", "--config"]).arg(config);
    } else {
        cmd.arg("coordinator");
    }
    let child = cmd
        .args(["--listen", &addr.to_string(), "--join-token", TOKEN])
        .arg("--state-dir")
        .arg(dir.join("coordinator"))
        .env("SHOAL_LEASE_MS", lease_ms.to_string())
        .env("SHOAL_METRICS_LISTEN", metrics.to_string())
        .env("SHOAL_HEARTBEAT_MS", (lease_ms / 4).to_string())
        .env("SHOAL_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("spawning shoal coordinator")?;
    Ok(Proc { child, log })
}

/// `shoal containerd-config --registry REGISTRY --mirror MIRROR --dir DIR`, as an operator
/// runs it on a node: containerd then pulls REGISTRY's images through MIRROR first.
pub fn containerd_config(registry: &str, mirror: &str, dir: &Path) -> Result<()> {
    let out = shoal()
        .args([
            "containerd-config",
            "--registry",
            registry,
            "--mirror",
            mirror,
        ])
        .arg("--dir")
        .arg(dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "shoal containerd-config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A file of `len` pseudo-random bytes.
pub fn random_file(dir: &Path, name: &str, len: usize, seed: u64) -> Result<PathBuf> {
    let mut x = seed | 1;
    let mut data = vec![0u8; len];
    for w in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
    let path = dir.join(name);
    std::fs::write(&path, &data)?;
    Ok(path)
}
