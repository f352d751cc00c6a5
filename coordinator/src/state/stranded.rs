//! Blobs no target can finish: targets wait for the blob, no agent holds it whole, nothing
//! seeds it from an origin, and no holder has gained a chunk for `stranded_after`. That is
//! what is left when the last whole copy loses a chunk (rot on its disk, found when a peer
//! rejected it), is evicted or removed, or its agent is gone past its lease: the chunks no
//! partial holder has are nowhere. Without this the targets would wait for ever; with it
//! they fail `NO_SOURCE` with a message that says so, and the blob can be pushed again.
//!
//! Progress is the sum of the chunks every holder of the blob has verified: any target
//! that gains one (from partial holders that still have what it lacks) resets the clock,
//! so a swarm finishing among partial copies is never cut short.

use std::collections::BTreeMap;
use std::time::Duration;

use shoal_planner::Time;
use shoal_proto::Digest;
use shoal_proto::pb::v1::FailureReason;

/// What is watched of one blob.
#[derive(Debug, Clone, Copy)]
struct Watch {
    held: u64,
    since: Time,
}

#[derive(Debug)]
pub struct Stranded {
    watching: BTreeMap<Digest, Watch>,
    /// Nothing is watched before this: after a restart the catalog's holders come back
    /// with the agents' inventories, and a blob whose holders have not reconnected yet is
    /// not stranded. A lease after the start, every live agent has.
    from: Time,
}

impl Stranded {
    /// Watching from `from` on.
    pub fn new(from: Time) -> Self {
        Stranded {
            watching: BTreeMap::new(),
            from,
        }
    }

    /// Looks at this round's candidates (blobs with waiting targets, no whole holder and
    /// nothing seeding them, with the chunks their holders have verified in all); returns
    /// those whose count has not moved for `after`. Blobs not among the candidates are no
    /// longer watched (a whole copy came back, or nobody waits).
    pub fn check(
        &mut self,
        candidates: impl IntoIterator<Item = (Digest, u64)>,
        now: Time,
        after: Duration,
    ) -> Vec<Digest> {
        let mut watching = BTreeMap::new();
        let mut stranded = Vec::new();
        if now < self.from {
            return stranded;
        }
        for (blob, held) in candidates {
            let watch = match self.watching.get(&blob) {
                Some(w) if w.held == held => *w,
                _ => Watch { held, since: now },
            };
            if now.saturating_since(watch.since) >= after {
                stranded.push(blob);
            } else {
                watching.insert(blob, watch);
            }
        }
        self.watching = watching;
        stranded
    }
}

impl super::State {
    /// Fails the waiting targets of every blob [`Stranded`] finds no target can finish.
    pub(super) fn fail_stranded(&mut self, now: super::Now) {
        let candidates: Vec<(Digest, u64)> = (self.jobs.open_blobs())
            .filter(|(blob, origin)| !origin && self.streams.get(blob).is_none())
            .filter_map(|(blob, _)| Some((blob, self.catalog.held_if_none_whole(&blob)?)))
            .collect();
        let after = self.config.stranded_after;
        for blob in self.stranded.check(candidates, now.mono, after) {
            let message = format!(
                "no agent holds the whole blob, nothing seeds it, and no holder gained a chunk \
                 in {after:?}: the chunks no holder has are lost (the last whole copy lost \
                 them: corrupt on its disk, evicted or removed, or its agent gone); push the \
                 blob again"
            );
            tracing::warn!(%blob, "{message}");
            // Failing a target unwants it: the planner cancels its order on the agent.
            for host in self.jobs.hosts_wanting(&blob) {
                self.fail_targets(host, blob, FailureReason::NoSource, &message, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(30);

    fn at(secs: u64) -> Time {
        Time::from_secs(secs)
    }

    #[test]
    fn a_blob_is_stranded_after_a_quiet_period_and_progress_resets_the_clock() {
        let blob = Digest::from_bytes([1; 32]);
        let mut s = Stranded::new(Time::ZERO);
        assert!(s.check([(blob, 10)], at(0), AFTER).is_empty());
        assert!(s.check([(blob, 11)], at(20), AFTER).is_empty());
        // Quiet since 20 s.
        assert!(s.check([(blob, 11)], at(49), AFTER).is_empty());
        assert_eq!(s.check([(blob, 11)], at(50), AFTER), vec![blob]);
        // Reported once: a later round starts over.
        assert!(s.check([(blob, 11)], at(51), AFTER).is_empty());
    }

    #[test]
    fn nothing_is_stranded_before_the_agents_had_a_lease_to_come_back() {
        let blob = Digest::from_bytes([3; 32]);
        let mut s = Stranded::new(at(10));
        assert!(s.check([(blob, 0)], at(5), AFTER).is_empty());
        // The clock starts at the first look from then on.
        assert!(s.check([(blob, 0)], at(10), AFTER).is_empty());
        assert!(s.check([(blob, 0)], at(39), AFTER).is_empty());
        assert_eq!(s.check([(blob, 0)], at(40), AFTER), vec![blob]);
    }

    #[test]
    fn a_blob_that_leaves_the_candidates_starts_over_when_it_returns() {
        let blob = Digest::from_bytes([2; 32]);
        let mut s = Stranded::new(Time::ZERO);
        assert!(s.check([(blob, 3)], at(0), AFTER).is_empty());
        // A whole copy came back for a while.
        assert!(s.check([], at(10), AFTER).is_empty());
        assert!(s.check([(blob, 3)], at(31), AFTER).is_empty());
        assert_eq!(s.check([(blob, 3)], at(61), AFTER), vec![blob]);
    }
}
