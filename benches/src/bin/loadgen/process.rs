//! The real `shoal coordinator` process under test: its configuration, start and restart,
//! what `/proc` says it used, its Prometheus endpoint and its log. Killed on drop.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::coordinator_client::CoordinatorClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

/// The kernel's clock ticks per second for `/proc/<pid>/stat` times (`sysconf(_SC_CLK_TCK)`):
/// 100 on every Linux architecture Shoal runs on (x86-64 and arm64 fix USER_HZ at 100); the
/// crate's `nix` lacks the `feature` feature that `sysconf` needs.
const CLOCK_TICKS: f64 = 100.0;

/// The join token of the generated configuration.
pub const JOIN_TOKEN: &str = "loadgen-join-token";

/// What the coordinator's configuration says, for the report.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub metrics: SocketAddr,
    pub lease_ms: Option<u64>,
    pub heartbeat_ms: Option<u64>,
    pub extra_toml: String,
}

/// A running coordinator; SIGKILLed when dropped.
#[derive(Debug)]
pub struct Coordinator {
    child: Option<Child>,
    shoal: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    pub logs: Vec<PathBuf>,
}

/// CPU and memory of one coordinator process, read from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu_seconds: f64,
    /// The CPU seconds of its state thread (`shoal-state`), the one that takes every
    /// request in turn; 0 where there is none.
    pub state_cpu_seconds: f64,
    /// How long its state thread waited on a run queue for a core while it had work
    /// (`schedstat`): the share of the machine the rest of it and the load generator took
    /// from the thread that answers every message.
    pub state_waiting_seconds: f64,
    pub peak_rss_bytes: u64,
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

impl Coordinator {
    /// Writes the configuration into `dir` and starts the coordinator.
    pub fn start(shoal: &Path, dir: &Path, s: &Settings) -> Result<Self> {
        ensure!(
            shoal.is_file(),
            "{} not found: build it with `cargo build --release -p shoal` or pass --shoal",
            shoal.display()
        );
        let state = dir.join("state");
        let mut toml = format!(
            "listen = \"{}\"\nstate_dir = \"{}\"\njoin_token = \"{JOIN_TOKEN}\"\ninsecure = true\nmetrics_listen = \"{}\"\n",
            s.listen,
            state.display(),
            s.metrics
        );
        if let Some(lease) = s.lease_ms {
            toml += &format!("lease_ms = {lease}\n");
        }
        if let Some(hb) = s.heartbeat_ms {
            toml += &format!("heartbeat_ms = {hb}\n");
        }
        toml += &s.extra_toml;
        toml.push('\n');
        let config = dir.join("coordinator.toml");
        std::fs::write(&config, toml).with_context(|| format!("writing {}", config.display()))?;
        let mut c = Self {
            child: None,
            shoal: shoal.to_path_buf(),
            config,
            dir: dir.to_path_buf(),
            logs: Vec::new(),
        };
        c.spawn()?;
        Ok(c)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = self
            .dir
            .join(format!("coordinator-{}.log", self.logs.len() + 1));
        let file = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        let child = Command::new(&self.shoal)
            .args(["--log-format", "json", "--log-level", "warn", "coordinator"])
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", self.shoal.display()))?;
        self.child = Some(child);
        self.logs.push(log);
        Ok(())
    }

    fn pid(&self) -> Result<u32> {
        Ok(self.child.as_ref().context("no coordinator running")?.id())
    }

    /// An error (with the end of its log) if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        let child = self.child.as_mut().context("no coordinator running")?;
        if let Some(status) = child.try_wait()? {
            let log = self.logs.last().map(|l| tail(l, 20)).unwrap_or_default();
            bail!("the coordinator exited ({status}); its log ends:\n{log}");
        }
        Ok(())
    }

    /// Waits until the public API answers on `channel`.
    pub async fn wait_ready(&mut self, channel: &Channel, limit: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut client = CoordinatorClient::new(channel.clone());
        loop {
            self.check_alive()?;
            let req = pb::ListAgentsRequest {
                page_size: 1,
                ..Default::default()
            };
            match client.list_agents(req).await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() > deadline => {
                    bail!("the coordinator did not answer within {limit:?}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// CPU seconds (user + system) and peak RSS of the running process.
    pub fn usage(&self) -> Result<Usage> {
        usage_of(&self.pid()?.to_string())
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing the coordinator")?;
            child.wait().context("reaping the coordinator")?;
        }
        Ok(())
    }

    /// Starts it again on the same configuration and state directory.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// CPU seconds and peak RSS of `/proc/<pid>` (`pid` may be `self`).
pub fn usage_of(pid: &str) -> Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let cpu_seconds = cpu_ticks(&stat)? as f64 / CLOCK_TICKS;
    let state_cpu_seconds = thread_cpu_seconds(pid, shoal_coordinator::STATE_THREAD)?;
    let state_waiting_seconds = thread_waiting_seconds(pid, shoal_coordinator::STATE_THREAD)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmHWM in status")?;
    Ok(Usage {
        cpu_seconds,
        state_cpu_seconds,
        state_waiting_seconds,
        peak_rss_bytes: kib * 1024,
    })
}

/// The CPU seconds of the threads of `/proc/<pid>` named `name`.
fn thread_cpu_seconds(pid: &str, name: &str) -> Result<f64> {
    let mut ticks = 0u64;
    for stat in thread_files(pid, name, "stat")? {
        ticks += cpu_ticks(&stat)?;
    }
    Ok(ticks as f64 / CLOCK_TICKS)
}

/// The seconds the threads of `/proc/<pid>` named `name` waited on a run queue: the second
/// field of their `schedstat` (nanoseconds).
fn thread_waiting_seconds(pid: &str, name: &str) -> Result<f64> {
    let mut ns = 0u64;
    for schedstat in thread_files(pid, name, "schedstat")? {
        let waited = (schedstat.split_whitespace().nth(1)).context("short schedstat")?;
        ns += waited.parse::<u64>().context("schedstat field")?;
    }
    Ok(ns as f64 / 1e9)
}

/// The text of `file` in the task directory of each thread of `/proc/<pid>` named `name`.
fn thread_files(pid: &str, name: &str, file: &str) -> Result<Vec<String>> {
    let tasks = format!("/proc/{pid}/task");
    let mut texts = Vec::new();
    for task in std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
        let dir = task?.path();
        // A thread may end between the listing and the reads.
        let (Ok(comm), Ok(text)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join(file)),
        ) else {
            continue;
        };
        if comm.trim_end() == name {
            texts.push(text);
        }
    }
    Ok(texts)
}

/// User and system clock ticks from a `stat` file's text (a process's or a thread's).
fn cpu_ticks(stat: &str) -> Result<u64> {
    // Fields after the command name (which may hold spaces and parentheses): state is
    // field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        (fields.get(i).context("short stat")?.parse()).context("stat field")
    };
    Ok(field(11)? + field(12)?)
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One scrape of the Prometheus endpoint at `addr` (plain HTTP/1.1 on 127.0.0.1).
pub async fn scrape(addr: SocketAddr) -> Result<String> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .context("metrics scrape timed out")?
        .context("metrics scrape")?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Cumulative counts of one of the coordinator's histograms, summed over the series read:
/// (bucket bound in seconds, events at most that long), in bound order, the last bound
/// infinite.
pub type WaitBuckets = Vec<(f64, f64)>;

/// Two histograms of the coordinator, read from one scrape.
#[derive(Clone, Debug, Default)]
pub struct Waits {
    /// How long session messages waited for the state task
    /// (`shoal_coordinator_request_wait_seconds{kind="session"}`).
    pub session: WaitBuckets,
    /// How long the coordinator took to answer job API calls, every method
    /// (`shoal_coordinator_api_call_seconds`).
    pub api: WaitBuckets,
}

impl Waits {
    pub fn read(scrape: &str) -> Self {
        use shoal_coordinator::metrics::{API_CALL_SECONDS, REQUEST_WAIT_SECONDS};
        Self {
            session: histogram(scrape, REQUEST_WAIT_SECONDS, "kind=\"session\""),
            api: histogram(scrape, API_CALL_SECONDS, ""),
        }
    }

    /// What was counted in `self` and not in `before` (an earlier scrape of the same process).
    pub fn since(&self, before: &Waits) -> Self {
        Self {
            session: waits_between(&before.session, &self.session),
            api: waits_between(&before.api, &self.api),
        }
    }
}

/// [`WaitBuckets`] of histogram `name` from a scrape, summed over its series whose labels
/// contain `labels` (every series if empty); empty if the coordinator exported none yet.
pub fn histogram(scrape: &str, name: &str, labels: &str) -> WaitBuckets {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: BTreeMap<u64, f64> = BTreeMap::new();
    for l in scrape.lines() {
        let Some(rest) = l.strip_prefix(&prefix) else {
            continue;
        };
        let Some((series, value)) = rest.split_once('}') else {
            continue;
        };
        if !series.contains(labels) {
            continue;
        }
        let Some(le) = series
            .split("le=\"")
            .nth(1)
            .and_then(|v| v.split('"').next())
        else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            match le.parse::<f64>() {
                Ok(v) => v,
                Err(_) => continue,
            }
        };
        if let Ok(n) = value.trim().parse::<f64>() {
            // Non-negative floats order as their bits do.
            *buckets.entry(le.to_bits()).or_default() += n;
        }
    }
    (buckets.into_iter())
        .map(|(le, n)| (f64::from_bits(le), n))
        .collect()
}

/// The messages counted in `after` and not in `before` (an earlier scrape of the same
/// process, or empty), by bucket.
pub fn waits_between(before: &WaitBuckets, after: &WaitBuckets) -> WaitBuckets {
    (after.iter())
        .map(|&(le, n)| {
            let earlier = (before.iter().find(|(b, _)| *b == le)).map_or(0.0, |(_, m)| *m);
            (le, n - earlier)
        })
        .collect()
}

/// The value of an unlabelled series `name` in a scrape.
pub fn metric(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Lines of the coordinators' JSON logs by level and message (fields dropped), most
/// frequent first.
pub fn log_summary(logs: &[PathBuf]) -> Vec<(String, usize)> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        for line in text.lines() {
            let level = json_string(line, "level").unwrap_or_else(|| "(text)".into());
            let message = json_string(line, "message").unwrap_or_else(|| {
                let mut l = line.to_string();
                l.truncate(120);
                l
            });
            *counts.entry(format!("{level} {message}")).or_default() += 1;
        }
    }
    let mut v: Vec<(String, usize)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

/// The string value of `"key":"..."` in one JSON line (escapes kept as written).
fn json_string(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let mut out = String::new();
    let mut escaped = false;
    for c in line[start..].chars() {
        match c {
            '"' if !escaped => return Some(out),
            '\\' if !escaped => escaped = true,
            c => {
                escaped = false;
                out.push(c);
            }
        }
    }
    None
}

/// A plaintext channel to `addr`, connected lazily (each one its own HTTP/2 connection).
pub fn channel(addr: SocketAddr) -> Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect_lazy())
}
