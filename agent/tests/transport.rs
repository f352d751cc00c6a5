//! In-process QUIC tests: real endpoints on loopback UDP, real stores on disk, real TLS.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use shoal_agent::transport::tls::{ClusterCa, Identity};
use shoal_agent::transport::{FetchError, HaveUpdate, TransportConfig};
use shoal_proto::wire::{ErrorStatus, bitfield_get};
use shoal_proto::{CHUNK_SIZE, ChunkIndex, Manifest};

#[path = "support/node.rs"]
mod support;

use support::{node, pseudo_random, seed};

const LOOPBACK: &str = "127.0.0.1:0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_a_64_mib_blob_with_every_chunk_verified() -> Result<()> {
    let ca = ClusterCa::generate()?;
    let a = node(&ca.issue("a")?, TransportConfig::default())?;
    let b = node(&ca.issue("b")?, TransportConfig::default())?;
    let data = pseudo_random(64 << 20, 7);
    let manifest = seed(&a, &data, CHUNK_SIZE)?;
    assert_eq!(manifest.chunk_count(), 64);

    b.endpoint.store().insert_manifest(&manifest)?;
    let report = b
        .endpoint
        .fetch_blob(a.endpoint.local_addr(), &manifest)
        .await?;
    assert_eq!(report.chunks_stored, 64);
    assert_eq!(report.bytes_stored, 64 << 20);

    let store = b.endpoint.store();
    assert!(store.is_complete(&manifest.digest()));
    store.verify_blob(&manifest.digest())?;
    for i in manifest.chunk_indices() {
        let r = manifest.chunk_range(i)?;
        assert_eq!(
            store.get_chunk(&manifest.digest(), i)?,
            data[r.start as usize..r.end as usize]
        );
    }
    let served = a.endpoint.serve_stats();
    assert_eq!(served.chunks_served, 64);
    assert_eq!(served.bytes_served, 64 << 20);
    Ok(())
}

#[tokio::test]
async fn a_corrupted_chunk_from_a_peer_is_detected_and_not_stored() -> Result<()> {
    let ca = ClusterCa::generate()?;
    let a = node(&ca.issue("a")?, TransportConfig::default())?;
    let b = node(&ca.issue("b")?, TransportConfig::default())?;
    let data = pseudo_random(8 * 4096, 3);
    let manifest = seed(&a, &data, 4096)?;

    // The serving peer's disk rots after verification: it now serves bytes that do not match.
    let path = a
        .endpoint
        .store()
        .data_path(&manifest.digest())
        .expect("data file");
    let mut on_disk = std::fs::read(&path)?;
    on_disk[2 * 4096 + 100] ^= 0xff;
    std::fs::write(&path, &on_disk)?;

    b.endpoint.store().insert_manifest(&manifest)?;
    let peer = b.endpoint.peer(a.endpoint.local_addr()).await?;
    let (result, _) = peer
        .fetch_into_store(b.endpoint.store(), &manifest, ChunkIndex(2), Vec::new())
        .await;
    match result {
        Err(FetchError::Corrupt {
            index, peer: who, ..
        }) => {
            assert_eq!(index, ChunkIndex(2));
            assert_eq!(who, a.endpoint.local_addr());
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(
        !b.endpoint
            .store()
            .has_chunk(&manifest.digest(), ChunkIndex(2))
    );
    assert!(
        b.endpoint
            .store()
            .get_chunk(&manifest.digest(), ChunkIndex(2))
            .is_err()
    );

    // fetch_blob surfaces the same and keeps the good chunks it got.
    let err = b
        .endpoint
        .fetch_blob(a.endpoint.local_addr(), &manifest)
        .await;
    assert!(matches!(err, Err(FetchError::Corrupt { .. })), "{err:?}");
    assert!(
        !b.endpoint
            .store()
            .has_chunk(&manifest.digest(), ChunkIndex(2))
    );
    Ok(())
}

#[tokio::test]
async fn a_source_told_of_a_rejected_chunk_drops_it_if_it_rotted_and_stops_serving_it() -> Result<()>
{
    let ca = ClusterCa::generate()?;
    let a = node(&ca.issue("a")?, TransportConfig::default())?;
    let b = node(&ca.issue("b")?, TransportConfig::default())?;
    let data = pseudo_random(8 * 4096, 5);
    let manifest = seed(&a, &data, 4096)?;
    let blob = manifest.digest();
    let path = a.endpoint.store().data_path(&blob).expect("data file");
    let rot = std::fs::OpenOptions::new().write(true).open(&path)?;
    std::os::unix::fs::FileExt::write_all_at(&rot, b"rot", 2 * 4096 + 7)?;

    b.endpoint.store().insert_manifest(&manifest)?;
    let peer = b.endpoint.peer(a.endpoint.local_addr()).await?;
    let (result, _) = peer
        .fetch_into_store(b.endpoint.store(), &manifest, ChunkIndex(2), Vec::new())
        .await;
    assert!(
        matches!(result, Err(FetchError::Corrupt { .. })),
        "{result:?}"
    );
    // A notice about an intact chunk changes nothing; the rotten one is dropped.
    peer.report_corrupt(blob, ChunkIndex(3)).await?;
    peer.report_corrupt(blob, ChunkIndex(2)).await?;
    let store = a.endpoint.store().clone();
    wait_for(|| !store.has_chunk(&blob, ChunkIndex(2))).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        store.has_chunk(&blob, ChunkIndex(3)),
        "an intact chunk was dropped"
    );
    assert!(!store.is_complete(&blob));
    // A second notice about it finds nothing to do.
    peer.report_corrupt(blob, ChunkIndex(2)).await?;

    // Nobody is served the rotten bytes again.
    let (result, _) = peer
        .fetch_into_store(b.endpoint.store(), &manifest, ChunkIndex(2), Vec::new())
        .await;
    assert!(
        matches!(
            result,
            Err(FetchError::Refused {
                status: ErrorStatus::NotFound,
                ..
            })
        ),
        "{result:?}"
    );
    let (result, _) = peer
        .fetch_into_store(b.endpoint.store(), &manifest, ChunkIndex(3), Vec::new())
        .await;
    assert!(result.is_ok(), "the rest is still served: {result:?}");
    Ok(())
}

#[tokio::test]
async fn a_client_refuses_a_server_the_cluster_ca_did_not_sign() -> Result<()> {
    let ours = ClusterCa::generate()?;
    let theirs = ClusterCa::generate()?;
    let client = node(&ours.issue("client")?, TransportConfig::default())?;
    let impostor = node(&theirs.issue("impostor")?, TransportConfig::default())?;
    let err = client
        .endpoint
        .peer(impostor.endpoint.local_addr())
        .await
        .expect_err("must refuse");
    let text = err.to_string();
    assert!(
        text.contains("connect") || text.contains("certificate"),
        "{text}"
    );
    assert!(client.endpoint.connected_peers().is_empty());

    // And a server refuses a client whose certificate the CA did not sign, even when that
    // client trusts the server (it has our root but a certificate from another CA).
    let server = node(&ours.issue("server")?, TransportConfig::default())?;
    let manifest = seed(&server, &pseudo_random(4096, 1), 4096)?;
    let forged = theirs.issue("forged")?;
    let ours_root = ours.issue("x")?.roots;
    let sneaky = node(
        &Identity {
            roots: ours_root,
            ..forged
        },
        TransportConfig::default(),
    )?;
    sneaky.endpoint.store().insert_manifest(&manifest)?;
    let fetched = sneaky
        .endpoint
        .fetch_blob(server.endpoint.local_addr(), &manifest)
        .await;
    assert!(fetched.is_err(), "server served a client of another CA");
    assert_eq!(server.endpoint.serve_stats().chunks_served, 0);
    assert!(
        !sneaky
            .endpoint
            .store()
            .has_chunk(&manifest.digest(), ChunkIndex(0))
    );

    // The same client with a certificate from our CA is served: the refusal was the CA.
    let honest = node(&ours.issue("honest")?, TransportConfig::default())?;
    honest.endpoint.store().insert_manifest(&manifest)?;
    honest
        .endpoint
        .fetch_blob(server.endpoint.local_addr(), &manifest)
        .await?;
    assert_eq!(server.endpoint.serve_stats().chunks_served, 1);
    Ok(())
}

#[tokio::test]
async fn unknown_blobs_are_not_found_and_a_full_server_says_busy() -> Result<()> {
    let ca = ClusterCa::generate()?;
    let a = node(&ca.issue("a")?, TransportConfig::default())?;
    let full = node(
        &ca.issue("full")?,
        TransportConfig {
            max_concurrent_served: 0,
            ..Default::default()
        },
    )?;
    let b = node(&ca.issue("b")?, TransportConfig::default())?;
    let manifest = Manifest::from_reader(&pseudo_random(4096, 9)[..], 4096)?;

    let peer = b.endpoint.peer(a.endpoint.local_addr()).await?;
    let err = peer
        .fetch_chunk(&manifest, ChunkIndex(0), &mut Vec::new())
        .await
        .expect_err("unknown");
    assert!(
        matches!(
            err,
            FetchError::Refused {
                status: ErrorStatus::NotFound,
                ..
            }
        ),
        "{err}"
    );

    let data = pseudo_random(4096, 9);
    seed(&full, &data, 4096)?;
    let peer = b.endpoint.peer(full.endpoint.local_addr()).await?;
    let err = peer
        .fetch_chunk(&manifest, ChunkIndex(0), &mut Vec::new())
        .await
        .expect_err("busy");
    assert!(err.is_busy(), "{err}");
    assert_eq!(full.endpoint.serve_stats().busy_rejections, 1);
    Ok(())
}

/// One peer (one certificate) cannot take what all share: its connections past
/// `max_connections_per_peer` are closed, and its requests past `max_served_per_peer` are
/// answered Busy while another peer's are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_gets_its_share_of_connections_and_serving_slots() -> Result<()> {
    use std::sync::Arc;
    let ca = ClusterCa::generate()?;
    // 1 MiB chunks at 1 MB/s: a request holds its slot for about a second.
    let a = node(
        &ca.issue("a")?,
        TransportConfig {
            max_connections_per_peer: 2,
            max_served_per_peer: 1,
            upload_limit: Some(Arc::new(shoal_agent::RateLimiter::new(1_000_000, 64 << 10))),
            // Requests wait for the cap rather than being answered Busy for it.
            max_upload_wait: Duration::from_secs(20),
            ..Default::default()
        },
    )?;
    let data = pseudo_random(3 << 20, 5);
    let manifest = seed(&a, &data, 1 << 20)?;
    let b_identity = ca.issue("b")?;
    let b: Vec<_> = (0..3)
        .map(|_| node(&b_identity, TransportConfig::default()))
        .collect::<Result<_>>()?;
    let c = node(&ca.issue("c")?, TransportConfig::default())?;
    let server = a.endpoint.local_addr();

    // Two of b's requests at once (two connections, the same certificate), and c's.
    let fetch = |n: &support::Node, index: u32| {
        let endpoint = n.endpoint.clone();
        let manifest = manifest.clone();
        async move {
            let peer = endpoint.peer(server).await?;
            peer.fetch_chunk(&manifest, ChunkIndex(index), &mut Vec::new())
                .await
                .map_err(anyhow::Error::from)
        }
    };
    let (b0, b1, c0) = tokio::join!(fetch(&b[0], 0), fetch(&b[1], 1), fetch(&c, 2));
    let busy = |r: &Result<_>| {
        r.as_ref()
            .err()
            .and_then(|e| e.downcast_ref::<FetchError>())
            .is_some_and(FetchError::is_busy)
    };
    assert!(
        [&b0, &b1].iter().filter(|r| busy(r)).count() == 1
            && [&b0, &b1].iter().filter(|r| r.is_ok()).count() == 1,
        "b's two requests at once: one served, one Busy: {b0:?} {b1:?}"
    );
    assert!(c0.is_ok(), "another peer is served meanwhile: {c0:?}");

    // A third connection under b's certificate is closed.
    let third = fetch(&b[2], 0).await;
    assert!(third.is_err() && !busy(&third), "{third:?}");
    // The first two still work.
    fetch(&b[0], 2).await.context("b's first connection")?;
    Ok(())
}

/// Past `max_connections` connections in all, a new peer's connection is closed; those
/// already open go on.
#[tokio::test]
async fn connections_past_the_total_cap_are_closed() -> Result<()> {
    let ca = ClusterCa::generate()?;
    let a = node(
        &ca.issue("a")?,
        TransportConfig {
            max_connections: 2,
            ..Default::default()
        },
    )?;
    let manifest = seed(&a, &pseudo_random(4096, 6), 4096)?;
    let peers: Vec<_> = ["b", "c", "d"]
        .iter()
        .map(|n| node(&ca.issue(n)?, TransportConfig::default()))
        .collect::<Result<_>>()?;
    let mut results = Vec::new();
    for p in &peers {
        let fetched = async {
            let peer = p.endpoint.peer(a.endpoint.local_addr()).await?;
            peer.fetch_chunk(&manifest, ChunkIndex(0), &mut Vec::new())
                .await
                .map_err(anyhow::Error::from)
        }
        .await;
        results.push(fetched.is_ok());
    }
    assert_eq!(results, [true, true, false], "the third peer's connection");
    let again = peers[0].endpoint.peer(a.endpoint.local_addr()).await?;
    again
        .fetch_chunk(&manifest, ChunkIndex(0), &mut Vec::new())
        .await
        .context("an open connection goes on")?;
    Ok(())
}

#[tokio::test]
async fn have_stream_sends_bitfield_then_deltas_until_complete() -> Result<()> {
    let ca = ClusterCa::generate()?;
    let a = node(&ca.issue("a")?, TransportConfig::default())?;
    let b = node(&ca.issue("b")?, TransportConfig::default())?;
    let data = pseudo_random(4 * 4096, 5);
    let manifest = Manifest::from_reader(&data[..], 4096)?;
    let store = a.endpoint.store();
    store.insert_manifest(&manifest)?;
    store.put_chunk(&manifest.digest(), ChunkIndex(1), &data[4096..8192])?;

    let peer = b.endpoint.peer(a.endpoint.local_addr()).await?;
    let mut have = peer.watch_have(manifest.digest()).await?;
    match have.next().await? {
        Some(HaveUpdate::Bitfield { chunk_count, bits }) => {
            assert_eq!(chunk_count, 4);
            assert!(bitfield_get(&bits, ChunkIndex(1)));
            assert!(!bitfield_get(&bits, ChunkIndex(0)));
        }
        other => panic!("expected a bitfield first, got {other:?}"),
    }
    let mut seen = vec![ChunkIndex(1)];
    for i in [0u32, 2, 3] {
        let r = (i as usize * 4096)..(i as usize + 1) * 4096;
        store.put_chunk(&manifest.digest(), ChunkIndex(i), &data[r])?;
    }
    let mut last = None;
    while let Some(update) = tokio::time::timeout(Duration::from_secs(5), have.next()).await?? {
        last = Some(update.clone());
        match update {
            HaveUpdate::Delta(indices) => seen.extend(indices),
            HaveUpdate::Bitfield { bits, .. } => {
                seen = (0..4)
                    .map(ChunkIndex)
                    .filter(|i| bitfield_get(&bits, *i))
                    .collect();
            }
        }
    }
    seen.sort();
    assert_eq!(seen, (0..4).map(ChunkIndex).collect::<Vec<_>>());
    // The stream ends with the whole picture, so no delta queued at completion is lost.
    match last {
        Some(HaveUpdate::Bitfield { chunk_count, bits }) => {
            assert_eq!(chunk_count, 4);
            assert!((0..4).all(|i| bitfield_get(&bits, ChunkIndex(i))));
        }
        other => panic!("expected a final full bitfield, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn one_connection_serves_both_directions() -> Result<()> {
    let ca = ClusterCa::generate()?;
    let a = node(&ca.issue("a")?, TransportConfig::default())?;
    let b = node(&ca.issue("b")?, TransportConfig::default())?;
    let blob_a = seed(&a, &pseudo_random(4096, 11), 4096)?;
    let blob_b = seed(&b, &pseudo_random(4096, 12), 4096)?;

    b.endpoint.store().insert_manifest(&blob_a)?;
    b.endpoint
        .fetch_blob(a.endpoint.local_addr(), &blob_a)
        .await?;
    // A now reaches B over the connection B dialled: no second handshake.
    wait_for(|| a.endpoint.connected_peers() == vec![b.endpoint.local_addr()]).await;
    a.endpoint.store().insert_manifest(&blob_b)?;
    a.endpoint
        .fetch_blob(b.endpoint.local_addr(), &blob_b)
        .await?;
    assert_eq!(a.endpoint.connected_peers(), vec![b.endpoint.local_addr()]);
    assert_eq!(b.endpoint.connected_peers(), vec![a.endpoint.local_addr()]);
    Ok(())
}

#[tokio::test]
async fn a_silent_peer_times_out_instead_of_hanging() -> Result<()> {
    let ca = ClusterCa::generate()?;
    let config = TransportConfig {
        request_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let a = node(&ca.issue("a")?, config)?;
    // A UDP socket that never answers: the handshake can never finish.
    let silent = std::net::UdpSocket::bind(LOOPBACK)?;
    let addr: SocketAddr = silent.local_addr()?;
    let started = std::time::Instant::now();
    let err = a.endpoint.peer(addr).await.expect_err("no answer");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    Ok(())
}

#[tokio::test]
async fn a_chunk_header_too_short_for_its_index_is_a_protocol_error() -> Result<()> {
    let ca = ClusterCa::generate()?;
    // A hostile peer with a valid certificate, speaking raw QUIC: it answers every request
    // with a chunk-data frame whose length (2) cannot even hold the chunk index.
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(ca.issue("liar")?.server_config()?)?;
    let liar = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(std::sync::Arc::new(crypto)),
        LOOPBACK.parse()?,
    )?;
    let liar_addr = liar.local_addr()?;
    tokio::spawn(async move {
        let conn = liar.accept().await.context("endpoint closed")?.await?;
        loop {
            let (mut send, mut recv) = conn.accept_bi().await?;
            recv.read_to_end(256).await?;
            let mut frame = shoal_proto::wire::chunk_data_header(ChunkIndex(0), 0);
            frame[2..6].copy_from_slice(&2u32.to_be_bytes());
            send.write_all(&frame[..8]).await?;
            send.finish()?;
        }
        #[allow(unreachable_code)]
        anyhow::Ok(())
    });

    let b = node(&ca.issue("b")?, TransportConfig::default())?;
    let manifest = Manifest::from_reader(&pseudo_random(4096, 13)[..], 4096)?;
    let peer = b.endpoint.peer(liar_addr).await?;
    let err = peer
        .fetch_chunk(&manifest, ChunkIndex(0), &mut Vec::new())
        .await
        .expect_err("malformed answer");
    assert!(matches!(err, FetchError::Protocol { .. }), "{err}");
    Ok(())
}

async fn wait_for(mut cond: impl FnMut() -> bool) {
    for _ in 0..100 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not met within 2 s");
}
