//! Whose word about content the coordinator still takes, and which blobs it asks their
//! holders to register again.
//!
//! An agent that registered a manifest which two targets found not to describe its blob is
//! quarantined: its registrations and its claims to hold blobs are ignored from then on
//! (in memory: a coordinator restart forgets it; `shoal agents remove` is for good). It
//! keeps its session and its lease, so its own targets still count.
//!
//! A blob an agent reports whole that the catalog does not know (the coordinator lost its
//! state, or dropped a wrong manifest) is asked of at most [`ASKED_AT_ONCE`] of its holders
//! at a time: each answers with its manifest (two registrations by different agents verify
//! it). An ask is repeated of others once [`ASK_AGAIN_AFTER`] passed without an answer.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use shoal_planner::{HostId, Time};
use shoal_proto::Digest;

/// Holders asked to register one blob at once: two registrations verify a manifest.
pub const ASKED_AT_ONCE: usize = 2;
/// An ask not answered by then (the holder left, or lied) is made of other holders.
pub const ASK_AGAIN_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct Vetting {
    /// Agent id → why its word is no longer taken.
    quarantined: BTreeMap<String, String>,
    /// Blobs the catalog lacks that agents report whole.
    unknown: BTreeMap<Digest, Unknown>,
}

#[derive(Debug, Default)]
struct Unknown {
    /// Who was asked to register it, and when.
    asked: BTreeMap<HostId, Time>,
    /// Who reported it whole meanwhile: holders once it is known.
    holders: BTreeSet<HostId>,
}

impl Vetting {
    pub fn quarantine(&mut self, agent: &str, why: String) {
        self.quarantined.insert(agent.to_string(), why);
    }

    /// Nobody is quarantined (the usual case: callers skip the lookup).
    pub fn none_quarantined(&self) -> bool {
        self.quarantined.is_empty()
    }

    /// Why `agent` is quarantined, if it is.
    pub fn quarantined(&self, agent: &str) -> Option<&str> {
        self.quarantined.get(agent).map(String::as_str)
    }

    /// `host` reports `blob` whole and the catalog lacks it: records the holder, and
    /// returns whether to ask it to register the blob now (recording the ask if so).
    pub fn ask(&mut self, blob: Digest, host: HostId, now: Time) -> bool {
        let unknown = self.unknown.entry(blob).or_default();
        unknown.holders.insert(host);
        let asked = &mut unknown.asked;
        asked.retain(|_, at| now.saturating_since(*at) < ASK_AGAIN_AFTER);
        if asked.contains_key(&host) || asked.len() >= ASKED_AT_ONCE {
            return false;
        }
        asked.insert(host, now);
        true
    }

    /// The catalog knows `blob` now: no more asks for it. Returns who reported it whole
    /// while it was unknown.
    pub fn known(&mut self, blob: &Digest) -> BTreeSet<HostId> {
        self.unknown
            .remove(blob)
            .map(|u| u.holders)
            .unwrap_or_default()
    }

    /// Forgets blobs whose asks all expired (housekeeping), so blobs nobody registers cost
    /// nothing; a later report asks again.
    pub fn expire(&mut self, now: Time) {
        self.unknown.retain(|_, u| {
            u.asked
                .retain(|_, at| now.saturating_since(*at) < ASK_AGAIN_AFTER);
            !u.asked.is_empty()
        });
    }

    /// Hosts asked to register `blob`, asks not yet expired.
    #[cfg(test)]
    pub fn asked(&self, blob: &Digest) -> BTreeSet<HostId> {
        self.unknown
            .get(blob)
            .map(|u| u.asked.keys().copied().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_two_holders_are_asked_until_the_ask_expires() {
        let mut v = Vetting::default();
        let blob = Digest::of(b"x");
        let t0 = Time::from_secs(1);
        assert!(v.ask(blob, HostId(1), t0));
        assert!(!v.ask(blob, HostId(1), t0), "once per holder");
        assert!(v.ask(blob, HostId(2), t0));
        assert!(!v.ask(blob, HostId(3), t0), "two at once");
        let later = t0 + ASK_AGAIN_AFTER;
        assert!(v.ask(blob, HostId(3), later), "asks expire");
        let holders: Vec<_> = v.known(&blob).into_iter().collect();
        assert_eq!(
            holders,
            [HostId(1), HostId(2), HostId(3)],
            "every reporter holds it"
        );
        assert!(v.asked(&blob).is_empty());
        v.ask(blob, HostId(1), later);
        v.expire(later + ASK_AGAIN_AFTER);
        assert!(v.asked(&blob).is_empty());
    }

    #[test]
    fn quarantine_is_by_agent_id() {
        let mut v = Vetting::default();
        v.quarantine("a", "lied".into());
        assert_eq!(v.quarantined("a"), Some("lied"));
        assert_eq!(v.quarantined("b"), None);
    }
}
