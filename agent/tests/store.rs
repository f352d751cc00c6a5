//! Content store behaviour on real files: round trips, verification, restart, whole-blob
//! checks, eviction and concurrent readers and writers.

#[path = "support/store.rs"]
mod util;

use std::collections::HashSet;
use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use shoal_agent::store::{PutOutcome, StoreError};
use shoal_proto::{ChunkIndex, Manifest, VerifyError};
use util::*;

const QUOTA: u64 = 1 << 30;

#[test]
fn store_put_get_round_trip_serves_only_verified_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), QUOTA);
    let (data, m) = blob(1, 4 * CHUNK as usize + 100);
    let d = m.digest();
    assert!(
        matches!(store.put_chunk(&d, ChunkIndex(0), chunk(&data, &m, 0)), Err(StoreError::UnknownBlob(x)) if x == d)
    );
    store.insert_manifest(&m).expect("insert");
    store.insert_manifest(&m).expect("insert is idempotent");
    assert_eq!(store.manifest(&d).as_deref(), Some(&m));
    let mut events = store.subscribe(&d).expect("subscribe");

    put(&store, &data, &m, [0, 2, 4]);
    assert_eq!(
        store
            .put_chunk(&d, ChunkIndex(2), chunk(&data, &m, 2))
            .expect("again"),
        PutOutcome::AlreadyPresent
    );
    for i in [0, 2, 4] {
        assert_eq!(
            &store.get_chunk(&d, ChunkIndex(i)).expect("get")[..],
            chunk(&data, &m, i)
        );
        assert_eq!(events.try_recv().expect("event"), ChunkIndex(i));
    }
    assert!(
        events.try_recv().is_err(),
        "no event for an already present chunk"
    );
    assert!(matches!(
        store.get_chunk(&d, ChunkIndex(1)),
        Err(StoreError::ChunkMissing {
            index: ChunkIndex(1),
            ..
        })
    ));
    assert!(matches!(
        store.get_chunk(&d, ChunkIndex(5)),
        Err(StoreError::Verify(VerifyError::NoSuchChunk { .. }))
    ));
    assert_eq!(
        store.bitfield(&d),
        Some((5, bytes::Bytes::from_static(&[0b1_0101])))
    );
    assert_eq!(store.present_count(&d), Some(3));
    assert!(!store.is_complete(&d));
    assert_eq!(store.usage_bytes(), m.size());

    put(&store, &data, &m, [1, 3]);
    assert!(store.is_complete(&d));
    assert_eq!(
        fs::read(store.data_path(&d).expect("path")).expect("read data file"),
        data
    );
    let summary = store.blobs();
    assert_eq!(summary.len(), 1);
    assert_eq!(
        (
            summary[0].digest,
            summary[0].present,
            summary[0].chunk_count
        ),
        (d, 5, 5)
    );
}

#[test]
fn store_corrupt_chunk_is_rejected_and_never_present_even_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, m) = blob(2, 3 * CHUNK as usize);
    let d = m.digest();
    {
        let store = open(dir.path(), QUOTA);
        store.insert_manifest(&m).expect("insert");
        put(&store, &data, &m, [0]);
        let mut bad = chunk(&data, &m, 1).to_vec();
        bad[100] ^= 1;
        assert!(matches!(
            store.put_chunk(&d, ChunkIndex(1), &bad),
            Err(StoreError::Verify(VerifyError::WrongChain { .. }))
        ));
        assert!(matches!(
            store.put_chunk(&d, ChunkIndex(1), &chunk(&data, &m, 1)[1..]),
            Err(StoreError::Verify(VerifyError::WrongLength { .. }))
        ));
        // Another chunk's (valid) bytes at the wrong index are refused too.
        assert!(matches!(
            store.put_chunk(&d, ChunkIndex(1), chunk(&data, &m, 2)),
            Err(StoreError::Verify(VerifyError::WrongChain { .. }))
        ));
        assert!(!store.has_chunk(&d, ChunkIndex(1)));
        assert!(matches!(
            store.get_chunk(&d, ChunkIndex(1)),
            Err(StoreError::ChunkMissing { .. })
        ));
        // Refused bytes were not even written.
        let on_disk = fs::read(data_file(dir.path(), &d)).expect("read");
        assert!(
            on_disk[CHUNK as usize..2 * CHUNK as usize]
                .iter()
                .all(|&b| b == 0)
        );
    }
    let store = open(dir.path(), QUOTA);
    assert_eq!(present(&store, &m), vec![0]);
    assert!(matches!(
        store.get_chunk(&d, ChunkIndex(1)),
        Err(StoreError::ChunkMissing { .. })
    ));
    assert_present_chunks_match(&store, &data, &m);
}

#[test]
fn store_restart_keeps_every_chunk_with_and_without_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, m) = blob(3, 10 * CHUNK as usize + 7);
    let d = m.digest();
    {
        let store = open(dir.path(), QUOTA);
        store.insert_manifest(&m).expect("insert");
        put(&store, &data, &m, [0, 1, 3, 10]);
        // Dropped without flush: as after a process crash, only the page cache has it.
    }
    {
        let store = open(dir.path(), QUOTA);
        assert_eq!(store.manifest(&d).as_deref(), Some(&m));
        assert_eq!(present(&store, &m), vec![0, 1, 3, 10]);
        assert_present_chunks_match(&store, &data, &m);
        assert_eq!(store.usage_bytes(), m.size());
        // The recovered journal is appended to correctly.
        put(&store, &data, &m, [2, 4]);
    }
    {
        let store = open(dir.path(), QUOTA);
        assert_eq!(present(&store, &m), vec![0, 1, 2, 3, 4, 10]);
        put(&store, &data, &m, 5..10);
        assert!(store.is_complete(&d));
        store.flush().expect("flush");
    }
    let store = open(dir.path(), QUOTA);
    assert!(store.is_complete(&d));
    assert_present_chunks_match(&store, &data, &m);
    store.verify_blob(&d).expect("complete blob verifies");
    store.flush().expect("flush twice");
    drop(store);
    assert_eq!(open(dir.path(), QUOTA).present_count(&d), Some(11));
}

#[test]
fn store_whole_blob_verification_detects_altered_data_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), QUOTA);
    let (data, m) = blob(4, 5 * CHUNK as usize + 1);
    let d = m.digest();
    store.insert_manifest(&m).expect("insert");
    put(&store, &data, &m, 0..5);
    assert!(matches!(
        store.verify_blob(&d),
        Err(StoreError::ChunkMissing {
            index: ChunkIndex(5),
            ..
        })
    ));
    put(&store, &data, &m, [5]);
    store.verify_blob(&d).expect("verifies");

    corrupt_chunk_on_disk(dir.path(), &m, 3);
    assert!(matches!(
        store.verify_blob(&d),
        Err(StoreError::Verify(VerifyError::WrongBlobDigest { want, .. })) if want == d
    ));
}

#[test]
fn store_ensure_verified_reads_a_blob_once_and_verify_blob_always() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), QUOTA);
    let (data, m) = blob(6, 3 * CHUNK as usize);
    let d = m.digest();
    store.insert_manifest(&m).expect("insert");
    put(&store, &data, &m, 0..2);
    assert!(matches!(
        store.ensure_verified(&d),
        Err(StoreError::ChunkMissing { .. })
    ));
    put(&store, &data, &m, [2]);
    store.ensure_verified(&d).expect("verifies");

    // Altered behind the store's back after it passed: the remembered result stands, and
    // the full check still reads the data.
    corrupt_chunk_on_disk(dir.path(), &m, 1);
    store.ensure_verified(&d).expect("remembered");
    assert!(matches!(
        store.verify_blob(&d),
        Err(StoreError::Verify(VerifyError::WrongBlobDigest { .. }))
    ));
}

/// An order's end and a pull both verify the blob they waited for, at once: one reads it,
/// the other waits for that read instead of reading the blob again beside it; and a blob
/// with a chained manifest is not read.
#[test]
fn store_ensure_verified_by_two_callers_at_once_reads_the_blob_once() {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("recorder");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), QUOTA);
    // 32 MiB: reading it takes long enough that both callers arrive while it runs. Plain
    // chunk digests (a blob assembled from ranges): only a whole read checks the digest.
    let chunks = 8192;
    let (data, _) = blob(9, chunks as usize * CHUNK as usize);
    let mut plain = shoal_proto::ManifestBuilder::plain(CHUNK).expect("builder");
    plain.update(&data);
    let m = plain.finish().expect("manifest");
    store.insert_manifest(&m).expect("insert");
    put(&store, &data, &m, 0..chunks);
    let d = m.digest();
    let start = Arc::new(std::sync::Barrier::new(2));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (store, start) = (store.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                store.ensure_verified(&d)
            })
        })
        .collect();
    for r in readers {
        r.join().expect("thread").expect("verifies");
    }
    // A chained manifest's complete blob is not read at all: its chunks' checks were the
    // blob's. An incomplete one is still refused.
    let (data, chained) = blob(10, 4 * CHUNK as usize);
    store.insert_manifest(&chained).expect("insert");
    put(&store, &data, &chained, 0..3);
    assert!(matches!(
        store.ensure_verified(&chained.digest()),
        Err(StoreError::ChunkMissing { .. })
    ));
    put(&store, &data, &chained, 3..4);
    store.ensure_verified(&chained.digest()).expect("verified");
    let rendered = metrics.render();
    let reads: Vec<&str> = (rendered.lines())
        .filter(|l| l.starts_with("shoal_agent_whole_blob_reads_total"))
        .collect();
    assert_eq!(
        reads,
        ["shoal_agent_whole_blob_reads_total 1"],
        "{rendered}"
    );
}

#[test]
fn store_holds_keep_a_blob_like_a_pin_without_touching_the_users_pin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 4 * CHUNK as usize;
    let (_, a) = blob(20, size);
    let (_, b) = blob(21, size);
    let store = open(dir.path(), size as u64 + 100);
    store.insert_manifest(&a).expect("insert");
    let first = store.hold(&a.digest()).expect("hold");
    let second = store.hold(&a.digest()).expect("hold again");
    assert_eq!(store.is_pinned(&a.digest()), Some(false));
    assert!(matches!(
        store.insert_manifest(&b),
        Err(StoreError::QuotaExceeded { .. })
    ));
    // A user pins while the blob is held; releasing every hold keeps the pin.
    store.pin(&a.digest()).expect("pin");
    drop(first);
    drop(second);
    assert_eq!(store.is_pinned(&a.digest()), Some(true));
    assert!(store.insert_manifest(&b).is_err(), "still pinned");
    // Unpinned and released: evictable again. One hold out of two still protects it.
    store.unpin(&a.digest()).expect("unpin");
    let hold = store.hold(&a.digest()).expect("hold");
    let other = store.hold(&a.digest()).expect("hold");
    drop(other);
    assert!(store.insert_manifest(&b).is_err(), "one hold left");
    drop(hold);
    store.insert_manifest(&b).expect("evicts the released blob");
    assert!(store.manifest(&a.digest()).is_none());
}

#[test]
fn store_conflicting_manifest_and_remove() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), QUOTA);
    let (data, m) = blob(5, 4 * CHUNK as usize);
    let d = m.digest();
    store.insert_manifest(&m).expect("insert");
    let other = Manifest::from_reader(&data[..], 2 * CHUNK).expect("manifest");
    assert_eq!(other.digest(), d);
    assert!(
        matches!(store.insert_manifest(&other), Err(StoreError::ManifestConflict(x)) if x == d)
    );

    put(&store, &data, &m, [1]);
    store.remove(&d).expect("remove");
    assert!(store.manifest(&d).is_none());
    assert_eq!(store.usage_bytes(), 0);
    assert!(matches!(store.remove(&d), Err(StoreError::UnknownBlob(_))));
    assert_eq!(
        fs::read_dir(blobs_dir(dir.path())).expect("ls").count(),
        0,
        "files left behind"
    );
    drop(store);
    assert!(open(dir.path(), QUOTA).blobs().is_empty());
}

#[test]
fn store_evicts_least_recently_used_unpinned_blob() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 4 * CHUNK as usize;
    let blobs: Vec<(Vec<u8>, Manifest)> = (10..16).map(|seed| blob(seed, size)).collect();
    let [a, b, c, e, f, g] = &blobs[..] else {
        unreachable!()
    };
    let store = open(dir.path(), 3 * size as u64 + 100);
    for (data, m) in [a, b, c] {
        store.insert_manifest(m).expect("insert");
        put(&store, data, m, [0]);
    }
    // Reading A makes it recent: B is now the least recently used.
    store.get_chunk(&a.1.digest(), ChunkIndex(0)).expect("get");
    store.insert_manifest(&e.1).expect("insert evicts");
    let have: HashSet<_> = store.blobs().iter().map(|s| s.digest).collect();
    assert_eq!(
        have,
        HashSet::from([a.1.digest(), c.1.digest(), e.1.digest()])
    );
    assert!(
        !manifest_file(dir.path(), &b.1.digest()).exists(),
        "evicted blob's files deleted"
    );
    assert!(!data_file(dir.path(), &b.1.digest()).exists());
    assert_eq!(store.usage_bytes(), 3 * size as u64);

    // Pinned blobs are never evicted: C is the oldest but pinned, so A goes.
    store.pin(&c.1.digest()).expect("pin");
    store.insert_manifest(&f.1).expect("insert evicts");
    assert!(store.manifest(&c.1.digest()).is_some());
    assert!(store.manifest(&a.1.digest()).is_none());

    // Everything pinned: nothing fits and nothing is evicted.
    store.pin(&e.1.digest()).expect("pin");
    store.pin(&f.1.digest()).expect("pin");
    let err = store.insert_manifest(&g.1).expect_err("no room");
    assert!(
        matches!(err, StoreError::QuotaExceeded { needed, pinned, .. } if needed == size as u64 && pinned == 3 * size as u64),
        "{err:?}"
    );
    assert_eq!(store.blobs().len(), 3);
    assert!(store.blobs().iter().all(|s| s.pinned));

    store.unpin(&e.1.digest()).expect("unpin");
    store.insert_manifest(&g.1).expect("room after unpin");
    assert!(store.manifest(&e.1.digest()).is_none());

    // A blob larger than the whole quota never fits.
    let (_, huge) = blob(99, 4 * size);
    assert!(matches!(
        store.insert_manifest(&huge),
        Err(StoreError::QuotaExceeded { .. })
    ));
}

#[test]
fn store_eviction_order_survives_restart_via_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 2 * CHUNK as usize;
    let blobs: Vec<(Vec<u8>, Manifest)> = (20..24).map(|seed| blob(seed, size)).collect();
    let quota = 3 * size as u64;
    {
        let store = open(dir.path(), quota);
        for (data, m) in &blobs[..3] {
            store.insert_manifest(m).expect("insert");
            put(&store, data, m, [0]);
        }
        // Oldest insert, but most recently read.
        store
            .get_chunk(&blobs[0].1.digest(), ChunkIndex(0))
            .expect("get");
        store.flush().expect("flush");
    }
    let store = open(dir.path(), quota);
    store.insert_manifest(&blobs[3].1).expect("insert evicts");
    assert!(
        store.manifest(&blobs[0].1.digest()).is_some(),
        "recently read blob kept"
    );
    assert!(
        store.manifest(&blobs[1].1.digest()).is_none(),
        "least recently used evicted"
    );
}

#[test]
fn store_readers_see_only_verified_chunks_while_writers_put_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), QUOTA);
    let chunks = 300u32;
    let (data, m) = blob(30, chunks as usize * CHUNK as usize - 1);
    let d = m.digest();
    store.insert_manifest(&m).expect("insert");
    let data = Arc::new(data);
    let m = Arc::new(m);
    let done = Arc::new(AtomicBool::new(false));

    // Two writers put every chunk, in opposite orders, so most chunks race.
    let writers: Vec<_> = [false, true]
        .into_iter()
        .map(|reverse| {
            let (store, data, m) = (store.clone(), Arc::clone(&data), Arc::clone(&m));
            thread::spawn(move || {
                let mut stored = Vec::new();
                let order: Vec<u32> = if reverse {
                    (0..chunks).rev().collect()
                } else {
                    (0..chunks).collect()
                };
                for i in order {
                    let outcome = store
                        .put_chunk(&d, ChunkIndex(i), chunk(&data, &m, i))
                        .expect("put");
                    if outcome == PutOutcome::Stored {
                        stored.push(i);
                    }
                }
                stored
            })
        })
        .collect();
    let reader = {
        let (store, data, m, done) = (
            store.clone(),
            Arc::clone(&data),
            Arc::clone(&m),
            Arc::clone(&done),
        );
        thread::spawn(move || {
            let mut reads = 0u64;
            // One last full pass after the writers are done, so every chunk is read at least once.
            loop {
                let last_pass = done.load(Ordering::Relaxed);
                for i in 0..chunks {
                    match store.get_chunk(&d, ChunkIndex(i)) {
                        Ok(bytes) => {
                            assert_eq!(
                                &bytes[..],
                                chunk(&data, &m, i),
                                "chunk {i} served wrong bytes"
                            );
                            reads += 1;
                        }
                        Err(StoreError::ChunkMissing { .. }) => {}
                        Err(e) => panic!("get chunk {i}: {e}"),
                    }
                }
                if last_pass {
                    break;
                }
            }
            reads
        })
    };
    let mut stored: Vec<u32> = writers
        .into_iter()
        .flat_map(|w| w.join().expect("writer"))
        .collect();
    done.store(true, Ordering::Relaxed);
    assert!(reader.join().expect("reader") >= u64::from(chunks));
    stored.sort_unstable();
    assert_eq!(
        stored,
        (0..chunks).collect::<Vec<_>>(),
        "each chunk stored exactly once"
    );
    assert!(store.is_complete(&d));
    store.verify_blob(&d).expect("verifies");
    drop(store);
    let store = open(dir.path(), QUOTA);
    assert!(store.is_complete(&d));
    store.verify_blob(&d).expect("verifies after reopen");
}
