//! The manifest: a blob's size and a SHA-256 value for every chunk, made once by whoever
//! ingests the blob and verified by every agent that receives a chunk. A manifest made by
//! reading the blob in order is *chained*: its values are SHA-256's state at each chunk's end
//! (`manifest/chain.rs`), so chunks that all pass make a blob that matches its digest. One
//! assembled from ranges hashed apart lists each chunk's own digest, and a blob assembled by
//! it is read whole against its digest at the end.

mod builder;
mod chain;

pub use builder::{BlobVerifier, ManifestBuilder};

use std::io::{self, Read};
use std::ops::Range;

use crate::{BlobId, ChunkIndex, Digest, DigestParseError, pb};
use chain::State;

/// Chunk size used across Shoal: 1 MiB.
pub const CHUNK_SIZE: u32 = 1 << 20;
/// The largest blob a manifest may describe: 1 TiB.
pub const MAX_BLOB_SIZE: u64 = 1 << 40;
/// Smallest and largest chunk sizes a manifest may carry (tests use small chunks).
const MIN_CHUNK_SIZE: u32 = 4 << 10;
const MAX_CHUNK_SIZE: u32 = 16 << 20;

/// A verified-by-construction description of a blob. Every constructor checks that the chunk
/// table matches the size, so `chunk_count() == ceil(size / chunk_size)` always holds.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Manifest {
    digest: Digest,
    size: u64,
    chunk_size: u32,
    chunks: Vec<Digest>,
    /// `chunks` are chaining values, the last one the blob digest (see `manifest/chain.rs`);
    /// otherwise each chunk's own SHA-256.
    chained: bool,
    /// The blob is named, not addressed by its content (`name.rs`): `digest` is
    /// [`Digest::naming`] of this, and the chain's last value is the content's SHA-256.
    name: Option<String>,
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("blob size is 0; empty blobs are not distributed")]
    Empty,
    #[error("blob size {0} bytes exceeds the 1 TiB limit")]
    TooLarge(u64),
    #[error("chunk size {0} is not a power of two between 4 KiB and 16 MiB")]
    BadChunkSize(u32),
    #[error(
        "manifest lists {got} chunks; a {size}-byte blob in {chunk_size}-byte chunks has {want}"
    )]
    ChunkCountMismatch {
        size: u64,
        chunk_size: u32,
        got: u64,
        want: u64,
    },
    #[error("chunk digest table is {0} bytes; expected a multiple of 32")]
    ChunkTableLength(usize),
    #[error("blob digest: {0}")]
    BlobDigest(DigestParseError),
    #[error("chunk {index} was said to hash to {new}, but it is known to hash to {known}")]
    DigestConflict {
        index: ChunkIndex,
        known: Digest,
        new: Digest,
    },
    #[error("digests for chunks {first}..{end} do not fit a blob of {count} chunks")]
    DigestsOutOfRange { first: u32, end: u64, count: u32 },
    #[error("a chained manifest's last value is {last}, not the blob digest {digest}")]
    ChainEnd { last: Digest, digest: Digest },
    #[error("{digest} is not the address of the name the manifest carries (or of any name)")]
    NotItsName { digest: Digest },
    #[error("a named blob's manifest must be chained (its content is checked by the chain)")]
    NamedPlain,
    #[error("a blob name is at most {max} bytes, not {0}", max = crate::MAX_NAME_LEN)]
    NameTooLong(usize),
}

/// Why data did not match the manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("chunk {index} does not exist; the blob has {count} chunks")]
    NoSuchChunk { index: ChunkIndex, count: u32 },
    #[error("chunk {index} is {got} bytes; expected {want}")]
    WrongLength {
        index: ChunkIndex,
        got: usize,
        want: usize,
    },
    #[error("chunk {index} hashes to {got}; manifest says {want}")]
    WrongDigest {
        index: ChunkIndex,
        got: Digest,
        want: Digest,
    },
    #[error("blob hashes to {got}; expected {want}")]
    WrongBlobDigest { got: Digest, want: Digest },
    #[error("chunk {index}'s digest is not known yet")]
    UnknownDigest { index: ChunkIndex },
    #[error("chunk {index} hashes on to {got} from the value before it; the manifest says {want}")]
    WrongChain {
        index: ChunkIndex,
        got: Digest,
        want: Digest,
    },
}

impl Manifest {
    /// Builds a manifest of plain chunk digests from its parts, checking that they agree.
    pub fn new(
        digest: Digest,
        size: u64,
        chunk_size: u32,
        chunks: Vec<Digest>,
    ) -> Result<Self, ManifestError> {
        Self::checked(digest, size, chunk_size, chunks, false, None)
    }

    /// Builds a chained manifest (chunk values are SHA-256 chaining values, see
    /// `manifest/chain.rs`): the last value must be the blob digest, or unknown yet.
    pub fn chained(
        digest: Digest,
        size: u64,
        chunk_size: u32,
        chunks: Vec<Digest>,
    ) -> Result<Self, ManifestError> {
        Self::checked(digest, size, chunk_size, chunks, true, None)
    }

    /// This chained manifest of some content as the manifest of the blob named `name`
    /// (`name.rs`): addressed by the name, the same table, whose last value stays the
    /// content's digest.
    pub fn named(self, name: &str) -> Result<Self, ManifestError> {
        if !self.chained {
            return Err(ManifestError::NamedPlain);
        }
        let digest = Digest::naming(name);
        let (size, chunk_size) = (self.size, self.chunk_size);
        Self::checked(
            digest,
            size,
            chunk_size,
            self.chunks,
            true,
            Some(name.into()),
        )
    }

    fn checked(
        digest: Digest,
        size: u64,
        chunk_size: u32,
        chunks: Vec<Digest>,
        chained: bool,
        name: Option<String>,
    ) -> Result<Self, ManifestError> {
        if let Some(name) = &name {
            if name.len() > crate::MAX_NAME_LEN {
                return Err(ManifestError::NameTooLong(name.len()));
            }
            if !chained {
                return Err(ManifestError::NamedPlain);
            }
            if Digest::naming(name) != digest {
                return Err(ManifestError::NotItsName { digest });
            }
        }
        if size == 0 {
            return Err(ManifestError::Empty);
        }
        if size > MAX_BLOB_SIZE {
            return Err(ManifestError::TooLarge(size));
        }
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        {
            return Err(ManifestError::BadChunkSize(chunk_size));
        }
        let want = size.div_ceil(u64::from(chunk_size));
        if chunks.len() as u64 != want {
            return Err(ManifestError::ChunkCountMismatch {
                size,
                chunk_size,
                got: chunks.len() as u64,
                want,
            });
        }
        if let Some(&last) = chunks.last().filter(|l| chained && !l.is_unknown())
            && name.is_none()
            && last != digest
        {
            return Err(ManifestError::ChainEnd { last, digest });
        }
        Ok(Self {
            digest,
            size,
            chunk_size,
            chunks,
            chained,
            name,
        })
    }

    /// The manifest of a blob being seeded whole, in order: size and chunk size final, every
    /// chunk value [`Digest::UNKNOWN`] until [`Manifest::learn`] fills it in. It is chained:
    /// the seeder learns the values as it reads.
    pub fn provisional(digest: Digest, size: u64, chunk_size: u32) -> Result<Self, ManifestError> {
        Self::provisional_named(digest, None, size, chunk_size)
    }

    /// [`Manifest::provisional`] of `digest`, which is the address of `name` if one is given
    /// (a blob named by its origin, `name.rs`).
    pub fn provisional_named(
        digest: Digest,
        name: Option<&str>,
        size: u64,
        chunk_size: u32,
    ) -> Result<Self, ManifestError> {
        let count = size.div_ceil(u64::from(chunk_size.max(1)));
        if count > MAX_BLOB_SIZE / u64::from(MIN_CHUNK_SIZE) {
            return Err(ManifestError::TooLarge(size));
        }
        let unknown = vec![Digest::UNKNOWN; count as usize];
        Self::checked(
            digest,
            size,
            chunk_size,
            unknown,
            true,
            name.map(Into::into),
        )
    }

    /// The chunk values are chaining values: a complete blob whose every chunk passed is
    /// one that matches the blob digest (see `manifest/chain.rs`).
    pub fn is_chained(&self) -> bool {
        self.chained
    }

    /// Whether chunk `index` can be checked now: its value is known, and for a chained
    /// manifest the value before it too.
    pub fn is_checkable(&self, index: ChunkIndex) -> bool {
        let i = index.as_usize();
        let known = |i: usize| self.chunks.get(i).is_some_and(|d| !d.is_unknown());
        known(i) && (!self.chained || i == 0 || known(i - 1))
    }

    /// Some chunk digest is not known yet.
    pub fn is_provisional(&self) -> bool {
        self.chunks.iter().any(Digest::is_unknown)
    }

    /// Chunks whose digest is known.
    pub fn known_count(&self) -> u32 {
        self.chunks.iter().filter(|d| !d.is_unknown()).count() as u32
    }

    /// Fills in the digests of chunks `first..` (an unknown entry of `digests` teaches
    /// nothing). A digest that contradicts a known one is refused and nothing changes.
    /// Returns how many digests were new.
    pub fn learn(&mut self, first: u32, digests: &[Digest]) -> Result<u32, ManifestError> {
        let end = u64::from(first) + digests.len() as u64;
        if end > u64::from(self.chunk_count()) {
            return Err(ManifestError::DigestsOutOfRange {
                first,
                end,
                count: self.chunk_count(),
            });
        }
        let at = first as usize;
        let last = self.chunks.len() - 1;
        for (i, new) in digests.iter().enumerate() {
            let known = if self.chained && at + i == last && self.name.is_none() {
                self.digest
            } else {
                self.chunks[at + i]
            };
            if !new.is_unknown() && !known.is_unknown() && known != *new {
                return Err(ManifestError::DigestConflict {
                    index: ChunkIndex(first + i as u32),
                    known,
                    new: *new,
                });
            }
        }
        let mut learned = 0;
        for (i, new) in digests.iter().enumerate() {
            let slot = &mut self.chunks[at + i];
            if slot.is_unknown() && !new.is_unknown() {
                *slot = *new;
                learned += 1;
            }
        }
        Ok(learned)
    }

    /// Reads `reader` to the end and builds its chained manifest with the given chunk size,
    /// hashing each byte once.
    pub fn from_reader(reader: impl Read, chunk_size: u32) -> io::Result<Self> {
        let mut builder = ManifestBuilder::new(chunk_size)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        builder.read_all(reader)?;
        builder
            .finish()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// The blob's address: its content's SHA-256, or the address of its name.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// The name of a blob named by its origin (`name.rs`).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The SHA-256 of the blob's content: its digest, or for a named blob the chain's last
    /// value once known.
    pub fn content_digest(&self) -> Option<Digest> {
        match self.name {
            None => Some(self.digest),
            Some(_) => self.chunks.last().copied().filter(|d| !d.is_unknown()),
        }
    }
    pub fn blob_id(&self) -> BlobId {
        BlobId(self.digest)
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }
    pub fn chunk_count(&self) -> u32 {
        // Bounded by MAX_BLOB_SIZE / MIN_CHUNK_SIZE = 2^28, checked in `new`.
        self.chunks.len() as u32
    }
    pub fn chunk_digests(&self) -> &[Digest] {
        &self.chunks
    }
    pub fn chunk_indices(&self) -> impl Iterator<Item = ChunkIndex> + use<> {
        (0..self.chunk_count()).map(ChunkIndex)
    }

    /// The byte range of chunk `index` within the blob; the last chunk may be short.
    pub fn chunk_range(&self, index: ChunkIndex) -> Result<Range<u64>, VerifyError> {
        self.check_index(index)?;
        let start = u64::from(index.0) * u64::from(self.chunk_size);
        let end = (start + u64::from(self.chunk_size)).min(self.size);
        Ok(start..end)
    }

    /// The length of chunk `index` in bytes.
    pub fn chunk_len(&self, index: ChunkIndex) -> Result<usize, VerifyError> {
        self.chunk_range(index).map(|r| (r.end - r.start) as usize)
    }

    pub fn chunk_digest(&self, index: ChunkIndex) -> Result<Digest, VerifyError> {
        self.check_index(index)?;
        Ok(self.chunks[index.as_usize()])
    }

    /// Checks `data` is exactly chunk `index`: right length, right SHA-256 (for a chained
    /// manifest: right chaining value from the one before it, or the blob digest for the last
    /// chunk).
    pub fn verify_chunk(&self, index: ChunkIndex, data: &[u8]) -> Result<(), VerifyError> {
        let want_len = self.chunk_len(index)?;
        if data.len() != want_len {
            return Err(VerifyError::WrongLength {
                index,
                got: data.len(),
                want: want_len,
            });
        }
        let want = self.chunks[index.as_usize()];
        if want.is_unknown() {
            return Err(VerifyError::UnknownDigest { index });
        }
        if self.chained {
            return self.verify_link(index, data, want);
        }
        let got = Digest::of(data);
        if got != want {
            return Err(VerifyError::WrongDigest { index, got, want });
        }
        Ok(())
    }

    /// Chunk `index` of a chained manifest, whose value `want` is known.
    fn verify_link(&self, index: ChunkIndex, data: &[u8], want: Digest) -> Result<(), VerifyError> {
        let i = index.as_usize();
        let mut state = match i.checked_sub(1).map(|p| self.chunks[p]) {
            None => State::INITIAL,
            Some(before) if before.is_unknown() => {
                return Err(VerifyError::UnknownDigest {
                    index: ChunkIndex(index.0 - 1),
                });
            }
            Some(before) => State::of(&before),
        };
        let got = if i + 1 == self.chunks.len() {
            state.finish(data, self.size)
        } else {
            state.compress(data);
            state.value()
        };
        if got != want {
            return Err(VerifyError::WrongChain { index, got, want });
        }
        Ok(())
    }

    fn check_index(&self, index: ChunkIndex) -> Result<(), VerifyError> {
        if index.0 >= self.chunk_count() {
            return Err(VerifyError::NoSuchChunk {
                index,
                count: self.chunk_count(),
            });
        }
        Ok(())
    }
}

impl From<&Manifest> for pb::v1::Manifest {
    fn from(m: &Manifest) -> Self {
        Self {
            digest: m.digest.as_bytes().to_vec(),
            size: m.size,
            chunk_size: m.chunk_size,
            chunk_digests: Digest::table_bytes(&m.chunks).into(),
            chained: m.chained,
            name: m.name.clone().unwrap_or_default(),
        }
    }
}

impl TryFrom<&pb::v1::Manifest> for Manifest {
    type Error = ManifestError;

    /// Rejects anything a peer or client could get wrong: digest length, table length, chunk
    /// count, size bounds. The table's allocation is bounded by the message size limit.
    fn try_from(m: &pb::v1::Manifest) -> Result<Self, Self::Error> {
        let digest = Digest::from_slice(&m.digest).map_err(ManifestError::BlobDigest)?;
        let chunks = Digest::from_table(&m.chunk_digests)
            .ok_or(ManifestError::ChunkTableLength(m.chunk_digests.len()))?;
        let name = (!m.name.is_empty()).then(|| m.name.clone());
        Self::checked(digest, m.size, m.chunk_size, chunks, m.chained, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn builds_from_reader_and_verifies_every_chunk() {
        let data = blob(3 * 4096 + 17);
        let m = Manifest::from_reader(&data[..], 4096).expect("manifest");
        assert_eq!(m.size(), data.len() as u64);
        assert_eq!(m.chunk_count(), 4);
        assert_eq!(m.digest(), Digest::of(&data));
        for i in m.chunk_indices() {
            let r = m.chunk_range(i).expect("range");
            m.verify_chunk(i, &data[r.start as usize..r.end as usize])
                .expect("verifies");
        }
        assert_eq!(m.chunk_len(ChunkIndex(3)), Ok(17));
    }

    #[test]
    fn a_chained_manifest_ends_in_the_blob_digest_and_checks_chunks_in_any_order() {
        // Ending inside a chunk, on a chunk boundary, and a single chunk.
        for len in [3 * 4096 + 17, 3 * 4096, 4096, 100] {
            let data = blob(len);
            let m = Manifest::from_reader(&data[..], 4096).expect("manifest");
            assert!(m.is_chained());
            assert_eq!(m.chunk_digests().last(), Some(&Digest::of(&data)), "{len}");
            for i in (0..m.chunk_count()).rev().map(ChunkIndex) {
                let r = m.chunk_range(i).expect("range");
                let chunk = &data[r.start as usize..r.end as usize];
                assert_eq!(m.verify_chunk(i, chunk), Ok(()), "{len}: chunk {i}");
                // Any flipped bit anywhere in it fails, and so does another chunk's bytes.
                for at in [0, chunk.len() / 2, chunk.len() - 1] {
                    let mut bad = chunk.to_vec();
                    bad[at] ^= 0x10;
                    assert!(matches!(
                        m.verify_chunk(i, &bad),
                        Err(VerifyError::WrongChain { .. })
                    ));
                }
            }
        }
    }

    #[test]
    fn a_lying_chain_lets_no_blob_but_the_real_one_complete() {
        // The chain of other bytes, under the real blob's digest: the liar's own chunks pass
        // up to the last, whose value must be the digest; the real chunks fail against it.
        let real = blob(4 * 4096);
        let other: Vec<u8> = real.iter().map(|b| b ^ 0x5a).collect();
        let theirs = Manifest::from_reader(&other[..], 4096).expect("manifest");
        let mut values = theirs.chunk_digests().to_vec();
        *values.last_mut().expect("chunks") = Digest::of(&real);
        let lie = Manifest::chained(Digest::of(&real), 4 * 4096, 4096, values).expect("lie");
        for i in 0..3 {
            let r = i * 4096..(i + 1) * 4096;
            assert_eq!(
                lie.verify_chunk(ChunkIndex(i as u32), &other[r.clone()]),
                Ok(())
            );
            assert!(lie.verify_chunk(ChunkIndex(i as u32), &real[r]).is_err());
        }
        assert!(lie.verify_chunk(ChunkIndex(3), &other[3 * 4096..]).is_err());
        assert!(lie.verify_chunk(ChunkIndex(3), &real[3 * 4096..]).is_err());
        // A chain whose last value is not the digest is no manifest at all.
        let p = pb::v1::Manifest::from(&theirs);
        let mut wrong_end = p.clone();
        wrong_end.digest = Digest::of(&real).as_bytes().to_vec();
        assert!(matches!(
            Manifest::try_from(&wrong_end),
            Err(ManifestError::ChainEnd { .. })
        ));
        assert_eq!(Manifest::try_from(&p), Ok(theirs));
    }

    #[test]
    fn a_chained_chunk_is_checkable_only_after_the_value_before_it() {
        let data = blob(3 * 4096);
        let full = Manifest::from_reader(&data[..], 4096).expect("manifest");
        let mut m = Manifest::provisional(full.digest(), 3 * 4096, 4096).expect("provisional");
        assert_eq!(m.learn(1, &full.chunk_digests()[1..2]), Ok(1));
        assert!(!m.is_checkable(ChunkIndex(1)));
        assert_eq!(
            m.verify_chunk(ChunkIndex(1), &data[4096..8192]),
            Err(VerifyError::UnknownDigest {
                index: ChunkIndex(0)
            })
        );
        assert_eq!(m.learn(0, &full.chunk_digests()[..1]), Ok(1));
        assert!(m.is_checkable(ChunkIndex(0)) && m.is_checkable(ChunkIndex(1)));
        assert_eq!(m.verify_chunk(ChunkIndex(1), &data[4096..8192]), Ok(()));
        // The last value can only ever be the blob digest.
        assert!(matches!(
            m.learn(2, &[Digest::of(b"not the blob")]),
            Err(ManifestError::DigestConflict { .. })
        ));
        assert_eq!(m.learn(2, &[full.digest()]), Ok(1));
        assert_eq!(m, full);
    }

    #[test]
    fn verify_rejects_wrong_bytes_length_and_index() {
        let data = blob(8192);
        let m = Manifest::from_reader(&data[..], 4096).expect("manifest");
        let mut bad = data[..4096].to_vec();
        bad[7] ^= 1;
        assert!(matches!(
            m.verify_chunk(ChunkIndex(0), &bad),
            Err(VerifyError::WrongChain { .. })
        ));
        let plain = builder::tests::plain_of(&data, 4096);
        assert!(matches!(
            plain.verify_chunk(ChunkIndex(0), &bad),
            Err(VerifyError::WrongDigest { .. })
        ));
        assert!(matches!(
            m.verify_chunk(ChunkIndex(0), &data[..4095]),
            Err(VerifyError::WrongLength {
                got: 4095,
                want: 4096,
                ..
            })
        ));
        assert!(matches!(
            m.verify_chunk(ChunkIndex(2), &data[..4096]),
            Err(VerifyError::NoSuchChunk { count: 2, .. })
        ));
    }

    #[test]
    fn protobuf_round_trip_and_rejections() {
        let data = blob(9000);
        let m = Manifest::from_reader(&data[..], 4096).expect("manifest");
        let p = pb::v1::Manifest::from(&m);
        assert_eq!(Manifest::try_from(&p), Ok(m.clone()));

        let mut short_digest = p.clone();
        short_digest.digest.pop();
        assert_eq!(
            Manifest::try_from(&short_digest),
            Err(ManifestError::BlobDigest(DigestParseError::WrongRawLength(
                31
            )))
        );

        let mut ragged = p.clone();
        ragged
            .chunk_digests
            .truncate(ragged.chunk_digests.len() - 1);
        assert_eq!(
            Manifest::try_from(&ragged),
            Err(ManifestError::ChunkTableLength(95))
        );

        let mut missing = p.clone();
        missing.chunk_digests.truncate(64);
        assert!(matches!(
            Manifest::try_from(&missing),
            Err(ManifestError::ChunkCountMismatch {
                got: 2,
                want: 3,
                ..
            })
        ));

        let mut zero = p.clone();
        zero.size = 0;
        assert_eq!(Manifest::try_from(&zero), Err(ManifestError::Empty));

        let mut huge = p.clone();
        huge.size = MAX_BLOB_SIZE + 1;
        assert_eq!(
            Manifest::try_from(&huge),
            Err(ManifestError::TooLarge(MAX_BLOB_SIZE + 1))
        );

        let mut odd = p;
        odd.chunk_size = 5000;
        assert_eq!(
            Manifest::try_from(&odd),
            Err(ManifestError::BadChunkSize(5000))
        );
    }

    #[test]
    fn a_provisional_manifest_learns_digests_and_refuses_contradictions() {
        let data = blob(9000);
        let full = Manifest::from_reader(&data[..], 4096).expect("manifest");
        let mut m = Manifest::provisional(full.digest(), 9000, 4096).expect("provisional");
        assert!(m.is_provisional());
        assert_eq!(m.known_count(), 0);
        assert_eq!(
            m.verify_chunk(ChunkIndex(0), &data[..4096]),
            Err(VerifyError::UnknownDigest {
                index: ChunkIndex(0)
            })
        );
        let digests = full.chunk_digests();
        assert_eq!(m.learn(1, &digests[1..]), Ok(2));
        assert_eq!(m.learn(1, &digests[1..2]), Ok(0), "nothing new");
        assert_eq!(m.known_count(), 2);
        assert!(m.verify_chunk(ChunkIndex(2), &data[8192..]).is_ok());
        // A contradiction changes nothing, even the unknown entries beside it.
        let wrong = [digests[0], Digest::of(b"other")];
        assert!(matches!(
            m.learn(0, &wrong),
            Err(ManifestError::DigestConflict { .. })
        ));
        assert_eq!(m.known_count(), 2);
        assert!(matches!(
            m.learn(2, &digests[..2]),
            Err(ManifestError::DigestsOutOfRange { .. })
        ));
        assert_eq!(m.learn(0, &[digests[0], Digest::UNKNOWN]), Ok(1));
        assert!(!m.is_provisional());
        assert_eq!(m, full);
        // A provisional manifest survives the wire (unknown entries are zero bytes).
        let p = pb::v1::Manifest::from(&Manifest::provisional(full.digest(), 9000, 4096).unwrap());
        assert_eq!(Manifest::try_from(&p).map(|m| m.known_count()), Ok(0));
    }

    #[test]
    fn a_named_blob_is_checked_by_its_chain_and_only_under_its_own_name() {
        let data = blob(3 * 4096 + 100);
        let content = Manifest::from_reader(&data[..], 4096).expect("manifest");
        let name = crate::url_name("http://h0/m.bin", "\"e1\"", data.len() as u64);
        let named = content.clone().named(&name).expect("named");
        assert_eq!(named.digest(), Digest::naming(&name));
        assert_eq!(named.content_digest(), Some(Digest::of(&data)));
        assert_eq!(content.content_digest(), Some(content.digest()));
        for i in named.chunk_indices() {
            let r = named.chunk_range(i).unwrap();
            named
                .verify_chunk(i, &data[r.start as usize..r.end as usize])
                .expect("verifies");
        }
        // The name travels with the manifest and is checked against the address.
        let mut wire = pb::v1::Manifest::from(&named);
        assert_eq!(Manifest::try_from(&wire).as_ref(), Ok(&named));
        wire.name = crate::url_name("http://h0/m.bin", "\"e2\"", data.len() as u64);
        assert!(matches!(
            Manifest::try_from(&wire),
            Err(ManifestError::NotItsName { .. })
        ));
        // Without its name, the table does not end at the address: refused.
        wire.name.clear();
        assert!(matches!(
            Manifest::try_from(&wire),
            Err(ManifestError::ChainEnd { .. })
        ));
        // No content digest can pass as a name.
        let mut forged = pb::v1::Manifest::from(&content);
        forged.name = name.clone();
        assert!(matches!(
            Manifest::try_from(&forged),
            Err(ManifestError::NotItsName { .. })
        ));
        // A provisional named manifest learns its last value, the content digest.
        let mut p =
            Manifest::provisional_named(named.digest(), Some(&name), data.len() as u64, 4096)
                .expect("provisional");
        assert_eq!(p.content_digest(), None);
        assert_eq!(p.learn(0, named.chunk_digests()), Ok(4));
        assert_eq!(p, named);
        assert!(matches!(
            Manifest::provisional_named(Digest::of(b"x"), Some(&name), 10, 4096),
            Err(ManifestError::NotItsName { .. })
        ));
    }
}
