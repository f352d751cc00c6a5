//! The orders out: at most one per (agent, blob), with its kind and what its agent was told,
//! and the order ids.
//!
//! Order ids come from a counter whose ceiling is kept in the database and reserved a block
//! at a time before any id of the block is issued, so ids only grow, across restarts and
//! whatever the wall clock does: an agent still running an order of a previous incarnation
//! never mistakes a new order for a resend of it. A database that never held a ceiling
//! starts above the wall clock in microseconds, the scheme before the counter existed.
//!
//! The first block is reserved at load, before anything is served; the next one is queued
//! for the writer when half of the current one is used, and its ids are issued once the
//! writer has stored it, so issuing an order never waits on the disk. Only a disk more than
//! half a block (32,768 orders) behind makes ids go out unreserved (logged): unique in this
//! run, and covered as soon as the pending reservation lands.

use std::collections::BTreeMap;
use std::time::SystemTime;

use shoal_planner::HostId;
use shoal_proto::Digest;
use shoal_proto::pb::v1::FailureReason;

use crate::db::{Db, Write};
use crate::writer::{Ticket, Writer};

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
    /// It began as a target of a streamed seed, under a provisional manifest: every
    /// delivery carries the chunk table (the agent may be running it already, and learns
    /// the digests it still lacks from a resend's table).
    pub streamed: bool,
}

#[derive(Debug)]
pub struct Orders {
    writer: Writer,
    out: BTreeMap<(HostId, Digest), Order>,
    next_id: u64,
    /// Ids below this are reserved in the database.
    ceiling: u64,
    /// The next reservation, queued for the writer: its ceiling and whether it is stored.
    reserving: Option<(u64, Ticket)>,
    /// The last failure reported for (host, blob), for the target's message if the
    /// planner gives up on it.
    failures: BTreeMap<(HostId, Digest), (FailureReason, String)>,
}

impl Orders {
    /// Loads the id counter and reserves its first block (a write, before the writer owns
    /// the database); `wall` seeds it for a database that never held one.
    pub fn load(db: &Db, writer: Writer, wall: SystemTime) -> Result<Self, crate::db::DbError> {
        let start = match db.order_ceiling()? {
            Some(c) => c,
            None => wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(1, |d| d.as_micros() as u64)
                .max(1),
        };
        let ceiling = start + BLOCK;
        db.apply(&[Write::OrderCeiling(ceiling)])?;
        Ok(Self {
            writer,
            out: BTreeMap::new(),
            next_id: start,
            ceiling,
            reserving: None,
            failures: BTreeMap::new(),
        })
    }

    fn next_id(&mut self) -> u64 {
        if let Some((ceiling, ticket)) = &mut self.reserving {
            match ticket.poll() {
                None => {}
                Some(Ok(())) => {
                    self.ceiling = self.ceiling.max(*ceiling);
                    self.reserving = None;
                }
                // Logged by the writer; asked again below.
                Some(Err(_)) => self.reserving = None,
            }
        }
        if self.reserving.is_none() && self.ceiling.saturating_sub(self.next_id) <= BLOCK / 2 {
            let ceiling = self.ceiling.max(self.next_id) + BLOCK;
            let ticket = self.writer.write_ticket(Write::OrderCeiling(ceiling), None);
            self.reserving = Some((ceiling, ticket));
        }
        if self.next_id == self.ceiling {
            // Unique in this run; only a restart before a reservation lands could reuse
            // these. Logged once, at the first.
            tracing::warn!(
                id = self.next_id,
                ceiling = self.ceiling,
                "issuing order ids not yet reserved on disk: the state database is behind"
            );
        }
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Records a new order for (host, blob), replacing any; returns its id.
    pub fn issue(&mut self, host: HostId, blob: Digest, kind: OrderKind) -> u64 {
        self.record(host, blob, kind, false)
    }

    /// Records an order from peers for a target of a streamed seed (see [`Order::streamed`]).
    pub fn issue_streamed(
        &mut self,
        host: HostId,
        blob: Digest,
        sources: BTreeMap<HostId, (u32, u32)>,
    ) -> u64 {
        self.record(host, blob, OrderKind::Peers { sources }, true)
    }

    fn record(&mut self, host: HostId, blob: Digest, kind: OrderKind, streamed: bool) -> u64 {
        let id = self.next_id();
        let order = Order { id, kind, streamed };
        self.out.insert((host, blob), order);
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
        let load = |wall| {
            let db = std::sync::Arc::new(Db::open(&path).expect("db"));
            let (writer, stopped) = Writer::spawn(db.clone()).expect("writer");
            let orders = Orders::load(&db, writer, wall).expect("load");
            (orders, stopped)
        };
        let (first, last) = {
            let (mut orders, stopped) = load(late);
            let a = orders.issue(HostId(0), blob, OrderKind::Seed { range: None });
            let b = orders.issue(HostId(1), blob, OrderKind::Seed { range: None });
            assert!(b > a);
            assert!(
                a >= 2_000_000_000 * 1_000_000,
                "a fresh database starts at the clock"
            );
            // Past half the block: the next one is reserved by the writer, and its ids are
            // issued once it is stored.
            let mut last = b;
            for host in 0..BLOCK {
                last = orders.issue(HostId(host as u32), blob, OrderKind::Seed { range: None });
            }
            assert!(last >= a + BLOCK, "{last} is in the second block");
            drop(orders);
            stopped
                .wait_blocking()
                .expect("the writer stored everything");
            (b, last)
        };
        // The clock stepped back by years: ids still grow.
        let (mut orders, _stopped) = load(SystemTime::UNIX_EPOCH);
        let next = orders.issue(HostId(0), blob, OrderKind::Seed { range: None });
        assert!(next > first, "{next} after {first}");
        assert!(
            next > last,
            "{next} after {last}: the block the writer reserved holds"
        );
        assert!(orders.is_current(HostId(0), blob, next));
        assert!(!orders.is_current(HostId(0), blob, first));
        assert_eq!(orders.of_host(HostId(0)), vec![blob]);
        orders.drop_host(HostId(0));
        assert!(orders.get(HostId(0), blob).is_none());
    }
}
