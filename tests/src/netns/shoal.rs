//! Shoal on a [`Fabric`]: a coordinator and an agent on host 0, an agent on every other
//! host, each its own `shoal` process in its host's namespace, as a user runs them. Agents
//! are labelled `role=seed` (host 0) or `role=target`, and `host=h<i>`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use shoal_proto::pb::v1 as pb;

use super::Fabric;

/// The join token of the cluster's coordinator.
pub const JOIN_TOKEN: &str = "netns";
/// The admin API token of the cluster's coordinator (in `<dir>/admin-token`).
const ADMIN_TOKEN: &str = "netns-admin-token-0123456789";
const COORDINATOR_PORT: u16 = 7000;
const QUIC_PORT: u16 = 7001;
/// Every agent's Prometheus endpoint, on its host's address.
pub const METRICS_PORT: u16 = 9100;

/// How to start the processes.
pub struct Options<'a> {
    /// The `shoal` binary.
    pub shoal: PathBuf,
    /// Data directories, configuration files and logs go here.
    pub dir: PathBuf,
    /// Extra lines for host `i`'s agent.toml.
    pub agent_toml: &'a dyn Fn(usize) -> String,
    /// Extra lines for coordinator.toml.
    pub coordinator_toml: &'a str,
    /// Applied to every command before it is spawned (e.g. to count its CPU time).
    pub wrap: &'a dyn Fn(Command) -> Command,
}

impl std::fmt::Debug for Options<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("shoal", &self.shoal)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The running processes, killed on drop.
#[derive(Debug)]
pub struct Cluster<'a> {
    fabric: &'a Fabric,
    opts: Options<'a>,
    procs: Vec<Child>,
    /// Agent id → host.
    pub hosts: BTreeMap<String, usize>,
}

impl<'a> Cluster<'a> {
    /// Starts everything and waits until every agent has joined.
    pub fn start(fabric: &'a Fabric, opts: Options<'a>) -> Result<Cluster<'a>> {
        std::fs::create_dir_all(&opts.dir)?;
        let mut cluster = Cluster {
            fabric,
            opts,
            procs: Vec::new(),
            hosts: BTreeMap::new(),
        };
        let ip0 = fabric.ip(0);
        let config = cluster.opts.dir.join("coordinator.toml");
        // Secure as in production: TLS (agents learn the CA with their join token) and an
        // admin API token for the harness's and the CLI's calls.
        std::fs::write(cluster.admin_token_file(), format!("{ADMIN_TOKEN}\n"))?;
        std::fs::write(
            &config,
            format!(
                "listen = \"{ip0}:{COORDINATOR_PORT}\"\nstate_dir = \"{}\"\njoin_token = \"{JOIN_TOKEN}\"\n{}\n\n[[api_tokens]]\nname = \"netns-admin\"\nrole = \"admin\"\ntoken_file = \"{}\"\n",
                cluster.opts.dir.join("coordinator").display(),
                cluster.opts.coordinator_toml,
                cluster.admin_token_file().display(),
            ),
        )?;
        let c = cluster.coordinator_command();
        cluster.spawn(c, "coordinator")?;
        for h in 0..fabric.hosts() {
            let dir = cluster.opts.dir.join(format!("h{h}"));
            std::fs::create_dir_all(&dir)?;
            let ip = fabric.ip(h);
            let toml = format!(
                "coordinator = \"{}\"\njoin_token = \"{JOIN_TOKEN}\"\ndata_dir = \"{}\"\nquic_listen = \"{ip}:{QUIC_PORT}\"\nmetrics_listen = \"{ip}:{METRICS_PORT}\"\nquota_bytes = {}\n{}",
                cluster.coordinator_url(),
                dir.display(),
                64u64 << 30,
                (cluster.opts.agent_toml)(h),
            );
            std::fs::write(dir.join("agent.toml"), toml)?;
            let c = cluster.agent_command(h);
            cluster.spawn(c, &format!("agent-{h}"))?;
        }
        let hosts = fabric.hosts();
        cluster.hosts = cluster.with_client(async move |mut client| {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let agents = (client.list_agents(pb::ListAgentsRequest::default()).await)
                    .map(|r| r.into_inner().agents)
                    .unwrap_or_default();
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
        ensure!(
            cluster.hosts.len() == hosts,
            "agents by host: {:?}",
            cluster.hosts
        );
        // An agent is listed once it joined; its local socket comes a moment later, and a
        // push or pull right away would find none.
        let deadline = Instant::now() + Duration::from_secs(30);
        for h in 0..hosts {
            while !cluster.socket(h).exists() {
                ensure!(
                    Instant::now() < deadline,
                    "host {h}'s agent never opened {}",
                    cluster.socket(h).display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(cluster)
    }

    fn coordinator_command(&self) -> Command {
        let mut c = self.shoal(0);
        c.args(["coordinator", "--config"])
            .arg(self.opts.dir.join("coordinator.toml"));
        c
    }

    /// Host `h`'s agent: role `seed` on host 0, `target` elsewhere.
    fn agent_command(&self, h: usize) -> Command {
        let role = if h == 0 { "seed" } else { "target" };
        let mut c = self.shoal(h);
        c.args(["agent", "--config"])
            .arg(self.opts.dir.join(format!("h{h}/agent.toml")))
            .args([
                "--label",
                &format!("role={role}"),
                "--label",
                &format!("host=h{h}"),
            ]);
        c
    }

    /// Kills process `i` (SIGKILL) and starts `c` in its place, logging to `<name>.log`.
    fn respawn(&mut self, i: usize, c: Command, name: &str) -> Result<()> {
        let _ = self.procs[i].kill();
        let _ = self.procs[i].wait();
        let log = std::fs::File::create(self.opts.dir.join(format!("{name}.log")))?;
        let mut c = (self.opts.wrap)(c);
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        self.procs[i] = c.spawn().with_context(|| format!("spawning {name}"))?;
        Ok(())
    }

    /// Kills the coordinator (SIGKILL) and leaves it down until [`Cluster::start_coordinator`].
    pub fn stop_coordinator(&mut self) {
        let _ = self.procs[0].kill();
        let _ = self.procs[0].wait();
    }

    /// Starts the coordinator again on its state directory (after
    /// [`Cluster::stop_coordinator`]).
    pub fn start_coordinator(&mut self) -> Result<()> {
        self.restart_coordinator()
    }

    /// Sends `signal` (e.g. `"STOP"`, `"CONT"`) to host `h`'s agent.
    pub fn signal_agent(&self, h: usize, signal: &str) -> Result<()> {
        let pid = self.procs[1 + h].id().to_string();
        let out = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .output()?;
        ensure!(
            out.status.success(),
            "kill -{signal} {pid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// The agents the coordinator lists as ready, by host.
    pub fn ready_hosts(&self) -> Result<Vec<usize>> {
        let hosts = self.hosts.clone();
        self.with_client(async move |mut client| {
            let agents = client
                .list_agents(pb::ListAgentsRequest::default())
                .await?
                .into_inner()
                .agents;
            let mut ready: Vec<usize> = agents
                .iter()
                .filter(|a| a.state() == pb::AgentState::Ready)
                .filter_map(|a| hosts.get(&a.agent_id).copied())
                .collect();
            ready.sort_unstable();
            Ok(ready)
        })
    }

    /// Kills host `h`'s agent (SIGKILL) and starts it again on the same data directory.
    pub fn restart_agent(&mut self, h: usize) -> Result<()> {
        let c = self.agent_command(h);
        self.respawn(1 + h, c, &format!("agent-{h}-restarted"))
    }

    /// Kills the coordinator (SIGKILL) and starts it again on the same state directory.
    pub fn restart_coordinator(&mut self) -> Result<()> {
        let c = self.coordinator_command();
        self.respawn(0, c, "coordinator-restarted")
    }

    /// The job as the coordinator reports it (with its targets).
    pub fn job(&self, job_id: &str) -> Result<pb::Job> {
        let id = job_id.to_string();
        self.with_client(async move |mut client| {
            client
                .get_job(pb::GetJobRequest {
                    job_id: id,
                    include_targets: true,
                })
                .await?
                .into_inner()
                .job
                .context("no job in the answer")
        })
    }

    pub fn coordinator_url(&self) -> String {
        format!("https://{}:{COORDINATOR_PORT}", self.fabric.ip(0))
    }

    /// The cluster CA, as the coordinator wrote it in its state directory.
    pub fn ca_file(&self) -> PathBuf {
        self.opts.dir.join("coordinator").join("ca.pem")
    }

    /// The file holding the admin API token.
    pub fn admin_token_file(&self) -> PathBuf {
        self.opts.dir.join("admin-token")
    }

    /// Host `h`'s agent's local API socket.
    pub fn socket(&self, h: usize) -> PathBuf {
        self.opts.dir.join(format!("h{h}/agent.sock"))
    }

    /// `shoal` in host `h`'s namespace, with the coordinator's address, CA and admin token
    /// in the environment for client commands.
    pub fn shoal(&self, h: usize) -> Command {
        let mut c = self.fabric.command(h, &self.opts.shoal);
        c.env("SHOAL_COORDINATOR", self.coordinator_url())
            .env("SHOAL_CA_FILE", self.ca_file())
            .env("SHOAL_TOKEN_FILE", self.admin_token_file());
        c
    }

    /// Spawns `c` (wrapped), logging its stderr to `<dir>/<name>.log`; its index.
    pub fn spawn(&mut self, c: Command, name: &str) -> Result<usize> {
        let log = std::fs::File::create(self.opts.dir.join(format!("{name}.log")))?;
        let mut c = (self.opts.wrap)(c);
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        self.procs
            .push(c.spawn().with_context(|| format!("spawning {name}"))?);
        Ok(self.procs.len() - 1)
    }

    /// A process spawned with [`Cluster::spawn`].
    pub fn proc(&mut self, i: usize) -> &mut Child {
        &mut self.procs[i]
    }

    /// Pushes `file` on host 0's agent and waits until the coordinator knows the blob; its
    /// digest.
    pub fn push(&self, file: &Path) -> Result<String> {
        let out = self
            .shoal(0)
            .arg("push")
            .arg(file)
            .arg("--socket")
            .arg(self.socket(0))
            .output()?;
        ensure!(
            out.status.success(),
            "push: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let digest = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .find(|w| w.starts_with("sha256:"))
            .context("push printed no digest")?
            .to_string();
        let known = digest.clone();
        self.with_client(async move |mut client| {
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
        Ok(digest)
    }

    /// How many agents the coordinator lists as holding `digest` whole.
    pub fn blob_holders(&self, digest: &str) -> Result<u32> {
        let digest = digest.to_string();
        self.with_client(async move |mut client| {
            let blob = client
                .get_blob(pb::GetBlobRequest {
                    digest,
                    include_manifest: false,
                })
                .await?
                .into_inner()
                .blob;
            Ok(blob.map_or(0, |b| b.complete_holders))
        })
    }

    /// Copies host `h`'s copy of `digest` out of its store (`shoal pull`, verified).
    pub fn copy_out(&self, h: usize, digest: &str, out: &Path) -> Result<()> {
        let pulled = self
            .shoal(h)
            .args(["pull", digest, "-o"])
            .arg(out)
            .arg("--socket")
            .arg(self.socket(h))
            .output()?;
        ensure!(
            pulled.status.success(),
            "reading host {h}'s copy: {}",
            String::from_utf8_lossy(&pulled.stderr)
        );
        Ok(())
    }

    /// Runs `f` with a coordinator client, on a thread in host 0's namespace.
    pub fn with_client<T: Send + 'static>(
        &self,
        f: impl AsyncFnOnce(shoal_pki::grpc::ApiClient) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let url = self.coordinator_url();
        let ca_file = self.ca_file();
        self.fabric.run_in(0, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                let client = loop {
                    match api_client(&url, &ca_file).await {
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

    /// A series of host `h`'s agent's metrics, summed over its labels (except bytes from
    /// the origin).
    pub fn metric(&self, h: usize, series: &'static str) -> Result<f64> {
        let addr = std::net::SocketAddr::new(self.fabric.ip(h).into(), METRICS_PORT);
        self.fabric.run_in(h, move || -> Result<f64> {
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
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A connected job-API client with the admin token; fails until the coordinator has written
/// its CA and answers.
async fn api_client(url: &str, ca_file: &std::path::Path) -> Result<shoal_pki::grpc::ApiClient> {
    let ca = std::fs::read_to_string(ca_file)?;
    let channel = shoal_pki::grpc::api_channel(url, Some(&ca), Duration::from_secs(5))?;
    let mut client = shoal_pki::grpc::api_client(channel, Some(ADMIN_TOKEN))?;
    client
        .list_agents(shoal_proto::pb::v1::ListAgentsRequest::default())
        .await?;
    Ok(client)
}
