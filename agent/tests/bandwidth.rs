//! Bandwidth caps on real QUIC endpoints: a capped side moves N bytes in no less than about
//! N / limit seconds (loose lower bounds, small sizes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use shoal_agent::RateLimiter;
use shoal_agent::transport::TransportConfig;
use shoal_agent::transport::tls::ClusterCa;
use shoal_proto::Manifest;

const CHUNK: u32 = 64 << 10;
const LIMIT: u64 = 2 << 20;
const BURST: u64 = 2 * CHUNK as u64;
const SIZE: usize = 3 << 20;

#[path = "support/node.rs"]
mod support;

use support::{Node, node, seed};

fn seeded(node: &Node) -> Result<Manifest> {
    let data: Vec<u8> = (0..SIZE).map(|i| (i * 31 % 251) as u8).collect();
    seed(node, &data, CHUNK)
}

fn capped() -> Option<Arc<RateLimiter>> {
    Some(Arc::new(RateLimiter::new(LIMIT, BURST)))
}

/// (SIZE - BURST) / LIMIT, less 10% for timer slack.
fn lower_bound() -> Duration {
    Duration::from_secs_f64((SIZE as u64 - BURST) as f64 / LIMIT as f64 * 0.9)
}

/// How long a fetcher with `fetcher` takes to move the test blob from a seeder with
/// `seeder`, every chunk verified.
async fn timed_fetch(seeder: TransportConfig, fetcher: TransportConfig) -> Result<Duration> {
    let ca = ClusterCa::generate()?;
    let seeder = node(&ca.issue("seeder")?, seeder)?;
    let fetcher = node(&ca.issue("fetcher")?, fetcher)?;
    let manifest = seeded(&seeder)?;
    fetcher.endpoint.store().insert_manifest(&manifest)?;
    let started = Instant::now();
    fetcher
        .endpoint
        .fetch_blob(seeder.endpoint.local_addr(), &manifest)
        .await?;
    let took = started.elapsed();
    fetcher.endpoint.store().verify_blob(&manifest.digest())?;
    Ok(took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_uploader_serves_no_faster_than_its_limit() -> Result<()> {
    let seeder = TransportConfig {
        upload_limit: capped(),
        ..TransportConfig::default()
    };
    let took = timed_fetch(seeder, TransportConfig::default()).await?;
    assert!(took >= lower_bound(), "3 MiB at 2 MiB/s took only {took:?}");
    assert!(took < Duration::from_secs(10), "far too slow: {took:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_downloader_fetches_no_faster_than_its_limit() -> Result<()> {
    let fetcher = TransportConfig {
        download_limit: capped(),
        ..TransportConfig::default()
    };
    let took = timed_fetch(TransportConfig::default(), fetcher).await?;
    assert!(took >= lower_bound(), "3 MiB at 2 MiB/s took only {took:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncapped_endpoints_are_not_slowed() -> Result<()> {
    let took = timed_fetch(TransportConfig::default(), TransportConfig::default()).await?;
    assert!(took < lower_bound(), "{took:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_cost_no_download_tokens() -> Result<()> {
    let ca = ClusterCa::generate()?;
    let full = node(
        &ca.issue("full")?,
        TransportConfig {
            max_concurrent_served: 0,
            ..TransportConfig::default()
        },
    )?;
    let limit = Arc::new(RateLimiter::new(LIMIT, BURST));
    let fetcher = node(
        &ca.issue("fetcher")?,
        TransportConfig {
            download_limit: Some(limit.clone()),
            ..TransportConfig::default()
        },
    )?;
    let manifest = seeded(&full)?;
    let peer = fetcher.endpoint.peer(full.endpoint.local_addr()).await?;
    for i in manifest.chunk_indices().take(8) {
        let err = peer
            .fetch_chunk(&manifest, i, &mut Vec::new())
            .await
            .expect_err("the server is full");
        assert!(err.is_busy(), "{err}");
    }
    // Eight chunks would have been 4x the burst: the bucket is still full.
    assert_eq!(limit.available(), BURST as i64);
    Ok(())
}
