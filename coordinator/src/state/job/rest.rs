//! A job's targets not built or not wanted yet: each of its agents with each of its blobs,
//! in that order, from a cursor on (one for building, one for wanting: a cancel or a lost
//! agent builds them all at once, and the built ones are wanted in their turn).
//!
//! A Distribute to 20,000 agents used to build all its targets in its own turn (~13 ms
//! here, and its first record's 20,000 entries ~5-10 ms more), a pause for every message
//! behind it; they are built as they are wanted instead, a few thousand a turn
//! (`State::want_some`), and the first record lists them by this rule, expanded on the
//! writer's thread ([`crate::db::PendingTargets`]).
//!
//! Every target not built yet is pending, of its blob's size: the job's counts and bytes
//! include them ([`Rest::pending`], [`Rest::bytes`]).

use std::sync::Arc;

use shoal_planner::HostId;
use shoal_proto::Digest;

use crate::db::PendingTargets;

#[derive(Clone, Debug)]
pub struct Rest {
    hosts: Vec<HostId>,
    /// The agents' names, shared with the first record.
    names: Arc<[String]>,
    /// Each blob with its size (0 while unknown).
    blobs: Vec<(Digest, u64)>,
    /// Targets before this one are built.
    next: usize,
    /// Targets before this one are wanted (or were skipped): never past `next`.
    wanted: usize,
    /// The sum of the sizes of the targets from `next` on.
    bytes: u64,
}

impl Rest {
    /// Every target of `agents` × `blobs`, none built. Both must be non-empty.
    pub fn new(agents: Vec<(HostId, String)>, blobs: Vec<(Digest, u64)>) -> Self {
        let (hosts, names): (Vec<HostId>, Vec<String>) = agents.into_iter().unzip();
        let per_agent: u64 = blobs.iter().map(|(_, size)| *size).sum();
        Rest {
            bytes: per_agent.saturating_mul(hosts.len() as u64),
            hosts,
            names: names.into(),
            blobs,
            next: 0,
            wanted: 0,
        }
    }

    fn len(&self) -> usize {
        self.hosts.len() * self.blobs.len()
    }

    /// How many targets are not built.
    pub fn pending(&self) -> u64 {
        (self.len() - self.next) as u64
    }

    /// Their bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether every target is built.
    pub fn all_built(&self) -> bool {
        self.next >= self.len()
    }

    /// Whether every target is wanted.
    pub fn all_wanted(&self) -> bool {
        self.wanted >= self.len()
    }

    /// The next target to build, taken: its host, key and size.
    pub fn build(&mut self) -> Option<(HostId, (String, Digest), u64)> {
        let i = self.next;
        let (host, agent, blob, size) = self.at(i)?;
        let key = (agent.to_string(), blob);
        self.next += 1;
        self.bytes = self.bytes.saturating_sub(size);
        Some((host, key, size))
    }

    /// Whether the next target to want is built already.
    pub fn next_is_built(&self) -> bool {
        self.wanted < self.next
    }

    /// The next target built and not wanted, taken: its host, agent and blob.
    pub fn want(&mut self) -> Option<(HostId, &str, Digest)> {
        if self.wanted >= self.next {
            return None;
        }
        self.wanted += 1;
        let (host, agent, blob, _) = self.at(self.wanted - 1)?;
        Some((host, agent, blob))
    }

    fn at(&self, i: usize) -> Option<(HostId, &str, Digest, u64)> {
        let (agent, blob) = PendingTargets::place(i, self.blobs.len());
        let host = *self.hosts.get(agent)?;
        let (blob, size) = *self.blobs.get(blob)?;
        Some((host, &self.names[agent], blob, size))
    }

    /// The targets not built, as (agent, blob, size).
    pub fn iter(&self) -> impl Iterator<Item = (&str, Digest, u64)> {
        (self.next..self.len()).filter_map(|i| self.at(i).map(|(_, a, b, s)| (a, b, s)))
    }

    /// Whether a target of `agent` is not built.
    pub fn has_agent(&self, agent: &str) -> bool {
        let (first, _) = PendingTargets::place(self.next, self.blobs.len());
        self.names
            .get(first..)
            .is_some_and(|n| n.iter().any(|a| a == agent))
    }

    /// How many of the targets not built are of the blob at `index`.
    fn of_blob(&self, index: usize) -> usize {
        let n = self.blobs.len().max(1);
        // The positions below `x` that are of that blob.
        let below = |x: usize| x / n + usize::from(x % n > index);
        below(self.len()) - below(self.next)
    }

    /// The blob's size became known: the targets not built carry it.
    pub fn set_size(&mut self, blob: &Digest, size: u64) {
        let Some(index) = self.blobs.iter().position(|(b, _)| b == blob) else {
            return;
        };
        let count = self.of_blob(index) as u64;
        let old = std::mem::replace(&mut self.blobs[index].1, size);
        let without = self.bytes.saturating_sub(old.saturating_mul(count));
        self.bytes = without.saturating_add(size.saturating_mul(count));
    }

    /// The targets not built as the database lists them: pending, each of its size.
    pub fn record(&self) -> PendingTargets {
        PendingTargets {
            agents: self.names.clone(),
            blobs: (self.blobs.iter())
                .map(|(b, size)| (b.to_string(), *size))
                .collect(),
            from: self.next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rest() -> (Rest, Digest, Digest) {
        let (x, y) = (Digest::of(b"x"), Digest::of(b"y"));
        let agents = (0..3).map(|i| (HostId(i), format!("a{i}"))).collect();
        (Rest::new(agents, vec![(x, 10), (y, 0)]), x, y)
    }

    #[test]
    fn targets_are_taken_agent_by_agent_and_counted_until_built() {
        let (mut r, x, y) = rest();
        assert_eq!((r.pending(), r.bytes()), (6, 30));
        assert!(r.want().is_none(), "nothing built to want");
        let (host, key, size) = r.build().expect("first");
        assert_eq!((host, key, size), (HostId(0), ("a0".into(), x), 10));
        assert_eq!(r.build().map(|t| t.1), Some(("a0".into(), y)));
        assert_eq!((r.pending(), r.bytes()), (4, 20));
        assert!(!r.has_agent("a0") && r.has_agent("a1") && r.has_agent("a2"));
        let left: Vec<_> = r.iter().map(|(a, b, _)| (a.to_string(), b)).collect();
        assert_eq!(left.len(), 4);
        assert_eq!(left[0], ("a1".into(), x));
        while r.build().is_some() {}
        assert!(r.all_built() && !r.all_wanted());
        assert_eq!((r.pending(), r.bytes()), (0, 0));
        // Wanted in the same order, after they were built.
        let wanted: Vec<_> = std::iter::from_fn(|| r.want().map(|(h, _, b)| (h, b))).collect();
        assert_eq!(wanted.len(), 6);
        assert_eq!((wanted[0], wanted[5]), ((HostId(0), x), (HostId(2), y)));
        assert!(r.all_wanted());
    }

    #[test]
    fn a_size_learned_counts_for_the_targets_not_built_only() {
        let (mut r, x, y) = rest();
        r.build(); // a0 × x
        r.set_size(&y, 7);
        // a0 × y, a1 × x, a1 × y, a2 × x, a2 × y: 7 + 10 + 7 + 10 + 7.
        assert_eq!(r.bytes(), 41);
        r.build(); // a0 × y, now of 7 bytes
        assert_eq!(r.bytes(), 34);
        r.set_size(&x, 1);
        assert_eq!(r.bytes(), 16);
        let record = r.record();
        assert_eq!(record.from, 2);
        assert_eq!(record.blobs[0], (x.to_string(), 1));
    }
}
