//! A blob peers are fetching is kept from eviction (it may be the swarm's only complete copy)
//! until it has not been served for `serving_hold`; then it is evicted as usual.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use shoal_agent::store::StoreError;
use shoal_agent::transport::TransportConfig;
use shoal_agent::transport::tls::ClusterCa;
use shoal_proto::{CHUNK_SIZE, Manifest};

#[path = "support/node.rs"]
mod support;

use support::{node, node_with_quota, pseudo_random, seed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_being_served_is_not_evicted_until_it_has_been_quiet() -> Result<()> {
    let ca = ClusterCa::generate()?;
    let hold = Duration::from_millis(500);
    let config = TransportConfig {
        serving_hold: hold,
        ..TransportConfig::default()
    };
    // Room for one 2 MiB blob and a half.
    let seeder = node_with_quota(&ca.issue("seeder")?, config, 3 << 20)?;
    let target = node(&ca.issue("target")?, TransportConfig::default())?;
    let served = seed(&seeder, &pseudo_random(2 << 20, 1), CHUNK_SIZE)?;
    let next = Manifest::from_reader(&pseudo_random(2 << 20, 2)[..], CHUNK_SIZE)?;

    target.endpoint.store().insert_manifest(&served)?;
    target
        .endpoint
        .fetch_blob(seeder.endpoint.local_addr(), &served)
        .await?;
    ensure!(seeder.endpoint.held_for_serving() == 1);
    // Room for the next blob means evicting the one just served: refused while it is held.
    match seeder.endpoint.store().insert_manifest(&next) {
        Err(StoreError::QuotaExceeded { .. }) => {}
        other => anyhow::bail!("a served blob was evictable: {other:?}"),
    }
    ensure!(seeder.endpoint.store().is_complete(&served.digest()));

    // Quiet for the hold: released, and evicted for the next blob as usual.
    let started = Instant::now();
    while seeder.endpoint.held_for_serving() > 0 {
        ensure!(
            started.elapsed() < hold * 20,
            "the serving hold was never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seeder.endpoint.store().insert_manifest(&next)?;
    ensure!(!seeder.endpoint.store().is_complete(&served.digest()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_removed_and_taken_again_is_held_again_when_served() -> Result<()> {
    let ca = ClusterCa::generate()?;
    let config = TransportConfig {
        serving_hold: Duration::from_secs(30),
        ..TransportConfig::default()
    };
    let seeder = node_with_quota(&ca.issue("seeder")?, config, 3 << 20)?;
    let target = node(&ca.issue("target")?, TransportConfig::default())?;
    let data = pseudo_random(2 << 20, 3);
    let served = seed(&seeder, &data, CHUNK_SIZE)?;
    target.endpoint.store().insert_manifest(&served)?;
    let fetch = || {
        target
            .endpoint
            .fetch_blob(seeder.endpoint.local_addr(), &served)
    };
    fetch().await?;
    // Removed (an admin's delete) while held, then taken again: the old hold is on a blob
    // that is gone; serving the new one must hold the new one.
    seeder.endpoint.store().remove(&served.digest())?;
    seed(&seeder, &data, CHUNK_SIZE)?;
    target.endpoint.store().remove(&served.digest())?;
    target.endpoint.store().insert_manifest(&served)?;
    fetch().await?;
    let next = Manifest::from_reader(&pseudo_random(2 << 20, 4)[..], CHUNK_SIZE)?;
    match seeder.endpoint.store().insert_manifest(&next) {
        Err(StoreError::QuotaExceeded { .. }) => Ok(()),
        other => anyhow::bail!("the blob served again was evictable: {other:?}"),
    }
}
