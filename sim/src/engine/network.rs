//! The fluid network: max-min sharing of every NIC between the flows with requests ready.

use super::*;

impl Sim<'_> {
    // ---- the network ----

    /// One step of the fluid model; returns the chunks that completed, in flow order.
    pub(super) fn step(&mut self) -> Vec<(usize, ChunkIndex)> {
        let now = self.now;
        let dt = self.tick().as_secs_f64();
        self.active.clear();
        self.demand.clear();
        for (id, f) in self.flows.iter().enumerate() {
            let Some(f) = f else { continue };
            if !self.hosts[f.src as usize].alive || !self.hosts[f.dst as usize].alive {
                continue;
            }
            let mut bytes = 0.0;
            let mut first = true;
            for &(i, ready) in &f.queue {
                if ready > now {
                    break;
                }
                bytes += if first {
                    f.head_left
                } else {
                    self.spec.chunk_bytes(f.blob, i)
                };
                first = false;
            }
            if bytes > 0.0 {
                self.active.push(id);
                self.demand.push(bytes / dt);
            }
        }
        let n = self.active.len();
        if n == 0 {
            return Vec::new();
        }
        let src: Vec<u32> = (self.active.iter())
            .map(|&id| self.flows[id].as_ref().map_or(0, |f| f.src))
            .collect();
        let dst: Vec<u32> = (self.active.iter())
            .map(|&id| self.flows[id].as_ref().map_or(0, |f| f.dst))
            .collect();
        let up: Vec<f64> = self.hosts.iter().map(|h| h.up).collect();
        let down: Vec<f64> = self.hosts.iter().map(|h| h.down).collect();
        self.alloc_a.resize(n, 0.0);
        self.alloc_b.resize(n, 0.0);
        // Round 1: sources share their uplink, targets their downlink.
        water_fill(&src, &up, &self.demand, &mut self.alloc_a, &mut self.order);
        water_fill(
            &dst,
            &down,
            &self.alloc_a,
            &mut self.alloc_b,
            &mut self.order,
        );
        // Round 2: what targets could not take goes back to the sources' other flows.
        let demand2: Vec<f64> = (self.demand.iter().zip(&self.alloc_a).zip(&self.alloc_b))
            .map(|((&d, &a), &b)| if b < a * (1.0 - 1e-9) { b } else { d })
            .collect();
        water_fill(&src, &up, &demand2, &mut self.alloc_a, &mut self.order);
        water_fill(
            &dst,
            &down,
            &self.alloc_a,
            &mut self.alloc_b,
            &mut self.order,
        );
        // A shared CPU moves no more than its cores allow: every flow slows alike.
        if let Some(cpu) = &self.spec.params.shared_cpu {
            let total: f64 = self.alloc_b.iter().sum();
            let max = cpu.max_bytes_per_sec();
            if total > max {
                let scale = max / total;
                self.alloc_b.iter_mut().for_each(|r| *r *= scale);
            }
        }
        // Nobody sends more than its uplink.
        self.spent.clear();
        self.spent.resize(self.hosts.len(), 0.0);
        for (&s, &rate) in src.iter().zip(&self.alloc_b) {
            self.spent[s as usize] += rate;
        }
        let over: Vec<u32> = (0..self.hosts.len() as u32)
            .filter(|&h| self.spent[h as usize] > self.hosts[h as usize].up * (1.0 + 1e-6))
            .collect();
        for h in over {
            self.violation(format!("host{h} sends above its uplink"));
        }
        let mut done = Vec::new();
        let spec = self.spec;
        let mut egress = 0.0;
        let mut moved = 0.0;
        let mut cross = 0.0;
        for k in 0..n {
            let id = self.active[k];
            let mut budget = self.alloc_b[k] * dt;
            let f = self.flows[id].as_mut().expect("active");
            if budget > 0.0 {
                f.last_progress = now;
                f.stall_reported = false;
                moved += budget;
                if self.hosts[f.src as usize].zone != self.hosts[f.dst as usize].zone {
                    cross += budget;
                }
                if self.hosts[f.src as usize].origin {
                    egress += budget;
                }
            }
            while budget > 0.0 {
                let Some(&(i, ready)) = f.queue.front() else {
                    break;
                };
                if ready > now {
                    break;
                }
                let take = budget.min(f.head_left);
                f.head_left -= take;
                budget -= take;
                if f.head_left <= 0.5 {
                    f.queue.pop_front();
                    done.push((id, i));
                    if let Some(&(next, _)) = f.queue.front() {
                        f.head_left = spec.chunk_bytes(f.blob, next);
                    }
                }
            }
        }
        if self.debug && now.as_micros() % 100_000 < self.tick().as_micros() as u64 {
            let downloading: Vec<&Host> = (self.hosts.iter())
                .filter(|h| h.alive && !h.downloads.is_empty())
                .collect();
            let want_rate: f64 = downloading.iter().map(|h| h.down).sum();
            let dls: usize = downloading.iter().map(|h| h.downloads.len()).sum();
            let srcs: usize = (downloading.iter())
                .flat_map(|h| h.downloads.values())
                .map(|d| d.sources.len())
                .sum();
            let no_src = (downloading.iter())
                .flat_map(|h| h.downloads.values())
                .filter(|d| d.sources.is_empty())
                .count();
            let origin_rate: f64 = (0..n)
                .filter(|&k| self.hosts[src[k] as usize].origin)
                .map(|k| self.alloc_b[k])
                .sum();
            let origin_flows = (0..n)
                .filter(|&k| self.hosts[src[k] as usize].origin)
                .count();
            let origin_up: f64 = self.hosts.iter().filter(|h| h.origin).map(|h| h.up).sum();
            {
                // Per-download progress, and whether each flow's source has anything its
                // target lacks (starved: no; idle: yes, but no request ready).
                let mut held: Vec<u32> = Vec::new();
                let (mut starved, mut useful_idle, mut useful_active) = (0, 0, 0);
                let mut useful_sum = 0u64;
                let activeset: std::collections::BTreeSet<usize> =
                    self.active.iter().copied().collect();
                for h in self
                    .hosts
                    .iter()
                    .filter(|h| h.alive && !h.downloads.is_empty())
                {
                    for (b, d) in &h.downloads {
                        let mine = &h.store[b];
                        held.push(mine.count());
                        for (&s, &fid) in &d.sources {
                            let theirs = self.hosts[s as usize].store.get(b);
                            let useful = theirs
                                .map_or(0, |t| t.iter().filter(|i| !mine.contains(*i)).count());
                            useful_sum += useful as u64;
                            if useful == 0 {
                                starved += 1
                            } else if activeset.contains(&fid) {
                                useful_active += 1
                            } else {
                                useful_idle += 1
                            }
                        }
                    }
                }
                held.sort_unstable();
                let q = |p: f64| {
                    held.get(((held.len() as f64 - 1.0) * p) as usize)
                        .copied()
                        .unwrap_or(0)
                };
                eprintln!(
                    "  held min {} p10 {} p50 {} p90 {} max {}; flows starved {starved} useful-idle {useful_idle} useful-active {useful_active}; mean useful {:.1}",
                    q(0.0),
                    q(0.1),
                    q(0.5),
                    q(0.9),
                    q(1.0),
                    useful_sum as f64 / (starved + useful_idle + useful_active).max(1) as f64
                );
            }
            eprintln!(
                "  origins send {:.0}% of their uplink over {origin_flows} active flows",
                100.0 * origin_rate / origin_up
            );
            eprintln!(
                "{now:?}: flows {} active {n} moving {:.2} GB/s of {:.2} downlink; downloads {dls} sources/dl {:.1} without {no_src}",
                self.flows.len() - self.free_flows.len(),
                moved / dt / 1e9,
                want_rate / 1e9,
                srcs as f64 / dls.max(1) as f64
            );
        }
        self.out.origin_egress += egress.round() as u64;
        self.out.bytes_moved += moved.round() as u64;
        self.out.cross_zone_bytes += cross.round() as u64;
        done
    }
}

/// Max-min shares of each host's capacity among its flows: flow `k` belongs to host
/// `key[k]` and asks for `demand[k]`; `out[k]` gets at most that. Flows are served smallest
/// demand first, each the lesser of its demand and an equal split of what is left.
pub(super) fn water_fill(
    key: &[u32],
    cap: &[f64],
    demand: &[f64],
    out: &mut [f64],
    order: &mut Vec<u32>,
) {
    order.clear();
    order.extend(0..key.len() as u32);
    order.sort_unstable_by(|&a, &b| {
        (key[a as usize].cmp(&key[b as usize]))
            .then(demand[a as usize].total_cmp(&demand[b as usize]))
            .then(a.cmp(&b))
    });
    let mut start = 0;
    while start < order.len() {
        let host = key[order[start] as usize];
        let mut end = start;
        while end < order.len() && key[order[end] as usize] == host {
            end += 1;
        }
        let mut left = cap[host as usize];
        for (j, &k) in order[start..end].iter().enumerate() {
            let share = left / (end - start - j) as f64;
            let give = demand[k as usize].min(share).max(0.0);
            out[k as usize] = give;
            left -= give;
        }
        start = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn water_fill_is_max_min() {
        let key = [0, 0, 0, 1];
        let cap = [9.0, 5.0];
        let demand = [1.0, 10.0, 10.0, 10.0];
        let mut out = [0.0; 4];
        water_fill(&key, &cap, &demand, &mut out, &mut Vec::new());
        assert_eq!(out, [1.0, 4.0, 4.0, 5.0]);
    }
}
