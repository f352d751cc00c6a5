//! The agents' downloads: the real `ChunkPicker` per download, sources as flows, verify and
//! store, have-announcements, stall detection, and the random mesh's tracker.

use super::*;

impl Sim<'_> {
    // ---- random mesh ----

    /// Asks the "tracker" for 5–10 random live members of the swarm and connects both ways.
    pub(super) fn mesh_announce(&mut self, h: u32, b: u32) {
        let candidates: Vec<u32> = (self.swarm[b as usize].iter())
            .copied()
            .filter(|&p| p != h && self.hosts[p as usize].alive)
            .filter(|p| {
                !self.hosts[h as usize].downloads[&b].sources.contains_key(p)
                    && !self.hosts[h as usize].downloads[&b].banned.contains(p)
            })
            .collect();
        let k = self.rng.random_range(5..=10usize).min(candidates.len());
        let picked = rand::seq::index::sample(&mut self.rng, candidates.len(), k);
        let mut peers: Vec<u32> = picked.iter().map(|i| candidates[i]).collect();
        peers.sort_unstable();
        for p in peers {
            self.add_source(h, b, p, None);
            let reverse = (self.hosts[p as usize].downloads.get(&b))
                .is_some_and(|d| !d.sources.contains_key(&h) && !d.banned.contains(&h));
            if reverse {
                self.add_source(p, b, h, None);
                self.refill(p, b);
            }
        }
        self.refill(h, b);
    }

    // ---- the agent's downloads ----

    /// Starts a download of `b` on `h` unless the store has it complete. Returns whether a
    /// download now runs.
    pub(super) fn start_download(&mut self, h: u32, b: u32) -> bool {
        // Ranges it seeded go into the store first (their part files wait for this order).
        self.import_parts(h, b);
        let n = self.spec.chunk_count(b);
        let seed = mix(self.spec.seed, (u64::from(h) << 32) | u64::from(b));
        let host = &mut self.hosts[h as usize];
        if host.downloads.contains_key(&b) {
            return true;
        }
        let have = host.store.entry(b).or_insert_with(|| ChunkSet::empty(n));
        if have.is_full() {
            return false;
        }
        let picker = ChunkPicker::new(
            have.clone(),
            mix(seed, self.out.events),
            self.picker.clone(),
        );
        host.downloads.insert(
            b,
            Dl {
                picker,
                sources: BTreeMap::new(),
                banned: BTreeSet::new(),
                reported: have.count(),
            },
        );
        true
    }

    pub(super) fn rtt(&self, a: u32, b: u32) -> Duration {
        let (x, y) = (&self.hosts[a as usize], &self.hosts[b as usize]);
        let p = &self.spec.params;
        if x.zone != y.zone {
            p.rtt_cross_zone
        } else if x.rack != y.rack {
            p.rtt_zone
        } else {
            p.rtt_rack
        }
    }

    pub(super) fn add_source(&mut self, h: u32, b: u32, s: u32, stripe: Option<(u32, u32)>) {
        if s == h {
            return;
        }
        let Some(d) = self.hosts[h as usize].downloads.get_mut(&b) else {
            return;
        };
        if d.banned.contains(&s) {
            return;
        }
        if d.sources.contains_key(&s) {
            // Known source: only its stripe may have changed.
            if let Some((stripe, stripes)) = stripe {
                d.picker.set_stripe(HostId(s), stripe, stripes);
            }
            return;
        }
        let n = self.spec.chunk_count(b);
        let has = (self.hosts[s as usize].store.get(&b))
            .filter(|_| self.hosts[s as usize].alive)
            .cloned()
            .unwrap_or_else(|| ChunkSet::empty(n));
        let id = self.new_flow(Flow {
            src: s,
            dst: h,
            blob: b,
            rtt: self.rtt(s, h),
            queue: VecDeque::new(),
            head_left: 0.0,
            last_progress: self.now,
            stall_reported: false,
            seed: false,
        });
        let d = self.hosts[h as usize]
            .downloads
            .get_mut(&b)
            .expect("checked");
        d.sources.insert(s, id);
        d.picker.add_source(HostId(s), has);
        if let Some((stripe, stripes)) = stripe {
            d.picker.set_stripe(HostId(s), stripe, stripes);
        }
    }

    /// Adds a flow served by its source; returns its id.
    pub(super) fn new_flow(&mut self, flow: Flow) -> usize {
        let src = flow.src;
        let id = match self.free_flows.pop() {
            Some(id) => {
                self.flows[id] = Some(flow);
                id
            }
            None => {
                self.flows.push(Some(flow));
                self.flows.len() - 1
            }
        };
        self.hosts[src as usize].out.push(id);
        id
    }

    pub(super) fn remove_flow(&mut self, id: usize) {
        if let Some(f) = self.flows[id].take() {
            let out = &mut self.hosts[f.src as usize].out;
            if let Some(pos) = out.iter().position(|&x| x == id) {
                out.swap_remove(pos);
            }
            self.free_flows.push(id);
        }
    }

    pub(super) fn remove_source(&mut self, h: u32, b: u32, s: u32) {
        let Some(d) = self.hosts[h as usize].downloads.get_mut(&b) else {
            return;
        };
        let Some(id) = d.sources.remove(&s) else {
            return;
        };
        d.picker.remove_source(HostId(s));
        self.remove_flow(id);
    }

    pub(super) fn drop_download(&mut self, h: u32, b: u32) {
        let Some(d) = self.hosts[h as usize].downloads.remove(&b) else {
            return;
        };
        self.out.duplicate_requests += d.picker.stats().duplicate_requests;
        self.out.wasted_chunks += d.picker.stats().wasted_chunks;
        for &id in d.sources.values() {
            self.remove_flow(id);
        }
    }

    /// Hands out requests up to each source's window.
    pub(super) fn refill(&mut self, h: u32, b: u32) {
        self.refill_from(h, b, None);
    }

    /// Hands out requests up to the window of `only` (every source if `None`).
    pub(super) fn refill_from(&mut self, h: u32, b: u32, only: Option<u32>) {
        let now = self.now;
        let spec = self.spec;
        let Some(d) = self.hosts[h as usize].downloads.get_mut(&b) else {
            return;
        };
        for (&s, &id) in &d.sources {
            if only.is_some_and(|o| o != s) {
                continue;
            }
            let Some(f) = self.flows[id].as_mut() else {
                continue;
            };
            while let Some(i) = d.picker.next_request(now, HostId(s)) {
                if f.queue.is_empty() {
                    f.head_left = spec.chunk_bytes(b, i);
                    f.last_progress = now;
                }
                f.queue.push_back((i, now + f.rtt));
            }
        }
    }

    /// A chunk finished arriving over `flow`: verify, store, announce, continue.
    pub(super) fn chunk_arrived(&mut self, id: usize, i: ChunkIndex) {
        let Some(f) = self.flows[id].as_ref() else {
            return;
        };
        let (s, h, b) = (f.src, f.dst, f.blob);
        if f.seed {
            self.seed_chunk_arrived(h, b);
            return;
        }
        let now = self.now;
        let bytes = self.spec.chunk_bytes(b, i);
        let corrupt = self.hosts[s as usize].corrupt;
        let Some(d) = self.hosts[h as usize].downloads.get_mut(&b) else {
            return;
        };
        if corrupt {
            // The digest does not match the manifest: drop it, never use the source again.
            self.out.rejected_chunks += 1;
            d.picker.on_chunk_failed(now, HostId(s), i);
            d.banned.insert(s);
            self.remove_source(h, b, s);
            match self.strategy {
                Strategy::Shoal => self.send(
                    h,
                    Event::SourceCorrupt {
                        host: HostId(h),
                        blob: blob_id(b),
                        source: HostId(s),
                    },
                ),
                Strategy::RandomMesh => {
                    if self.hosts[h as usize].downloads[&b].sources.len() < 5 {
                        self.mesh_announce(h, b);
                    }
                }
                Strategy::SingleOrigin => {}
            }
            self.refill(h, b);
            return;
        }
        let others = d.picker.on_chunk_done(now, HostId(s), i, bytes as u64);
        for o in others {
            if let Some(&oid) = d.sources.get(&o.0)
                && let Some(of) = self.flows[oid].as_mut()
                && let Some(pos) = of.queue.iter().position(|(c, _)| *c == i)
            {
                of.queue.remove(pos);
                if pos == 0
                    && let Some(&(next, _)) = of.queue.front()
                {
                    of.head_left = self.spec.chunk_bytes(b, next);
                }
            }
        }
        let complete = d.picker.is_complete();
        self.store(h, b, i, s);
        if complete {
            self.finish_download(h, b);
        } else {
            self.refill(h, b);
        }
    }

    /// Stores a verified chunk and tells the host's downloaders of `b` that it has it.
    pub(super) fn store(&mut self, h: u32, b: u32, i: ChunkIndex, from: u32) {
        if self.hosts[from as usize].corrupt {
            self.out.stored_corrupt += 1;
            self.violation(format!(
                "host{h} stored chunk {} of blob {b} from a corrupt source",
                i.0
            ));
        }
        let n = self.spec.chunk_count(b);
        let host = &mut self.hosts[h as usize];
        let have = host.store.entry(b).or_insert_with(|| ChunkSet::empty(n));
        if !have.insert(i) {
            return;
        }
        let downstream: Vec<u32> = (host.out.iter())
            .filter_map(|&id| self.flows[id].as_ref())
            .filter(|f| f.blob == b)
            .map(|f| f.dst)
            .collect();
        for t in downstream {
            if let Some(d) = self.hosts[t as usize].downloads.get_mut(&b) {
                d.picker.source_have(HostId(h), [i]);
            }
            // Only what `h` offers changed for `t`.
            self.refill_from(t, b, Some(h));
        }
    }

    pub(super) fn finish_download(&mut self, h: u32, b: u32) {
        self.drop_download(h, b);
        self.blob_complete(h, b);
        if self.strategy == Strategy::Shoal {
            self.send(
                h,
                Event::Done {
                    host: HostId(h),
                    blob: blob_id(b),
                },
            );
        }
    }

    /// `h` holds `b` whole: one want less, and the host is finished when none is left.
    pub(super) fn blob_complete(&mut self, h: u32, b: u32) {
        let host = &mut self.hosts[h as usize];
        host.pending.remove(&b);
        if host.pending.is_empty() && host.finished_at.is_none() {
            host.finished_at = Some(self.now);
            self.unfinished -= 1;
        }
    }

    pub(super) fn stall_check(&mut self) {
        let now = self.now;
        let timeout = self.spec.params.stall_timeout;
        let mut stalled = Vec::new();
        for f in self.flows.iter_mut().flatten().filter(|f| !f.seed) {
            let waiting = f.queue.front().is_some_and(|(_, ready)| *ready <= now);
            if waiting && !f.stall_reported && now.saturating_since(f.last_progress) >= timeout {
                f.stall_reported = true;
                stalled.push((f.dst, f.blob, f.src));
            }
        }
        for (h, b, s) in stalled {
            if !self.hosts[h as usize].alive {
                continue;
            }
            self.remove_source(h, b, s);
            match self.strategy {
                Strategy::Shoal => self.send(
                    h,
                    Event::SourceStalled {
                        host: HostId(h),
                        blob: blob_id(b),
                        source: HostId(s),
                    },
                ),
                Strategy::RandomMesh => {
                    if let Some(d) = self.hosts[h as usize].downloads.get_mut(&b) {
                        d.banned.insert(s);
                        if d.sources.len() < 5 {
                            self.mesh_announce(h, b);
                        }
                    }
                }
                Strategy::SingleOrigin => {}
            }
            self.refill(h, b);
        }
    }
}
