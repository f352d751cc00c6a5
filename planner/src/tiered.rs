//! Ordered sets indexed by locality, so "nearest first" costs O(log n) per step instead of a
//! scan over every host.

use std::collections::{BTreeMap, BTreeSet};

use crate::{RackId, ZoneId};

/// One ordered set of keys, also split by rack and by zone. Every key lives in exactly one
/// rack set, one zone set and the global set.
#[derive(Debug)]
pub(crate) struct Tiered<K> {
    by_rack: BTreeMap<(ZoneId, RackId), BTreeSet<K>>,
    by_zone: BTreeMap<ZoneId, BTreeSet<K>>,
    all: BTreeSet<K>,
}

impl<K> Default for Tiered<K> {
    fn default() -> Self {
        Self {
            by_rack: BTreeMap::new(),
            by_zone: BTreeMap::new(),
            all: BTreeSet::new(),
        }
    }
}

impl<K: Ord + Clone> Tiered<K> {
    pub(crate) fn insert(&mut self, zone: ZoneId, rack: RackId, key: K) {
        self.by_rack
            .entry((zone, rack))
            .or_default()
            .insert(key.clone());
        self.by_zone.entry(zone).or_default().insert(key.clone());
        self.all.insert(key);
    }

    pub(crate) fn remove(&mut self, zone: ZoneId, rack: RackId, key: &K) -> bool {
        if let Some(set) = self.by_rack.get_mut(&(zone, rack)) {
            set.remove(key);
            if set.is_empty() {
                self.by_rack.remove(&(zone, rack));
            }
        }
        if let Some(set) = self.by_zone.get_mut(&zone) {
            set.remove(key);
            if set.is_empty() {
                self.by_zone.remove(&zone);
            }
        }
        self.all.remove(key)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// Keys in the same rack, then the same zone, then anywhere, each in key order. A key
    /// near the caller appears up to three times; callers skip what they already took.
    pub(crate) fn nearest(&self, zone: ZoneId, rack: RackId) -> impl Iterator<Item = &K> + '_ {
        let rack_set = self.by_rack.get(&(zone, rack)).into_iter().flatten();
        let zone_set = self.by_zone.get(&zone).into_iter().flatten();
        rack_set.chain(zone_set).chain(self.all.iter())
    }

    /// [`Tiered::nearest`], but each tier only as long as `keep` holds: for a prefix of the
    /// key order (complete holders sort first), without walking the rest of each tier.
    pub(crate) fn nearest_while<'a>(
        &'a self,
        zone: ZoneId,
        rack: RackId,
        keep: impl Fn(&K) -> bool + Copy + 'a,
    ) -> impl Iterator<Item = &'a K> + 'a {
        let rack_set = self.by_rack.get(&(zone, rack)).into_iter().flatten();
        let zone_set = self.by_zone.get(&zone).into_iter().flatten();
        (rack_set.take_while(move |k| keep(k)))
            .chain(zone_set.take_while(move |k| keep(k)))
            .chain(self.all.iter().take_while(move |k| keep(k)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_goes_rack_zone_all() {
        let mut t = Tiered::default();
        t.insert(ZoneId(1), RackId(1), 30);
        t.insert(ZoneId(1), RackId(2), 20);
        t.insert(ZoneId(2), RackId(1), 10);
        let order: Vec<_> = t.nearest(ZoneId(1), RackId(1)).copied().collect();
        assert_eq!(order, vec![30, 20, 30, 10, 20, 30]);
        assert!(t.remove(ZoneId(1), RackId(1), &30));
        assert_eq!(
            t.nearest(ZoneId(1), RackId(1)).copied().collect::<Vec<_>>(),
            vec![20, 10, 20]
        );
        assert!(!t.by_rack.contains_key(&(ZoneId(1), RackId(1))));
    }

    #[test]
    fn nearest_while_stops_each_tier_at_the_first_miss() {
        let mut t = Tiered::default();
        for (zone, rack, key) in [(1, 1, 1), (1, 1, 50), (1, 2, 2), (1, 2, 60), (2, 1, 3)] {
            t.insert(ZoneId(zone), RackId(rack), key);
        }
        let small: Vec<_> = t
            .nearest_while(ZoneId(1), RackId(1), |k| *k < 10)
            .copied()
            .collect();
        assert_eq!(small, vec![1, 1, 2, 1, 2, 3]);
    }
}
