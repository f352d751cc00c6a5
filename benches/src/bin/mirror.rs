//! The OCI mirror against the upstream, in one run on loopback: a real CNCF registry
//! (`docker-registry`), a real coordinator and agents in this process, `skopeo` as the client.
//!
//! - Time to first byte of one layer: from the upstream directly, through the mirror of the
//!   agent that seeds it, and through another agent's mirror once a peer holds it. Reported
//!   as ratios to the upstream's.
//! - Upstream bytes ÷ unique bytes when N agents pull the same image at once (N = 4, 8): 1.0
//!   means every byte left the registry once.
//!
//! `cargo run --release -p shoal-benches --bin mirror [-- --layer-mib 64]`

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use shoal_benches::cluster::LocalCluster;
use shoal_tests::oci_image::{self, ImageSpec, LayerSpec};
use shoal_tests::registry::Registry;

#[derive(Parser, Debug)]
struct Args {
    /// Size of the image's big layer, MiB.
    #[arg(long, default_value_t = 64)]
    layer_mib: u64,
    /// Repetitions of the time-to-first-byte measurement (median reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

/// (time to first body byte, body bytes) of a plain HTTP/1.1 GET.
fn timed_get(addr: SocketAddr, path: &str) -> Result<(Duration, u64)> {
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: shoal-bench\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = vec![0u8; 1 << 20];
    let mut head = Vec::new();
    let mut first = None;
    let mut body = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if first.is_none() {
            head.extend_from_slice(&buf[..n]);
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                if !head.starts_with(b"HTTP/1.1 200") {
                    bail!("GET {path}: {}", String::from_utf8_lossy(&head[..end]));
                }
                let extra = (head.len() - end - 4) as u64;
                if extra > 0 {
                    first = Some(started.elapsed());
                    body += extra;
                }
            }
        } else {
            body += n as u64;
        }
        if first.is_none() && body > 0 {
            first = Some(started.elapsed());
        }
    }
    Ok((first.context("no body")?, body))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn cluster(n: usize, registry: &str) -> Result<LocalCluster> {
    let mut origin = shoal_origin::OriginConfig::default();
    origin.registries.push(shoal_origin::RegistryConfig {
        host: registry.to_string(),
        plain_http: true,
        ..Default::default()
    });
    let for_agents = origin.clone();
    LocalCluster::start(
        n,
        |c| c.origin = origin,
        |a| {
            a.mirror_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
            a.quota_bytes = 8 << 30;
            a.origin = for_agents.clone();
            a.mirror.default_registry = registry.to_string();
        },
    )
    .await
}

/// A small config layer and one incompressible layer of `layer_mib` MiB.
fn image(tag: &str, seed: u64, layer_mib: u64) -> ImageSpec {
    ImageSpec {
        layers: vec![
            LayerSpec::default().file("etc/app/config", 4096, seed * 10 + 1),
            LayerSpec::default().file("opt/model.bin", layer_mib << 20, seed * 10 + 2),
        ],
        tag: tag.to_string(),
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    // SHOAL_LOG=info shows where the time of a pull goes.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let registry = Registry::start()?;
    let host = registry.host();
    let work = tempfile::tempdir()?;
    let c = cluster(8, &host).await?;

    // Time to first byte, per round a fresh image: upstream, seeding mirror, peer's mirror.
    let (mut upstream, mut seeded, mut peer) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let layout = work.path().join(format!("ttfb-{round}"));
        let spec = image("v1", 100 + round as u64, args.layer_mib);
        let built = oci_image::build_layout(&layout, &spec)?;
        let repo = format!("bench/ttfb{round}");
        oci_image::push_to_registry(&layout, "v1", &host, &repo)?;
        let (layer, size) = built.layers[1].clone();
        let path = format!("/v2/{repo}/blobs/{layer}");
        let direct = tokio::task::spawn_blocking({
            let (addr, path) = (registry.addr(), path.clone());
            move || timed_get(addr, &path)
        });
        let (t, n) = direct.await??;
        anyhow::ensure!(n == size, "upstream sent {n} of {size}");
        upstream.push(t);
        for (list, agent) in [(&mut seeded, 0usize), (&mut peer, 1)] {
            if agent == 1 {
                // "Already on a peer": wait until the seeder has stored and registered it.
                let digest: shoal_proto::Digest = layer.parse()?;
                let started = Instant::now();
                while !c.agents[0].store().is_complete(&digest) {
                    anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "seed stuck");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let addr = c.agents[agent].mirror_addr().context("mirror")?;
            let path = path.clone();
            let (t, n) = tokio::task::spawn_blocking(move || timed_get(addr, &path)).await??;
            anyhow::ensure!(n == size, "mirror sent {n} of {size}");
            list.push(t);
        }
    }
    let ms = |v: &[Duration]| -> Vec<u64> { v.iter().map(|d| d.as_millis() as u64).collect() };
    eprintln!(
        "TTFB per round, ms: upstream {:?}, seeding {:?}, peer {:?}",
        ms(&upstream),
        ms(&seeded),
        ms(&peer)
    );
    let (u, s, p) = (median(upstream), median(seeded), median(peer));
    println!(
        "time to first byte of a {} MiB layer (median of {}):",
        args.layer_mib, args.rounds
    );
    println!("| path | ratio to the upstream's |");
    println!("|---|---|");
    println!("| upstream registry, directly | 1.00 |");
    println!(
        "| mirror of the seeding agent (fetches from the upstream) | {:.2} |",
        s.as_secs_f64() / u.as_secs_f64()
    );
    println!(
        "| mirror of another agent, blob on a peer | {:.2} |",
        p.as_secs_f64() / u.as_secs_f64()
    );
    println!(
        "(absolute, noisy on a shared machine: upstream {:.1} ms, seeding {:.1} ms, peer {:.1} ms)",
        u.as_secs_f64() * 1e3,
        s.as_secs_f64() * 1e3,
        p.as_secs_f64() * 1e3
    );

    // N agents pull one image at once with skopeo.
    println!();
    println!("| agents pulling at once | upstream bytes ÷ unique bytes |");
    println!("|---|---|");
    for n in [4usize, 8] {
        let layout = work.path().join(format!("fan-{n}"));
        let spec = image("v1", 200 + n as u64, args.layer_mib);
        let built = oci_image::build_layout(&layout, &spec)?;
        let repo = format!("bench/fan{n}");
        oci_image::push_to_registry(&layout, "v1", &host, &repo)?;
        let mut pulls = Vec::new();
        for (i, agent) in c.agents.iter().take(n).enumerate() {
            let source = format!(
                "docker://{}/{repo}:v1",
                agent.mirror_addr().context("mirror")?
            );
            let dest = work.path().join(format!("out-{n}-{i}"));
            pulls.push(std::thread::spawn(move || {
                oci_image::skopeo_copy_to_dir(&source, &dest, &[])
            }));
        }
        for p in pulls {
            p.join().map_err(|_| anyhow::anyhow!("pull thread"))??;
        }
        let config_size = std::fs::metadata(
            layout
                .join("blobs/sha256")
                .join(built.config_digest.trim_start_matches("sha256:")),
        )?
        .len();
        let unique: u64 = built.layers.iter().map(|(_, s)| s).sum::<u64>() + config_size;
        let prefix = format!("/v2/{repo}/blobs/");
        let fetched: u64 = (registry.access_log().into_iter())
            .filter(|e| e.method == "GET" && e.path.starts_with(&prefix))
            .map(|e| e.bytes)
            .sum();
        println!("| {n} | {:.3} |", fetched as f64 / unique as f64);
    }
    c.shutdown().await
}
