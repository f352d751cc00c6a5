//! The disk failing under the store, for real, without device-mapper: the store lives on ext4
//! on a loop device whose backing file sits on a small tmpfs.
//!
//! A failed fdatasync: writes land in ext4's page cache and succeed; when the tmpfs is full,
//! writeback to the loop device fails and fdatasync returns the error, once. Linux then marks
//! the pages clean: a second fdatasync succeeds although the bytes never reached the "disk"
//! (`fsyncgate`). Unmounting and mounting again drops the page cache as a
//! power loss would, and shows what is really on disk.
//!
//! The store must treat the failed fdatasync as a lost write of the blob: never vouch for its
//! chunks after a later fdatasync succeeds, and drop the whole blob, to be taken again into new
//! files. Taking the lost chunks again into the same file is not enough: ext4 left the range it
//! failed to write "unwritten" ("failed to convert unwritten extents to written extents --
//! potential data loss!" in the kernel log), and it reads back as zeros after a remount even
//! once later writes to it succeeded. A first version of this fix that did that failed here.
//!
//! Rot under the page cache: bytes changed in the backing file behind ext4's back are what
//! the disk holds, while the page cache still holds what was written. A check must find them.
//!
//! Needs root, `losetup`, `mkfs.ext4` and `filefrag` (util-linux, e2fsprogs), like the
//! network-namespace suites need root and iproute2.

#[path = "support/store.rs"]
mod util;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use shoal_agent::store::{ChunkCheck, DamageCause, PutOutcome, Reread, StoreError};
use shoal_proto::{ChunkIndex, Manifest};
use util::open;

/// 64 KiB chunks: a group commit (64 chunks) writes back 4 MiB.
const CHUNK_SIZE: u32 = 64 << 10;
const CHUNKS: u32 = 160;
/// What the tmpfs under the loop device has left when the first group commit writes back.
const ROOM: u64 = 512 << 10;

fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {} (is it installed?)", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
            .unwrap_or(false)
    })
}

/// ext4 on a loop device backed by a file on a tmpfs of its own; torn down on drop.
struct FailingDisk {
    tmpfs: PathBuf,
    mount: PathBuf,
    device: String,
}

impl FailingDisk {
    fn new(dir: &Path) -> Result<FailingDisk> {
        ensure!(
            is_root(),
            "this test mounts a tmpfs and a loop device: run it as root"
        );
        let tmpfs = dir.join("tmpfs");
        let mount = dir.join("ext4");
        std::fs::create_dir_all(&tmpfs)?;
        std::fs::create_dir_all(&mount)?;
        run(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "size=48m",
            "shoal-test",
            path(&tmpfs)?,
        ])?;
        let backing = tmpfs.join("disk.img");
        std::fs::File::create(&backing)?.set_len(256 << 20)?;
        let device = match run(&["losetup", "--find", "--show", path(&backing)?]) {
            Ok(d) => d,
            Err(e) => {
                let _ = run(&["umount", "-l", path(&tmpfs)?]);
                return Err(e);
            }
        };
        let disk = FailingDisk {
            tmpfs,
            mount,
            device,
        };
        run(&[
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            "4096",
            "-O",
            "^has_journal",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
            &disk.device,
        ])?;
        disk.mount_ext4()?;
        Ok(disk)
    }

    fn mount_ext4(&self) -> Result<()> {
        run(&["mount", &self.device, path(&self.mount)?])?;
        Ok(())
    }

    /// Unmounts and mounts again: the page cache (and with it every page whose writeback
    /// failed) is gone; what is read now is what the disk holds.
    fn power_cycle(&self) -> Result<()> {
        run(&["umount", path(&self.mount)?])?;
        self.mount_ext4()
    }

    /// Flips a byte at `offset` of `file` (on the ext4) on the "disk" itself, behind ext4 and
    /// its page cache: in the loop device's backing file, at the block `filefrag` maps it to.
    fn rot_on_disk(&self, file: &Path, offset: u64) -> Result<()> {
        let block = offset / 4096;
        let map = run(&["filefrag", "-v", "-b4096", path(file)?])?;
        let physical = map
            .lines()
            .filter_map(|line| {
                // "   0:        0..     767:      34816..     35583:    768: ..."
                let mut fields = line.split(':').skip(1);
                let logical = fields.next()?.trim().split_once("..")?;
                let physical = fields.next()?.trim().split_once("..")?;
                let (first, last) = (
                    logical.0.trim().parse::<u64>().ok()?,
                    logical.1.trim().parse::<u64>().ok()?,
                );
                let start = physical.0.trim().parse::<u64>().ok()?;
                (first..=last)
                    .contains(&block)
                    .then_some(start + block - first)
            })
            .next()
            .with_context(|| format!("block {block} not in the extent map:\n{map}"))?;
        let backing = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.tmpfs.join("disk.img"))?;
        let at = physical * 4096 + offset % 4096;
        let mut byte = [0u8; 1];
        backing.read_exact_at(&mut byte, at)?;
        backing.write_all_at(&[byte[0] ^ 0xa5], at)?;
        Ok(())
    }

    /// Fills the tmpfs under the loop device up to `room` bytes.
    fn fill_leaving(&self, room: u64) -> Result<PathBuf> {
        let st = rustix::fs::statvfs(&self.tmpfs)?;
        let free = st.f_bavail * st.f_frsize;
        ensure!(free > room, "the tmpfs has only {free} bytes free");
        let filler = self.tmpfs.join("filler");
        let f = std::fs::File::create(&filler)?;
        rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, free - room)?;
        Ok(filler)
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        let _ = Command::new("umount").arg("-l").arg(&self.tmpfs).status();
    }
}

fn path(p: &Path) -> Result<&str> {
    p.to_str().context("a UTF-8 path")
}

/// The test blob: its bytes and manifest.
struct Blob {
    data: Vec<u8>,
    manifest: Manifest,
}

impl Blob {
    fn new() -> Result<Self> {
        let data: Vec<u8> = (0..(CHUNKS * CHUNK_SIZE) as usize)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let manifest = Manifest::from_reader(&data[..], CHUNK_SIZE)?;
        Ok(Self { data, manifest })
    }

    fn chunk(&self, i: u32) -> &[u8] {
        let r = self.manifest.chunk_range(ChunkIndex(i)).expect("range");
        &self.data[r.start as usize..r.end as usize]
    }
}

#[test]
fn store_a_failed_fdatasync_is_a_lost_write_never_retried_and_trusted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = FailingDisk::new(dir.path())?;
    let blob = Blob::new()?;
    let (data, m) = (&blob.data, &blob.manifest);
    let d = m.digest();
    let chunk = |i: u32| blob.chunk(i);
    let root = disk.mount.join("store");
    {
        let store = open(&root, 1 << 30);
        let mut damage = store.damage();
        let mut removals = store.removals();
        store.insert_manifest(m)?;
        store.pin(&d)?;
        run(&["sync"])?;
        let filler = disk.fill_leaving(ROOM)?;

        // The 64th chunk completes a group commit, whose fdatasync cannot write 4 MiB back.
        for i in 0..63 {
            assert_eq!(
                store.put_chunk(&d, ChunkIndex(i), chunk(i))?,
                PutOutcome::Stored
            );
        }
        let failed = store.put_chunk(&d, ChunkIndex(63), chunk(63));
        assert!(
            matches!(failed, Err(StoreError::LostWrite { .. })),
            "the group commit's fdatasync failed: {failed:?}"
        );
        // The blob is dropped whole, pinned or not, and reported: as removed, and as a lost
        // write (with its pin, so that the agent fetches it again).
        assert!(
            store.manifest(&d).is_none(),
            "a blob trusted after a failed fdatasync"
        );
        assert!(!store.has_chunk(&d, ChunkIndex(0)));
        assert_eq!(removals.try_recv()?, d);
        let report = damage.try_recv().context("a damage report")?;
        assert_eq!(report.blob, d);
        assert_eq!(report.cause, DamageCause::LostWrite);
        assert_eq!(report.chunks.len(), 64);
        assert!(report.pinned && !report.was_complete);

        // The disk has room again. A retried fdatasync would now succeed and vouch for the
        // lost chunks; the blob is taken again instead, into new files.
        std::fs::remove_file(filler)?;
        store.insert_manifest(m)?;
        for i in 0..CHUNKS {
            assert_eq!(
                store.put_chunk(&d, ChunkIndex(i), chunk(i))?,
                PutOutcome::Stored,
                "chunk {i}"
            );
        }
        store.flush()?;
        store.verify_blob(&d)?;
    }
    disk.power_cycle()?;
    let store = open(&root, 1 << 30);
    assert!(store.is_complete(&d), "every chunk was durable");
    // Read from the disk, not from a page cache that held the lost pages.
    let file = std::fs::File::open(store.data_path(&d).context("data path")?)?;
    let mut on_disk = vec![0u8; data.len()];
    file.read_exact_at(&mut on_disk, 0)?;
    let differ: Vec<u32> = (0..CHUNKS)
        .filter(|&i| {
            let r = m.chunk_range(ChunkIndex(i)).expect("range");
            on_disk[r.start as usize..r.end as usize] != data[r.start as usize..r.end as usize]
        })
        .collect();
    ensure!(differ.is_empty(), "chunks that differ on disk: {differ:?}");
    store.verify_blob(&d)?;
    drop(store);
    drop(disk);
    Ok(())
}

#[test]
fn store_a_check_reads_the_disk_not_a_cached_copy() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = FailingDisk::new(dir.path())?;
    let blob = Blob::new()?;
    let m = &blob.manifest;
    let d = m.digest();
    let chunk = |i: u32| blob.chunk(i);
    let store = open(&disk.mount.join("store"), 1 << 30);
    store.insert_manifest(m)?;
    for i in 0..CHUNKS {
        store.put_chunk(&d, ChunkIndex(i), chunk(i))?;
    }
    store.flush()?;
    let file = store.data_path(&d).context("data path")?;
    for i in [3, 9] {
        // Cached now (it was just written, and is read here), and on disk.
        assert_eq!(&store.get_chunk(&d, ChunkIndex(i))?[..], chunk(i));
        disk.rot_on_disk(&file, m.chunk_range(ChunkIndex(i))?.start + 777)?;
        // A read through the cache still returns what was written...
        assert_eq!(
            &store.get_chunk(&d, ChunkIndex(i))?[..],
            chunk(i),
            "chunk {i}"
        );
    }
    // ...but the scrub reads the disk, leaving the cache alone,
    assert_eq!(
        store.check_chunk(&d, ChunkIndex(3), Reread::Disk)?,
        ChunkCheck::Dropped
    );
    assert_eq!(
        &store.get_chunk(&d, ChunkIndex(9))?[..],
        chunk(9),
        "cache untouched"
    );
    // and a check for a peer that rejected a chunk drops the cached copy first.
    assert_eq!(
        store.check_chunk(&d, ChunkIndex(9), Reread::Served)?,
        ChunkCheck::Dropped
    );
    for i in [4, 10] {
        assert_eq!(
            store.check_chunk(&d, ChunkIndex(i), Reread::Disk)?,
            ChunkCheck::Intact
        );
    }
    assert!(!store.has_chunk(&d, ChunkIndex(3)) && !store.has_chunk(&d, ChunkIndex(9)));
    drop(store);
    drop(disk);
    Ok(())
}
