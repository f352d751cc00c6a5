//! Copying a file of chunks into the store: `shoal push` (the user's file) and seeding
//! (the part file an origin fetch wrote) both lay a blob's chunks out one after another in
//! a file, and both move them in chunk by chunk, each verified by the store on put.

use std::io::{self, Read};

use shoal_proto::{ChunkIndex, Manifest};

use super::{PutOutcome, Store, StoreError};

/// Why copying a file of chunks stopped.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("reading: {0}")]
    Read(io::Error),
    /// The file ended before chunk `index` did: it is not the file the manifest describes
    /// (any more).
    #[error("the file ends inside chunk {index}")]
    Short { index: ChunkIndex },
    #[error(transparent)]
    Store(StoreError),
}

impl Store {
    /// Puts the chunks `indices` of `manifest` into the store, read one after another from
    /// `file` at its current position; `on_chunk` is told the bytes of each one copied.
    /// Returns how many chunks were new. A chunk that does not match the manifest fails
    /// with [`StoreError::Verify`]. Blocking.
    pub fn import_chunks(
        &self,
        manifest: &Manifest,
        file: &mut impl Read,
        indices: impl Iterator<Item = ChunkIndex>,
        mut on_chunk: impl FnMut(u64),
    ) -> Result<u32, ImportError> {
        let digest = manifest.digest();
        let mut buf = vec![0u8; manifest.chunk_size() as usize];
        let mut stored = 0;
        for index in indices {
            let len = (manifest.chunk_len(index)).map_err(|e| ImportError::Store(e.into()))?;
            if read_full(file, &mut buf[..len]).map_err(ImportError::Read)? != len {
                return Err(ImportError::Short { index });
            }
            let outcome = self
                .put_chunk(&digest, index, &buf[..len])
                .map_err(ImportError::Store)?;
            if outcome == PutOutcome::Stored {
                stored += 1;
            }
            on_chunk(len as u64);
        }
        Ok(stored)
    }
}

/// Reads until `buf` is full or the file ends; how many bytes it read.
pub fn read_full(file: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}
