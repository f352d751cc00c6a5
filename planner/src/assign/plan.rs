//! The mechanics behind the policy: the availability and hunger indexes, capacity
//! accounting, topping targets up, offering freed sources, and turning changes into commands.

use std::cmp::Reverse;

use rand::Rng;

use super::{
    Assigner, Blob, Command, Download, FULL_SLACK, HolderKey, Holding, HungryKey, OFFER_SCAN_LIMIT,
    Serve, TOP_UP_SCAN, TOP_UP_SCAN_LIMIT,
};
use crate::{BlobId, HostId, ZoneId};

impl Assigner {
    /// Checks the safety invariants (fan-out, upload capacity, no dead or corrupt source,
    /// index consistency). O(state): for tests and the simulator, not the hot path.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (id, h) in self.hosts.iter() {
            if h.serving.len() > self.config.max_uploads {
                return Err(format!("{id} serves {} > F", h.serving.len()));
            }
            let sum: u64 = h.serving.values().map(|v| v.rate).sum();
            // More than its upload only after its capacity fell (`Event::HostCapacity`): it
            // is then full and takes nothing new until the shares fit again.
            let over = sum > h.upload_bps.max(h.committed_before_cut);
            if sum != h.committed_bps || over {
                return Err(format!("{id} committed {sum} of {} bps", h.upload_bps));
            }
            let idle = h.serving.is_empty() && h.holdings.is_empty();
            if !h.alive && !idle {
                return Err(format!("{id} is down but still serves or holds"));
            }
            let full = self.is_full(id);
            for (b, holding) in &h.holdings {
                let corrupt = self.blobs.get(b).is_some_and(|x| x.corrupt.contains(&id));
                let should = h.alive && !full && !corrupt;
                if should != holding.indexed.is_some() {
                    return Err(format!(
                        "{id}'s holding of {b} is {}indexed (alive {}, full {full}, corrupt {corrupt})",
                        if holding.indexed.is_some() {
                            ""
                        } else {
                            "not "
                        },
                        h.alive
                    ));
                }
            }
        }
        self.check_stripes()?;
        for (b, blob) in &self.blobs {
            if self.hungry_blobs.contains(b) == blob.hungry.is_empty() {
                return Err(format!("hungry_blobs out of sync for {b}"));
            }
            let filed: Vec<((ZoneId, usize), HostId)> = (blob.members.by_zone.iter())
                .flat_map(|(z, v)| v.iter().enumerate().map(move |(i, h)| ((*z, i), *h)))
                .collect();
            if blob.members.len != blob.downloads.len()
                || filed.len() != blob.members.len
                || (filed.iter())
                    .any(|(at, h)| blob.downloads.get(h).is_none_or(|d| d.member != *at))
            {
                return Err(format!("members out of sync for {b}"));
            }
            for (t, d) in &blob.downloads {
                let target = &self.hosts[t];
                if !target.alive && (d.sent.is_some() || !d.sources.is_empty()) {
                    return Err(format!("{t} is down but has an order for {b}"));
                }
                if d.sources.len() > self.config.max_sources {
                    return Err(format!("{t} has {} sources > K", d.sources.len()));
                }
                if target.alive
                    && d.retry_at.is_none()
                    && d.sources.is_empty()
                    && d.hungry.is_none()
                {
                    return Err(format!("{t} has no source for {b} and is not hungry"));
                }
                for s in &d.sources {
                    let src = &self.hosts[s];
                    if !src.alive || blob.corrupt.contains(s) || s == t {
                        return Err(format!("{t} pulls {b} from bad source {s}"));
                    }
                    if !src.serving.contains_key(&(*b, *t)) {
                        return Err(format!("{s} does not account serving {t}"));
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) fn download_mut(&mut self, blob: BlobId, host: HostId) -> Option<&mut Download> {
        self.blobs.get_mut(&blob)?.downloads.get_mut(&host)
    }

    /// Unknown hosts count as full: nothing is ever assigned to them. So does a host with
    /// at most 1/[`FULL_SLACK`] of its upload free (the rounding of K shares).
    pub(super) fn is_full(&self, id: HostId) -> bool {
        let Some(h) = self.hosts.get(&id) else {
            return true;
        };
        let spare = h.upload_bps.saturating_sub(h.committed_bps);
        h.serving.len() >= self.config.max_uploads || spare <= h.upload_bps / FULL_SLACK
    }

    /// Upload a source reserves for one download of `target`: the target's downlink split
    /// over K sources and over the downloads it wants at once (they share that downlink).
    /// Capped at the source's whole upload: a source slower than that share can still
    /// serve the target, just not at the share.
    pub(super) fn rate_for(&self, target: HostId, source: HostId) -> u64 {
        let t = &self.hosts[&target];
        let downloads = t.wants.len().max(1) as u64;
        let share = (t.download_bps / (self.config.max_sources as u64 * downloads)).max(1);
        share.min(self.hosts[&source].upload_bps.max(1))
    }

    /// Records what `host` holds of `blob` (`None`: nothing) and re-indexes it.
    pub(super) fn set_holding(&mut self, host: HostId, blob: BlobId, holding: Option<(u32, bool)>) {
        let h = self.hosts.get_mut(&host).expect("known host");
        match holding {
            Some((chunks, complete)) => {
                let e = h.holdings.entry(blob).or_insert(Holding {
                    chunks,
                    complete,
                    indexed: None,
                });
                e.chunks = chunks;
                e.complete = complete;
                self.sync_holder(host, blob);
            }
            None => {
                if let Some(old) = h.holdings.remove(&blob)
                    && let Some(key) = old.indexed
                {
                    let (zone, rack) = (h.zone, h.rack);
                    if let Some(b) = self.blobs.get_mut(&blob) {
                        b.available.remove(zone, rack, &key);
                    }
                }
            }
        }
    }

    /// Puts `host` in `blob`'s index of available sources under its current key, or takes
    /// it out if it is down, full, or corrupt for this blob.
    pub(super) fn sync_holder(&mut self, host: HostId, blob: BlobId) {
        let full = self.is_full(host);
        let b = self.blobs.entry(blob).or_default();
        let Some(h) = self.hosts.get_mut(&host) else {
            return;
        };
        let Some(holding) = h.holdings.get_mut(&blob) else {
            return;
        };
        let want = (h.alive && !full && !b.corrupt.contains(&host)).then_some(HolderKey {
            incomplete: !holding.complete,
            chunks: Reverse(holding.chunks),
            salt: h.salt,
            host,
        });
        if want == holding.indexed {
            return;
        }
        if let Some(old) = holding.indexed.take() {
            b.available.remove(h.zone, h.rack, &old);
        }
        if let Some(key) = want {
            b.available.insert(h.zone, h.rack, key);
        }
        holding.indexed = want;
    }

    pub(super) fn sync_all_holdings(&mut self, host: HostId) {
        let blobs: Vec<BlobId> = self.hosts[&host].holdings.keys().copied().collect();
        for blob in blobs {
            self.sync_holder(host, blob);
        }
    }

    /// Puts a download in its blob's hungry index iff it is alive, not backing off, and
    /// short of K sources.
    pub(super) fn sync_hungry(&mut self, blob: BlobId, target: HostId) {
        let k = self.config.max_sources;
        let h = &self.hosts[&target];
        let (alive, zone, rack) = (h.alive, h.zone, h.rack);
        let Some(b) = self.blobs.get_mut(&blob) else {
            return;
        };
        let Some(d) = b.downloads.get_mut(&target) else {
            return;
        };
        // Short of K, or with no complete source: a download fed only by partial holders can
        // sit in an island of peers that all lack the same chunks, so it stays hungry for a
        // complete holder (see `offer`).
        let upstream = (d.sources.iter()).any(|s| {
            (self.hosts.get(s))
                .and_then(|h| h.holdings.get(&blob))
                .is_some_and(|h| h.complete)
        });
        let short = d.sources.len() < k || (d.stuck && !upstream);
        let want = (alive && d.retry_at.is_none() && short).then_some(HungryKey {
            priority: Reverse(d.priority),
            sources: d.sources.len(),
            seq: d.seq,
            host: target,
        });
        if want == d.hungry {
            return;
        }
        if let Some(old) = d.hungry.take() {
            b.hungry.remove(zone, rack, &old, k);
        }
        if let Some(key) = want {
            b.hungry.insert(zone, rack, key, k);
        }
        d.hungry = want;
        if b.hungry.is_empty() {
            self.hungry_blobs.remove(&blob);
        } else {
            self.hungry_blobs.insert(blob);
        }
    }

    /// Whether `source` can take `target` on for `blob` right now.
    pub(super) fn fits(
        &self,
        blob: &Blob,
        d: &Download,
        target: HostId,
        source: HostId,
        rate: u64,
    ) -> bool {
        let s = &self.hosts[&source];
        source != target
            && s.alive
            && !d.sources.contains(&source)
            && !d.shuns(source, self.now)
            && !blob.corrupt.contains(&source)
            && s.serving.len() < self.config.max_uploads
            && s.committed_bps + rate <= s.upload_bps
    }

    /// Upload `source` may commit to `blob`, and what it has committed to it: its upload
    /// split evenly between the blobs it holds that are in demand (wanted by a hungry
    /// target, or being served), so that the first blob ordered cannot take every slot
    /// while the others wait for it to finish.
    pub(super) fn blob_share(&self, blob: BlobId, source: HostId) -> (u64, u64) {
        let s = &self.hosts[&source];
        let of = |b: BlobId| s.serving.range((b, HostId(0))..=(b, HostId(u32::MAX)));
        let in_demand = (s.holdings.keys())
            .filter(|b| **b == blob || self.hungry_blobs.contains(b) || of(**b).next().is_some())
            .count()
            .max(1) as u64;
        let used = of(blob).map(|(_, v)| v.rate).sum();
        (s.upload_bps / in_demand, used)
    }

    /// Whether `source` may give `blob` another `rate` (always, for its first download).
    pub(super) fn blob_share_ok(&self, blob: BlobId, source: HostId, rate: u64) -> bool {
        let (share, used) = self.blob_share(blob, source);
        used == 0 || used + rate <= share
    }

    pub(super) fn assign(&mut self, blob: BlobId, target: HostId, source: HostId, rate: u64) {
        let was_full = self.is_full(source);
        let s = self.hosts.get_mut(&source).expect("known host");
        s.serving.insert((blob, target), Serve { rate });
        s.committed_bps += rate;
        self.take_slot(blob, target, source);
        let d = self.download_mut(blob, target).expect("download exists");
        d.sources.push(source);
        self.stats.assignments += 1;
        self.dirty.insert((blob, target));
        self.sync_hungry(blob, target);
        if !was_full && self.is_full(source) {
            self.sync_all_holdings(source);
        }
    }

    /// Returns the capacity `source` reserved for `target`; does not touch the download.
    pub(super) fn release(&mut self, blob: BlobId, target: HostId, source: HostId) {
        let was_full = self.is_full(source);
        let s = self.hosts.get_mut(&source).expect("known host");
        if let Some(v) = s.serving.remove(&(blob, target)) {
            s.committed_bps -= v.rate;
            if s.committed_bps <= s.upload_bps {
                s.committed_before_cut = 0;
            }
            self.free_slot(blob, target, source);
        }
        if was_full && !self.is_full(source) {
            self.sync_all_holdings(source);
        }
    }

    /// Takes `source` away from one download, tops the download up, and offers the freed
    /// capacity to other targets.
    pub(super) fn drop_source(&mut self, blob: BlobId, target: HostId, source: HostId) {
        let Some(d) = self.download_mut(blob, target) else {
            return;
        };
        let before = d.sources.len();
        d.sources.retain(|s| *s != source);
        if d.sources.len() == before {
            return;
        }
        self.release(blob, target, source);
        self.dirty.insert((blob, target));
        self.stats.replans += 1;
        self.sync_hungry(blob, target);
        self.top_up(blob, target);
        self.offer_everything(source, blob);
    }

    /// Fills a download up to K sources from the nearest available holders.
    pub(super) fn top_up(&mut self, blob: BlobId, target: HostId) {
        let Some(b) = self.blobs.get(&blob) else {
            return;
        };
        let Some(d) = b.downloads.get(&target) else {
            return;
        };
        let t = &self.hosts[&target];
        if !t.alive || d.retry_at.is_some() || d.sources.len() >= self.config.max_sources {
            return;
        }
        let need = self.config.max_sources - d.sources.len();
        // Complete holders first, nearest first. Partial holders (targets still
        // downloading, most with nothing yet) are drawn at random from the nearest
        // TOP_UP_SCAN that fit: taking them in index order gives every target the same
        // few, the newest once those are full, and the swarm becomes a long chain that
        // each chunk has to walk down hop by hop; a random draw makes it an expander.
        let mut complete: Vec<HostId> = Vec::with_capacity(need);
        let mut partial: Vec<(HostId, u32)> = Vec::new();
        let mut examined = 0;
        for key in b.available.nearest(t.zone, t.rack).take(TOP_UP_SCAN_LIMIT) {
            if complete.len() == need || partial.len() == TOP_UP_SCAN {
                break;
            }
            examined += 1;
            let taken = complete.contains(&key.host) || partial.iter().any(|p| p.0 == key.host);
            let rate = self.rate_for(target, key.host);
            if !taken
                && self.fits(b, d, target, key.host, rate)
                && self.blob_share_ok(blob, key.host, rate)
            {
                if key.incomplete {
                    partial.push((key.host, key.chunks.0));
                } else {
                    complete.push(key.host);
                }
            }
        }
        self.stats.candidates_examined += examined;
        let need = need - complete.len();
        for source in complete {
            let rate = self.rate_for(target, source);
            self.assign(blob, target, source, rate);
        }
        let need = need - self.split_edges(blob, target, need);
        // Weighted by chunks + 1: a holder further along likely has more of what we lack.
        let mut picked = 0;
        while picked < need && !partial.is_empty() {
            let total: u64 = partial.iter().map(|p| u64::from(p.1) + 1).sum();
            let mut x = self.rng.random_range(0..total);
            let mut i = 0;
            while x > u64::from(partial[i].1) {
                x -= u64::from(partial[i].1) + 1;
                i += 1;
            }
            let source = partial.swap_remove(i).0;
            let rate = self.rate_for(target, source);
            let b = &self.blobs[&blob];
            if self.fits(b, &b.downloads[&target], target, source, rate)
                && self.blob_share_ok(blob, source, rate)
            {
                self.assign(blob, target, source, rate);
                picked += 1;
            }
        }
    }

    /// Gives `source`'s spare capacity to hungry targets of `blob`, nearest first.
    pub(super) fn offer(&mut self, source: HostId, blob: BlobId) {
        let Some(b) = self.blobs.get(&blob) else {
            return;
        };
        let s = &self.hosts[&source];
        let indexed = s.holdings.get(&blob).is_some_and(|h| h.indexed.is_some());
        if !indexed {
            return;
        }
        let complete = s.holdings.get(&blob).is_some_and(|h| h.complete);
        let k = self.config.max_sources;
        let mut slots = self.config.max_uploads.saturating_sub(s.serving.len());
        let mut spare = s.upload_bps.saturating_sub(s.committed_bps);
        let mut picked: Vec<(HostId, u64)> = Vec::new();
        let (share, mut used) = self.blob_share(blob, source);
        let mut examined = 0;
        // Downloads short of sources, then (for a complete holder) stuck ones.
        let starved = complete.then(|| b.hungry.starved.nearest(s.zone, s.rack));
        let candidates =
            (b.hungry.short.nearest(s.zone, s.rack)).chain(starved.into_iter().flatten());
        for key in candidates.take(OFFER_SCAN_LIMIT) {
            if slots == 0 {
                break;
            }
            examined += 1;
            let target = key.host;
            let rate = self.rate_for(target, source);
            if rate > spare || picked.iter().any(|(t, _)| *t == target) {
                continue;
            }
            if used > 0 && used + rate > share {
                break;
            }
            let d = &b.downloads[&target];
            // A full download is hungry only for a complete holder (an upstream).
            if d.sources.len() >= k && !complete {
                continue;
            }
            if self.fits(b, d, target, source, rate) {
                picked.push((target, rate));
                slots -= 1;
                spare -= rate;
                used += rate;
            }
        }
        self.stats.candidates_examined += examined;
        let mut freed = Vec::new();
        for (target, rate) in picked {
            let full = self
                .blobs
                .get(&blob)
                .and_then(|b| b.downloads.get(&target))
                .is_some_and(|d| d.sources.len() >= k);
            if full {
                freed.extend(self.make_room(blob, target));
            }
            self.assign(blob, target, source, rate);
        }
        for victim in freed {
            self.offer_everything(victim, blob);
        }
    }

    /// Offers freed capacity for `first`, then for every other blob the source holds that
    /// has hungry targets (walking whichever of the two sets is smaller).
    pub(super) fn offer_everything(&mut self, source: HostId, first: BlobId) {
        if !self.is_up(source) {
            return;
        }
        self.offer(source, first);
        let holdings = &self.hosts[&source].holdings;
        let blobs: Vec<BlobId> = if self.hungry_blobs.len() < holdings.len() {
            (self.hungry_blobs.iter())
                .filter(|b| holdings.contains_key(b))
                .copied()
                .collect()
        } else {
            (holdings.keys())
                .filter(|b| self.hungry_blobs.contains(b))
                .copied()
                .collect()
        };
        for blob in blobs {
            if self.is_full(source) {
                break;
            }
            if blob != first {
                self.offer(source, blob);
            }
        }
    }

    /// The target completed: it becomes a complete holder and its sources are freed.
    pub(super) fn finish_download(&mut self, blob: BlobId, target: HostId) {
        self.stats.completions += 1;
        self.forget_download(blob, target);
    }

    /// Removes a download and frees its sources. Returns whether an order was outstanding.
    pub(super) fn forget_download(&mut self, blob: BlobId, target: HostId) -> Option<bool> {
        let h = self.hosts.get_mut(&target)?;
        let (zone, rack) = (h.zone, h.rack);
        let b = self.blobs.get_mut(&blob)?;
        let d = b.downloads.remove(&target)?;
        if let Some(moved) = b.members.remove(d.member) {
            b.downloads
                .get_mut(&moved)
                .expect("members mirror downloads")
                .member = d.member;
        }
        h.wants.remove(&blob);
        if let Some(key) = d.hungry {
            b.hungry.remove(zone, rack, &key, self.config.max_sources);
            if b.hungry.is_empty() {
                self.hungry_blobs.remove(&blob);
            }
        }
        if let Some(at) = d.retry_at {
            self.retries.remove(&(at, blob, target));
        }
        self.dirty.remove(&(blob, target));
        for s in &d.sources {
            self.release(blob, target, *s);
        }
        for s in &d.sources {
            self.offer_everything(*s, blob);
        }
        Some(d.sent.is_some())
    }

    /// Turns changed source lists into commands, once per download per call (or per batch,
    /// see `begin_batch`). A target that gets its order becomes a source of the blob at
    /// once, holding nothing yet: its peers connect to it now and learn each chunk from its
    /// have-stream as it is verified, instead of waiting for progress reports to reach the
    /// coordinator. This is what lets a swarm relay a chunk within milliseconds of it
    /// leaving the origin.
    pub(super) fn flush(&mut self) {
        self.settle();
        if self.batching {
            return;
        }
        self.send_commands();
    }

    /// A target about to get its first order becomes a holder, which may give others
    /// sources (and change stripes), which may order more targets: settled before any
    /// command goes out, so that each carries its download's final sources and stripes.
    pub(super) fn settle(&mut self) {
        while !self.dirty.is_empty() {
            let mut ordered = Vec::new();
            for (blob, target) in std::mem::take(&mut self.dirty) {
                if self.touched_set.insert((blob, target)) {
                    self.touched.push((blob, target));
                }
                let first = (self.blobs.get(&blob))
                    .and_then(|b| b.downloads.get(&target))
                    .is_some_and(|d| d.sent.is_none() && !d.sources.is_empty());
                if first && self.is_up(target) {
                    ordered.push((blob, target));
                }
            }
            for (blob, target) in ordered {
                if !self.hosts[&target].holdings.contains_key(&blob) {
                    self.set_holding(target, blob, Some((0, false)));
                    self.offer(target, blob);
                }
            }
        }
    }

    /// One command per download changed since the last, but a blob's held ones (see
    /// `intake`).
    fn send_commands(&mut self) {
        // A blob with wants still queued keeps its commands until they are all planned.
        let mut ready = Vec::new();
        for (blob, target) in std::mem::take(&mut self.touched) {
            if self.intake.holds_back(blob) {
                self.intake.hold(blob, target);
            } else {
                ready.push((blob, target));
            }
        }
        ready.splice(0..0, self.intake.release(self.release_slice()));
        for key in &ready {
            self.touched_set.remove(key);
        }
        for (blob, target) in ready {
            if !self.is_up(target) {
                continue;
            }
            let Some(sources) = self.sources(blob, target).map(<[HostId]>::to_vec) else {
                continue;
            };
            let stripes: Vec<(u32, u32)> = (sources.iter())
                .map(|s| self.stripe(blob, target, *s).unwrap_or((0, 1)))
                .collect();
            let d = self.download_mut(blob, target).expect("checked above");
            let command = match &d.sent {
                None if d.sources.is_empty() => continue,
                None => Command::Fetch {
                    host: target,
                    blob,
                    sources: d.sources.clone(),
                },
                Some(sent) if *sent == d.sources && d.sent_stripes == stripes => continue,
                Some(_) => Command::UpdateSources {
                    host: target,
                    blob,
                    sources: d.sources.clone(),
                },
            };
            let stripes_only = d.sent.as_ref() == Some(&d.sources);
            d.sent = Some(d.sources.clone());
            d.sent_stripes = stripes;
            let first = matches!(command, Command::Fetch { .. });
            match command {
                Command::Fetch { .. } => self.stats.orders += 1,
                _ => self.stats.source_updates += 1,
            }
            if stripes_only {
                self.stats.stripe_updates += 1;
            }
            self.commands.push_back(command);
            if first {
                self.progressed(blob, target);
            }
        }
    }

    /// Drops the source of (blob, target) that has verified least, to make room for a
    /// complete holder. Returns it; its freed capacity is the caller's to offer.
    fn make_room(&mut self, blob: BlobId, target: HostId) -> Option<HostId> {
        let d = self.blobs.get(&blob)?.downloads.get(&target)?;
        let victim = (d.sources.iter())
            .copied()
            .min_by_key(|v| (self.hosts[v].holdings.get(&blob)).map_or(0, |h| h.chunks))?;
        if let Some(d) = self.download_mut(blob, target) {
            d.sources.retain(|s| *s != victim);
        }
        self.release(blob, target, victim);
        self.stats.replans += 1;
        Some(victim)
    }

    /// The download made progress: not stuck. Its checks run every `stuck_after` while it
    /// has an order (see `check_stuck`).
    pub(super) fn progressed(&mut self, blob: BlobId, target: HostId) {
        let now = self.now;
        let after = self.config.stuck_after;
        let Some(d) = self.download_mut(blob, target) else {
            return;
        };
        d.progress_at = now;
        let was_stuck = std::mem::replace(&mut d.stuck, false);
        if !d.checking {
            d.checking = true;
            d.mark = (now, d.mark.1);
            self.stuck_checks.insert((now + after, blob, target));
        }
        if was_stuck {
            self.sync_hungry(blob, target);
        }
    }

    /// Whether the download ran below `slow_fraction` of its share of the target's link
    /// since the last check; moves the mark.
    fn slow(&mut self, blob: BlobId, target: HostId) -> bool {
        let now = self.now;
        let fraction = self.config.slow_fraction;
        let chunks = (self.hosts.get(&target))
            .and_then(|h| h.holdings.get(&blob))
            .map_or(0, |h| h.chunks);
        let (share, chunk_bytes) = {
            let t = &self.hosts[&target];
            let b = &self.blobs[&blob];
            (
                t.download_bps as f64 / t.wants.len().max(1) as f64,
                b.size as f64 / f64::from(b.chunk_count.max(1)),
            )
        };
        let Some(d) = self.download_mut(blob, target) else {
            return false;
        };
        let (at, before) = std::mem::replace(&mut d.mark, (now, chunks));
        let secs = now.saturating_since(at).as_secs_f64();
        if fraction <= 0.0 || secs <= 0.0 || chunks < before {
            return false;
        }
        let rate = f64::from(chunks - before) * chunk_bytes / secs;
        rate < fraction * share
    }

    /// Runs every `stuck_after` per download with an order. One with no complete source
    /// that made no progress (stuck: hungry for a complete holder) or ran below
    /// `slow_fraction` of its share of the link (slow) gets a complete holder with room,
    /// which replaces its least advanced partial source.
    pub(super) fn check_stuck(&mut self, blob: BlobId, target: HostId) {
        let now = self.now;
        let after = self.config.stuck_after;
        let Some(d) = (self.blobs.get(&blob)).and_then(|b| b.downloads.get(&target)) else {
            return;
        };
        if d.sent.is_none() {
            if let Some(d) = self.download_mut(blob, target) {
                d.checking = false; // Rescheduled at its next progress.
            }
            return;
        }
        let idle = now.saturating_since(d.progress_at) >= after;
        let upstream = (d.sources.iter()).any(|s| {
            (self.hosts.get(s))
                .and_then(|h| h.holdings.get(&blob))
                .is_some_and(|h| h.complete)
        });
        let slow = self.slow(blob, target);
        if upstream || !(idle || slow) {
            // Check again later: its complete source may go, or it may slow down.
            self.stuck_checks.insert((now + after, blob, target));
            return;
        }
        if idle {
            if let Some(d) = self.download_mut(blob, target) {
                d.stuck = true;
            }
            self.sync_hungry(blob, target);
        }
        // Complete holders with room, nearest first.
        let candidates: Vec<HostId> = {
            let b = &self.blobs[&blob];
            let t = &self.hosts[&target];
            (b.available.nearest_while(t.zone, t.rack, |k| !k.incomplete))
                .map(|k| k.host)
                .take(16)
                .collect()
        };
        self.stats.candidates_examined += candidates.len() as u64;
        for source in candidates {
            let rate = self.rate_for(target, source);
            let b = &self.blobs[&blob];
            if self.fits(b, &b.downloads[&target], target, source, rate)
                && self.blob_share_ok(blob, source, rate)
            {
                let full = b.downloads[&target].sources.len() >= self.config.max_sources;
                let freed = if full {
                    self.make_room(blob, target)
                } else {
                    None
                };
                self.assign(blob, target, source, rate);
                if let Some(victim) = freed {
                    self.offer_everything(victim, blob);
                }
                break;
            }
        }
        self.stuck_checks.insert((now + after, blob, target));
    }

    /// Forgets a download's empty holding when the download stops without a chunk.
    pub(super) fn drop_empty_holding(&mut self, blob: BlobId, host: HostId) {
        let empty = (self.hosts.get(&host))
            .and_then(|h| h.holdings.get(&blob))
            .is_some_and(|h| h.chunks == 0 && !h.complete);
        if empty && self.is_up(host) {
            self.evict(host, blob);
        }
    }
}
