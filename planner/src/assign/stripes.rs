//! Stripes: which part of a source's chunks each of its downloads of one blob asks it for
//! first, so that they ask it for different chunks and its upload puts new chunks into the
//! swarm rather than one chunk into several hosts that could relay it to each other.
//!
//! A source's downloads of a blob hold numbered slots; the one in slot `i` of `n` prefers
//! chunks `c` with `c % n == i`. A download that ends leaves its slot empty and the others
//! keep theirs, so the next download to arrive takes the empty slot and nobody else hears
//! of it: the usual churn of a swarm (one download done, another given the freed capacity)
//! changes no stripe. Stripes change only when a download finds no empty slot (`n` grows),
//! or, for a source seeding from its origin, when a slot stays empty for [`COMPACT_AFTER`]
//! × `restripe_delay`: the others close ranks and `n` shrinks. An empty stripe is only
//! nobody's first choice, which costs little, but a source seeding from its origin sends
//! each chunk only to the download whose stripe it is (`stripe_only`), so there it must not
//! last (see `may_send_stripes_only`). A growth reaches the source's
//! other downloads after `restripe_delay`, one `UpdateSources` each however many changes it
//! folds.
//!
//! Ranking the downloads by host id instead (as before) moved the stripes of every download
//! ranked after one that came or went: 8 stripe-only updates per target in a 20,000-agent
//! distribution, 95% of everything the coordinator sent.

use super::Assigner;
use crate::{BlobId, HostId, Time};

/// How many `restripe_delay`s a slot stays empty before the others close ranks: most
/// empty slots are taken (or the source's last download ends) before then.
pub const COMPACT_AFTER: u32 = 10;

/// One source's stripe slots for one blob: the download in each, or since when it is empty.
#[derive(Debug, Default)]
pub(super) struct Slots(Vec<Result<HostId, Time>>);

impl Slots {
    /// The downloads in the slots, in slot order.
    pub(super) fn holders(&self) -> impl Iterator<Item = HostId> + '_ {
        self.0.iter().filter_map(|s| s.ok())
    }
}

impl Assigner {
    /// The stripe `target` should prefer from `source` for `blob`, and how many there are.
    /// Every command carries the current stripes.
    pub fn stripe(&self, blob: BlobId, target: HostId, source: HostId) -> Option<(u32, u32)> {
        let slots = self.hosts.get(&source)?.stripes.get(&blob)?;
        let i = slots.0.iter().position(|s| *s == Ok(target))?;
        Some((i as u32, slots.0.len() as u32))
    }

    /// `source` took `target` on for `blob`: it gets the first empty slot, or a new one (then
    /// every other download's stripe changed).
    pub(super) fn take_slot(&mut self, blob: BlobId, target: HostId, source: HostId) {
        let s = self.hosts.get_mut(&source).expect("known host");
        let slots = s.stripes.entry(blob).or_default();
        if let Some(empty) = slots.0.iter_mut().find(|s| s.is_err()) {
            *empty = Ok(target);
            return;
        }
        slots.0.push(Ok(target));
        self.restripe(blob, source);
    }

    /// `source` no longer serves `target` for `blob`: its slot is left empty for the next
    /// download, and the others close ranks if none takes it in time (see [`COMPACT_AFTER`]).
    pub(super) fn free_slot(&mut self, blob: BlobId, target: HostId, source: HostId) {
        let s = self.hosts.get_mut(&source).expect("known host");
        let Some(slots) = s.stripes.get_mut(&blob) else {
            return;
        };
        if let Some(slot) = slots.0.iter_mut().find(|s| **s == Ok(target)) {
            *slot = Err(self.now);
        }
        if slots.0.iter().all(Result::is_err) {
            s.stripes.remove(&blob);
            return;
        }
        if !self.may_send_stripes_only(blob, source) {
            return;
        }
        let delay = self.config.restripe_delay * COMPACT_AFTER;
        if delay.is_zero() {
            self.compact(blob, source);
        } else {
            self.compactions.insert((self.now + delay, blob, source));
        }
    }

    /// Whether `source` may send `blob`'s chunks only to the downloads whose stripe they
    /// are: a host seeding it from its origin, which holds part of it and downloads none
    /// of it. Only its empty slots must close. Any other source serves every chunk it holds
    /// to whoever asks, so an empty slot only leaves its stripe nobody's first choice, and
    /// closing ranks would send every other download of it a new stripe: at the end of a
    /// 20,000-target burst, when downloads finish while their sources still serve others,
    /// that was 3,500 to 74,000 stripe-only updates, and 15% of the coordinator's CPU.
    fn may_send_stripes_only(&self, blob: BlobId, source: HostId) -> bool {
        let complete = (self.hosts.get(&source))
            .and_then(|h| h.holdings.get(&blob))
            .is_some_and(|h| h.complete);
        let downloading =
            (self.blobs.get(&blob)).is_some_and(|b| b.downloads.contains_key(&source));
        !complete && !downloading
    }

    /// Closes the ranks of `source`'s downloads of `blob` if a slot has been empty for the
    /// whole delay (a younger one has its own turn): each keeps its order and gets its new
    /// stripe with its next command (now).
    pub(super) fn compact(&mut self, blob: BlobId, source: HostId) {
        let delay = self.config.restripe_delay * COMPACT_AFTER;
        let now = self.now;
        let Some(slots) = (self.hosts.get_mut(&source)).and_then(|s| s.stripes.get_mut(&blob))
        else {
            return;
        };
        if !(slots.0.iter()).any(|s| s.is_err_and(|since| since + delay <= now)) {
            return;
        }
        slots.0.retain(Result::is_ok);
        let moved: Vec<HostId> = slots.holders().collect();
        self.dirty.extend(moved.into_iter().map(|t| (blob, t)));
    }

    /// The stripes of `source`'s downloads of `blob` changed: each gets its new one with its
    /// next command, after `restripe_delay`. Stripes are a preference, so a stale one for a
    /// moment costs little; a download whose sources change meanwhile gets its current
    /// stripes with that command.
    fn restripe(&mut self, blob: BlobId, source: HostId) {
        let delay = self.config.restripe_delay;
        let at = self.now + delay;
        let others: Vec<HostId> = (self.hosts[&source].stripes.get(&blob))
            .map(|slots| slots.holders().collect())
            .unwrap_or_default();
        for t in others {
            if delay.is_zero() {
                self.dirty.insert((blob, t));
                continue;
            }
            let Some(d) = self.download_mut(blob, t) else {
                continue;
            };
            if std::mem::replace(&mut d.restripe_pending, true) {
                self.stats.restripes_coalesced += 1;
            } else {
                self.restripes.insert((at, blob, t));
            }
        }
    }

    /// Every download a source serves holds exactly one slot of it, and nothing else does.
    pub(super) fn check_stripes(&self) -> Result<(), String> {
        for (id, h) in self.hosts.iter() {
            for (blob, slots) in &h.stripes {
                let mut held: Vec<HostId> = slots.holders().collect();
                held.sort_unstable();
                let served: Vec<HostId> = (h.serving.keys())
                    .filter(|(b, _)| b == blob)
                    .map(|(_, t)| *t)
                    .collect();
                if held != served || held.is_empty() {
                    return Err(format!("{id}'s stripes of {blob} {held:?} != {served:?}"));
                }
            }
            let blobs: std::collections::BTreeSet<BlobId> =
                h.serving.keys().map(|(b, _)| *b).collect();
            if blobs.iter().any(|b| !h.stripes.contains_key(b)) {
                return Err(format!("{id} serves a blob without stripes"));
            }
        }
        Ok(())
    }
}
