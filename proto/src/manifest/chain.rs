//! SHA-256 chaining values at chunk boundaries: what lets a chunk's check also check the
//! blob digest, out of order, in the one hash pass a chunk gets anyway.
//!
//! SHA-256 reads its input in 64-byte blocks, carrying a 32-byte state from block to block;
//! the digest is the state after the last block and the padding (which holds the length).
//! Every chunk but the last is a whole number of blocks (chunk sizes are powers of two of at
//! least 4 KiB), so the state after chunk `i` is well defined: its chaining value. A chained
//! manifest lists those values instead of each chunk's own digest, and the last entry is the
//! blob digest itself. Chunk `i` is checked by compressing its bytes from the value before
//! it (the standard initial state for chunk 0) and comparing with its own; the last chunk
//! is padded with the blob's length and must give the blob digest. A complete set of chunks
//! that passed is therefore a blob that hashes to its digest: no read of the whole blob is
//! needed to know it. Forging a chunk against honest values means finding a second preimage
//! of SHA-256's compression function. Values only someone who read the blob in order can
//! compute: a blob seeded as ranges in parallel gets plain chunk digests.

use sha2::compress256;
use sha2::digest::consts::U64;
use sha2::digest::generic_array::GenericArray;

use crate::Digest;

/// SHA-256's initial state (FIPS 180-4, 5.3.3): the value "before" chunk 0.
const INITIAL: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

const BLOCK: usize = 64;

/// A SHA-256 state between blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct State([u32; 8]);

impl State {
    pub(crate) const INITIAL: State = State(INITIAL);

    /// The state a chaining value (or a digest) encodes: its eight words, big-endian.
    pub(crate) fn of(value: &Digest) -> State {
        let mut words = [0u32; 8];
        for (w, b) in words.iter_mut().zip(value.as_bytes().chunks_exact(4)) {
            *w = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        }
        State(words)
    }

    /// The chaining value of this state (the same encoding as a digest).
    pub(crate) fn value(&self) -> Digest {
        let mut bytes = [0u8; 32];
        for (b, w) in bytes.chunks_exact_mut(4).zip(self.0) {
            b.copy_from_slice(&w.to_be_bytes());
        }
        Digest::from_bytes(bytes)
    }

    /// Compresses whole blocks: `data.len()` must be a multiple of 64 (checked).
    pub(crate) fn compress(&mut self, data: &[u8]) {
        assert!(data.len() % BLOCK == 0, "compressing a partial block");
        compress256(&mut self.0, as_blocks(data));
    }

    /// The digest of a message whose bytes before `tail` left this state: `tail` is the
    /// message's end (any length) and `total` the whole message's length in bytes.
    pub(crate) fn finish(mut self, tail: &[u8], total: u64) -> Digest {
        let whole = tail.len() - tail.len() % BLOCK;
        self.compress(&tail[..whole]);
        let rest = &tail[whole..];
        // Padding: 0x80, zeros, then the length in bits, big-endian, ending a block.
        let mut last = [0u8; 2 * BLOCK];
        last[..rest.len()].copy_from_slice(rest);
        last[rest.len()] = 0x80;
        let end = if rest.len() < BLOCK - 8 {
            BLOCK
        } else {
            2 * BLOCK
        };
        last[end - 8..end].copy_from_slice(&(total.wrapping_mul(8)).to_be_bytes());
        self.compress(&last[..end]);
        self.value()
    }
}

/// Whole 64-byte blocks as the block type `compress256` takes.
#[allow(unsafe_code)]
fn as_blocks(data: &[u8]) -> &[GenericArray<u8, U64>] {
    // SAFETY: `GenericArray<u8, U64>` is a `repr(transparent)` array of 64 `u8`s: size 64,
    // alignment 1, no invalid bit patterns; `data` holds at least `len / 64` of them, for
    // the same lifetime. (`compress256` itself casts its argument back to `[u8; 64]`
    // blocks on the same grounds.)
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast(), data.len() / BLOCK) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn finishing_from_the_initial_state_is_sha256() {
        for len in [
            0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 4095, 4096, 4097, 10_000,
        ] {
            let data = bytes(len, 7);
            assert_eq!(
                State::INITIAL.finish(&data, len as u64),
                Digest::of(&data),
                "{len} bytes"
            );
        }
    }

    #[test]
    fn a_chain_of_chunks_ends_in_the_blob_digest() {
        let data = bytes(3 * 4096 + 100, 3);
        let mut state = State::INITIAL;
        for chunk in data[..3 * 4096].chunks(4096) {
            // A value survives its encoding.
            state.compress(chunk);
            assert_eq!(State::of(&state.value()), state);
        }
        assert_eq!(
            state.finish(&data[3 * 4096..], data.len() as u64),
            Digest::of(&data)
        );
    }

    #[test]
    #[should_panic(expected = "partial block")]
    fn a_partial_block_is_refused() {
        let mut state = State::INITIAL;
        state.compress(&[0; 65]);
    }
}
