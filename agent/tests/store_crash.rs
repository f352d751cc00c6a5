//! Crash recovery of the content store: files are left as a crash or power loss would leave
//! them, then the store is reopened.

#[path = "support/store.rs"]
mod util;

use std::fs;

use shoal_agent::store::StoreError;
use shoal_proto::ChunkIndex;
use util::*;

const QUOTA: u64 = 1 << 30;

#[test]
fn store_chunk_written_without_journal_record_is_not_present() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, m) = blob(1, 4 * CHUNK as usize);
    {
        let store = open(dir.path(), QUOTA);
        store.insert_manifest(&m).expect("insert");
        put(&store, &data, &m, [0]);
    }
    // Crash between the data write of chunk 2 and its record.
    let offset = m.chunk_range(ChunkIndex(2)).expect("range").start;
    write_at(
        &data_file(dir.path(), &m.digest()),
        offset,
        chunk(&data, &m, 2),
    );
    let store = open(dir.path(), QUOTA);
    assert_eq!(present(&store, &m), vec![0]);
    assert!(matches!(
        store.get_chunk(&m.digest(), ChunkIndex(2)),
        Err(StoreError::ChunkMissing { .. })
    ));
}

#[test]
fn store_partial_record_at_tail_is_ignored_and_truncated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, m) = blob(2, 4 * CHUNK as usize);
    let journal = journal_file(dir.path(), &m.digest());
    {
        let store = open(dir.path(), QUOTA);
        store.insert_manifest(&m).expect("insert");
        put(&store, &data, &m, [0, 1]);
    }
    // The data of chunk 2 made it, its record only half: still not present.
    let offset = m.chunk_range(ChunkIndex(2)).expect("range").start;
    write_at(
        &data_file(dir.path(), &m.digest()),
        offset,
        chunk(&data, &m, 2),
    );
    append(&journal, &chunk_record(2)[..5]);
    {
        let store = open(dir.path(), QUOTA);
        assert_eq!(present(&store, &m), vec![0, 1]);
        let len = fs::metadata(&journal).expect("stat").len();
        assert_eq!(len % 8, 0, "torn tail cut off (journal is {len} bytes)");
        // Appending after the cut works and survives the next restart.
        put(&store, &data, &m, [2]);
    }
    let store = open(dir.path(), QUOTA);
    assert_eq!(present(&store, &m), vec![0, 1, 2]);
    assert_present_chunks_match(&store, &data, &m);
}

#[test]
fn store_garbage_record_ends_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, m) = blob(3, 4 * CHUNK as usize);
    let journal = journal_file(dir.path(), &m.digest());
    {
        let store = open(dir.path(), QUOTA);
        store.insert_manifest(&m).expect("insert");
        put(&store, &data, &m, [0, 1, 2]);
    }
    // Power loss left the page holding the second record unwritten (zeros).
    write_at(&journal, 8, &[0u8; 8]);
    let store = open(dir.path(), QUOTA);
    assert_eq!(present(&store, &m), vec![0]);
    assert_eq!(fs::metadata(&journal).expect("stat").len() % 8, 0);
    drop(store);
    assert_eq!(present(&open(dir.path(), QUOTA), &m), vec![0]);
}

#[test]
fn store_unsynced_record_whose_data_did_not_survive_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, m) = blob(4, 8 * CHUNK as usize);
    {
        let store = open(dir.path(), QUOTA);
        store.insert_manifest(&m).expect("insert");
        put(&store, &data, &m, [0, 1, 2, 5]);
    }
    // Power loss: the records reached the disk, chunk 1's data did not.
    corrupt_chunk_on_disk(dir.path(), &m, 1);
    {
        let store = open(dir.path(), QUOTA);
        assert_eq!(present(&store, &m), vec![0, 2, 5]);
        assert_present_chunks_match(&store, &data, &m);
        put(&store, &data, &m, [1]);
    }
    let store = open(dir.path(), QUOTA);
    assert_eq!(present(&store, &m), vec![0, 1, 2, 5]);
    assert_present_chunks_match(&store, &data, &m);
}

#[test]
fn store_group_commit_vouches_for_synced_chunks_and_rechecks_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, m) = blob(5, 100 * CHUNK as usize);
    let journal = journal_file(dir.path(), &m.digest());
    {
        let store = open(dir.path(), QUOTA);
        store.insert_manifest(&m).expect("insert");
        // More than one group (64 chunks): the first 64 are synced, the rest are not.
        put(&store, &data, &m, 0..70);
    }
    let bytes = fs::read(&journal).expect("read journal");
    let sync_records = bytes
        .chunks_exact(8)
        .filter(|r| r[..4] == u32::MAX.to_le_bytes())
        .count();
    assert_eq!(sync_records, 1, "one group commit after 64 chunks");

    // Damage a synced chunk and an unsynced one. Only the unsynced one is re-hashed on open:
    // synced records are trusted (that is what bounds the cost of recovery), and it is
    // whole-blob verification that catches later damage to the disk.
    corrupt_chunk_on_disk(dir.path(), &m, 10);
    corrupt_chunk_on_disk(dir.path(), &m, 67);
    let store = open(dir.path(), QUOTA);
    let have = present(&store, &m);
    assert!(have.contains(&10), "synced chunk re-hashed on open");
    assert!(!have.contains(&67), "unsynced chunk with bad data kept");
    assert_eq!(have.len(), 69);
}

#[test]
fn store_flush_makes_everything_trusted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, m) = blob(6, 6 * CHUNK as usize);
    {
        let store = open(dir.path(), QUOTA);
        store.insert_manifest(&m).expect("insert");
        put(&store, &data, &m, [0, 3]);
        store.flush().expect("flush");
    }
    let journal = fs::read(journal_file(dir.path(), &m.digest())).expect("read journal");
    assert_eq!(
        &journal[16..20],
        &u32::MAX.to_le_bytes(),
        "flush appends a sync record"
    );
    assert_eq!(
        &journal[20..24],
        &2u32.to_le_bytes(),
        "covering both chunk records"
    );
    let store = open(dir.path(), QUOTA);
    assert_eq!(present(&store, &m), vec![0, 3]);
}

#[test]
fn store_unreadable_manifest_and_orphans_are_removed_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, good) = blob(7, 2 * CHUNK as usize);
    let (_, bad) = blob(8, 2 * CHUNK as usize);
    {
        let store = open(dir.path(), QUOTA);
        store.insert_manifest(&good).expect("insert");
        store.insert_manifest(&bad).expect("insert");
        put(&store, &data, &good, [1]);
    }
    fs::write(manifest_file(dir.path(), &bad.digest()), b"not a manifest").expect("clobber");
    let (_, orphan) = blob(9, CHUNK as usize);
    fs::write(
        data_file(dir.path(), &orphan.digest()),
        b"left by a crashed insert",
    )
    .expect("orphan");
    fs::write(blobs_dir(dir.path()).join("x.manifest.tmp"), b"half").expect("tmp");

    let store = open(dir.path(), QUOTA);
    assert_eq!(store.blobs().len(), 1);
    assert_eq!(present(&store, &good), vec![1]);
    assert_eq!(store.usage_bytes(), good.size());
    let mut files: Vec<_> = fs::read_dir(blobs_dir(dir.path()))
        .expect("ls")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    files.sort();
    let hex = good.digest().hex();
    assert_eq!(
        files,
        vec![
            format!("{hex}.chunks"),
            format!("{hex}.data"),
            format!("{hex}.manifest")
        ]
    );
    // The removed blob can be inserted again from scratch.
    store.insert_manifest(&bad).expect("reinsert");
    assert_eq!(store.present_count(&bad.digest()), Some(0));
}

#[test]
fn store_one_unrecoverable_blob_does_not_keep_the_store_from_opening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (good_data, good) = blob(21, 2 * CHUNK as usize);
    let (bad_data, bad) = blob(22, 2 * CHUNK as usize);
    {
        let store = open(dir.path(), QUOTA);
        for (data, m) in [(&good_data, &good), (&bad_data, &bad)] {
            store.insert_manifest(m).expect("insert");
            put(&store, data, m, [0, 1]);
        }
        store.flush().expect("flush");
    }
    // An IO error on one blob's files (here its journal is not a file at all).
    let journal = journal_file(dir.path(), &bad.digest());
    fs::remove_file(&journal).expect("remove journal");
    fs::create_dir(&journal).expect("journal as a directory");

    let store = open(dir.path(), QUOTA);
    assert_eq!(present(&store, &good), vec![0, 1]);
    assert_present_chunks_match(&store, &good_data, &good);
    assert!(
        store.manifest(&bad.digest()).is_none(),
        "the broken blob is dropped"
    );
}
