//! The orders out: at most one per (agent, blob), with its kind and what its agent was told,
//! and the order ids.
//!
//! Order ids come from a counter whose ceiling is kept in the database and reserved a block
//! at a time before any id of the block is issued, so ids only grow, across restarts and
//! whatever the wall clock does: an agent still running an order of a previous incarnation
//! never mistakes a new order for a resend of it. A database that never held a ceiling
//! starts above the wall clock in microseconds, the scheme before the counter existed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use shoal_planner::HostId;
use shoal_proto::Digest;
use shoal_proto::pb::v1::FailureReason;

use crate::db::Db;

/// Ids reserved per database write.
const BLOCK: u64 = 1 << 16;

/// What an order asks of its agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderKind {
    /// Fetch the blob from peers: each source with the stripe this download was told.
    Peers {
        sources: BTreeMap<HostId, (u32, u32)>,
    },
    /// Fetch the blob, or the byte range [start, end) of it, from its origin.
    Seed { range: Option<(u64, u64)> },
}

#[derive(Clone, Debug)]
pub struct Order {
    pub id: u64,
    pub kind: OrderKind,
}

#[derive(Debug)]
pub struct Orders {
    db: Arc<Db>,
    out: BTreeMap<(HostId, Digest), Order>,
    next_id: u64,
    /// Ids below this are reserved in the database.
    ceiling: u64,
    /// The last failure reported for (host, blob), for the target's message if the
    /// planner gives up on it.
    failures: BTreeMap<(HostId, Digest), (FailureReason, String)>,
}

impl Orders {
    /// Loads the id counter; `wall` seeds it for a database that never held one.
    pub fn load(db: Arc<Db>, wall: SystemTime) -> Result<Self, crate::db::DbError> {
        let start = match db.order_ceiling()? {
            Some(c) => c,
            None => wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(1, |d| d.as_micros() as u64)
                .max(1),
        };
        Ok(Self {
            db,
            out: BTreeMap::new(),
            next_id: start,
            ceiling: start,
            failures: BTreeMap::new(),
        })
    }

    fn next_id(&mut self) -> u64 {
        if self.next_id >= self.ceiling {
            let ceiling = self.next_id + BLOCK;
            match self.db.set_order_ceiling(ceiling) {
                Ok(()) => self.ceiling = ceiling,
                // Ids stay unique in this run; only a restart could reuse the unreserved
                // ones, so keep going and try again at the next order.
                Err(e) => tracing::error!(error = %e, "reserving order ids failed"),
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Records a new order for (host, blob), replacing any; returns its id.
    pub fn issue(&mut self, host: HostId, blob: Digest, kind: OrderKind) -> u64 {
        let id = self.next_id();
        self.out.insert((host, blob), Order { id, kind });
        id
    }

    /// Records an order from peers for (host, blob). One from peers already out keeps its
    /// id (the agent runs one download per order id: a resend only brings sources);
    /// returns the id.
    pub fn issue_peers(
        &mut self,
        host: HostId,
        blob: Digest,
        sources: BTreeMap<HostId, (u32, u32)>,
    ) -> u64 {
        let kind = OrderKind::Peers { sources };
        match self.out.get_mut(&(host, blob)) {
            Some(o) if matches!(o.kind, OrderKind::Peers { .. }) => {
                o.kind = kind;
                o.id
            }
            _ => self.issue(host, blob, kind),
        }
    }

    pub fn get(&self, host: HostId, blob: Digest) -> Option<&Order> {
        self.out.get(&(host, blob))
    }

    pub fn get_mut(&mut self, host: HostId, blob: Digest) -> Option<&mut Order> {
        self.out.get_mut(&(host, blob))
    }

    /// Whether `id` is the order out for (host, blob): reports of older ones are stale.
    pub fn is_current(&self, host: HostId, blob: Digest, id: u64) -> bool {
        self.get(host, blob).is_some_and(|o| o.id == id)
    }

    /// Whether the order out for (host, blob) is a seed order.
    pub fn is_seed(&self, host: HostId, blob: Digest) -> bool {
        (self.get(host, blob)).is_some_and(|o| matches!(o.kind, OrderKind::Seed { .. }))
    }

    pub fn remove(&mut self, host: HostId, blob: Digest) -> Option<Order> {
        self.out.remove(&(host, blob))
    }

    /// Records why the order for (host, blob) failed.
    pub fn failed(&mut self, host: HostId, blob: Digest, reason: FailureReason, message: String) {
        self.failures.insert((host, blob), (reason, message));
    }

    /// The last failure recorded for (host, blob), forgotten once read.
    pub fn last_failure(&mut self, host: HostId, blob: Digest) -> Option<(FailureReason, String)> {
        self.failures.remove(&(host, blob))
    }

    /// (host, blob) is done with, whichever way: its failures are history.
    pub fn forget_failure(&mut self, host: HostId, blob: Digest) {
        self.failures.remove(&(host, blob));
    }

    /// The blobs `host` has orders for.
    pub fn of_host(&self, host: HostId) -> Vec<Digest> {
        (self.out.range((host, Digest::from_bytes([0; 32]))..))
            .take_while(|((h, _), _)| *h == host)
            .map(|((_, b), _)| *b)
            .collect()
    }

    /// Forgets every order of `host` (its lease expired).
    pub fn drop_host(&mut self, host: HostId) {
        for blob in self.of_host(host) {
            self.out.remove(&(host, blob));
        }
        self.failures.retain(|(h, _), _| *h != host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_grow_across_restarts_whatever_the_wall_clock_says() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.redb");
        let blob = Digest::of(b"b");
        let late = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(2_000_000_000);
        let first = {
            let db = Arc::new(Db::open(&path).expect("db"));
            let mut orders = Orders::load(db, late).expect("load");
            let a = orders.issue(HostId(0), blob, OrderKind::Seed { range: None });
            let b = orders.issue(HostId(1), blob, OrderKind::Seed { range: None });
            assert!(b > a);
            assert!(
                a >= 2_000_000_000 * 1_000_000,
                "a fresh database starts at the clock"
            );
            b
        };
        // The clock stepped back by years: ids still grow.
        let db = Arc::new(Db::open(&path).expect("db"));
        let mut orders = Orders::load(db, SystemTime::UNIX_EPOCH).expect("load");
        let next = orders.issue(HostId(0), blob, OrderKind::Seed { range: None });
        assert!(next > first, "{next} after {first}");
        assert!(orders.is_current(HostId(0), blob, next));
        assert!(!orders.is_current(HostId(0), blob, first));
        assert_eq!(orders.of_host(HostId(0)), vec![blob]);
        orders.drop_host(HostId(0));
        assert!(orders.get(HostId(0), blob).is_none());
    }
}
