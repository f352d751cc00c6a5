//! Reading a whole object from an origin, in order, over several connections at once.
//!
//! One TCP connection seldom carries a host's link rate from an origin: object stores cap
//! each connection well below a datacenter NIC, and one flow's window cannot cover a path
//! whose round trip grows (a seeder's own uplink, busy serving its peers, delays the ACKs of
//! its download). So an object whose origin serves ranges is read as ranged GETs of
//! [`Ranges::block`] bytes on up to [`Ranges::connections`] connections at once, and handed
//! on in order: the block in front streams as it comes, the ones behind it are held in
//! memory until their turn (at most `connections × block` bytes). An origin that ignores
//! `Range` answers the first request with the whole object, which is then read as one body:
//! nothing is asked twice.
//!
//! Every block must be a range (206) of the same object, with the first answer's ETag and
//! total size; a block that differs, ends early or fails makes [`Whole::chunk`] fail (the
//! caller resumes from what it has, as one GET: `agent/src/ingest.rs`), never yield bytes of
//! another version within one read. Each block's body keeps its own rate floor
//! (`min_bytes_per_sec`), so the origin must give every connection that much.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::{Body, ByteRange, OriginError};

/// How a whole object is read from an origin that serves ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ranges {
    /// Ranged GETs in flight at once; 1 reads the object as one GET.
    pub connections: u32,
    /// Bytes of each ranged GET.
    pub block: u64,
}

/// Opens the object, or a range of it.
pub type Open = Arc<
    dyn Fn(Option<ByteRange>) -> Pin<Box<dyn Future<Output = Result<Body, OriginError>> + Send>>
        + Send
        + Sync,
>;

/// An object being read from some offset to its end: one body, or blocks in parallel.
pub struct Whole {
    /// Bytes this will yield, when known.
    pub len: Option<u64>,
    /// The ETag of the (first) answer, if any: a caller resuming a read compares it.
    pub etag: Option<String>,
    inner: Inner,
}

enum Inner {
    One(Box<Body>),
    Blocks(Blocks),
}

impl std::fmt::Debug for Whole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match &self.inner {
            Inner::One(body) => format!("one body from {}", body.url()),
            Inner::Blocks(b) => format!("{} ranges in flight, next at {}", b.queue.len(), b.next),
        };
        f.debug_struct("Whole")
            .field("len", &self.len)
            .field("read", &how)
            .finish()
    }
}

/// Opens the object from byte `start` to its end, in parallel ranges where the origin
/// serves them (see the module's documentation).
pub async fn open_whole(start: u64, ranges: Ranges, open: Open) -> Result<Whole, OriginError> {
    let from = |start: u64| {
        (start > 0).then_some(ByteRange {
            start,
            end_inclusive: None,
        })
    };
    if ranges.connections <= 1 || ranges.block == 0 {
        return Ok(Whole::one(open(from(start)).await?));
    }
    let first = match open(Some(ByteRange {
        start,
        end_inclusive: Some(start.saturating_add(ranges.block - 1)),
    }))
    .await
    {
        // An empty object has no byte 0 to ask for: read it as it is.
        Err(OriginError::Upstream { status: 416, .. }) if start == 0 => {
            return Ok(Whole::one(open(None).await?));
        }
        other => other?,
    };
    if !first.partial {
        // The origin ignored Range: its answer is the whole object, read to the end.
        return Ok(Whole::one(first.to_end()));
    }
    let Some(total) = first.total else {
        // A 206 without the object's size (`Content-Range: bytes a-b/*`): no blocks to plan.
        drop(first);
        return Ok(Whole::one(open(from(start)).await?));
    };
    if total <= start + ranges.block {
        return Ok(Whole::one(first));
    }
    Ok(Whole {
        len: Some(total - start),
        etag: first.etag.clone(),
        inner: Inner::Blocks(Blocks::new(first, start, total, ranges, open)),
    })
}

impl Whole {
    /// One body, read as it is.
    pub fn one(body: Body) -> Self {
        Self {
            len: body.len,
            etag: body.etag.clone(),
            inner: Inner::One(Box::new(body)),
        }
    }

    /// The next piece, in order; `None` at the end. After an error, further calls return
    /// `None` (as [`Body::chunk`]): a caller compares what it got with [`Whole::len`].
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, OriginError> {
        match &mut self.inner {
            Inner::One(body) => body.chunk().await,
            Inner::Blocks(blocks) => blocks.chunk().await,
        }
    }
}

/// Ranged GETs in flight, in the object's order; the front one is being read.
struct Blocks {
    open: Open,
    ranges: Ranges,
    /// The first answer's ETag: every block must have it.
    etag: Option<String>,
    total: u64,
    /// The first byte no block has asked for yet.
    next: u64,
    queue: VecDeque<Block>,
    failed: bool,
}

struct Block {
    pieces: mpsc::UnboundedReceiver<Result<Bytes, OriginError>>,
    /// Bytes the block must yield, and has yielded.
    len: u64,
    got: u64,
    _task: AbortOnDrop,
}

/// Stops a block's reader when the block is dropped (the read failed or was abandoned).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Blocks {
    fn new(first: Body, start: u64, total: u64, ranges: Ranges, open: Open) -> Self {
        let mut blocks = Self {
            open,
            ranges,
            etag: first.etag.clone(),
            total,
            next: start,
            queue: VecDeque::new(),
            failed: false,
        };
        blocks.spawn(Some(first));
        blocks.fill();
        blocks
    }

    /// Starts blocks until `connections` are in flight or none is left to ask for.
    fn fill(&mut self) {
        while self.queue.len() < self.ranges.connections as usize && self.next < self.total {
            self.spawn(None);
        }
    }

    /// Starts the block at `next`, reading `first` if it is that block's answer already.
    fn spawn(&mut self, first: Option<Body>) {
        let start = self.next;
        let end = (start + self.ranges.block).min(self.total);
        self.next = end;
        let (tx, rx) = mpsc::unbounded_channel();
        let (open, etag, total) = (self.open.clone(), self.etag.clone(), self.total);
        let task = tokio::spawn(async move {
            let range = ByteRange {
                start,
                end_inclusive: Some(end - 1),
            };
            let body = match first {
                Some(body) => Ok(body),
                None => open(Some(range)).await.and_then(|b| same(b, &etag, total)),
            };
            let mut body = match body {
                Ok(b) => b,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            loop {
                match body.chunk().await {
                    Ok(Some(piece)) => {
                        if tx.send(Ok(piece)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
        });
        self.queue.push_back(Block {
            pieces: rx,
            len: end - start,
            got: 0,
            _task: AbortOnDrop(task),
        });
    }

    async fn chunk(&mut self) -> Result<Option<Bytes>, OriginError> {
        if self.failed {
            return Ok(None);
        }
        loop {
            self.fill();
            let Some(front) = self.queue.front_mut() else {
                return Ok(None);
            };
            let outcome = match front.pieces.recv().await {
                Some(Ok(piece)) => {
                    front.got += piece.len() as u64;
                    if front.got <= front.len {
                        return Ok(Some(piece));
                    }
                    Err(OriginError::Unreachable(format!(
                        "a {}-byte range of the object yielded more",
                        front.len
                    )))
                }
                Some(Err(e)) => Err(e),
                None if front.got == front.len => {
                    self.queue.pop_front();
                    continue;
                }
                None => Err(OriginError::Unreachable(format!(
                    "a range of the object stopped after {} of {} bytes",
                    front.got, front.len
                ))),
            };
            // Whatever is in flight behind a failed block is dropped with it.
            self.failed = true;
            self.queue.clear();
            return outcome;
        }
    }
}

/// A block's answer must be a range of the same object the first answer was.
fn same(body: Body, etag: &Option<String>, total: u64) -> Result<Body, OriginError> {
    if !body.partial {
        // The whole object again (another backend, or the origin stopped serving ranges):
        // reading it to the block would cost everything before it.
        return Err(OriginError::Unreachable(format!(
            "{}: a range was answered with the whole object",
            body.url()
        )));
    }
    if body.total.is_some_and(|t| t != total) {
        return Err(OriginError::Unreachable(format!(
            "{}: the object changed while it was read ({total} bytes, then {:?})",
            body.url(),
            body.total
        )));
    }
    if let (Some(first), Some(now)) = (etag, &body.etag)
        && first != now
    {
        return Err(OriginError::Unreachable(format!(
            "{}: the object changed while it was read (ETag {first}, then {now})",
            body.url()
        )));
    }
    Ok(body)
}
