//! A map keyed by [`HostId`] kept as a vector indexed by the id. Host ids are dense (the
//! coordinator numbers its agents as they first join, the simulator its hosts), so a lookup
//! is an index instead of a search of a B-tree of 20,000 hosts: the planner looks hosts up
//! several times for every source it considers.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Index;

use crate::HostId;

/// A hash map keyed by [`HostId`], for per-blob maps that a vector per blob would make
/// too big (20,000 blobs × the cluster). Its hasher is fixed, so iteration order depends
/// only on what was inserted and removed: runs stay reproducible; callers that act on
/// entries in turn sort them first.
pub(crate) type HostHashMap<V> = HashMap<HostId, V, BuildHasherDefault<IdHasher>>;

/// Hashes a host id by one multiplication, its high half folded into the low (the table
/// picks a bucket by the low bits and tags it with the top seven: both then depend on
/// every bit of the id).
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
}

#[derive(Debug)]
pub(crate) struct ByHost<V> {
    slots: Vec<Option<V>>,
}

impl<V> Default for ByHost<V> {
    fn default() -> Self {
        Self { slots: Vec::new() }
    }
}

impl<V> ByHost<V> {
    pub(crate) fn get(&self, id: &HostId) -> Option<&V> {
        self.slots.get(id.0 as usize)?.as_ref()
    }

    pub(crate) fn get_mut(&mut self, id: &HostId) -> Option<&mut V> {
        self.slots.get_mut(id.0 as usize)?.as_mut()
    }

    /// The value of `id`, made by `make` if it has none.
    pub(crate) fn get_or_insert_with(&mut self, id: HostId, make: impl FnOnce() -> V) -> &mut V {
        let i = id.0 as usize;
        if i >= self.slots.len() {
            self.slots.resize_with(i + 1, || None);
        }
        self.slots[i].get_or_insert_with(make)
    }

    /// Every entry in id order, as a `BTreeMap` would give them.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (HostId, &V)> + '_ {
        (self.slots.iter().enumerate()).filter_map(|(i, v)| Some((HostId(i as u32), v.as_ref()?)))
    }
}

impl<V> Index<&HostId> for ByHost<V> {
    type Output = V;

    fn index(&self, id: &HostId) -> &V {
        self.get(id)
            .unwrap_or_else(|| panic!("unknown host {id:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_found_by_id_and_listed_in_id_order() {
        let mut m = ByHost::default();
        *m.get_or_insert_with(HostId(5), || 50) += 1;
        m.get_or_insert_with(HostId(2), || 20);
        assert_eq!(*m.get_or_insert_with(HostId(5), || 0), 51);
        assert_eq!((m.get(&HostId(2)), m.get(&HostId(3))), (Some(&20), None));
        assert_eq!(m.get(&HostId(99)), None);
        *m.get_mut(&HostId(2)).unwrap() = 21;
        assert_eq!(m[&HostId(2)], 21);
        let all: Vec<_> = m.iter().map(|(h, v)| (h.0, *v)).collect();
        assert_eq!(all, vec![(2, 21), (5, 51)]);
    }
}
