//! Per-peer limits on the serving side, so that one peer cannot take what all share: at most
//! `max_connections_per_peer` connections and `max_served_per_peer` requests served at once
//! per peer, and `max_connections` connections in all. A peer is its certificate (the cluster CA issues one per agent join), or its
//! address if it showed none.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use shoal_proto::Digest;

/// Who a connection's peer is.
pub(super) type PeerKey = [u8; 32];

/// The key of `conn`'s peer: SHA-256 of its leaf certificate, else of its address.
pub(super) fn peer_key(conn: &quinn::Connection) -> PeerKey {
    super::leaf_certificate(conn)
        .map(|c| Digest::of(c.as_ref()))
        .unwrap_or_else(|| Digest::of(conn.remote_address().to_string().as_bytes()))
        .as_bytes()
        .to_owned()
}

#[derive(Debug, Default)]
struct Use {
    connections: usize,
    serving: usize,
}

/// What each peer holds now.
#[derive(Debug, Default)]
pub(super) struct Peers {
    by_key: Mutex<HashMap<PeerKey, Use>>,
}

/// The key under which all connections are counted together.
const ALL: PeerKey = [0; 32];

/// One of a peer's connections, or one request served to it; released on drop.
#[derive(Debug)]
pub(super) struct Slot {
    peers: Arc<Peers>,
    key: PeerKey,
    connection: bool,
}

impl Peers {
    /// A connection slot for `key`, if it has fewer than `max` connections and all peers
    /// fewer than `max_all`; both released on drop.
    pub(super) fn connect(
        self: &Arc<Self>,
        key: PeerKey,
        max: usize,
        max_all: usize,
    ) -> Option<(Slot, Slot)> {
        let all = self.take(ALL, max_all, true)?;
        let own = self.take(key, max, true)?;
        Some((all, own))
    }

    /// A serving slot for `key`, if fewer than `max` of its requests are being served.
    pub(super) fn serve(self: &Arc<Self>, key: PeerKey, max: usize) -> Option<Slot> {
        self.take(key, max, false)
    }

    fn take(self: &Arc<Self>, key: PeerKey, max: usize, connection: bool) -> Option<Slot> {
        let mut by_key = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
        let used = by_key.entry(key).or_default();
        let count = if connection {
            &mut used.connections
        } else {
            &mut used.serving
        };
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Slot {
            peers: self.clone(),
            key,
            connection,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_key = self.peers.by_key.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(used) = by_key.get_mut(&self.key) {
            if self.connection {
                used.connections = used.connections.saturating_sub(1);
            } else {
                used.serving = used.serving.saturating_sub(1);
            }
            if used.connections == 0 && used.serving == 0 {
                by_key.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_peer_and_released_on_drop() {
        let peers = Arc::new(Peers::default());
        let (a, b) = ([1; 32], [2; 32]);
        let first = peers.serve(a, 2).expect("first");
        let second = peers.serve(a, 2).expect("second");
        assert!(peers.serve(a, 2).is_none(), "a third for the same peer");
        assert!(peers.serve(b, 2).is_some(), "another peer is not affected");
        let conn = peers.connect(a, 1, 2).expect("connections count apart");
        assert!(
            peers.connect(a, 1, 2).is_none(),
            "a second for the same peer"
        );
        let other = peers.connect(b, 1, 2).expect("another peer's");
        assert!(peers.connect([3; 32], 1, 2).is_none(), "a third in all");
        drop(other);
        drop(first);
        assert!(peers.serve(a, 2).is_some(), "a released slot is free again");
        drop((second, conn));
        assert!(peers.by_key.lock().expect("lock").is_empty());
    }
}
