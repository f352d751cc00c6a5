//! Verified-chunk throughput over QUIC against plain TCP, in the same run, on loopback.
//!
//! Both paths move the same blob from one store to another and verify every chunk (SHA-256
//! against the manifest) before storing it; only the transport differs. Prints GB/s, CPU
//! seconds per GB (user + system, whole process) and the ratio QUIC / TCP.
//!
//! A third row runs what users run: a coordinator and two `Agent`s in this process, the
//! blob pushed on one and pulled by digest on the other through its local API, so the bytes
//! take the agent's download loop (have-streams, picker, request windows, the uplink's
//! queue, the store's writer), not `fetch_blob`'s plain loop.
//!
//! `cargo run --release -p shoal-benches --bin throughput -- --size-mib 1024`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use shoal_agent::store::{Store, StoreConfig};
use shoal_agent::transport::tls::ClusterCa;
use shoal_agent::transport::{ChunkEndpoint, TransportConfig};
use shoal_benches::cluster::LocalCluster;
use shoal_proto::wire::{self, Frame};
use shoal_proto::{CHUNK_SIZE, Manifest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Debug)]
struct Args {
    /// Blob size in MiB (at least 1024 for the recorded figures).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Chunk requests in flight per QUIC connection.
    #[arg(long, default_value_t = 32)]
    in_flight: u32,
    /// Largest UDP payload (loopback allows up to 65527).
    #[arg(long, default_value_t = 1472)]
    udp_payload: u16,
    /// Only the agents' row (coordinator, push, pull): for profiling the download loop.
    #[arg(long)]
    agents_only: bool,
    /// Rounds of each transport; the best round is reported.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
}

struct Run {
    secs: f64,
    cpu_secs: f64,
}

fn cpu_time() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let Ok(u) = getrusage(UsageWho::RUSAGE_SELF) else {
        return 0.0;
    };
    let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    tv(u.user_time()) + tv(u.system_time())
}

fn open_store(dir: &std::path::Path) -> Result<Store> {
    Ok(Store::open(StoreConfig {
        root: dir.into(),
        quota_bytes: 1 << 40,
    })?)
}

/// A fresh, empty receiving store with the manifest registered.
fn receiver(manifest: &Manifest) -> Result<(tempfile::TempDir, Store)> {
    let dir = tempfile::tempdir()?;
    let store = open_store(dir.path())?;
    store.insert_manifest(manifest)?;
    Ok((dir, store))
}

async fn quic_round(
    ca: &ClusterCa,
    seeder: &Store,
    manifest: &Manifest,
    args: &Args,
) -> Result<Run> {
    let config = TransportConfig {
        max_requests_in_flight: args.in_flight,
        max_udp_payload_size: args.udp_payload,
        ..Default::default()
    };
    let loopback = "127.0.0.1:0".parse()?;
    let server = ChunkEndpoint::bind(
        loopback,
        &ca.issue("seeder")?,
        seeder.clone(),
        config.clone(),
    )?;
    let (_dir, store) = receiver(manifest)?;
    let client = ChunkEndpoint::bind(loopback, &ca.issue("leecher")?, store.clone(), config)?;
    let (t0, c0) = (Instant::now(), cpu_time());
    let report = client.fetch_blob(server.local_addr(), manifest).await?;
    let run = Run {
        secs: t0.elapsed().as_secs_f64(),
        cpu_secs: cpu_time() - c0,
    };
    if report.bytes_stored != manifest.size() || !store.is_complete(&manifest.digest()) {
        bail!(
            "QUIC round stored {} of {} bytes",
            report.bytes_stored,
            manifest.size()
        );
    }
    client.close().await;
    server.close().await;
    Ok(run)
}

/// A coordinator and two agents on loopback, uncapped, set up as `shoal demo` sets up its
/// own; the blob file is pushed on the first (outside the timed window) and pulled by digest
/// on the second, which asks the coordinator for it and downloads it from the first.
async fn agent_round(blob_file: &std::path::Path, size: u64) -> Result<Run> {
    use shoal_proto::pb::v1 as pb;

    let quota = 2 * size + (64 << 20);
    let cluster = LocalCluster::start(2, |_| {}, |a| a.quota_bytes = quota).await?;
    let agents = &cluster.agents;
    let mut seeder = shoal_agent::local_api::connect(agents[0].local_socket()).await?;
    let mut pushed = seeder
        .push(pb::PushRequest {
            path: blob_file.display().to_string(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let digest = loop {
        match pushed.message().await? {
            Some(pb::PushProgress {
                result: Some(r), ..
            }) => break r.digest,
            Some(_) => {}
            None => bail!("the seeder ended the push without a result"),
        }
    };

    let mut puller = shoal_agent::local_api::connect(agents[1].local_socket()).await?;
    let (t0, c0) = (Instant::now(), cpu_time());
    let mut pulled = puller
        .pull(pb::PullRequest {
            digest: digest.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    loop {
        match pulled.message().await? {
            Some(p) if p.state() == pb::PullState::Done => break,
            Some(_) => {}
            None => bail!("the pull ended before it was done"),
        }
    }
    let run = Run {
        secs: t0.elapsed().as_secs_f64(),
        cpu_secs: cpu_time() - c0,
    };
    let store = agents[1].store().clone();
    let blob: shoal_proto::Digest = digest.parse()?;
    tokio::task::spawn_blocking(move || store.verify_blob(&blob))
        .await?
        .context("the pulled copy failed verification")?;
    cluster.shutdown().await?;
    Ok(run)
}

/// The baseline: the seeder streams every chunk as a wire frame over one TCP connection; the
/// receiver verifies and stores each, with as many puts in flight as QUIC has requests.
async fn tcp_round(seeder: &Store, manifest: &Manifest, args: &Args) -> Result<Run> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (seeder, served) = (seeder.clone(), manifest.clone());
    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await?;
        sock.set_nodelay(true)?;
        for i in served.chunk_indices() {
            let s = seeder.clone();
            let blob = served.digest();
            let data = tokio::task::spawn_blocking(move || s.get_chunk(&blob, i)).await??;
            sock.write_all(&wire::chunk_data_header(i, data.len()))
                .await?;
            sock.write_all(&data).await?;
        }
        anyhow::Ok(())
    });

    let (_dir, store) = receiver(manifest)?;
    let (t0, c0) = (Instant::now(), cpu_time());
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    sock.set_nodelay(true)?;
    let puts = Arc::new(tokio::sync::Semaphore::new(args.in_flight as usize));
    let mut tasks = tokio::task::JoinSet::new();
    let mut buf = bytes::BytesMut::with_capacity(2 * CHUNK_SIZE as usize);
    let mut received = 0u32;
    while received < manifest.chunk_count() {
        let frame = loop {
            if let Some(frame) = wire::decode(&mut buf)? {
                break frame;
            }
            buf.reserve(CHUNK_SIZE as usize);
            if sock.read_buf(&mut buf).await? == 0 {
                bail!("TCP seeder closed early");
            }
        };
        let Frame::ChunkData { index, data } = frame else {
            bail!("unexpected frame")
        };
        let permit = puts.clone().acquire_owned().await?;
        let (store, blob) = (store.clone(), manifest.digest());
        tasks.spawn_blocking(move || {
            let _permit = permit;
            store.put_chunk(&blob, index, &data)
        });
        received += 1;
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let run = Run {
        secs: t0.elapsed().as_secs_f64(),
        cpu_secs: cpu_time() - c0,
    };
    server.await??;
    if !store.is_complete(&manifest.digest()) {
        bail!("TCP round did not store every chunk");
    }
    Ok(run)
}

fn best(runs: &[Run]) -> &Run {
    runs.iter()
        .min_by(|a, b| a.secs.total_cmp(&b.secs))
        .expect("at least one round")
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let size = args.size_mib << 20;
    eprintln!("generating and seeding a {} MiB blob...", args.size_mib);
    let seed_dir = tempfile::tempdir()?;
    let seeder = open_store(seed_dir.path())?;
    let mut data = vec![0u8; size as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for word in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
    }
    let manifest = Manifest::from_reader(&data[..], CHUNK_SIZE)?;
    seeder.insert_manifest(&manifest)?;
    for i in manifest.chunk_indices() {
        let r = manifest.chunk_range(i)?;
        seeder.put_chunk(
            &manifest.digest(),
            i,
            &data[r.start as usize..r.end as usize],
        )?;
    }
    let blob_file = seed_dir.path().join("blob");
    std::fs::write(&blob_file, &data)?;
    drop(data);

    let ca = ClusterCa::generate()?;
    let (mut quic, mut tcp, mut agent) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        if args.agents_only {
            eprintln!("round {}: agents (push, then pull by digest)", round + 1);
            agent.push(agent_round(&blob_file, size).await.context("agent round")?);
            continue;
        }
        eprintln!("round {}: TCP", round + 1);
        tcp.push(
            tcp_round(&seeder, &manifest, &args)
                .await
                .context("TCP round")?,
        );
        eprintln!("round {}: QUIC", round + 1);
        quic.push(
            quic_round(&ca, &seeder, &manifest, &args)
                .await
                .context("QUIC round")?,
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        eprintln!("round {}: agents (push, then pull by digest)", round + 1);
        agent.push(agent_round(&blob_file, size).await.context("agent round")?);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gb = size as f64 / 1e9;
    if args.agents_only {
        let a = best(&agent);
        println!(
            "agents: {:.2} GB/s, {:.2} CPU s per GB",
            gb / a.secs,
            a.cpu_secs / gb
        );
        return Ok(());
    }
    let (q, t, a) = (best(&quic), best(&tcp), best(&agent));
    println!(
        "verified chunk transfer, {} MiB in 1 MiB chunks, loopback, best of {} rounds",
        args.size_mib, args.rounds
    );
    println!("| transport | GB/s | CPU s per GB | ratio to TCP |");
    println!("|---|---|---|---|");
    println!(
        "| TCP (tokio) | {:.2} | {:.2} | 1.00 |",
        gb / t.secs,
        t.cpu_secs / gb
    );
    println!(
        "| QUIC (quinn) | {:.2} | {:.2} | {:.2} |",
        gb / q.secs,
        q.cpu_secs / gb,
        t.secs / q.secs
    );
    println!(
        "| agents: `shoal pull` by digest (coordinator, download loop) | {:.2} | {:.2} | {:.2} |",
        gb / a.secs,
        a.cpu_secs / gb,
        t.secs / a.secs
    );
    Ok(())
}
