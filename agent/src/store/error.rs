//! What can go wrong in the content store, typed so callers can tell a full disk from a bad
//! peer from a bug.

use std::io;
use std::path::{Path, PathBuf};

use shoal_proto::{ChunkIndex, Digest, VerifyError};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob {0} is not in the store")]
    UnknownBlob(Digest),
    #[error("chunk {index} of blob {blob} is not present")]
    ChunkMissing { blob: Digest, index: ChunkIndex },
    /// The data does not match the manifest (or the index is out of range). Nothing was
    /// written or marked.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// Even after evicting every unpinned blob, `needed` bytes do not fit under the quota.
    /// `pinned` counts blobs pinned by a user or held by a running order.
    #[error(
        "blob {blob} needs {needed} bytes; the quota is {quota} bytes and pinned or in-use blobs hold {pinned} bytes"
    )]
    QuotaExceeded {
        blob: Digest,
        needed: u64,
        quota: u64,
        pinned: u64,
    },
    /// The filesystem is out of space (ENOSPC/EDQUOT). The store stays consistent: whatever
    /// was being added is not marked present.
    #[error("disk full while {context} {}", path.display())]
    DiskFull {
        context: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The same digest was inserted with a different chunk table or chunk size.
    #[error("blob {0} is already stored with a different manifest")]
    ManifestConflict(Digest),
    /// Chunk digests for a provisional manifest that do not fit it or contradict it.
    #[error("chunk digests refused: {0}")]
    DigestConflict(String),
    #[error("{context} {}: {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Another process (or another `Store` in this one) has the store open.
    #[error("store {} is already open by another process or Store", root.display())]
    Locked { root: PathBuf },
    /// An fdatasync of the blob's data file failed: some of its bytes may not be on disk, and
    /// a retried fdatasync would succeed without them. The blob was dropped from the store
    /// (reported as a removal and on `Store::damage`): fetch it again.
    #[error("syncing {}: {source}; the blob was dropped (a failed fdatasync is a lost write)", path.display())]
    LostWrite {
        blob: Digest,
        path: PathBuf,
        source: io::Error,
    },
    /// A file on disk does not have the shape its manifest says it must.
    #[error("{}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
}

impl StoreError {
    /// Wraps an IO error, telling a full disk apart from other failures.
    pub(crate) fn io(context: &'static str, path: &Path, source: io::Error) -> Self {
        let path = path.to_path_buf();
        if is_disk_full(&source) {
            Self::DiskFull {
                context,
                path,
                source,
            }
        } else {
            Self::Io {
                context,
                path,
                source,
            }
        }
    }
}

/// `map_err` adapter: `.map_err(io_err("writing chunk to", &path))`.
pub(crate) fn io_err(context: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    move |source| StoreError::io(context, path, source)
}

pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == io::ErrorKind::StorageFull
}
