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

/// An agent's config for this file's tests: in `dir/name`, joined to `coordinator`.
fn agent_config(dir: &std::path::Path, coordinator: SocketAddr, name: &str) -> AgentConfig {
    AgentConfig {
        coordinator: format!("http://{coordinator}"),
        join_token: TOKEN.into(),
        data_dir: dir.join(name),
        quic_listen: "127.0.0.1:0".parse().expect("addr"),
        chunk_size: 64 << 10,
        quota_bytes: 1 << 30,
        ..AgentConfig::default()
    }
}

/// Pushes `file` on each of `holders` through its local API.
async fn push_on(holders: &[&Agent], file: &std::path::Path) -> Result<()> {
    for holder in holders {
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
    Ok(())
}

/// Complete holders of `digest` the coordinator knows of.
async fn holders(client: &mut CoordinatorClient<tonic::transport::Channel>, digest: Digest) -> u32 {
    let known = client
        .get_blob(pb::GetBlobRequest {
            digest: digest.to_string(),
            include_manifest: false,
        })
        .await;
    known.map_or(0, |b| b.into_inner().blob.map_or(0, |b| b.complete_holders))
}

/// Waits until the coordinator counts `want` complete holders of `digest`.
async fn wait_for_holders(
    client: &mut CoordinatorClient<tonic::transport::Channel>,
    digest: Digest,
    want: u32,
    what: &str,
) -> Result<()> {
    let started = tokio::time::Instant::now();
    while holders(client, digest).await != want {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Once every agent in `all` is connected: a 16 MB blob (bytes per `seed`) pushed on each of
/// `holders`, and a coordinator client that has seen them all hold it.
async fn blob_on(
    dir: &std::path::Path,
    coordinator: SocketAddr,
    all: &[&Agent],
    holders: &[&Agent],
    seed: usize,
) -> Result<(Digest, CoordinatorClient<tonic::transport::Channel>)> {
    wait_until(Duration::from_secs(10), || {
        all.iter().all(|a| a.is_connected())
    })
    .await?;
    let content: Vec<u8> = (0..16_000_000usize)
        .map(|i| (i * seed + i / 991) as u8)
        .collect();
    let file = dir.join("blob.bin");
    std::fs::write(&file, &content)?;
    let digest = Digest::of(&content);
    push_on(holders, &file).await?;
    let mut client = CoordinatorClient::connect(format!("http://{coordinator}")).await?;
    let n = holders.len() as u32;
    wait_for_holders(
        &mut client,
        digest,
        n,
        "the coordinator never learnt of every holder",
    )
    .await?;
    Ok((digest, client))
}

/// Distributes `digest` to `target` alone.
async fn distribute_to(
    client: &mut CoordinatorClient<tonic::transport::Channel>,
    digest: Digest,
    target: &Agent,
) -> Result<()> {
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
    Ok(())
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
        // Without stall detection the silent source's requests would hang this long.
        request_timeout_ms: 120_000,
        ..agent_config(dir.path(), coordinator_addr, name)
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
    let (digest, mut client) = blob_on(
        dir.path(),
        coordinator_addr,
        &[&silent, &healthy, &target],
        &[&silent, &healthy],
        31,
    )
    .await?;
    distribute_to(&mut client, digest, &target).await?;

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

/// A holder the coordinator believes but that does not hold the blob (an agent claiming
/// what it does not have: here a session of this test's own, speaking the real protocol,
/// whose QUIC address is a real agent without the blob) answers its have-stream with
/// NotFound: it is dropped within `NEVER_READY_STALLS` stall timeouts and reported,
/// instead of being kept as a source for ever; the blob completes from the honest holder.
/// First, an honest agent that removes the blob tells the coordinator at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_does_not_hold_the_blob_is_dropped_and_reported() -> Result<()> {
    use shoal_proto::pb::v1::agent_message::Msg;
    use shoal_proto::pb::v1::agent_session_client::AgentSessionClient;

    let dir = tempfile::tempdir()?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let coordinator = Coordinator::start(dir.path(), TOKEN, 60_000).await?;
    let coordinator_addr = coordinator.addr;
    let config = |name: &str| agent_config(dir.path(), coordinator_addr, name);
    let empty = Agent::start(config("empty")).await?;
    // Slow enough that the download outlasts the 20 s a source has to become ready.
    let healthy = Agent::start(AgentConfig {
        upload_limit_bytes_per_sec: 600_000,
        ..config("healthy")
    })
    .await?;
    let target = Agent::start(config("target")).await?;
    let (digest, mut client) = blob_on(
        dir.path(),
        coordinator_addr,
        &[&empty, &healthy, &target],
        &[&empty, &healthy],
        7,
    )
    .await?;
    // An honest removal reaches the coordinator at once, not at the next snapshot.
    empty.store().remove(&digest)?;
    wait_for_holders(&mut client, digest, 1, "the removal was not reported").await?;

    // The liar: joins with the empty agent's address and claims the blob whole.
    let mut session = AgentSessionClient::connect(format!("http://{coordinator_addr}")).await?;
    let joined = session
        .join(pb::JoinRequest {
            token: TOKEN.into(),
            quic_addresses: vec![empty.quic_addr().to_string()],
            protocol: shoal_proto::SESSION_PROTOCOL,
            ..Default::default()
        })
        .await?
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let say = |msg| pb::AgentMessage { msg: Some(msg) };
    tx.send(say(Msg::Hello(pb::Hello {
        agent_id: joined.agent_id.clone(),
        session_token: joined.session_token.clone(),
        quic_addresses: vec![],
    })))
    .await?;
    tx.send(say(Msg::Inventory(pb::Inventory {
        replace: true,
        blobs: vec![pb::HeldBlob {
            blob_digest: digest.as_bytes().to_vec(),
            complete: true,
            chunks: None,
            pinned: false,
        }],
        removed_blobs: vec![],
    })))
    .await?;
    let mut from_coordinator = session
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    tokio::spawn(async move { while let Ok(Some(_)) = from_coordinator.message().await {} });
    wait_for_holders(
        &mut client,
        digest,
        2,
        "the coordinator did not take the liar's claim",
    )
    .await?;
    distribute_to(&mut client, digest, &target).await?;
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
    drop(tx);
    for a in [empty, healthy, target] {
        a.shutdown().await;
    }
    coordinator.stop().await;
    Ok(())
}
