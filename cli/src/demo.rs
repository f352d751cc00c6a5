//! `shoal demo`: agents on loopback, one seeded with a generated blob, the rest fetching it
//! over the real QUIC transport (mutual TLS, every chunk verified), then a summary.
//!
//! This is the foundation's demo: every agent pulls from the seeder. The coordinator-planned
//! swarm, where agents serve each other, replaces it with the control plane.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shoal_agent::store::{Store, StoreConfig};
use shoal_agent::transport::tls::ClusterCa;
use shoal_agent::transport::{ChunkEndpoint, TransportConfig};
use shoal_proto::{CHUNK_SIZE, ManifestBuilder};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Number of agents, the seeder included.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..=64))]
    agents: u32,
    /// Size of the generated blob in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    size_mib: u64,
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("shoal-demo-").tempdir()?;
    let ca = ClusterCa::generate()?;
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let size = args.size_mib << 20;

    let mut agents = Vec::new();
    for i in 0..args.agents {
        let store = Store::open(StoreConfig {
            root: dir.path().join(format!("agent-{i}")),
            quota_bytes: size * 2,
        })?;
        let id = ca.issue(&format!("agent-{i}"))?;
        agents.push(ChunkEndpoint::bind(
            loopback,
            &id,
            store,
            TransportConfig::default(),
        )?);
    }

    eprintln!("seeding a {} MiB blob on agent-0 ...", args.size_mib);
    let seeder = agents[0].clone();
    let manifest = tokio::task::spawn_blocking(move || seed(seeder.store(), size)).await??;
    eprintln!(
        "blob {}: {} chunks",
        manifest.digest(),
        manifest.chunk_count()
    );

    let started = Instant::now();
    let mut fetches = tokio::task::JoinSet::new();
    for (i, agent) in agents.iter().enumerate().skip(1) {
        let (agent, manifest, from) = (agent.clone(), manifest.clone(), agents[0].local_addr());
        fetches.spawn(async move {
            agent.store().insert_manifest(&manifest)?;
            agent
                .fetch_blob(from, &manifest)
                .await
                .with_context(|| format!("agent-{i}"))?;
            anyhow::Ok((i, started.elapsed()))
        });
    }
    let mut done: Vec<(usize, Duration)> = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    while done.len() + 1 < agents.len() {
        tokio::select! {
            joined = fetches.join_next() => {
                let Some(joined) = joined else { break };
                let (i, at) = joined??;
                eprintln!("agent-{i} complete after {:.2} s", at.as_secs_f64());
                done.push((i, at));
            }
            _ = ticker.tick() => {
                let have: u64 = agents.iter().skip(1)
                    .filter_map(|a| a.store().present_count(&manifest.digest()))
                    .map(u64::from).sum();
                let want = u64::from(manifest.chunk_count()) * (agents.len() as u64 - 1);
                eprintln!("{:5.1}% of {} copies", 100.0 * have as f64 / want as f64, agents.len() - 1);
            }
        }
    }
    let makespan = started.elapsed();

    for (i, agent) in agents.iter().enumerate() {
        let store = agent.store().clone();
        let digest = manifest.digest();
        tokio::task::spawn_blocking(move || store.verify_blob(&digest))
            .await?
            .with_context(|| format!("agent-{i}'s copy failed verification"))?;
    }
    done.sort_by_key(|(_, at)| *at);
    let p50 = done[done.len() / 2].1;
    let copies = done.len() as u64;
    let gb = (size * copies) as f64 / 1e9;
    let served = agents[0].serve_stats();
    if served.bytes_served != size * copies {
        bail!(
            "seeder served {} bytes, expected {}",
            served.bytes_served,
            size * copies
        );
    }
    println!("\nevery copy verified against {}", manifest.digest());
    println!("| agents | blob | makespan | p50 | aggregate | seeder served |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {} | {} MiB | {:.2} s | {:.2} s | {:.2} GB/s | {:.1} copies |",
        agents.len(),
        args.size_mib,
        makespan.as_secs_f64(),
        p50.as_secs_f64(),
        gb / makespan.as_secs_f64(),
        served.bytes_served as f64 / size as f64,
    );
    for a in &agents {
        a.close().await;
    }
    Ok(())
}

/// Generates `size` pseudo-random bytes straight into the seeder's store, chunk by chunk.
fn seed(store: &Store, size: u64) -> Result<shoal_proto::Manifest> {
    let chunk = |i: u64| -> Vec<u8> {
        let len = (size - i * u64::from(CHUNK_SIZE)).min(u64::from(CHUNK_SIZE)) as usize;
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ i;
        let mut v = vec![0u8; len];
        for w in v.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
        }
        v
    };
    let count = size.div_ceil(u64::from(CHUNK_SIZE));
    let mut builder = ManifestBuilder::new(CHUNK_SIZE)?;
    for i in 0..count {
        builder.update(&chunk(i));
    }
    let manifest = builder.finish()?;
    store.insert_manifest(&manifest)?;
    for i in manifest.chunk_indices() {
        store.put_chunk(&manifest.digest(), i, &chunk(u64::from(i.get())))?;
    }
    Ok(manifest)
}
