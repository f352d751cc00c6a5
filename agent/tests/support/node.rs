//! A QUIC endpoint with its own store in a temporary directory, for transport tests.
// Each test file includes this module and uses part of it.
#![allow(dead_code)]

use anyhow::Result;
use shoal_agent::store::{Store, StoreConfig};
use shoal_agent::transport::tls::Identity;
use shoal_agent::transport::{ChunkEndpoint, TransportConfig};
use shoal_proto::Manifest;

pub struct Node {
    pub endpoint: ChunkEndpoint,
    _dir: tempfile::TempDir,
}

/// An endpoint on a loopback port serving a fresh store.
pub fn node(identity: &Identity, config: TransportConfig) -> Result<Node> {
    node_with_quota(identity, config, 1 << 30)
}

/// [`node`] with a store that may hold `quota_bytes`.
pub fn node_with_quota(
    identity: &Identity,
    config: TransportConfig,
    quota_bytes: u64,
) -> Result<Node> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(StoreConfig {
        root: dir.path().to_path_buf(),
        quota_bytes,
    })?;
    let endpoint = ChunkEndpoint::bind("127.0.0.1:0".parse()?, identity, store, config)?;
    Ok(Node {
        endpoint,
        _dir: dir,
    })
}

/// `len` bytes that differ per `seed`.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Puts a whole blob into a node's store, as `push` would.
pub fn seed(node: &Node, data: &[u8], chunk_size: u32) -> Result<Manifest> {
    let manifest = Manifest::from_reader(data, chunk_size)?;
    let store = node.endpoint.store();
    store.insert_manifest(&manifest)?;
    for i in manifest.chunk_indices() {
        let r = manifest.chunk_range(i)?;
        store.put_chunk(
            &manifest.digest(),
            i,
            &data[r.start as usize..r.end as usize],
        )?;
    }
    Ok(manifest)
}
