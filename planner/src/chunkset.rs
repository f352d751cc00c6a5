//! A fixed-size set of chunk indices, as a bitmap.

use shoal_proto::ChunkIndex;

/// The set of chunks of one blob that somebody holds: a bitmap of `len` bits.
///
/// [`ChunkSet::from_bitfield`] and [`ChunkSet::to_bitfield`] use the wire layout of
/// `shoal_proto::wire::bitfield_get` (byte `i / 8`, bit `i % 8`, least significant first),
/// so have-streams convert without copying bit by bit.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ChunkSet {
    words: Vec<u64>,
    len: u32,
    count: u32,
}

impl ChunkSet {
    /// No chunk of `len`.
    pub fn empty(len: u32) -> Self {
        Self {
            words: vec![0; (len as usize).div_ceil(64)],
            len,
            count: 0,
        }
    }

    /// Every chunk of `len`.
    pub fn full(len: u32) -> Self {
        let mut set = Self::empty(len);
        for w in &mut set.words {
            *w = u64::MAX;
        }
        set.trim();
        set.count = len;
        set
    }

    /// From a wire bitfield; bits at or beyond `len` are ignored, missing bytes read as absent.
    pub fn from_bitfield(len: u32, bits: &[u8]) -> Self {
        let mut set = Self::empty(len);
        for (i, b) in bits.iter().enumerate().take((len as usize).div_ceil(8)) {
            set.words[i / 8] |= u64::from(*b) << ((i % 8) * 8);
        }
        set.trim();
        set.count = set.words.iter().map(|w| w.count_ones()).sum();
        set
    }

    /// The wire bitfield: `len.div_ceil(8)` bytes.
    pub fn to_bitfield(&self) -> Vec<u8> {
        (0..(self.len as usize).div_ceil(8))
            .map(|i| (self.words[i / 8] >> ((i % 8) * 8)) as u8)
            .collect()
    }

    fn trim(&mut self) {
        let tail = self.len % 64;
        if tail != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << tail) - 1;
        }
    }

    /// How many chunks the blob has (the bitmap's size, not the number present).
    pub fn len(&self) -> u32 {
        self.len
    }

    /// How many chunks are present.
    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn is_full(&self) -> bool {
        self.count == self.len
    }

    /// Whether `index` is present; out of range reads as absent.
    pub fn contains(&self, index: ChunkIndex) -> bool {
        index.0 < self.len && self.words[index.as_usize() / 64] & (1 << (index.0 % 64)) != 0
    }

    /// Adds `index`; returns whether it was new. Out of range is ignored (returns false).
    pub fn insert(&mut self, index: ChunkIndex) -> bool {
        if index.0 >= self.len {
            return false;
        }
        let w = &mut self.words[index.as_usize() / 64];
        let bit = 1 << (index.0 % 64);
        let new = *w & bit == 0;
        *w |= bit;
        self.count += u32::from(new);
        new
    }

    /// Removes `index`; returns whether it was present.
    pub fn remove(&mut self, index: ChunkIndex) -> bool {
        if index.0 >= self.len {
            return false;
        }
        let w = &mut self.words[index.as_usize() / 64];
        let bit = 1 << (index.0 % 64);
        let had = *w & bit != 0;
        *w &= !bit;
        self.count -= u32::from(had);
        had
    }

    /// Present chunks in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = ChunkIndex> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros();
                w &= w - 1;
                Some(ChunkIndex(wi as u32 * 64 + bit))
            })
        })
    }

    pub(crate) fn words(&self) -> &[u64] {
        &self.words
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::wire::{bitfield_get, bitfield_set};

    #[test]
    fn wire_layout_round_trips() {
        let mut bits = vec![0u8; 13];
        for i in [0, 7, 8, 63, 64, 99] {
            bitfield_set(&mut bits, ChunkIndex(i));
        }
        let set = ChunkSet::from_bitfield(100, &bits);
        assert_eq!(set.count(), 6);
        for i in 0..100 {
            assert_eq!(
                set.contains(ChunkIndex(i)),
                bitfield_get(&bits, ChunkIndex(i)),
                "{i}"
            );
        }
        assert_eq!(set.to_bitfield(), bits);
        assert_eq!(
            set.iter().map(|c| c.0).collect::<Vec<_>>(),
            vec![0, 7, 8, 63, 64, 99]
        );
    }

    #[test]
    fn full_is_trimmed_and_counts() {
        let mut set = ChunkSet::full(70);
        assert_eq!(set.count(), 70);
        assert!(!set.contains(ChunkIndex(70)));
        assert!(set.remove(ChunkIndex(3)));
        assert!(!set.remove(ChunkIndex(3)));
        assert!(set.insert(ChunkIndex(3)));
        assert!(!set.insert(ChunkIndex(200)));
        assert!(set.is_full());
        // Stray bits beyond len in a wire bitfield are ignored.
        assert_eq!(ChunkSet::from_bitfield(3, &[0xff]).count(), 3);
    }
}
