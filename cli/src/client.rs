//! Client commands against the coordinator's public API: distribute, status, watch, agents,
//! blobs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use shoal_proto::Digest;
use shoal_proto::pb::v1::{self as pb, JobState, TargetState};

pub type Client = shoal_pki::grpc::ApiClient;

/// How to reach the coordinator's job API, and as whom.
#[derive(clap::Args, Debug, Clone)]
pub struct CoordinatorAddr {
    /// The coordinator's gRPC address: https://HOST:PORT, or http:// for a coordinator run
    /// with `insecure = true`.
    #[arg(
        long,
        env = "SHOAL_COORDINATOR",
        default_value = "https://127.0.0.1:7400"
    )]
    pub coordinator: String,
    /// The cluster CA (PEM) that vouches for the coordinator: its `state_dir/ca.pem`.
    #[arg(long, env = "SHOAL_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// A file holding the API token (SHOAL_TOKEN, the token itself, also works).
    #[arg(long, env = "SHOAL_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
}

impl CoordinatorAddr {
    /// The API token: from `--token-file`, else `SHOAL_TOKEN`; none if neither is set.
    fn token(&self) -> Result<Option<String>> {
        let token = match &self.token_file {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("--token-file {}", path.display()))?
                .trim()
                .to_string(),
            None => match std::env::var("SHOAL_TOKEN") {
                Ok(t) => t.trim().to_string(),
                Err(_) => return Ok(None),
            },
        };
        if token.is_empty() {
            bail!("the API token is empty");
        }
        Ok(Some(token))
    }
}

pub async fn connect(addr: &CoordinatorAddr) -> Result<Client> {
    let url = &addr.coordinator;
    let ca_pem = match &addr.ca_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--ca-file {}", path.display()))?,
        ),
        None => None,
    };
    let token = addr.token()?;
    let channel = shoal_pki::grpc::api_channel(url, ca_pem.as_deref(), Duration::from_secs(5))
        .map_err(|e| match e {
            shoal_pki::grpc::ClientError::NoCa(_) => anyhow::anyhow!(
                "{e}: give it with --ca-file or SHOAL_CA_FILE (the coordinator's state_dir/ca.pem)"
            ),
            e => anyhow::anyhow!("{e}"),
        })?;
    // Fail here, with the address and the cause, rather than at the first call.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .map_err(|s| {
            anyhow::anyhow!("cannot reach the coordinator at {url}: {}", reach_error(&s))
        })?;
    Ok(shoal_pki::grpc::api_client(channel, token.as_deref())?)
}

/// Why a connection failed, with the cause TLS gave (a certificate the CA did not sign, a
/// plaintext server) rather than tonic's "transport error".
fn reach_error(status: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut message = status.message().to_string();
    let mut source = status.source();
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    message
}

/// A gRPC status as one line a person reads.
pub fn explain(status: tonic::Status) -> anyhow::Error {
    let what = match status.code() {
        tonic::Code::NotFound => "not found",
        tonic::Code::InvalidArgument => "invalid request",
        tonic::Code::Unavailable => "coordinator unavailable",
        tonic::Code::Unauthenticated => "not authorised",
        tonic::Code::PermissionDenied => "not allowed",
        tonic::Code::FailedPrecondition => "refused",
        _ => "error",
    };
    anyhow::anyhow!("{what}: {}", status.message())
}

/// Parses `--to`: `all`, `key=value[,key=value]` (labels), or `agents:id1,id2`.
pub fn selector(to: &str) -> Result<pb::TargetSelector, String> {
    use pb::target_selector::Selector;
    let to = to.trim();
    let selector = if to == "all" {
        Selector::All(pb::AllAgents {})
    } else if let Some(ids) = to.strip_prefix("agents:") {
        let agent_ids: Vec<String> = ids
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        if agent_ids.is_empty() {
            return Err("agents: needs at least one agent id".into());
        }
        Selector::Agents(pb::AgentIdList { agent_ids })
    } else {
        let mut match_labels = HashMap::new();
        for pair in to.split(',') {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(format!(
                    "{pair:?} is not all, key=value[,key=value] or agents:id[,id]"
                ));
            };
            match_labels.insert(k.trim().to_string(), v.trim().to_string());
        }
        Selector::Labels(pb::LabelSelector { match_labels })
    };
    Ok(pb::TargetSelector {
        selector: Some(selector),
    })
}

pub async fn distribute(
    client: &mut Client,
    blobs: &[Digest],
    to: pb::TargetSelector,
    deadline: Option<Duration>,
    from_url: Option<&str>,
) -> Result<String> {
    // An HTTP origin for a blob no agent holds yet (e.g. a model file): seeded once.
    let origins = match (from_url, blobs) {
        (None, _) => Default::default(),
        (Some(url), [blob]) => [(
            blob.to_string(),
            pb::Origin {
                // The coordinator asks the origin its size.
                origin: Some(pb::origin::Origin::Http(pb::HttpOrigin::plain(url))),
            },
        )]
        .into(),
        (Some(_), _) => anyhow::bail!("--from-url names the origin of exactly one digest"),
    };
    let response = client
        .distribute(pb::DistributeRequest {
            blobs: blobs.iter().map(Digest::to_string).collect(),
            targets: Some(to),
            deadline_ms: deadline.map_or(0, |d| d.as_millis() as u64),
            origins,
            ..Default::default()
        })
        .await
        .map_err(explain)?
        .into_inner();
    eprintln!(
        "job {} to {} agents",
        response.job_id, response.target_count
    );
    Ok(response.job_id)
}

/// Preheat: resolve an image on the coordinator and distribute its config and layers.
pub async fn preheat(
    client: &mut Client,
    image: &str,
    to: pb::TargetSelector,
    platforms: Vec<String>,
    deadline: Option<Duration>,
) -> Result<String> {
    let response = client
        .preheat(pb::PreheatRequest {
            image: image.to_string(),
            targets: Some(to),
            platforms,
            priority: 0,
            deadline_ms: deadline.map_or(0, |d| d.as_millis() as u64),
        })
        .await
        .map_err(explain)?
        .into_inner();
    eprintln!(
        "job {}: {} ({}) — {} blobs to {} agents",
        response.job_id,
        image,
        response.manifest_digest,
        response.blobs.len(),
        response.target_count
    );
    Ok(response.job_id)
}

pub async fn status(client: &mut Client, job_id: &str) -> Result<pb::Job> {
    let job = client
        .get_job(pb::GetJobRequest {
            job_id: job_id.to_string(),
            include_targets: true,
        })
        .await
        .map_err(explain)?
        .into_inner()
        .job
        .context("coordinator answered without a job")?;
    Ok(job)
}

/// Each agent's download capacity (bytes/s, 0 if unknown); empty if the listing fails.
pub async fn capacities(client: &mut Client) -> HashMap<String, u64> {
    let Ok(agents) = client.list_agents(pb::ListAgentsRequest::default()).await else {
        return HashMap::new();
    };
    (agents.into_inner().agents.into_iter())
        .map(|a| (a.agent_id, a.download_capacity_bytes_per_sec))
        .collect()
}

/// A job for people: counts, bytes, when its targets ended against their bounds
/// (`capacity`: see [`capacities`]), and each target.
pub fn print_job(job: &pb::Job, capacity: &HashMap<String, u64>) {
    let p = job.progress.clone().unwrap_or_default();
    let c = p.counts.unwrap_or_default();
    println!("job {}: {}", job.job_id, state_name(job.state()));
    println!(
        "targets: {} total, {} done, {} running, {} pending, {} failed, {} cancelled",
        c.total, c.done, c.running, c.pending, c.failed, c.cancelled
    );
    println!("bytes: {} of {}", p.bytes_done, p.bytes_total);
    if let Some(line) = crate::timing::summary(&crate::timing::ended(job, capacity)) {
        println!("{line}");
    }
    for t in &p.targets {
        let mut line = format!(
            "  {} {} {}",
            t.agent_id,
            short(&t.blob),
            target_name(t.state())
        );
        if !t.message.is_empty() {
            line.push_str(&format!(" ({})", t.message));
        }
        if let Some(secs) = crate::timing::target_secs(job, t) {
            line.push_str(&format!(" after {secs:.2} s"));
        }
        println!("{line}");
    }
}

/// A job followed to its end: its final record, and when each target (agent, blob)
/// finished, measured from the start of the watch.
#[derive(Debug)]
pub struct Watched {
    pub job: pb::Job,
    pub finished: HashMap<(String, String), Duration>,
}

/// Follows a job with progress bars until it ends, then prints a summary: time, throughput,
/// and time against the bound (the most loaded target's bytes over its agent's download
/// capacity: no schedule can finish sooner).
pub async fn watch(client: &mut Client, job_id: &str) -> Result<Watched> {
    let started = Instant::now();
    let mut stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: job_id.to_string(),
            include_targets: true,
        })
        .await
        .map_err(explain)?
        .into_inner();
    let bars = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix:>24} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    let total = bars.add(
        ProgressBar::new(0)
            .with_style(style.clone())
            .with_prefix("all"),
    );
    let mut per_target: HashMap<(String, String), ProgressBar> = HashMap::new();
    let mut finished = HashMap::new();
    while let Some(update) = stream.message().await.map_err(explain)? {
        total.set_length(update.bytes_total);
        total.set_position(update.bytes_done);
        total.set_message(format!("{}/s", human(update.rate_bytes_per_sec)));
        for t in &update.targets {
            let key = (t.agent_id.clone(), t.blob.clone());
            let bar = per_target.entry(key.clone()).or_insert_with(|| {
                bars.add(
                    ProgressBar::new(t.bytes_total)
                        .with_style(style.clone())
                        .with_prefix(format!("{} {}", t.agent_id, short(&t.blob))),
                )
            });
            bar.set_position(t.bytes_done);
            match t.state() {
                TargetState::Done => {
                    finished.entry(key).or_insert_with(|| started.elapsed());
                    bar.finish_with_message("done");
                }
                TargetState::Failed | TargetState::Cancelled => {
                    bar.abandon_with_message(format!("{}: {}", target_name(t.state()), t.message));
                }
                _ => bar.set_message(format!("{}/s", human(t.rate_bytes_per_sec))),
            }
        }
    }
    total.finish();
    let job = status(client, job_id).await?;
    summarize(client, &job).await;
    Ok(Watched { job, finished })
}

async fn summarize(client: &mut Client, job: &pb::Job) {
    let p = job.progress.clone().unwrap_or_default();
    let secs = match (job.created_at, job.finished_at) {
        (Some(a), Some(b)) => (b.seconds - a.seconds) as f64 + f64::from(b.nanos - a.nanos) / 1e9,
        _ => return,
    };
    eprintln!(
        "job {} {} in {:.2} s, {}/s aggregate",
        job.job_id,
        state_name(job.state()),
        secs,
        human((p.bytes_done as f64 / secs.max(1e-3)) as u64)
    );
    let capacity = capacities(client).await;
    let mut bytes_in: HashMap<&str, u64> = HashMap::new();
    for t in &p.targets {
        *bytes_in.entry(t.agent_id.as_str()).or_default() += t.bytes_total;
    }
    let bound = (bytes_in.iter())
        .filter_map(|(agent, bytes)| {
            let cap = *capacity.get(*agent)?;
            (cap > 0).then(|| *bytes as f64 / cap as f64)
        })
        .fold(0.0, f64::max);
    if bound > 0.0 {
        eprintln!(
            "bound (most loaded target's bytes / its download capacity) {bound:.2} s: {:.2}x the bound",
            secs / bound
        );
    }
    if let Some(line) = crate::timing::summary(&crate::timing::ended(job, &capacity)) {
        eprintln!("{line}");
    }
}

pub fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Done => "done",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::Running => "running",
        JobState::Pending | JobState::Unspecified => "pending",
    }
}

pub fn target_name(s: TargetState) -> &'static str {
    match s {
        TargetState::Done => "done",
        TargetState::Failed => "failed",
        TargetState::Cancelled => "cancelled",
        TargetState::Running => "running",
        TargetState::Pending | TargetState::Unspecified => "pending",
    }
}

fn short(blob: &str) -> &str {
    &blob[..blob.len().min(19)]
}

pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}

/// Fails unless the job ended done.
pub fn require_done(job: &pb::Job) -> Result<()> {
    if job.state() != JobState::Done {
        bail!("job {} ended {}", job.job_id, state_name(job.state()));
    }
    Ok(())
}
