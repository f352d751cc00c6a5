//! A source that goes silent mid-transfer (a frozen host, a black-holed path: its QUIC
//! connection stays open, nothing arrives) is dropped by the downloader within its stall
//! timeout and reported to the coordinator (`SourceStalled`), which counts it; the blob
//! completes from the other holder, long before the request timeout would have given up on
//! the silent one.
//!
//! The silent source is reached through a UDP relay in this test that forwards both ways
//! until it has passed some of the source's chunk data, then drops everything.
//!
//! Likewise a source that does not hold the blob it is listed for (its have-stream answers
//! NotFound): dropped and reported after 20 stall timeouts rather than kept for ever.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use shoal_agent::{Agent, AgentConfig, local_api};
use shoal_proto::Digest;
use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::coordinator_client::CoordinatorClient;
use tokio::net::UdpSocket;

#[path = "support/coordinator.rs"]
mod support;

use support::{Coordinator, wait_until};

const TOKEN: &str = "stall-test-token";

/// Forwards datagrams between any client and `target` (one back socket per client), until
/// `silent`; counts the bytes `target` sent.
struct Relay {
    addr: SocketAddr,
    silent: Arc<AtomicBool>,
    from_target: Arc<AtomicU64>,
}

async fn relay(target: SocketAddr) -> Result<Relay> {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let addr = front.local_addr()?;
    let silent = Arc::new(AtomicBool::new(false));
    let from_target = Arc::new(AtomicU64::new(0));
    let (s, f) = (silent.clone(), from_target.clone());
    tokio::spawn(async move {
        let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 65536];
        while let Ok((n, client)) = front.recv_from(&mut buf).await {
            if s.load(Ordering::SeqCst) {
                continue;
            }
            let back = match backs.get(&client) {
                Some(b) => b.clone(),
                None => {
                    let Ok(back) = UdpSocket::bind("127.0.0.1:0").await else {
                        continue;
                    };
                    let back = Arc::new(back);
                    backs.insert(client, back.clone());
                    let (front, back2, s, f) = (front.clone(), back.clone(), s.clone(), f.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        while let Ok((n, _)) = back2.recv_from(&mut buf).await {
                            if s.load(Ordering::SeqCst) {
                                continue;
                            }
                            f.fetch_add(n as u64, Ordering::SeqCst);
                            let _ = front.send_to(&buf[..n], client).await;
                        }
                    });
                    back
                }
            };
            let _ = back.send_to(&buf[..n], target).await;
        }
    });
    Ok(Relay {
        addr,
        silent,
        from_target,
    })
}

fn free_udp_port() -> Result<SocketAddr> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

fn stalls(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("shoal_coordinator_planner_decisions_total") && l.contains("\"stall\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_source_is_dropped_reported_and_the_blob_completes_from_another() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // The coordinator runs in this process: its counters land in this recorder.
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let coordinator = Coordinator::start(dir.path(), TOKEN, 30_000).await?;
    let coordinator_addr = coordinator.addr;

    let silent_quic = free_udp_port()?;
    let relay = relay(silent_quic).await?;
    let config = |name: &str| AgentConfig {
        coordinator: format!("http://{coordinator_addr}"),
        join_token: TOKEN.into(),
        data_dir: dir.path().join(name),
        quic_listen: "127.0.0.1:0".parse().expect("addr"),
        chunk_size: 64 << 10,
        quota_bytes: 1 << 30,
        // Without stall detection the silent source's requests would hang this long.
        request_timeout_ms: 120_000,
        ..AgentConfig::default()
    };
    let silent = Agent::start(AgentConfig {
        quic_listen: silent_quic,
        advertise: Some(relay.addr),
        ..config("silent")
    })
    .await?;
    // Slow enough that the transfer is still running when the stall timeout passes.
    let healthy = Agent::start(AgentConfig {
        upload_limit_bytes_per_sec: 4_000_000,
        ..config("healthy")
    })
    .await?;
    let target = Agent::start(config("target")).await?;
    let agents = [&silent, &healthy, &target];
    wait_until(Duration::from_secs(10), || {
        agents.iter().all(|a| a.is_connected())
    })
    .await?;

    let content: Vec<u8> = (0..16_000_000usize)
        .map(|i| (i * 31 + i / 991) as u8)
        .collect();
    let file = dir.path().join("blob.bin");
    std::fs::write(&file, &content)?;
    let digest = Digest::of(&content);
    for holder in [&silent, &healthy] {
        let mut local = local_api::connect(holder.local_socket()).await?;
        let mut push = local
            .push(pb::PushRequest {
                path: file.to_str().context("utf8")?.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        while push.message().await?.is_some() {}
    }

    let mut client = CoordinatorClient::connect(format!("http://{coordinator_addr}")).await?;
    let started = tokio::time::Instant::now();
    loop {
        let known = client
            .get_blob(pb::GetBlobRequest {
                digest: digest.to_string(),
                include_manifest: false,
            })
            .await;
        if known.is_ok_and(|b| b.into_inner().blob.is_some_and(|b| b.complete_holders == 2)) {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the coordinator never learnt of both holders"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client
        .distribute(pb::DistributeRequest {
            blobs: vec![digest.to_string()],
            targets: Some(pb::TargetSelector {
                selector: Some(pb::target_selector::Selector::Agents(pb::AgentIdList {
                    agent_ids: vec![target.agent_id().to_string()],
                })),
            }),
            ..Default::default()
        })
        .await?;

    // Let some chunk data through from the silent source, then silence it.
    wait_until(Duration::from_secs(10), || {
        relay.from_target.load(Ordering::SeqCst) > 512 << 10
    })
    .await
    .context("the target never fetched from the source behind the relay")?;
    relay.silent.store(true, Ordering::SeqCst);
    anyhow::ensure!(
        !target.store().is_complete(&digest),
        "the blob was complete before the source went silent"
    );

    wait_until(Duration::from_secs(20), || {
        target.store().is_complete(&digest)
    })
    .await
    .context("the blob did not complete from the healthy source")?;
    target.store().verify_blob(&digest)?;
    let reported = stalls(&metrics.render());
    assert!(
        reported >= 1,
        "the coordinator counted no stall ({reported})"
    );

    for a in [silent, healthy, target] {
        a.shutdown().await;
    }
    coordinator.stop().await;
    Ok(())
}

/// A holder that lost the blob without telling the coordinator (an unreported eviction, or
/// an agent that claims what it does not hold) answers its have-stream with NotFound: it
/// is dropped within `NEVER_READY_STALLS` stall timeouts and reported, instead of being
/// kept as a source for ever; the blob completes from the honest holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_does_not_hold_the_blob_is_dropped_and_reported() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let coordinator = Coordinator::start(dir.path(), TOKEN, 30_000).await?;
    let coordinator_addr = coordinator.addr;
    let config = |name: &str| AgentConfig {
        coordinator: format!("http://{coordinator_addr}"),
        join_token: TOKEN.into(),
        data_dir: dir.path().join(name),
        quic_listen: "127.0.0.1:0".parse().expect("addr"),
        chunk_size: 64 << 10,
        quota_bytes: 1 << 30,
        ..AgentConfig::default()
    };
    let liar = Agent::start(config("liar")).await?;
    // Slow enough that the download outlasts the 20 s a source has to become ready.
    let healthy = Agent::start(AgentConfig {
        upload_limit_bytes_per_sec: 600_000,
        ..config("healthy")
    })
    .await?;
    let target = Agent::start(config("target")).await?;
    let agents = [&liar, &healthy, &target];
    wait_until(Duration::from_secs(10), || {
        agents.iter().all(|a| a.is_connected())
    })
    .await?;

    let content: Vec<u8> = (0..16_000_000usize)
        .map(|i| (i * 7 + i / 613) as u8)
        .collect();
    let file = dir.path().join("blob.bin");
    std::fs::write(&file, &content)?;
    let digest = Digest::of(&content);
    for holder in [&liar, &healthy] {
        let mut local = local_api::connect(holder.local_socket()).await?;
        let mut push = local
            .push(pb::PushRequest {
                path: file.to_str().context("utf8")?.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        while push.message().await?.is_some() {}
    }
    let mut client = CoordinatorClient::connect(format!("http://{coordinator_addr}")).await?;
    let holders = async |client: &mut CoordinatorClient<_>| -> u32 {
        let known = client
            .get_blob(pb::GetBlobRequest {
                digest: digest.to_string(),
                include_manifest: false,
            })
            .await;
        known.map_or(0, |b| b.into_inner().blob.map_or(0, |b| b.complete_holders))
    };
    let started = tokio::time::Instant::now();
    while holders(&mut client).await < 2 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the coordinator never learnt of both holders"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Gone from the liar's store; the coordinator is not told.
    liar.store().remove(&digest)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    anyhow::ensure!(
        holders(&mut client).await == 2,
        "the coordinator learnt of the removal: this test needs a holder it still believes"
    );
    client
        .distribute(pb::DistributeRequest {
            blobs: vec![digest.to_string()],
            targets: Some(pb::TargetSelector {
                selector: Some(pb::target_selector::Selector::Agents(pb::AgentIdList {
                    agent_ids: vec![target.agent_id().to_string()],
                })),
            }),
            ..Default::default()
        })
        .await?;
    wait_until(Duration::from_secs(90), || {
        target.store().is_complete(&digest)
    })
    .await
    .context("the blob did not complete from the honest holder")?;
    target.store().verify_blob(&digest)?;
    let reported = stalls(&metrics.render());
    assert!(
        reported >= 1,
        "the holder without the blob was never dropped and reported ({reported})"
    );
    for a in [liar, healthy, target] {
        a.shutdown().await;
    }
    coordinator.stop().await;
    Ok(())
}
