//! Writing a pulled blob out to the caller's path: atomically (a temporary file beside it,
//! then a rename), and without a second copy of the bytes on disk where the filesystem allows.

use std::fs::{self, File, Permissions};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tonic::Status;

/// Where the caller wants the blob, and whether as its own writable copy.
#[derive(Clone, Debug)]
pub(super) struct Wanted {
    pub path: PathBuf,
    /// Never a hard link (a reflink is still taken where the filesystem can).
    pub copy: bool,
}

/// How the output file was made, as the pull reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Written {
    /// A reflink of the store's file: its own file, sharing the bytes until either is written.
    Cloned,
    /// A hard link to the store's file, read-only: the same file as the store's copy.
    Linked,
    /// A copy of the bytes.
    Copied,
}

impl Written {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Written::Cloned => "cloned",
            Written::Linked => "linked",
            Written::Copied => "copied",
        }
    }
}

/// Checks, before any work, that `path` can be an output: its directory exists and it is not
/// a directory itself.
pub(super) fn check(path: &Path) -> Result<(), Status> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    if !parent.is_dir() {
        return Err(Status::not_found(format!(
            "output_path: directory {} does not exist",
            parent.display()
        )));
    }
    if path.is_dir() {
        return Err(Status::invalid_argument(format!(
            "output_path: {} is a directory",
            path.display()
        )));
    }
    Ok(())
}

/// Makes `to` hold the store's complete, verified file `from`: a reflink where the filesystem
/// can clone; else, unless `copy`, a read-only hard link where both are on one filesystem
/// (the bytes are on disk once; the store keeps its name for them, and evicting the blob
/// removes only that name); else a copy, synced. The result replaces `to` atomically.
pub(super) fn write(from: &Path, to: &Path, copy: bool) -> Result<Written, Status> {
    let fail =
        |what: &str, e: std::io::Error| Status::internal(format!("{what} {}: {e}", to.display()));
    if !copy && same_file(from, to) {
        // Already this very file (a repeated pull): a rename onto it would do nothing.
        return Ok(Written::Linked);
    }
    let tmp = Temporary::beside(to);
    let cloned = (|| -> std::io::Result<bool> {
        let source = File::open(from)?;
        let target = File::create(&tmp.0)?;
        Ok(rustix::fs::ioctl_ficlone(&target, &source).is_ok())
    })()
    .map_err(|e| fail("writing", e))?;
    let written = if cloned {
        Written::Cloned
    } else if !copy && link(from, &tmp.0).map_err(|e| fail("linking", e))? {
        Written::Linked
    } else {
        fs::copy(from, &tmp.0).map_err(|e| fail("writing", e))?;
        // `fs::copy` takes the store file's mode, read-only if it was ever linked out.
        let mode = fs::metadata(&tmp.0).map_err(|e| fail("writing", e))?.mode() | 0o200;
        fs::set_permissions(&tmp.0, Permissions::from_mode(mode))
            .map_err(|e| fail("writing", e))?;
        Written::Copied
    };
    // The store synced its own file when the blob completed; syncing again costs nothing
    // then, and a link's bytes are that file's.
    File::open(&tmp.0)
        .and_then(|f| f.sync_all())
        .map_err(|e| fail("syncing", e))?;
    fs::rename(&tmp.0, to).map_err(|e| fail("renaming into", e))?;
    tmp.keep();
    Ok(written)
}

/// Replaces `tmp` (created empty for the clone attempt) with a hard link to `from`, read-only;
/// false if the two are on different filesystems (or the filesystem has no hard links).
fn link(from: &Path, tmp: &Path) -> std::io::Result<bool> {
    fs::remove_file(tmp)?;
    match fs::hard_link(from, tmp) {
        Ok(()) => {}
        Err(e)
            if e.kind() == std::io::ErrorKind::CrossesDevices
                || e.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) =>
        {
            // EXDEV: another filesystem; EPERM: one without hard links (or a protected
            // link). Fall back to a copy into a fresh temporary file.
            File::create(tmp)?;
            return Ok(false);
        }
        Err(e) => return Err(e),
    }
    // Read-only, so that writing to the output does not silently change the store's copy
    // (which peers would then reject and the agent repair). An agent not running as root
    // makes it writable for itself again when it restarts (`store/files.rs`).
    let mode = fs::metadata(tmp)?.permissions().mode() & 0o555;
    fs::set_permissions(tmp, Permissions::from_mode(mode))?;
    Ok(true)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// A temporary file beside the output, removed on drop unless kept (renamed into place).
struct Temporary(PathBuf);

impl Temporary {
    fn beside(to: &Path) -> Self {
        let dir = to.parent().unwrap_or(Path::new("/"));
        let name = to
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "blob".into());
        // Unique per write: two pulls to the same path (in this process or another) must not
        // write into one temporary file.
        Temporary(dir.join(format!(
            ".{name}.shoal-{}-{:016x}.tmp",
            std::process::id(),
            rand::random::<u64>()
        )))
    }

    /// It was renamed into place: nothing to remove.
    fn keep(mut self) {
        self.0 = PathBuf::new();
    }
}

impl Drop for Temporary {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.0);
        }
    }
}
