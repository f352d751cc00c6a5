//! In-process end to end: a real coordinator (`shoal_coordinator::run` on a loopback
//! port) and three real agents. A blob pushed (and pinned) on one reaches all through their
//! peers; a large blob's chunk table comes from peers too, not in every order.

use std::time::Duration;

use anyhow::{Context, Result};
use shoal_agent::{Agent, AgentConfig, AgentStats, local_api};
use shoal_proto::Digest;
use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::coordinator_client::CoordinatorClient;

#[path = "support/coordinator.rs"]
mod support;

use support::{Coordinator, wait_until};

const TOKEN: &str = "swarm-test-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_blob_reaches_every_agent() -> Result<()> {
    // 46 chunks of 64 KiB: a table small enough that orders carry it.
    let stats = push_to_all(64 << 10).await?;
    for s in &stats {
        assert_eq!((s.tables_from_peers, s.tables_from_coordinator), (0, 0));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_blobs_chunk_table_comes_from_the_peers_not_the_orders() -> Result<()> {
    // 184 chunks of 16 KiB: the orders name the table's digest, and each target asks its
    // source for the table (checked against that digest) before fetching chunks.
    let stats = push_to_all(16 << 10).await?;
    assert_eq!(stats[0].tables_from_peers, 0, "the pusher made the table");
    for s in &stats[1..] {
        assert_eq!(
            (s.tables_from_peers, s.tables_from_coordinator),
            (1, 0),
            "{stats:?}"
        );
    }
    Ok(())
}

/// Pushes (and pins) a 3 MB blob in `chunk_size` chunks on the first of three agents,
/// distributes it to all, checks every copy and the bytes moved; returns their stats.
async fn push_to_all(chunk_size: u32) -> Result<Vec<AgentStats>> {
    let dir = tempfile::tempdir()?;
    let coordinator = Coordinator::start(dir.path(), TOKEN, 5_000).await?;
    let coordinator_addr = coordinator.addr;

    let mut agents = Vec::new();
    for i in 0..3 {
        let config = AgentConfig {
            coordinator: format!("http://{coordinator_addr}"),
            join_token: TOKEN.into(),
            data_dir: dir.path().join(format!("agent-{i}")),
            quic_listen: "127.0.0.1:0".parse()?,
            chunk_size,
            quota_bytes: 1 << 30,
            labels: [("zone".to_string(), "z1".to_string())].into(),
            ..AgentConfig::default()
        };
        agents.push(Agent::start(config).await?);
    }
    // Every agent's session is up.
    wait_until(Duration::from_secs(10), || {
        agents.iter().all(Agent::is_connected)
    })
    .await?;

    let content: Vec<u8> = (0..3_000_000usize)
        .map(|i| (i * 13 + i / 777) as u8)
        .collect();
    let file = dir.path().join("blob.bin");
    std::fs::write(&file, &content)?;
    let digest = Digest::of(&content);
    let mut local = local_api::connect(agents[0].local_socket()).await?;
    let mut push = local
        .push(pb::PushRequest {
            path: file.to_str().context("utf8")?.into(),
            pin: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    while push.message().await?.is_some() {}

    let mut coordinator_client =
        CoordinatorClient::connect(format!("http://{coordinator_addr}")).await?;
    // The registration travels on the session; retry until the coordinator knows the blob.
    let started = tokio::time::Instant::now();
    let job = loop {
        let r = coordinator_client
            .distribute(pb::DistributeRequest {
                blobs: vec![digest.to_string()],
                targets: Some(pb::TargetSelector {
                    selector: Some(pb::target_selector::Selector::All(pb::AllAgents {})),
                }),
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) => break r.into_inner(),
            Err(s)
                if s.code() == tonic::Code::NotFound
                    && started.elapsed() < Duration::from_secs(5) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => anyhow::bail!("distribute: {s}"),
        }
    };
    assert_eq!(job.target_count, 3);
    // The pin travels too: the coordinator shows it among the blob's holders.
    let pusher = agents[0].agent_id().to_string();
    let started = tokio::time::Instant::now();
    loop {
        let blob = coordinator_client
            .get_blob(pb::GetBlobRequest {
                digest: digest.to_string(),
                include_manifest: false,
            })
            .await?
            .into_inner();
        if (blob.holders.iter()).any(|h| h.agent_id == pusher && h.pinned) {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(5),
            "the coordinator never showed the pusher's pin: {:?}",
            blob.holders
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    wait_until(Duration::from_secs(30), || {
        agents
            .iter()
            .all(|a| a.store().is_complete(&digest) && a.stats().active_transfers == 0)
    })
    .await
    .context("every agent holds the blob")?;
    for a in &agents {
        a.store().verify_blob(&digest)?;
    }
    let from_peers: u64 = agents.iter().map(|a| a.stats().bytes_from_peers).sum();
    assert_eq!(
        from_peers,
        2 * content.len() as u64,
        "two targets fetched it all"
    );

    let stats = agents.iter().map(Agent::stats).collect();
    for a in agents {
        a.shutdown().await;
    }
    coordinator.stop().await;
    Ok(stats)
}
