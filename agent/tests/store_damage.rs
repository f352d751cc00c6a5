//! A chunk that rotted on disk: `Store::check_chunk` reads it back past the page cache, drops
//! it, reports it, and writes it out of the journal, so that neither a later group commit nor
//! a restart brings it back.

#[path = "support/store.rs"]
mod util;

use shoal_agent::store::{ChunkCheck, DamageCause, Reread, StoreError};
use shoal_proto::ChunkIndex;
use tokio::sync::broadcast::error::TryRecvError;
use util::*;

const QUOTA: u64 = 1 << 30;

#[test]
fn store_a_corrupt_chunk_is_dropped_reported_and_stays_dropped_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, m) = blob(7, 8 * CHUNK as usize);
    let d = m.digest();
    {
        let store = open(dir.path(), QUOTA);
        let mut damage = store.damage();
        store.insert_manifest(&m).expect("insert");
        put(&store, &data, &m, 0..8);
        store.verify_blob(&d).expect("whole and intact");
        // Completion committed every chunk: all of them are vouched for by a sync record.

        corrupt_chunk_on_disk(dir.path(), &m, 5);
        // What a peer would be served before anyone looks.
        assert_ne!(
            &store.get_chunk(&d, ChunkIndex(5)).expect("still present")[..],
            chunk(&data, &m, 5)
        );
        assert_eq!(
            store
                .check_chunk(&d, ChunkIndex(4), Reread::Disk)
                .expect("check 4"),
            ChunkCheck::Intact
        );
        assert_eq!(
            store
                .check_chunk(&d, ChunkIndex(5), Reread::Disk)
                .expect("check 5"),
            ChunkCheck::Dropped
        );
        assert!(!store.has_chunk(&d, ChunkIndex(5)));
        assert!(!store.is_complete(&d));
        assert!(matches!(
            store.get_chunk(&d, ChunkIndex(5)),
            Err(StoreError::ChunkMissing { .. })
        ));
        assert_eq!(
            store
                .check_chunk(&d, ChunkIndex(5), Reread::Disk)
                .expect("again"),
            ChunkCheck::Absent,
            "dropped once"
        );
        let report = damage.try_recv().expect("a damage report");
        assert_eq!(report.blob, d);
        assert_eq!(report.chunks, vec![ChunkIndex(5)]);
        assert_eq!(report.cause, DamageCause::Corrupt);
        assert!(report.was_complete);
        assert!(matches!(damage.try_recv(), Err(TryRecvError::Empty)));
        // The bitfield peers are sent no longer offers it.
        let (_, bits) = store.bitfield(&d).expect("bitfield");
        assert_eq!(bits[0], 0b1101_1111);
        // A commit after the drop must not vouch for it either.
        store.flush().expect("flush");
    }
    // The journal no longer records chunk 5: the rotten bytes are not trusted after a restart.
    let store = open(dir.path(), QUOTA);
    assert_eq!(present(&store, &m), vec![0, 1, 2, 3, 4, 6, 7]);
    assert_present_chunks_match(&store, &data, &m);
    // Fetched again, it is whole and verified once more.
    put(&store, &data, &m, [5]);
    store.verify_blob(&d).expect("repaired");
    drop(store);
    let store = open(dir.path(), QUOTA);
    assert!(store.is_complete(&d));
    store.verify_blob(&d).expect("repaired after a restart");
}

#[test]
fn store_dropping_a_chunk_keeps_the_unsynced_ones_unvouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, m) = blob(8, 8 * CHUNK as usize);
    let d = m.digest();
    {
        let store = open(dir.path(), QUOTA);
        store.insert_manifest(&m).expect("insert");
        // Under SYNC_EVERY chunks and not complete: nothing is vouched for yet.
        put(&store, &data, &m, [0, 1, 2, 3]);
        corrupt_chunk_on_disk(dir.path(), &m, 1);
        assert_eq!(
            store
                .check_chunk(&d, ChunkIndex(1), Reread::Disk)
                .expect("check"),
            ChunkCheck::Dropped
        );
        assert_eq!(present(&store, &m), vec![0, 2, 3]);
        // No flush: a crash now. Chunk 3 did not survive it.
        corrupt_chunk_on_disk(dir.path(), &m, 3);
    }
    // The rewritten journal did not vouch for the unsynced chunks: they were re-hashed on
    // open, and the one whose data was lost is gone; the dropped one stays dropped.
    let store = open(dir.path(), QUOTA);
    assert_eq!(present(&store, &m), vec![0, 2]);
    assert_present_chunks_match(&store, &data, &m);
}

#[test]
fn store_a_chunk_past_the_end_of_a_truncated_data_file_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, m) = blob(9, 4 * CHUNK as usize);
    let d = m.digest();
    let store = open(dir.path(), QUOTA);
    store.insert_manifest(&m).expect("insert");
    put(&store, &data, &m, 0..4);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(data_file(dir.path(), &d))
        .expect("open data");
    f.set_len(3 * u64::from(CHUNK) + 100).expect("truncate");
    assert_eq!(
        store
            .check_chunk(&d, ChunkIndex(3), Reread::Served)
            .expect("check"),
        ChunkCheck::Dropped
    );
    assert_eq!(
        store
            .check_chunk(&d, ChunkIndex(2), Reread::Disk)
            .expect("check"),
        ChunkCheck::Intact
    );
    assert_eq!(
        store
            .check_chunk(
                &shoal_proto::Digest::of(b"unknown"),
                ChunkIndex(0),
                Reread::Served
            )
            .expect("unknown blob"),
        ChunkCheck::Absent
    );
}
