//! Reading a chunk back past the page cache, for `Store::check_chunk`: what a check must see is
//! what the disk holds (or, for a chunk a peer rejected, what peers are served next), not a
//! copy that happens to be cached.

use std::fs::File;
use std::io;
use std::num::NonZeroU64;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{Advice, Mode, OFlags, fadvise};

/// How [`crate::store::Store::check_chunk`] reads a chunk back.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Reread {
    /// From the disk, leaving the page cache as it is (`O_DIRECT`; through the cache where the
    /// filesystem refuses it): the scrub, which must neither evict the chunks peers are being
    /// served nor fill the cache with chunks nobody asked for.
    Disk,
    /// Dropping the chunk's clean cached pages, then through the cache: for a chunk a peer
    /// rejected, so that the copy checked is the one served next (a bad page in memory is
    /// replaced by the disk's copy, or the disk's bad copy is found).
    Served,
}

/// `O_DIRECT` wants buffers, offsets and lengths aligned to the logical block size; 4 KiB
/// covers the usual 512 and 4096. Chunk offsets are multiples of the chunk size (at least
/// 4 KiB), so only the blob's last chunk has a length to round up.
const ALIGN: usize = 4096;

/// Set once a filesystem refused `O_DIRECT` (logged once).
static NO_DIRECT_IO: AtomicBool = AtomicBool::new(false);

/// Fills `buf` from `offset` of the data file (`file`, opened at `path`) as `how` says.
pub(super) fn read(
    file: &File,
    path: &Path,
    offset: u64,
    buf: &mut [u8],
    how: Reread,
) -> io::Result<()> {
    match how {
        Reread::Disk => {
            if read_direct(path, offset, buf)? {
                return Ok(());
            }
            if !NO_DIRECT_IO.swap(true, Ordering::Relaxed) {
                tracing::info!(path = %path.display(), "the filesystem refuses O_DIRECT: the scrub reads through the page cache");
            }
        }
        Reread::Served => {
            // Clean pages go; dirty ones stay (and are what a read returns, as they are what
            // will be written back). Best effort: where it fails, the cache is what is checked.
            let len = NonZeroU64::new(buf.len() as u64);
            let _ = fadvise(file, offset, len, Advice::DontNeed);
        }
    }
    file.read_exact_at(buf, offset)
}

/// Reads with `O_DIRECT` through a file descriptor of its own; `Ok(false)` where the
/// filesystem or the alignment does not allow it.
fn read_direct(path: &Path, offset: u64, out: &mut [u8]) -> io::Result<bool> {
    if offset % ALIGN as u64 != 0 {
        return Ok(false);
    }
    let flags = OFlags::RDONLY | OFlags::DIRECT | OFlags::CLOEXEC;
    let file = match rustix::fs::open(path, flags, Mode::empty()) {
        Ok(fd) => File::from(fd),
        Err(rustix::io::Errno::INVAL) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let len = out.len().next_multiple_of(ALIGN);
    let mut raw = vec![0u8; len + ALIGN];
    let start = raw.as_ptr().align_offset(ALIGN);
    let buf = &mut raw[start..start + len];
    let mut filled = 0;
    while filled < out.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    out.copy_from_slice(&buf[..out.len()]);
    Ok(true)
}
