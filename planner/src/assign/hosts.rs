//! A host's life in the assigner: it comes up, learns what its links carry, renews its lease,
//! and goes down (crashed, left, or its lease ran out).

use rand::Rng;

use super::{Assigner, Host};
use crate::{BlobId, HostId, RackId, Time, ZoneId};

impl Assigner {
    pub(super) fn host_capacity(&mut self, id: HostId, up: u64, down: u64) {
        let was_full = self.is_full(id);
        let Some(h) = self.hosts.get_mut(&id).filter(|h| h.alive) else {
            return;
        };
        h.upload_bps = up.max(1);
        h.download_bps = down.max(1);
        h.committed_before_cut = if h.committed_bps > h.upload_bps {
            h.committed_bps.max(h.committed_before_cut)
        } else {
            0
        };
        if was_full != self.is_full(id) {
            self.sync_all_holdings(id);
        }
    }

    pub(super) fn host_up(
        &mut self,
        now: Time,
        id: HostId,
        zone: ZoneId,
        rack: RackId,
        up: u64,
        down: u64,
    ) {
        self.host_down(id);
        let salt = self.rng.random();
        let expiry = now + self.config.lease;
        let host = self.hosts.get_or_insert_with(id, Host::unknown);
        host.zone = zone;
        host.rack = rack;
        host.upload_bps = up;
        host.download_bps = down;
        host.salt = salt;
        host.alive = true;
        host.lease_expiry = expiry;
        let wants: Vec<BlobId> = host.wants.iter().copied().collect();
        self.leases.insert((expiry, id));
        for blob in wants {
            self.sync_hungry(blob, id);
            self.top_up(blob, id);
        }
    }

    pub(super) fn renew(&mut self, now: Time, id: HostId) {
        let lease = self.config.lease;
        if let Some(h) = self.hosts.get_mut(&id).filter(|h| h.alive) {
            self.leases.remove(&(h.lease_expiry, id));
            h.lease_expiry = now + lease;
            self.leases.insert((h.lease_expiry, id));
        }
    }

    pub(super) fn expire_leases(&mut self, now: Time) {
        while let Some(&(at, host)) = self.leases.first() {
            if at > now {
                break;
            }
            self.stats.lease_expiries += 1;
            self.host_down(host);
        }
    }

    pub(super) fn host_down(&mut self, id: HostId) {
        let Some(h) = self.hosts.get_mut(&id).filter(|h| h.alive) else {
            return;
        };
        h.alive = false;
        self.leases.remove(&(h.lease_expiry, id));
        self.stats.host_downs += 1;
        let h = self.hosts.get_mut(&id).expect("checked above");
        let serving = std::mem::take(&mut h.serving);
        h.stripes.clear();
        h.committed_bps = 0;
        let holdings: Vec<BlobId> = h.holdings.keys().copied().collect();
        let wants: Vec<BlobId> = h.wants.iter().copied().collect();
        for blob in holdings {
            self.set_holding(id, blob, None);
        }
        // Its own downloads: release their sources; the want stays for when it returns.
        let mut freed = Vec::new();
        for blob in wants {
            let Some(d) = self.download_mut(blob, id) else {
                continue;
            };
            d.sent = None;
            for s in std::mem::take(&mut d.sources) {
                self.release(blob, id, s);
                freed.push((s, blob));
            }
            self.sync_hungry(blob, id);
        }
        // Its downloaders: drop it and top them up.
        for (blob, target) in serving.into_keys() {
            if let Some(d) = self.download_mut(blob, target) {
                d.sources.retain(|s| *s != id);
                self.dirty.insert((blob, target));
                self.stats.replans += 1;
                self.sync_hungry(blob, target);
                self.top_up(blob, target);
            }
        }
        for (source, blob) in freed {
            self.offer_everything(source, blob);
        }
    }
}
