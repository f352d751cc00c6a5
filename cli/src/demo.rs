//! `shoal demo`: Shoal's main job on one machine. A coordinator and N agents on loopback,
//! each with its own store in a temporary directory and capped at a link rate; a generated
//! blob pushed on one agent and distributed to all; live progress; every copy verified; and a
//! summary that sets the makespan beside the physical bound and beside a single origin.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shoal_agent::{Agent, AgentConfig};
use shoal_coordinator::CoordinatorConfig;
use shoal_proto::Digest;
use shoal_proto::pb::v1 as pb;

use crate::client;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Number of agents, the seeder included.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..=64))]
    agents: u32,
    /// Size of the generated blob in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=16384))]
    size_mib: u64,
    /// Link rate of every agent, each way, in Mbit/s (0 = uncapped).
    #[arg(long, default_value_t = 200)]
    link_mbps: u64,
}

pub async fn run(args: DemoArgs) -> Result<()> {
    tokio::select! {
        r = demo(args) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; temporary files removed"),
    }
}

async fn demo(args: DemoArgs) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("shoal-demo-").tempdir()?;
    let size = args.size_mib << 20;
    let link_bytes = args.link_mbps * 1_000_000 / 8;

    // The coordinator, in this process, on a loopback port.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // Secure as in production: TLS from the coordinator's own CA, a fresh join token the
    // agents prove the CA with, and an admin API token for this command's calls.
    let join_token = random_token();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, random_token())?;
    let state_dir = dir.path().join("coordinator");
    let coordinator_config = CoordinatorConfig {
        listen: listener.local_addr()?,
        state_dir: state_dir.clone(),
        join_token: join_token.clone(),
        api_tokens: vec![shoal_coordinator::ApiToken {
            name: "demo".into(),
            role: shoal_coordinator::Role::Admin,
            token_file: token_file.clone(),
        }],
        ..Default::default()
    };
    let coordinator = tokio::spawn(shoal_coordinator::run(
        coordinator_config,
        listener,
        async {
            let _ = stopped.await;
        },
    ));

    eprintln!(
        "starting {} agents at {} Mbit/s each way ...",
        args.agents, args.link_mbps
    );
    let mut agents = Vec::new();
    for i in 0..args.agents {
        let config = AgentConfig {
            coordinator: url.clone(),
            join_token: join_token.clone(),
            data_dir: dir.path().join(format!("agent-{i}")),
            quota_bytes: 2 * size + (64 << 20),
            quic_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            labels: [("host".to_string(), format!("demo-{i}"))].into(),
            upload_limit_bytes_per_sec: link_bytes,
            download_limit_bytes_per_sec: link_bytes,
            ..Default::default()
        };
        agents.push(
            Agent::start(config)
                .await
                .with_context(|| format!("starting agent {i}"))?,
        );
    }
    let mut c = client::connect(&client::CoordinatorAddr {
        coordinator: url.clone(),
        ca_file: Some(state_dir.join("ca.pem")),
        token_file: Some(token_file),
    })
    .await?;
    wait_ready(&mut c, agents.len()).await?;

    eprintln!(
        "generating a {} MiB blob and pushing it on {} ...",
        args.size_mib,
        agents[0].agent_id()
    );
    let blob_path = dir.path().join("blob");
    let path = blob_path.clone();
    tokio::task::spawn_blocking(move || generate(&path, size)).await??;
    let digest: Digest =
        crate::local::push_file(agents[0].local_socket(), &blob_path, false, false)
            .await?
            .parse()?;
    std::fs::remove_file(&blob_path)?;

    let all = pb::TargetSelector {
        selector: Some(pb::target_selector::Selector::All(pb::AllAgents {})),
    };
    let started = Instant::now();
    let job_id = client::distribute(&mut c, &[digest], all, None, None).await?;
    let watched = client::watch(&mut c, &job_id).await?;
    client::require_done(&watched.job)?;
    let makespan = started.elapsed();
    // Per-host completion of the targets that fetched (the seeder held the blob already).
    let seeder_id = agents[0].agent_id().to_string();
    let finished: Vec<Duration> = (watched.finished.iter())
        .filter(|((agent, _), _)| *agent != seeder_id)
        .map(|(_, at)| *at)
        .collect();

    for agent in &agents {
        let store = agent.store().clone();
        tokio::task::spawn_blocking(move || store.verify_blob(&digest))
            .await?
            .with_context(|| format!("{}'s copy failed verification", agent.agent_id()))?;
    }
    let seeder = agents[0].stats().bytes_served;
    let peers: u64 = agents[1..].iter().map(|a| a.stats().bytes_served).sum();
    summary(
        &args, size, link_bytes, makespan, &finished, seeder, peers, &digest,
    );

    for agent in agents {
        agent.shutdown().await;
    }
    let _ = stop.send(());
    let _ = coordinator.await;
    Ok(())
}

async fn wait_ready(c: &mut client::Client, n: usize) -> Result<()> {
    for _ in 0..200 {
        let agents = c
            .list_agents(pb::ListAgentsRequest::default())
            .await
            .map_err(client::explain)?;
        if agents
            .into_inner()
            .agents
            .iter()
            .filter(|a| a.state() == pb::AgentState::Ready)
            .count()
            >= n
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("agents did not connect to the coordinator within 10 s")
}

#[allow(clippy::too_many_arguments)]
fn summary(
    args: &DemoArgs,
    size: u64,
    link: u64,
    makespan: Duration,
    finished: &[Duration],
    seeder: u64,
    peers: u64,
    digest: &Digest,
) {
    let mut times: Vec<f64> = finished.iter().map(Duration::as_secs_f64).collect();
    times.sort_by(f64::total_cmp);
    let p50 = times.get(times.len() / 2).copied().unwrap_or(0.0);
    let max = times.last().copied().unwrap_or(0.0);
    let targets = u64::from(args.agents - 1);
    let secs = makespan.as_secs_f64();
    println!("\nevery copy verified against {digest}");
    println!("| agents | blob | makespan | per-host p50 | per-host max | aggregate |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {} | {} MiB | {secs:.2} s | {p50:.2} s | {max:.2} s | {:.3} GB/s |",
        args.agents,
        args.size_mib,
        (size * targets) as f64 / secs / 1e9
    );
    println!(
        "\nbytes served: seeder {:.2} copies, peers {:.2} copies (of {} targets)",
        seeder as f64 / size as f64,
        peers as f64 / size as f64,
        targets
    );
    if link > 0 {
        let bound = size as f64 / link as f64;
        let origin = bound * targets as f64;
        println!(
            "physical bound (blob / link) {bound:.2} s: makespan {:.2}x the bound; one origin serving everyone would take {origin:.1} s ({:.1}x the bound)",
            secs / bound,
            origin / bound
        );
    }
}

/// Writes `size` pseudo-random bytes to `path`.
fn generate(path: &std::path::Path, size: u64) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for w in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()
}

/// 32 random bytes in hex.
fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
