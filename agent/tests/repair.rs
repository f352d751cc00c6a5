//! In-process end to end (a real coordinator on a loopback port, real agents with their stores
//! on disk): a chunk that rots on an agent's disk is found (by the scrub, or because a peer
//! rejected it), dropped, reported to the coordinator, and fetched again bit-identical; and no
//! peer is served the rotten bytes twice.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use shoal_agent::{Agent, AgentConfig, local_api};
use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::coordinator_client::CoordinatorClient;
use shoal_proto::{ChunkIndex, Digest, Manifest};
use tonic::transport::Channel;

#[path = "support/coordinator.rs"]
mod support;

use support::{Coordinator, wait_until};

const TOKEN: &str = "repair-test-token";
const CHUNK: u32 = 64 << 10;
/// The chunk that rots.
const ROTTEN: ChunkIndex = ChunkIndex(7);

fn config(dir: &Path, coordinator: &Coordinator, name: &str, scrub: u64) -> AgentConfig {
    AgentConfig {
        coordinator: coordinator.url(),
        join_token: TOKEN.into(),
        data_dir: dir.join(name),
        quic_listen: "127.0.0.1:0".parse().expect("addr"),
        chunk_size: CHUNK,
        quota_bytes: 1 << 30,
        scrub_bytes_per_sec: scrub,
        ..AgentConfig::default()
    }
}

fn content() -> Vec<u8> {
    (0..3_000_000usize)
        .map(|i| (i * 31 + i / 1009) as u8)
        .collect()
}

/// The test blob written to `dir/blob.bin`: its bytes, the file and its manifest.
fn blob_file(dir: &std::path::Path) -> Result<(Vec<u8>, std::path::PathBuf, Manifest)> {
    let content = content();
    let file = dir.join("blob.bin");
    std::fs::write(&file, &content)?;
    let manifest = Manifest::from_reader(&content[..], CHUNK)?;
    Ok((content, file, manifest))
}

async fn push(agent: &Agent, file: &Path, pin: bool) -> Result<()> {
    let mut local = local_api::connect(agent.local_socket()).await?;
    let mut push = local
        .push(pb::PushRequest {
            path: file.to_str().context("utf8")?.into(),
            pin,
            ..Default::default()
        })
        .await?
        .into_inner();
    while push.message().await?.is_some() {}
    Ok(())
}

/// Distributes `digest` to `agent`, retrying while the coordinator does not know it yet.
async fn distribute(
    client: &mut CoordinatorClient<Channel>,
    digest: &Digest,
    agents: &[&Agent],
) -> Result<()> {
    let started = tokio::time::Instant::now();
    loop {
        let r = client
            .distribute(pb::DistributeRequest {
                blobs: vec![digest.to_string()],
                targets: Some(pb::TargetSelector {
                    selector: Some(pb::target_selector::Selector::Agents(pb::AgentIdList {
                        agent_ids: agents.iter().map(|a| a.agent_id().to_string()).collect(),
                    })),
                }),
                ..Default::default()
            })
            .await;
        match r {
            Ok(_) => return Ok(()),
            // Unknown, or not yet known to be whole anywhere: the push's report is on its way.
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::NotFound | tonic::Code::FailedPrecondition
                ) && started.elapsed() < Duration::from_secs(10) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => anyhow::bail!("distribute: {s}"),
        }
    }
}

/// The holding of `digest` of the agent `agent_id` as the coordinator shows it.
async fn holding(
    client: &mut CoordinatorClient<Channel>,
    digest: &Digest,
    agent_id: &str,
) -> Result<Option<pb::BlobHolder>> {
    let blob = client
        .get_blob(pb::GetBlobRequest {
            digest: digest.to_string(),
            include_manifest: false,
        })
        .await?
        .into_inner();
    Ok(blob.holders.into_iter().find(|h| h.agent_id == agent_id))
}

/// Waits until the coordinator shows `agent` holding all chunks of `digest` but one.
async fn wait_coordinator_sees_one_missing(
    client: &mut CoordinatorClient<Channel>,
    digest: &Digest,
    agent: &Agent,
    chunk_count: u32,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let h = holding(client, digest, agent.agent_id()).await?;
        if h.as_ref()
            .is_some_and(|h| !h.complete && h.chunks_held == chunk_count - 1)
        {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the coordinator still shows {h:?} for the agent that lost a chunk"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Flips a byte of chunk `index` in the agent's data file, behind its store's back.
fn rot(agent: &Agent, manifest: &Manifest, index: ChunkIndex) -> Result<()> {
    let path = agent
        .store()
        .data_path(&manifest.digest())
        .context("data file")?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let offset = manifest.chunk_range(index)?.start + 1000;
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset)?;
    file.write_all_at(&[byte[0] ^ 0x5a], offset)?;
    Ok(())
}

/// The agent's whole blob, read from its data file, is `content`.
fn holds_exactly(agent: &Agent, digest: &Digest, content: &[u8]) -> Result<()> {
    ensure!(agent.store().is_complete(digest), "incomplete");
    let on_disk = std::fs::read(agent.store().data_path(digest).context("data file")?)?;
    ensure!(on_disk == content, "the data file is not the blob");
    agent.store().verify_blob(digest)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_that_rots_at_a_pinned_holder_is_found_by_the_scrub_reported_and_fetched_again()
-> Result<()> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    shoal_agent::metrics::describe();
    let dir = tempfile::tempdir()?;
    // A short lease: the peer stopped below is soon known to be gone.
    let coordinator = Coordinator::start(dir.path(), TOKEN, 2_000).await?;
    let holder = Agent::start(config(dir.path(), &coordinator, "holder", 64 << 20)).await?;
    // The peer comes back on the same port, as an agent restarted on its node would.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let peer_config = AgentConfig {
        quic_listen: ([127, 0, 0, 1], port).into(),
        ..config(dir.path(), &coordinator, "peer", 0)
    };
    let peer = Agent::start(peer_config.clone()).await?;
    wait_until(Duration::from_secs(10), || {
        holder.is_connected() && peer.is_connected()
    })
    .await?;
    let mut client = CoordinatorClient::connect(coordinator.url()).await?;

    let (content, file, manifest) = blob_file(dir.path())?;
    let digest = manifest.digest();
    push(&holder, &file, true).await?;
    distribute(&mut client, &digest, &[&peer]).await?;
    wait_until(Duration::from_secs(30), || {
        peer.store().is_complete(&digest)
    })
    .await?;
    // The only other copy goes away for now: the chunk cannot come back until it returns.
    let peer_id = peer.agent_id().to_string();
    peer.shutdown().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while holding(&mut client, &digest, &peer_id).await?.is_some() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the peer's lease never ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    rot(&holder, &manifest, ROTTEN)?;
    wait_until(Duration::from_secs(20), || {
        !holder.store().has_chunk(&digest, ROTTEN)
    })
    .await
    .context("the scrub finds the rotten chunk")?;
    wait_coordinator_sees_one_missing(&mut client, &digest, &holder, manifest.chunk_count())
        .await?;
    let text = metrics.render();
    ensure!(
        text.contains("shoal_agent_corrupt_chunks_found_total 1\n"),
        "corrupt chunks counted:\n{text}"
    );
    let scrubbed = text
        .lines()
        .find_map(|l| l.strip_prefix("shoal_agent_scrubbed_bytes_total "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    ensure!(
        scrubbed >= f64::from((ROTTEN.0 + 1) * CHUNK),
        "scrubbed {scrubbed} bytes"
    );

    // The other copy is back: the pinned holder fetches its chunk again.
    let peer = Agent::start(peer_config).await?;
    wait_until(Duration::from_secs(30), || {
        holder.store().is_complete(&digest)
    })
    .await
    .context("the holder fetches the chunk again")?;
    holds_exactly(&holder, &digest, &content)?;
    ensure!(holder.store().is_pinned(&digest) == Some(true));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !holding(&mut client, &digest, holder.agent_id())
        .await?
        .is_some_and(|h| h.complete)
    {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the coordinator never saw it whole again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    holder.shutdown().await;
    peer.shutdown().await;
    coordinator.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_a_peer_rejects_is_dropped_at_its_source_and_no_peer_gets_it_twice() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let coordinator = Coordinator::start(dir.path(), TOKEN, 10_000).await?;
    // No scrub anywhere: only the rejection can tell the source.
    let start = |name: &str| Agent::start(config(dir.path(), &coordinator, name, 0));
    let source = start("source").await?;
    let first = start("first").await?;
    let second = start("second").await?;
    let late = start("late").await?;
    let all = [&source, &first, &second, &late];
    wait_until(Duration::from_secs(10), || {
        all.iter().all(|a| a.is_connected())
    })
    .await?;
    let mut client = CoordinatorClient::connect(coordinator.url()).await?;

    let (content, file, manifest) = blob_file(dir.path())?;
    let digest = manifest.digest();
    let n = manifest.chunk_count();
    push(&source, &file, true).await?;
    rot(&source, &manifest, ROTTEN)?;

    // Two downloaders, with the source as the only whole copy. Whichever asks for the rotten
    // chunk first rejects it and tells the source, which drops it: the other may have been
    // served it in the meantime, once, but nobody is served it after that.
    distribute(&mut client, &digest, &[&first, &second]).await?;
    wait_until(Duration::from_secs(20), || {
        !source.store().has_chunk(&digest, ROTTEN)
    })
    .await
    .context("the source drops the chunk its peer rejected")?;
    wait_coordinator_sees_one_missing(&mut client, &digest, &source, n).await?;
    let rejected = |a: &Agent| a.stats().chunks_rejected;
    ensure!(
        rejected(&first) + rejected(&second) >= 1,
        "somebody was served the rotten chunk"
    );
    // While nobody else has the chunk, the downloaders take the rest from the source (the one
    // that was not served the rotten chunk, if one was not) and from each other, and wait.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        !first.store().has_chunk(&digest, ROTTEN) && !second.store().has_chunk(&digest, ROTTEN)
    );

    // A good copy appears: everyone completes from it, the source too (its blob is pinned).
    push(&late, &file, false).await?;
    wait_until(Duration::from_secs(40), || {
        [&source, &first, &second]
            .iter()
            .all(|a| a.store().is_complete(&digest))
    })
    .await
    .context("everyone completes from the good copy")?;
    for a in all {
        holds_exactly(a, &digest, &content)?;
    }
    ensure!(
        rejected(&first) <= 1 && rejected(&second) <= 1,
        "rotten bytes were served to a peer twice: first rejected {}, second {}",
        rejected(&first),
        rejected(&second)
    );

    for a in [source, first, second, late] {
        a.shutdown().await;
    }
    coordinator.stop().await;
    Ok(())
}
