//! The on-disk layout: creating a blob's files durably and recovering them on open.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use prost::Message;
use rustix::fs::{FallocateFlags, FlockOperation, fallocate, flock};
use rustix::io::Errno;
use shoal_proto::{ChunkIndex, Digest, Manifest, pb};

use super::blob::Opened;
use super::journal::{self, RECORD_LEN};
use super::{StoreError, io_err};

const MANIFEST_EXT: &str = "manifest";
const DATA_EXT: &str = "data";
const JOURNAL_EXT: &str = "chunks";
const TMP_EXT: &str = "tmp";

/// The three files of one blob in `<root>/blobs/`.
#[derive(Clone, Debug)]
pub(crate) struct BlobPaths {
    pub manifest: PathBuf,
    pub data: PathBuf,
    pub journal: PathBuf,
}

impl BlobPaths {
    pub(crate) fn new(dir: &Path, digest: &Digest) -> Self {
        let hex = digest.hex();
        Self {
            manifest: dir.join(format!("{hex}.{MANIFEST_EXT}")),
            data: dir.join(format!("{hex}.{DATA_EXT}")),
            journal: dir.join(format!("{hex}.{JOURNAL_EXT}")),
        }
    }

    /// Deletes the blob, manifest first: without its manifest a blob's other files are
    /// orphans that the next open deletes, so a crash midway leaves no half blob.
    pub(crate) fn remove(&self) -> Result<(), StoreError> {
        for path in [
            &self.manifest,
            &self.data,
            &self.journal,
            &tmp(&self.manifest),
            &tmp(&self.journal),
        ] {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("removing", path, e)),
            }
        }
        Ok(())
    }
}

fn tmp(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".");
    s.push(TMP_EXT);
    PathBuf::from(s)
}

/// Creates a blob's files: a data file with its whole size reserved (so a full disk shows up
/// here rather than mid-transfer), an empty journal with room reserved, and last the manifest,
/// whose durable rename is the commit point of the insert.
pub(crate) fn create(dir: &Path, manifest: &Manifest) -> Result<Opened, StoreError> {
    let paths = BlobPaths::new(dir, &manifest.digest());
    let result = create_files(dir, manifest, &paths);
    if result.is_err() {
        // Best effort: an orphan left behind is deleted by the next open.
        let _ = paths.remove();
    }
    result
}

fn create_files(dir: &Path, manifest: &Manifest, paths: &BlobPaths) -> Result<Opened, StoreError> {
    let data = open_rw(&paths.data, true)?;
    preallocate(&data, manifest.size()).map_err(io_err("reserving space for", &paths.data))?;
    let journal = open_rw(&paths.journal, true)?;
    reserve(&journal, journal::reserved_len(manifest.chunk_count()))
        .map_err(io_err("reserving space for", &paths.journal))?;
    let encoded = pb::v1::Manifest::from(manifest).encode_to_vec();
    write_durably(dir, &paths.manifest, &encoded)?;
    Ok(Opened {
        manifest: manifest.clone(),
        paths: paths.clone(),
        data,
        journal,
        present: Vec::new(),
        journal_records: 0,
        unsynced: Vec::new(),
        last_used: SystemTime::now(),
    })
}

/// Opens every blob in `dir`. Deletes temp files, orphans (data or journal without manifest)
/// and blobs whose manifest or data file is unusable, each with a warning: a damaged blob is
/// fetched again, it does not stop the agent.
pub(crate) fn recover_all(dir: &Path) -> Result<Vec<Opened>, StoreError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let entry = entry.map_err(io_err("listing", dir))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    let manifests: HashSet<&str> = names
        .iter()
        .filter_map(|n| n.strip_suffix(&format!(".{MANIFEST_EXT}")))
        .collect();
    let mut blobs = Vec::new();
    for name in &names {
        let path = dir.join(name);
        let (stem, ext) = name.split_once('.').unwrap_or((name, ""));
        match ext {
            MANIFEST_EXT => match recover(dir, stem) {
                Ok(Some(opened)) => blobs.push(opened),
                Ok(None) => {}
                // One blob that cannot be recovered (an IO error on its files) is dropped
                // like a damaged one, not allowed to keep the whole store from opening.
                Err(e) => {
                    tracing::warn!(blob = stem, error = %e, "deleting blob that could not be recovered");
                    if let Err(e) = remove_stem(dir, stem) {
                        tracing::warn!(blob = stem, error = %e, "could not delete it either; skipping it");
                    }
                }
            },
            DATA_EXT | JOURNAL_EXT if manifests.contains(stem) => {}
            _ => {
                if !ext.ends_with(TMP_EXT) {
                    tracing::warn!(path = %path.display(), "deleting orphan file in the blob store");
                }
                let _ = fs::remove_file(&path);
            }
        }
    }
    Ok(blobs)
}

/// Recovers one blob, `None` if it had to be deleted.
fn recover(dir: &Path, hex: &str) -> Result<Option<Opened>, StoreError> {
    let manifest_path = dir.join(format!("{hex}.{MANIFEST_EXT}"));
    let manifest = match read_manifest(&manifest_path, hex) {
        Ok(m) => m,
        Err(reason) => {
            tracing::warn!(path = %manifest_path.display(), %reason, "deleting blob with unreadable manifest");
            remove_stem(dir, hex)?;
            return Ok(None);
        }
    };
    let paths = BlobPaths::new(dir, &manifest.digest());
    let data = match open_data(&paths.data, manifest.size()) {
        Ok(data) => data,
        Err(reason) => {
            tracing::warn!(blob = %manifest.digest(), %reason, "deleting blob with unusable data file");
            paths.remove()?;
            return Ok(None);
        }
    };
    let last_used = data
        .metadata()
        .and_then(|m| m.modified())
        .map_err(io_err("reading mtime of", &paths.data))?;

    let mut journal = open_rw(&paths.journal, false)?;
    let bytes = fs::read(&paths.journal).map_err(io_err("reading", &paths.journal))?;
    let replay = journal::replay(&bytes, manifest.chunk_count());
    let mut present = replay.trusted;
    let trusted = present.len();
    // Journal position of the first record whose chunk did not survive.
    let mut first_dropped = None;
    let mut buf = vec![0u8; manifest.chunk_size() as usize];
    for &(position, index) in &replay.unsynced {
        if chunk_is_intact(&data, &manifest, index, &mut buf) {
            present.push(index);
        } else {
            tracing::warn!(blob = %manifest.digest(), %index, "dropping chunk whose data did not survive");
            first_dropped.get_or_insert(position);
        }
    }

    let (journal_records, unsynced) = if replay.clean {
        ((replay.valid_len / RECORD_LEN) as u32, Vec::new())
    } else {
        // Re-hashed chunks are vouched for by a fresh journal only once their data is durable.
        data.sync_data().map_err(io_err("syncing", &paths.data))?;
        match write_durably(dir, &paths.journal, &journal::compacted(&present)) {
            Ok(()) => {
                journal = open_rw(&paths.journal, false)?;
                (present.len() as u32 + 1, Vec::new())
            }
            Err(StoreError::DiskFull { .. }) => {
                // No room for a new journal: cut this one in place (needs no space) before
                // the first dropped record, which a later sync record must never vouch for.
                // Chunks recorded after that point are forgotten and fetched again.
                let keep = first_dropped.map_or(replay.valid_len / RECORD_LEN, u64::from);
                tracing::warn!(blob = %manifest.digest(), "disk full: truncating chunk journal in place");
                journal
                    .set_len(keep * RECORD_LEN)
                    .map_err(io_err("truncating", &paths.journal))?;
                let kept_unsynced = replay
                    .unsynced
                    .iter()
                    .filter(|&&(pos, index)| {
                        u64::from(pos) < keep && present[trusted..].contains(&index)
                    })
                    .copied()
                    .collect::<Vec<_>>();
                present.truncate(trusted);
                present.extend(kept_unsynced.iter().map(|&(_, index)| index));
                (keep as u32, kept_unsynced)
            }
            Err(e) => return Err(e),
        }
    };
    if let Err(e) = reserve(&journal, journal::reserved_len(manifest.chunk_count())) {
        tracing::warn!(path = %paths.journal.display(), error = %e, "could not reserve journal space");
    }
    Ok(Some(Opened {
        manifest,
        paths,
        data,
        journal,
        present,
        journal_records,
        unsynced,
        last_used,
    }))
}

/// Replaces a blob's journal durably with `bytes` (see `journal::rewritten`) and returns the
/// new file, opened for appending, with room reserved for a blob of `chunk_count` chunks.
pub(crate) fn replace_journal(
    paths: &BlobPaths,
    bytes: &[u8],
    chunk_count: u32,
) -> Result<File, StoreError> {
    let dir = paths.journal.parent().unwrap_or(Path::new("."));
    write_durably(dir, &paths.journal, bytes)?;
    let journal = open_rw(&paths.journal, false)?;
    if let Err(e) = reserve(&journal, journal::reserved_len(chunk_count)) {
        tracing::warn!(path = %paths.journal.display(), error = %e, "could not reserve journal space");
    }
    Ok(journal)
}

/// Replaces a provisional blob's manifest file with its complete manifest.
pub(crate) fn rewrite_manifest(paths: &BlobPaths, manifest: &Manifest) -> Result<(), StoreError> {
    let dir = paths.manifest.parent().unwrap_or(Path::new("."));
    let encoded = pb::v1::Manifest::from(manifest).encode_to_vec();
    write_durably(dir, &paths.manifest, &encoded)
}

fn read_manifest(path: &Path, hex: &str) -> Result<Manifest, String> {
    let bytes = fs::read(path).map_err(|e| e.to_string())?;
    let pb = pb::v1::Manifest::decode(&bytes[..]).map_err(|e| e.to_string())?;
    let manifest = Manifest::try_from(&pb).map_err(|e| e.to_string())?;
    if manifest.is_provisional() {
        // Its chunks were checked against digests a seeder reported while the blob was
        // coming in; nothing vouches for the rest. It is fetched again if still wanted.
        return Err("provisional manifest of a blob whose seeding was interrupted".into());
    }
    if manifest.digest().hex() != hex {
        return Err(format!(
            "file name does not match digest {}",
            manifest.digest()
        ));
    }
    Ok(manifest)
}

fn open_data(path: &Path, size: u64) -> Result<File, String> {
    let data = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(data) => data,
        // A blob pulled out as a read-only hard link (`shoal pull -o`) by an agent that does
        // not run as root: it owns the file, so it may write to it again (a rotted chunk is
        // repaired in place). Other users still cannot write to it.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            let mode = fs::metadata(path).map_err(|e| e.to_string())?.mode() | 0o200;
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .map_err(|e| e.to_string())?;
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| e.to_string())?
        }
        Err(e) => return Err(e.to_string()),
    };
    let len = data.metadata().map_err(|e| e.to_string())?.len();
    if len != size {
        return Err(format!("data file is {len} bytes; the blob is {size}"));
    }
    Ok(data)
}

fn chunk_is_intact(data: &File, manifest: &Manifest, index: ChunkIndex, buf: &mut [u8]) -> bool {
    let Ok(range) = manifest.chunk_range(index) else {
        return false;
    };
    let piece = &mut buf[..(range.end - range.start) as usize];
    data.read_exact_at(piece, range.start).is_ok() && manifest.verify_chunk(index, piece).is_ok()
}

fn remove_stem(dir: &Path, hex: &str) -> Result<(), StoreError> {
    for ext in [MANIFEST_EXT, DATA_EXT, JOURNAL_EXT] {
        let path = dir.join(format!("{hex}.{ext}"));
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("removing", &path, e)),
        }
    }
    Ok(())
}

fn open_rw(path: &Path, truncate: bool) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .open(path)
        .map_err(io_err("opening", path))
}

/// Writes `path` so that after a crash it is either absent/old or complete: temp file, fsync,
/// rename, fsync of the directory.
fn write_durably(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp_path = tmp(path);
    let result = (|| {
        let mut file = File::create(&tmp_path).map_err(io_err("creating", &tmp_path))?;
        file.write_all(bytes)
            .map_err(io_err("writing", &tmp_path))?;
        file.sync_all().map_err(io_err("syncing", &tmp_path))?;
        fs::rename(&tmp_path, path).map_err(io_err("renaming to", path))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp_path);
    }
    result
}

/// Takes the store's exclusive lock, held as long as the returned file is open.
pub(crate) fn lock_root(root: &Path) -> Result<File, StoreError> {
    let path = root.join("lock");
    let file = open_rw(&path, false)?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(Errno::WOULDBLOCK) => Err(StoreError::Locked {
            root: root.to_path_buf(),
        }),
        Err(e) => Err(StoreError::io("locking", &path, e.into())),
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

/// Sizes the data file to `len` with its blocks allocated where the filesystem can, so writes
/// into it cannot hit ENOSPC; a sparse file where it cannot.
fn preallocate(file: &File, len: u64) -> io::Result<()> {
    match fallocate(file, FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(e) if unsupported(e) => file.set_len(len),
        Err(e) => Err(e.into()),
    }
}

/// Allocates blocks for `len` bytes without changing the file size (appends then never hit
/// ENOSPC); nothing where the filesystem cannot.
fn reserve(file: &File, len: u64) -> io::Result<()> {
    match fallocate(file, FallocateFlags::KEEP_SIZE, 0, len) {
        Err(e) if !unsupported(e) => Err(e.into()),
        _ => Ok(()),
    }
}

fn unsupported(e: Errno) -> bool {
    e == Errno::OPNOTSUPP || e == Errno::NOSYS || e == Errno::INVAL
}
