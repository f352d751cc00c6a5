//! Streaming a seed: while a whole blob of known size comes from its origin, each chunk goes
//! into the store as soon as it is complete, under a provisional manifest that learns the
//! chunk's digest from the bytes just hashed, and the digest goes to the coordinator
//! (`ChunksSeeded`). The coordinator passes the digests on to the blob's other targets, which
//! fetch the chunks from here (and from each other) while the rest is still arriving, instead
//! of waiting for the whole blob: every chunk is checked against its digest on the way, and
//! every copy against the blob digest at the end, as this seed checks its own.
//!
//! Streaming is an optimisation of the seed, never a condition of it: a store that refuses
//! (quota, a manifest it already holds that disagrees) ends the streaming with a warning, and
//! the seed goes on into its part file as before.

use std::time::Duration;

use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::agent_message::Msg;
use shoal_proto::{ChunkIndex, Digest, Manifest};
use tokio::time::Instant;

use crate::link::Coordinator;
use crate::store::{Hold, Store};

/// Digests are reported when this many are waiting...
const REPORT_CHUNKS: usize = 8;
/// ...or the oldest has waited this long.
const REPORT_AFTER: Duration = Duration::from_millis(50);
/// Every this many reports, the whole table so far goes again.
const RESEND_EVERY: u32 = 16;

/// The streaming side of one whole-blob seed order.
pub(super) struct Streamer {
    store: Store,
    coordinator: Coordinator,
    blob: Digest,
    /// The blob's name, if it is named by its origin (`shoal_proto::url_name`).
    name: Option<String>,
    order_id: u64,
    chunk_size: usize,
    /// Set once the provisional manifest is in the store; None before, and after a refusal.
    state: Option<Live>,
    /// Streaming was given up (the store refused): the seed goes on without it.
    off: bool,
}

struct Live {
    size: u64,
    /// Chunks of the blob.
    count: u32,
    /// Keeps the blob from eviction while it streams.
    _hold: Hold,
    /// Removes the blob if it is still provisional when streaming ends.
    _provisional: Provisional,
    /// Bytes of chunk `next` received so far.
    buf: Vec<u8>,
    /// The next chunk to store.
    next: u32,
    /// Digests stored but not reported yet, from chunk `next - unreported.len()`.
    unreported: Vec<Digest>,
    oldest: Option<Instant>,
    /// Digests reported so far, from chunk 0, and how many reports went out.
    sent: Vec<Digest>,
    reports: u32,
}

/// Removes the blob from the store if its manifest is still provisional: a seed that
/// stopped before its blob matched its digest leaves nothing behind.
struct Provisional {
    store: Store,
    blob: Digest,
}

impl Drop for Provisional {
    fn drop(&mut self) {
        if self
            .store
            .manifest(&self.blob)
            .is_some_and(|m| m.is_provisional())
        {
            if let Err(e) = self.store.remove(&self.blob) {
                tracing::warn!(blob = %self.blob, error = %e, "removing an unfinished streamed seed failed");
            }
        }
    }
}

impl Streamer {
    pub(super) fn new(
        store: Store,
        coordinator: Coordinator,
        blob: Digest,
        name: Option<String>,
        order_id: u64,
        chunk_size: u32,
    ) -> Self {
        Self {
            store,
            coordinator,
            blob,
            name,
            order_id,
            chunk_size: chunk_size as usize,
            state: None,
            off: false,
        }
    }

    /// The blob's size is known (the origin answered): registers the provisional manifest.
    pub(super) async fn start(&mut self, size: u64) {
        if self.off || self.state.is_some() {
            return;
        }
        let (store, blob, chunk_size) = (self.store.clone(), self.blob, self.chunk_size as u32);
        let name = self.name.clone();
        let started = tokio::task::spawn_blocking(move || {
            let manifest = Manifest::provisional_named(blob, name.as_deref(), size, chunk_size)
                .map_err(|e| e.to_string())?;
            store
                .insert_manifest(&manifest)
                .map_err(|e| e.to_string())?;
            let hold = store.hold(&blob).map_err(|e| e.to_string())?;
            Ok::<Hold, String>(hold)
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match started {
            Ok(hold) => {
                self.state = Some(Live {
                    size,
                    count: size.div_ceil(self.chunk_size as u64) as u32,
                    _hold: hold,
                    _provisional: Provisional {
                        store: self.store.clone(),
                        blob: self.blob,
                    },
                    buf: Vec::with_capacity(self.chunk_size),
                    next: 0,
                    unreported: Vec::new(),
                    oldest: None,
                    sent: Vec::new(),
                    reports: 0,
                })
            }
            Err(e) => self.give_up(&e),
        }
    }

    /// The next bytes of the blob, after `done` holds the digests of every chunk completed so
    /// far (the builder's): stores each chunk now complete and reports digests when due.
    pub(super) async fn feed(&mut self, bytes: &[u8], done: &[Digest]) {
        let Some(live) = &mut self.state else {
            return;
        };
        live.buf.extend_from_slice(bytes);
        // Never the last chunk: its digest would complete the table, and nobody may hold a
        // complete blob before this seed has checked it against its digest (`finish`).
        while live.buf.len() >= self.chunk_size
            && (live.next as usize) < done.len()
            && live.next + 1 < live.count
        {
            let rest = live.buf.split_off(self.chunk_size);
            let chunk = std::mem::replace(&mut live.buf, rest);
            let digest = done[live.next as usize];
            if let Err(e) = put(&self.store, self.blob, live.next, digest, chunk).await {
                self.give_up(&e);
                return;
            }
            live.next += 1;
            live.unreported.push(digest);
            live.oldest.get_or_insert_with(Instant::now);
        }
        self.report(false);
    }

    /// The whole blob came and matched: stores the last, short chunk and reports the rest.
    pub(super) async fn finish(&mut self, manifest: &Manifest) {
        let Some(live) = &mut self.state else {
            return;
        };
        let next = live.next;
        if next + 1 == manifest.chunk_count() && !live.buf.is_empty() {
            let chunk = std::mem::take(&mut live.buf);
            let digest = manifest.chunk_digests()[next as usize];
            if let Err(e) = put(&self.store, self.blob, next, digest, chunk).await {
                self.give_up(&e);
                return;
            }
            live.next += 1;
            live.unreported.push(digest);
        }
        self.report(true);
    }

    /// The seed failed or was cancelled: what was stored streaming goes (its provisional
    /// manifest would make a later, correct one conflict).
    pub(super) fn discard(&mut self) {
        self.state = None;
    }

    fn report(&mut self, now: bool) {
        let Some(live) = &mut self.state else {
            return;
        };
        if live.unreported.is_empty() {
            return;
        }
        let due = now
            || live.unreported.len() >= REPORT_CHUNKS
            || live.oldest.is_some_and(|t| t.elapsed() >= REPORT_AFTER);
        if !due {
            return;
        }
        let mut first = live.next - live.unreported.len() as u32;
        live.reports += 1;
        if live.reports % RESEND_EVERY == 0 {
            // Every so often the whole table so far: a batch lost with a broken session
            // (reports are not resent) leaves a hole until the seed ends otherwise.
            first = 0;
        }
        live.sent.append(&mut live.unreported);
        let table = Digest::table_bytes(&live.sent[first as usize..]);
        live.oldest = None;
        self.coordinator.send(Msg::ChunksSeeded(pb::ChunksSeeded {
            order_id: self.order_id,
            blob_digest: self.blob.as_bytes().to_vec(),
            first_chunk: first,
            chunk_digests: table,
            size: live.size,
            chunk_size: self.chunk_size as u32,
            name: self.name.clone().unwrap_or_default(),
        }));
    }

    fn give_up(&mut self, why: &str) {
        tracing::warn!(blob = %self.blob, error = why, "seeding goes on without streaming to peers");
        self.off = true;
        // The provisional blob goes (`Provisional`); the seed goes on into its part file.
        self.state = None;
    }
}

/// Learns chunk `index`'s digest, then stores it (the store checks it against that digest).
async fn put(
    store: &Store,
    blob: Digest,
    index: u32,
    digest: Digest,
    chunk: Vec<u8>,
) -> Result<(), String> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        store
            .learn_digests(&blob, index, &[digest])
            .map_err(|e| e.to_string())?;
        store
            .put_chunk(&blob, ChunkIndex(index), &chunk)
            .map_err(|e| e.to_string())?;
        Ok(())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}
