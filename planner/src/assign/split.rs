//! Edge splitting: how a target that arrives with many others gets sources without
//! turning the swarm into a band (see `split_edges`).

use rand::Rng;

use super::{Assigner, HUNGRY_RETRY, OFFER_SCAN_LIMIT};
use crate::{BlobId, HostId};

impl Assigner {
    /// A new download of `blob` brought edges to split: targets near `near` still short
    /// of K sources (the first few of a swarm, which arrived when there was nobody to
    /// split) try again.
    pub(super) fn top_up_hungry(&mut self, blob: BlobId, near: HostId) {
        let k = self.config.max_sources;
        let (zone, rack) = (self.hosts[&near].zone, self.hosts[&near].rack);
        let short: Vec<HostId> = (self.blobs.get(&blob).into_iter())
            .flat_map(|b| b.hungry.short.nearest(zone, rack))
            .take(OFFER_SCAN_LIMIT)
            .filter(|key| key.host != near && key.sources < k)
            .take(HUNGRY_RETRY)
            .map(|key| key.host)
            .collect();
        for target in short {
            self.top_up(blob, target);
        }
    }

    /// Gives `target` up to `need` sources by splitting edges: a source `s` serving a
    /// download `u` of the same blob that has nothing verified yet serves `target` instead,
    /// and `target` serves `u`. Every host keeps its in- and out-degree, and the graph stays
    /// random. Without it, targets that arrive together take their sources from the only
    /// holders with room left, the latest arrivals, and the swarm becomes a band in arrival
    /// order (each host's sources its few neighbours) that every chunk walks down hop by hop:
    /// seed-example's slowest hosts received at a seventh of their link for half a second.
    /// Only downloads with nothing yet are split, so no running transfer loses a source
    /// with chunks; only partial sources, so nobody loses a complete upstream. Edges into
    /// the target's zone are split for all but its last source (full seed-example: 65% →
    /// 15% of bytes across zones, same makespan). Returns how many sources it gave.
    pub(super) fn split_edges(&mut self, blob: BlobId, target: HostId, need: usize) -> usize {
        let zone = self.hosts[&target].zone;
        let mut given = 0;
        for attempt in 0..need * 8 {
            if given == need {
                break;
            }
            self.stats.candidates_examined += 1;
            // All but the last source from downloads in the target's zone, so a zone's
            // swarm is fed mostly from within, and each target brings one edge from
            // anywhere, so content enters every zone along many paths. After half the
            // attempts, anywhere.
            let local = given + 1 < need && attempt < need * 4;
            let members = &self.blobs[&blob].members;
            let u = if local {
                let v = members.in_zone(zone);
                if v.len() < 2 {
                    continue;
                }
                v[self.rng.random_range(0..v.len())]
            } else {
                if members.len < 2 {
                    break;
                }
                let x = self.rng.random_range(0..members.len);
                members.nth(x).expect("x < len")
            };
            let Some(du) = self.blobs[&blob].downloads.get(&u) else {
                continue;
            };
            if u == target || du.sources.is_empty() {
                continue;
            }
            let s = du.sources[self.rng.random_range(0..du.sources.len())];
            if let Some((rate_st, rate_tu)) = self.can_split(blob, target, u, s) {
                if let Some(d) = self.download_mut(blob, u) {
                    d.sources.retain(|x| *x != s);
                }
                self.release(blob, u, s);
                self.assign(blob, target, s, rate_st);
                self.assign(blob, u, target, rate_tu);
                self.stats.splits += 1;
                given += 1;
            }
        }
        given
    }

    /// Whether the edge `s` → `u` may become `s` → `target` → `u` (see `split_edges`), and
    /// if so the rates `s` → `target` and `target` → `u` would reserve.
    fn can_split(&self, blob: BlobId, target: HostId, u: HostId, s: HostId) -> Option<(u64, u64)> {
        let b = &self.blobs[&blob];
        let (Some(dt), Some(du)) = (b.downloads.get(&target), b.downloads.get(&u)) else {
            return None;
        };
        let holding = |h: HostId| self.hosts[&h].holdings.get(&blob).copied();
        let u_started = holding(u).is_some_and(|h| h.chunks > 0 || h.complete);
        let s_partial = holding(s).is_some_and(|h| !h.complete);
        if u_started
            || !s_partial
            || s == target
            || dt.sources.contains(&s)
            || dt.shuns(s, self.now)
            || du.sources.contains(&target)
            || du.shuns(target, self.now)
            || b.corrupt.contains(&target)
            || b.corrupt.contains(&s)
            || !self.hosts[&s].alive
        {
            return None;
        }
        let t = &self.hosts[&target];
        let rate_tu = self.rate_for(u, target);
        let target_room = t.alive
            && t.serving.len() < self.config.max_uploads
            && t.committed_bps + rate_tu <= t.upload_bps
            && self.blob_share_ok(blob, target, rate_tu);
        let src = &self.hosts[&s];
        let rate_su = src.serving.get(&(blob, u)).map_or(0, |v| v.rate);
        let rate_st = self.rate_for(target, s);
        let (share, used) = self.blob_share(blob, s);
        let source_room = src.committed_bps - rate_su + rate_st <= src.upload_bps
            && (used - rate_su == 0 || used - rate_su + rate_st <= share);
        (target_room && source_room).then_some((rate_st, rate_tu))
    }
}
