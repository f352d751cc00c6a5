//! Making a manifest: [`ManifestBuilder`] hashes a blob fed in pieces (chained, or plain for a
//! range hashed apart), and [`BlobVerifier`] checks a whole blob against its digest.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use super::chain::State;
use super::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, Manifest, ManifestError, VerifyError};
use crate::Digest;

/// Builds a [`Manifest`] from bytes fed in any pieces, hashing as it goes, so a blob of any
/// size is ingested in one pass with bounded memory. Chained (each byte hashed once) unless
/// made [`ManifestBuilder::plain`].
#[derive(Debug)]
pub struct ManifestBuilder {
    chunk_size: u32,
    hashing: Hashing,
    current_len: u32,
    size: u64,
    chunks: Vec<Digest>,
}

#[derive(Debug)]
enum Hashing {
    /// SHA-256's state after the blob's whole blocks so far, and the bytes of the block
    /// begun.
    Chained {
        state: State,
        block: [u8; 64],
        filled: usize,
    },
    /// The whole blob's hash and the current chunk's.
    Plain { whole: Sha256, current: Sha256 },
}

impl ManifestBuilder {
    /// A builder of a chained manifest: the bytes fed are the whole blob, from its start.
    pub fn new(chunk_size: u32) -> Result<Self, ManifestError> {
        Self::with(
            chunk_size,
            Hashing::Chained {
                state: State::INITIAL,
                block: [0; 64],
                filled: 0,
            },
        )
    }

    /// A builder of plain chunk digests, for a range of a blob hashed apart from the rest
    /// (its "digest" is the range's own).
    pub fn plain(chunk_size: u32) -> Result<Self, ManifestError> {
        Self::with(
            chunk_size,
            Hashing::Plain {
                whole: Sha256::new(),
                current: Sha256::new(),
            },
        )
    }

    fn with(chunk_size: u32, hashing: Hashing) -> Result<Self, ManifestError> {
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        {
            return Err(ManifestError::BadChunkSize(chunk_size));
        }
        Ok(Self {
            chunk_size,
            hashing,
            current_len: 0,
            size: 0,
            chunks: Vec::new(),
        })
    }

    /// Feeds the next bytes of the blob.
    pub fn update(&mut self, mut data: &[u8]) {
        self.size += data.len() as u64;
        while !data.is_empty() {
            let room = (self.chunk_size - self.current_len) as usize;
            let take = room.min(data.len());
            self.absorb(&data[..take]);
            self.current_len += take as u32;
            data = &data[take..];
            if self.current_len == self.chunk_size {
                self.close_chunk();
            }
        }
    }

    /// Hashes bytes of the current chunk.
    fn absorb(&mut self, mut piece: &[u8]) {
        match &mut self.hashing {
            Hashing::Plain { whole, current } => {
                whole.update(piece);
                current.update(piece);
            }
            Hashing::Chained {
                state,
                block,
                filled,
            } => {
                if *filled > 0 {
                    let take = (block.len() - *filled).min(piece.len());
                    block[*filled..*filled + take].copy_from_slice(&piece[..take]);
                    *filled += take;
                    piece = &piece[take..];
                    if *filled < block.len() {
                        return;
                    }
                    state.compress(&block[..]);
                    *filled = 0;
                }
                let whole = piece.len() - piece.len() % block.len();
                state.compress(&piece[..whole]);
                let rest = &piece[whole..];
                block[..rest.len()].copy_from_slice(rest);
                *filled = rest.len();
            }
        }
    }

    /// Feeds everything `reader` yields until end of file.
    pub fn read_all(&mut self, mut reader: impl Read) -> io::Result<()> {
        let mut buf = vec![0u8; self.chunk_size as usize];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => self.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Values of the chunks completed so far, in order (the last chunk's only after
    /// [`ManifestBuilder::finish`]: a chained manifest's last value is the blob digest, which
    /// needs the blob's end).
    pub fn chunks_done(&self) -> &[Digest] {
        &self.chunks
    }

    pub fn finish(mut self) -> Result<Manifest, ManifestError> {
        if matches!(self.hashing, Hashing::Plain { .. }) && self.current_len > 0 {
            self.close_chunk();
        }
        match self.hashing {
            Hashing::Plain { whole, .. } => {
                let digest = Digest::from_bytes(whole.finalize().into());
                Manifest::new(digest, self.size, self.chunk_size, self.chunks)
            }
            Hashing::Chained {
                state,
                block,
                filled,
            } => {
                let digest = state.finish(&block[..filled], self.size);
                if self.current_len > 0 {
                    self.chunks.push(digest);
                } else if let Some(last) = self.chunks.last_mut() {
                    // The blob ends on a chunk boundary: its last value is the digest, not
                    // the state before the padding.
                    *last = digest;
                }
                Manifest::chained(digest, self.size, self.chunk_size, self.chunks)
            }
        }
    }

    fn close_chunk(&mut self) {
        let value = match &mut self.hashing {
            Hashing::Plain { current, .. } => {
                let hasher = std::mem::replace(current, Sha256::new());
                Digest::from_bytes(hasher.finalize().into())
            }
            // A whole chunk is whole blocks: nothing is left in `block`.
            Hashing::Chained { state, .. } => state.value(),
        };
        self.chunks.push(value);
        self.current_len = 0;
    }
}

/// Incremental whole-blob verification: feed chunks in order, then compare with the manifest.
#[derive(Debug)]
pub struct BlobVerifier {
    hasher: Sha256,
}

impl Default for BlobVerifier {
    fn default() -> Self {
        Self {
            hasher: Sha256::new(),
        }
    }
}

impl BlobVerifier {
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
    }
    pub fn finish(self, want: Digest) -> Result<(), VerifyError> {
        let got = Digest::from_bytes(self.hasher.finalize().into());
        if got == want {
            Ok(())
        } else {
            Err(VerifyError::WrongBlobDigest { got, want })
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn blob(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    pub(crate) fn plain_of(data: &[u8], chunk_size: u32) -> Manifest {
        let mut b = ManifestBuilder::plain(chunk_size).expect("builder");
        b.update(data);
        b.finish().expect("manifest")
    }

    #[test]
    fn builder_is_independent_of_how_input_is_split() {
        let data = blob(10_000);
        let whole = Manifest::from_reader(&data[..], 4096).expect("manifest");
        for piece in [1, 63, 64, 65, 333, 4096, 5000] {
            let mut b = ManifestBuilder::new(4096).expect("builder");
            for p in data.chunks(piece) {
                b.update(p);
            }
            assert_eq!(b.finish().as_ref(), Ok(&whole), "pieces of {piece}");
            let mut b = ManifestBuilder::plain(4096).expect("builder");
            for p in data.chunks(piece) {
                b.update(p);
            }
            assert_eq!(b.finish(), Ok(plain_of(&data, 4096)), "pieces of {piece}");
        }
    }

    #[test]
    fn a_plain_manifest_lists_each_chunks_own_digest() {
        let data = blob(2 * 4096 + 5);
        let m = plain_of(&data, 4096);
        assert!(!m.is_chained());
        assert_eq!(m.digest(), Digest::of(&data));
        let own: Vec<Digest> = data.chunks(4096).map(Digest::of).collect();
        assert_eq!(m.chunk_digests(), &own[..]);
    }

    #[test]
    fn whole_blob_verifier() {
        let data = blob(5000);
        let m = Manifest::from_reader(&data[..], 4096).expect("manifest");
        let mut v = BlobVerifier::default();
        v.update(&data);
        assert_eq!(v.finish(m.digest()), Ok(()));
        let mut v = BlobVerifier::default();
        v.update(&data[1..]);
        assert!(v.finish(m.digest()).is_err());
    }

    #[test]
    fn empty_input_is_refused() {
        let err = Manifest::from_reader(&[][..], 4096).expect_err("empty");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
