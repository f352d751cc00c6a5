//! Peers are the agents the coordinator names: a certificate names its agent, a downloader
//! takes chunks only from the agent it was sent to, and a revoked agent is refused both ways.
//! Real QUIC endpoints on loopback with real certificates from one cluster CA.

use anyhow::Result;
use shoal_agent::transport::tls::ClusterCa;
use shoal_agent::transport::{TransportConfig, TransportError};
use shoal_proto::ChunkIndex;

#[path = "support/node.rs"]
mod support;

use support::{node, pseudo_random, seed};

#[tokio::test]
async fn a_peer_is_the_agent_its_certificate_names() -> Result<()> {
    let ca = ClusterCa::generate()?;
    let a = node(&ca.issue("agent-a")?, TransportConfig::default())?;
    let b = node(&ca.issue("agent-b")?, TransportConfig::default())?;
    let addr = a.endpoint.local_addr();

    let peer = b.endpoint.peer_named(addr, "agent-a").await?;
    assert_eq!(peer.agent_id().as_deref(), Some("agent-a"));
    // The coordinator said another agent is at that address: whoever answers there is not it.
    let err = b
        .endpoint
        .peer_named(addr, "agent-c")
        .await
        .expect_err("another agent at the address");
    assert!(
        matches!(&err, TransportError::WrongPeer { expected, found, .. }
            if expected == "agent-c" && found == "agent-a"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn a_revoked_agent_is_refused_serving_and_dialling() -> Result<()> {
    let ca = ClusterCa::generate()?;
    let a = node(&ca.issue("agent-a")?, TransportConfig::default())?;
    let b = node(&ca.issue("agent-b")?, TransportConfig::default())?;
    let data = pseudo_random(4 * 4096, 5);
    let manifest = seed(&a, &data, 4096)?;
    b.endpoint.store().insert_manifest(&manifest)?;

    // Before: b fetches from a.
    let peer = b.endpoint.peer(a.endpoint.local_addr()).await?;
    let mut buf = Vec::new();
    peer.fetch_chunk(&manifest, ChunkIndex(0), &mut buf).await?;

    // a is told b is revoked: b's open connection is closed, and so is any new one.
    a.endpoint.revoke(&["agent-b".to_string()], false);
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), peer.closed()).await;
    assert!(
        closed.is_ok(),
        "b's connection stayed open after revocation"
    );
    let again = match b.endpoint.peer(a.endpoint.local_addr()).await {
        Ok(p) => p
            .fetch_chunk(&manifest, ChunkIndex(1), &mut buf)
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(again, "a revoked agent was served");
    assert!(
        !b.endpoint
            .store()
            .has_chunk(&manifest.digest(), ChunkIndex(1))
    );
    assert_eq!(a.endpoint.serve_stats().chunks_served, 1);

    // a does not dial b either.
    let err = a
        .endpoint
        .peer(b.endpoint.local_addr())
        .await
        .expect_err("dialled a revoked agent");
    assert!(matches!(err, TransportError::Revoked { .. }), "{err}");

    // A full list replaces the old one: b is accepted again once no longer listed.
    a.endpoint.revoke(&[], true);
    let peer = b.endpoint.peer(a.endpoint.local_addr()).await?;
    peer.fetch_chunk(&manifest, ChunkIndex(2), &mut buf).await?;
    Ok(())
}

#[tokio::test]
async fn a_new_identity_is_what_peers_see_next() -> Result<()> {
    let ca = ClusterCa::generate()?;
    let a = node(&ca.issue("agent-a")?, TransportConfig::default())?;
    let b = node(&ca.issue("agent-b")?, TransportConfig::default())?;
    let addr = a.endpoint.local_addr();
    let old = b.endpoint.peer_named(addr, "agent-a").await?;
    // Once a holds the connection too (its side of the handshake ends after b's).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !a
        .endpoint
        .connected_peers()
        .contains(&b.endpoint.local_addr())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "a never held b's connection"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // a re-joined under a new id and got a certificate for it.
    a.endpoint.set_identity(&ca.issue("agent-a2")?, true)?;
    // b's pooled connection was made under the old identity: it is closed, and a new dial
    // meets the new one.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), old.closed()).await;
    assert!(closed.is_ok(), "the old identity's connection stayed open");
    let peer = b.endpoint.peer_named(addr, "agent-a2").await?;
    assert_eq!(peer.agent_id().as_deref(), Some("agent-a2"));
    Ok(())
}
