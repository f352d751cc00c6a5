//! The chunk journal (`<hex>.chunks`): an append-only list of fixed 8-byte records.
//!
//! - chunk record: `[index u32 LE][!index u32 LE]`, appended only after the chunk's data write
//!   returned, so it never precedes its data in the page cache;
//! - sync record: `[u32::MAX LE][covered u32 LE]`, appended after an fdatasync of the data
//!   file that began once the first `covered` records were in the journal: it says "the data of
//!   every chunk recorded at a position below `covered` is durable".
//!
//! `covered` (rather than "everything before me") lets the data fdatasync run without holding
//! the lock writers take to append records: records appended while it runs sit between
//! `covered` and the sync record and are simply not vouched for.
//!
//! Replay stops at the first record that is neither (complement mismatch, index out of range,
//! `covered` beyond its own position or going backwards, a partial record at the tail): after a
//! power loss an unsynced journal page may read as zeros or stale bytes, and nothing after such a
//! point can be trusted to be ordered. Records at or after the last `covered` must have their
//! chunk re-hashed before they count.
//!
//! This module is pure: it encodes and parses bytes; `blob.rs` and `files.rs` do the IO.

use shoal_proto::ChunkIndex;

/// Every record is this long.
pub(crate) const RECORD_LEN: u64 = 8;
const SYNC_TAG: u32 = u32::MAX;

/// One journal record.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Record {
    /// Chunk `index` was verified and its data written.
    Chunk(ChunkIndex),
    /// The data of the chunks recorded at positions `< covered` is durable.
    Sync { covered: u32 },
}

impl Record {
    pub(crate) fn encode(self) -> [u8; RECORD_LEN as usize] {
        let (a, b) = match self {
            Self::Chunk(index) => (index.0, !index.0),
            Self::Sync { covered } => (SYNC_TAG, covered),
        };
        let mut out = [0u8; RECORD_LEN as usize];
        out[..4].copy_from_slice(&a.to_le_bytes());
        out[4..].copy_from_slice(&b.to_le_bytes());
        out
    }
}

/// What a journal says, as far as it can be read.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub(crate) struct Replay {
    /// Chunks recorded before the last sync's `covered` mark: their data is durable.
    pub trusted: Vec<ChunkIndex>,
    /// Chunks recorded after it, with their record positions, in journal order: present only
    /// if their data still hashes right.
    pub unsynced: Vec<(u32, ChunkIndex)>,
    /// Bytes of well-formed records; anything after is torn or garbage.
    pub valid_len: u64,
    /// The journal is exactly well-formed records with every chunk record covered by a sync,
    /// so it can be appended to as it is.
    pub clean: bool,
}

/// Parses a journal of a blob with `chunk_count` chunks.
pub(crate) fn replay(bytes: &[u8], chunk_count: u32) -> Replay {
    let mut chunks: Vec<(u32, ChunkIndex)> = Vec::new();
    let mut covered = 0u32;
    let mut position = 0u32;
    for raw in bytes.chunks_exact(RECORD_LEN as usize) {
        let a = u32::from_le_bytes(raw[..4].try_into().expect("4 bytes"));
        let b = u32::from_le_bytes(raw[4..].try_into().expect("4 bytes"));
        if a == SYNC_TAG {
            if b > position || b < covered {
                break;
            }
            covered = b;
        } else if b == !a && a < chunk_count {
            chunks.push((position, ChunkIndex(a)));
        } else {
            break;
        }
        position += 1;
    }
    let valid_len = u64::from(position) * RECORD_LEN;

    // A chunk is recorded once per lifetime of the journal, but be tolerant of repeats: a
    // trusted record wins over an unsynced one.
    let mut seen = vec![0u8; (chunk_count as usize).div_ceil(8)];
    let mut replay = Replay {
        valid_len,
        ..Replay::default()
    };
    for &(_, index) in chunks.iter().filter(|(pos, _)| *pos < covered) {
        if !shoal_proto::wire::bitfield_get(&seen, index) {
            shoal_proto::wire::bitfield_set(&mut seen, index);
            replay.trusted.push(index);
        }
    }
    for &(pos, index) in chunks.iter().filter(|(pos, _)| *pos >= covered) {
        if !shoal_proto::wire::bitfield_get(&seen, index) {
            shoal_proto::wire::bitfield_set(&mut seen, index);
            replay.unsynced.push((pos, index));
        }
    }
    replay.clean = valid_len == bytes.len() as u64
        && chunks.iter().all(|(pos, _)| *pos < covered)
        && replay.trusted.len() == chunks.len();
    replay
}

/// A fresh journal holding `present` and one sync record vouching for all of them; written
/// once the data file has been fdatasynced.
pub(crate) fn compacted(present: &[ChunkIndex]) -> Vec<u8> {
    rewritten(present, &[])
}

/// A fresh journal that records `durable` (chunks whose data was fdatasynced), one sync record
/// vouching for exactly those, then `unsynced` (present, data not known to be durable: the next
/// group commit vouches for them, or the next open re-hashes them). What replaces a journal
/// from which dropped chunks must disappear (see `BlobEntry::forget`).
pub(crate) fn rewritten(durable: &[ChunkIndex], unsynced: &[ChunkIndex]) -> Vec<u8> {
    let records = durable.len() + 1 + unsynced.len();
    let mut out = Vec::with_capacity(records * RECORD_LEN as usize);
    for &index in durable {
        out.extend_from_slice(&Record::Chunk(index).encode());
    }
    let covered = u32::try_from(durable.len()).expect("chunk count fits in u32");
    out.extend_from_slice(&Record::Sync { covered }.encode());
    for &index in unsynced {
        out.extend_from_slice(&Record::Chunk(index).encode());
    }
    out
}

/// Bytes to reserve for a journal so appends never hit ENOSPC: each absent chunk is recorded
/// at most once (a chunk recorded again after it was dropped follows a rewrite that left it
/// out), each sync record vouches for at least one new chunk record, and a compacted or
/// rewritten journal adds one sync; see `BlobEntry::commit`.
pub(crate) fn reserved_len(chunk_count: u32) -> u64 {
    (2 * u64::from(chunk_count) + 2) * RECORD_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(records: &[Record]) -> Vec<u8> {
        records.iter().flat_map(|r| r.encode()).collect()
    }

    fn idx(v: &[u32]) -> Vec<ChunkIndex> {
        v.iter().copied().map(ChunkIndex).collect()
    }

    #[test]
    fn splits_trusted_from_unsynced_by_covered_mark() {
        use Record::*;
        let bytes = journal(&[
            Chunk(ChunkIndex(3)),
            Chunk(ChunkIndex(1)),
            Chunk(ChunkIndex(0)),
            // Chunk 0 was appended while the data fdatasync ran: not covered.
            Sync { covered: 2 },
            Chunk(ChunkIndex(2)),
        ]);
        let r = replay(&bytes, 4);
        assert_eq!(r.trusted, idx(&[3, 1]));
        assert_eq!(r.unsynced, vec![(2, ChunkIndex(0)), (4, ChunkIndex(2))]);
        assert_eq!(r.valid_len, bytes.len() as u64);
        assert!(!r.clean);
    }

    #[test]
    fn compacted_journal_is_clean_and_round_trips() {
        let present = idx(&[5, 0, 7]);
        let bytes = compacted(&present);
        let r = replay(&bytes, 8);
        assert_eq!(r.trusted, present);
        assert!(r.unsynced.is_empty());
        assert!(r.clean);
        assert!(replay(&[], 8).clean);
    }

    #[test]
    fn a_rewritten_journal_vouches_only_for_durable_chunks() {
        let bytes = rewritten(&idx(&[4, 1]), &idx(&[6, 0]));
        let r = replay(&bytes, 8);
        assert_eq!(r.trusted, idx(&[4, 1]));
        assert_eq!(r.unsynced, vec![(3, ChunkIndex(6)), (4, ChunkIndex(0))]);
        assert_eq!(r.valid_len, bytes.len() as u64);
        assert!(!r.clean, "the unsynced chunks are re-hashed on open");
    }

    #[test]
    fn stops_at_torn_tail_and_garbage() {
        use Record::*;
        let mut bytes = journal(&[
            Chunk(ChunkIndex(0)),
            Sync { covered: 1 },
            Chunk(ChunkIndex(1)),
        ]);
        let good = bytes.len() as u64;
        bytes.extend_from_slice(&Chunk(ChunkIndex(2)).encode()[..5]);
        let r = replay(&bytes, 4);
        assert_eq!(
            (r.trusted, r.unsynced, r.valid_len),
            (idx(&[0]), vec![(2, ChunkIndex(1))], good)
        );
        assert!(!r.clean);

        // Zeros (an unwritten page after power loss) end replay; so does everything after.
        let mut bytes = journal(&[Chunk(ChunkIndex(0))]);
        bytes.extend_from_slice(&[0u8; 8]);
        bytes.extend_from_slice(&journal(&[Chunk(ChunkIndex(1)), Sync { covered: 3 }]));
        let r = replay(&bytes, 4);
        assert_eq!((r.unsynced, r.valid_len), (vec![(0, ChunkIndex(0))], 8));

        // Out-of-range index, a sync claiming more than precedes it, a sync going backwards.
        for bad in [
            journal(&[Chunk(ChunkIndex(9))]),
            journal(&[Chunk(ChunkIndex(0)), Sync { covered: 2 }]),
            journal(&[
                Chunk(ChunkIndex(0)),
                Sync { covered: 1 },
                Sync { covered: 0 },
            ]),
        ] {
            let r = replay(&bad, 4);
            assert!(r.valid_len < bad.len() as u64, "{bad:?} accepted");
        }
    }

    #[test]
    fn repeated_records_count_once() {
        use Record::*;
        let bytes = journal(&[
            Chunk(ChunkIndex(1)),
            Sync { covered: 1 },
            Chunk(ChunkIndex(1)),
            Chunk(ChunkIndex(2)),
            Chunk(ChunkIndex(2)),
        ]);
        let r = replay(&bytes, 4);
        assert_eq!(
            (r.trusted, r.unsynced),
            (idx(&[1]), vec![(3, ChunkIndex(2))])
        );
    }
}
