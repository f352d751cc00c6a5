//! The content store on a real, small, full filesystem: a 4 MiB tmpfs. Needs root to mount
//! (CI runs as root); fails rather than skips without it.

#[path = "support/store.rs"]
mod util;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{FallocateFlags, fallocate};
use shoal_agent::store::StoreError;
use shoal_proto::ChunkIndex;
use util::*;

/// A tmpfs mounted on a temp dir, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test needs root to mount a small tmpfs (CI runs as root): mount failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Writes a file until the filesystem refuses with ENOSPC, down to the last byte.
fn fill(path: PathBuf) -> File {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("create filler");
    for block in [vec![0xa5u8; 16 << 10], vec![0xa5u8; 1]] {
        loop {
            match f.write(&block) {
                Ok(0) => panic!("write returned 0"),
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling: {e}"),
            }
        }
    }
    f
}

#[test]
fn store_full_disk_is_a_typed_error_and_leaves_the_store_consistent() {
    let fs = Tmpfs::mount("4m");
    let root = fs.path().join("store");
    let (data, m) = blob(1, 1 << 20);
    let d = m.digest();
    let store = open(&root, 1 << 40);
    store.insert_manifest(&m).expect("insert");
    put(&store, &data, &m, 0..100);

    // With the disk full, a new blob cannot reserve its space.
    let _filler = fill(fs.path().join("filler"));
    let (_, other) = blob(2, 1 << 20);
    let err = store
        .insert_manifest(&other)
        .expect_err("insert on a full disk");
    assert!(matches!(err, StoreError::DiskFull { .. }), "{err:?}");
    assert!(store.manifest(&other.digest()).is_none());
    assert_eq!(store.usage_bytes(), m.size());
    assert!(
        !manifest_file(&root, &other.digest()).exists(),
        "failed insert left a manifest"
    );

    // The data file's reservation makes in-place writes immune to ENOSPC. Give up the space of
    // the chunks not yet written (as on a filesystem without fallocate) and fill it too.
    let tail = m.chunk_range(ChunkIndex(100)).expect("range").start;
    let data_path = data_file(&root, &d);
    let f = OpenOptions::new()
        .write(true)
        .open(&data_path)
        .expect("open data");
    fallocate(
        &f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        tail,
        m.size() - tail,
    )
    .expect("punch hole");
    drop(f);
    let _filler2 = fill(fs.path().join("filler2"));

    let mut written = 0;
    let mut disk_full = None;
    for i in 100..m.chunk_count() {
        match store.put_chunk(&d, ChunkIndex(i), chunk(&data, &m, i)) {
            Ok(_) => written += 1,
            Err(e) => {
                disk_full = Some((i, e));
                break;
            }
        }
    }
    let (failed, err) = disk_full.expect("some put must hit the full disk");
    assert!(matches!(err, StoreError::DiskFull { .. }), "{err:?}");
    assert!(
        !store.has_chunk(&d, ChunkIndex(failed)),
        "chunk marked present after ENOSPC"
    );
    let before: Vec<u32> = present(&store, &m);
    assert_eq!(before, (0..100 + written).collect::<Vec<_>>());
    assert_present_chunks_match(&store, &data, &m);
    // Still usable: reads work, a retry fails the same way, nothing is marked.
    assert!(matches!(
        store.put_chunk(&d, ChunkIndex(failed), chunk(&data, &m, failed)),
        Err(StoreError::DiskFull { .. })
    ));
    assert_eq!(present(&store, &m), before);

    // Reopen on the still-full disk: same chunks, same bytes.
    drop(store);
    let store = open(&root, 1 << 40);
    assert_eq!(present(&store, &m), before);
    assert_present_chunks_match(&store, &data, &m);

    // Once space is freed, the blob completes.
    drop(_filler);
    drop(_filler2);
    std::fs::remove_file(fs.path().join("filler")).expect("rm filler");
    std::fs::remove_file(fs.path().join("filler2")).expect("rm filler2");
    put(&store, &data, &m, failed..m.chunk_count());
    store.verify_blob(&d).expect("complete blob verifies");
    store.flush().expect("flush");
    drop(store);
    assert!(open(&root, 1 << 40).is_complete(&d));
}
