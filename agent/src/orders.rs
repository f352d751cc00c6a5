//! The orders running on this agent, in one table: an entry per order the coordinator sent,
//! created when the order arrives ([`RunningOrders::start`]) and removed when its task ends
//! ([`RunningOrders::finish`]) or the agent stops ([`RunningOrders::abort_all`]).
//!
//! The entry is everything the rest of the agent reads about a running order: its kind, its
//! progress (batched to the coordinator by the session, shown by the local status call and
//! by pulls), and, while a seed from the origin is writing its part file, where the OCI
//! mirror may stream it from. The order's own task (`execute.rs`) is the only writer of its
//! entry; changes to the order (new sources, cancel) reach the task through [`Control`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use shoal_proto::Digest;
use shoal_proto::pb::v1 as pb;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

/// What an order asks, from its `kind` oneof.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Fetch the blob from peers (its manifest is known).
    Peers,
    /// Seed the whole blob from its origin.
    Origin,
    /// Seed one range of the blob from its origin.
    OriginRange,
}

impl Kind {
    pub(crate) fn of(order: &pb::FetchOrder) -> Option<Kind> {
        use pb::fetch_order::Kind as K;
        Some(match order.kind.as_ref()? {
            K::Peers(_) => Kind::Peers,
            K::Origin(_) => Kind::Origin,
            K::OriginRange(_) => Kind::OriginRange,
        })
    }
}

/// Changes to a running order, for its task.
#[derive(Debug)]
pub(crate) enum Control {
    Sources {
        add: Vec<pb::Source>,
        remove: Vec<String>,
    },
    /// Digests of chunks `first..` of a blob whose manifest was provisional.
    Digests {
        first: u32,
        digests: Vec<Digest>,
    },
    Cancel(String),
}

/// Where a running origin fetch stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum IngestState {
    /// Bytes written (and flushed) to the part file so far.
    Writing {
        written: u64,
    },
    /// Verified and in the store.
    Done,
    Failed(String),
}

/// A running origin fetch, as the mirror sees it: a part file and how much of it is written.
#[derive(Clone, Debug)]
pub(crate) struct IngestView {
    pub part: PathBuf,
    pub state: watch::Receiver<IngestState>,
}

/// How far a fetch from peers is (known once the order's manifest is in the store).
#[derive(Clone, Debug)]
pub(crate) struct Progress {
    pub chunks_verified: u32,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub active_sources: u32,
    pub rate_bytes_per_sec: u64,
    /// Changed since the last progress report.
    dirty: bool,
    rate_mark: (Instant, u64),
}

/// One running order.
#[derive(Debug)]
pub(crate) struct RunningOrder {
    pub digest: Digest,
    pub job_id: String,
    pub priority: i32,
    pub kind: Kind,
    pub progress: Option<Progress>,
    pub ingest: Option<IngestView>,
    control: mpsc::UnboundedSender<Control>,
    abort: AbortHandle,
}

/// A snapshot of a running fetch from peers, for status and pulls.
#[derive(Clone, Debug)]
pub(crate) struct Transfer {
    pub digest: Digest,
    pub job_id: String,
    pub priority: i32,
    pub progress: Progress,
}

/// The end of an order, announced to local pulls waiting on the blob.
#[derive(Clone, Debug)]
pub(crate) struct Finished {
    pub digest: Digest,
    /// The job the order belonged to (a pull waits on its own job's order only).
    pub job_id: String,
    pub result: Result<(), String>,
}

/// The table. Cheap to clone; clones share it.
#[derive(Clone, Debug)]
pub(crate) struct RunningOrders {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    table: Mutex<BTreeMap<u64, RunningOrder>>,
    finished: broadcast::Sender<Finished>,
}

impl Default for RunningOrders {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                table: Mutex::default(),
                finished: broadcast::channel(256).0,
            }),
        }
    }
}

impl RunningOrders {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, RunningOrder>> {
        self.inner.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with<T>(&self, order_id: u64, f: impl FnOnce(&mut RunningOrder) -> T) -> Option<T> {
        self.lock().get_mut(&order_id).map(f)
    }

    /// Enters a new order and starts its task (`spawn`, given the order's control channel);
    /// the table stays locked meanwhile, so the task cannot finish before its entry exists.
    /// An order already running (sent again after a reconnect) is not started twice: it
    /// takes the new order's sources instead, and this returns false.
    pub(crate) fn start(
        &self,
        order: &pb::FetchOrder,
        digest: Digest,
        kind: Kind,
        spawn: impl FnOnce(mpsc::UnboundedReceiver<Control>) -> JoinHandle<()>,
    ) -> bool {
        let mut table = self.lock();
        if let Some(running) = table.get(&order.order_id) {
            if let Some(pb::fetch_order::Kind::Peers(p)) = &order.kind {
                let _ = running.control.send(Control::Sources {
                    add: p.sources.clone(),
                    remove: Vec::new(),
                });
                // Sent again with the manifest the seeding completed: the digests still
                // unknown to a provisional download.
                if let Some(m) = &p.manifest {
                    let _ = running.control.send(Control::Digests {
                        first: 0,
                        digests: Digest::from_table(&m.chunk_digests).unwrap_or_default(),
                    });
                }
            }
            return false;
        }
        let (control, control_rx) = mpsc::unbounded_channel();
        let task = spawn(control_rx);
        table.insert(
            order.order_id,
            RunningOrder {
                digest,
                job_id: order.job_id.clone(),
                priority: order.priority,
                kind,
                progress: None,
                ingest: None,
                control,
                abort: task.abort_handle(),
            },
        );
        true
    }

    /// Passes `c` to a running order's task; false if the order is not running.
    pub(crate) fn control(&self, order_id: u64, c: Control) -> bool {
        self.with(order_id, |o| o.control.send(c).is_ok())
            .unwrap_or(false)
    }

    /// Removes the order and announces how it ended. Called by the order's task, last.
    pub(crate) fn finish(&self, order_id: u64, result: Result<(), String>) {
        let Some(o) = self.lock().remove(&order_id) else {
            return;
        };
        let _ = self.inner.finished.send(Finished {
            digest: o.digest,
            job_id: o.job_id,
            result,
        });
    }

    /// Stops every order without reporting (the agent is shutting down).
    pub(crate) async fn abort_all(&self) {
        let handles: Vec<_> = std::mem::take(&mut *self.lock())
            .into_values()
            .map(|o| o.abort)
            .collect();
        for h in &handles {
            h.abort();
        }
        // Let the aborted tasks drop what they hold (store handles, connections).
        for _ in 0..50 {
            if handles.iter().all(AbortHandle::is_finished) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The order's manifest is in the store: its progress starts being reported.
    pub(crate) fn set_size(&self, order_id: u64, bytes_total: u64) {
        self.with(order_id, |o| {
            o.progress = Some(Progress {
                chunks_verified: 0,
                bytes_total,
                bytes_done: 0,
                active_sources: 0,
                rate_bytes_per_sec: 0,
                dirty: true,
                rate_mark: (Instant::now(), 0),
            });
        });
    }

    pub(crate) fn update(
        &self,
        order_id: u64,
        chunks_verified: u32,
        bytes_done: u64,
        active_sources: u32,
    ) {
        self.with(order_id, |o| {
            if let Some(p) = &mut o.progress {
                p.chunks_verified = chunks_verified;
                p.bytes_done = bytes_done;
                p.active_sources = active_sources;
                p.dirty = true;
            }
        });
    }

    /// Publishes (or withdraws) the part file of a running origin fetch.
    pub(crate) fn set_ingest(&self, order_id: u64, view: Option<IngestView>) {
        self.with(order_id, |o| o.ingest = view);
    }

    /// The part file of a running origin fetch of `blob`, if any.
    pub(crate) fn ingest(&self, blob: &Digest) -> Option<IngestView> {
        (self.lock().values())
            .filter(|o| o.digest == *blob && o.kind == Kind::Origin)
            .find_map(|o| o.ingest.clone())
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Finished> {
        self.inner.finished.subscribe()
    }

    /// The fetches from peers whose progress is known.
    pub(crate) fn transfers(&self) -> Vec<Transfer> {
        (self.lock().values())
            .filter_map(|o| {
                Some(Transfer {
                    digest: o.digest,
                    job_id: o.job_id.clone(),
                    priority: o.priority,
                    progress: o.progress.clone()?,
                })
            })
            .collect()
    }

    pub(crate) fn transfer_of(&self, blob: &Digest) -> Option<Transfer> {
        self.transfers().into_iter().find(|t| t.digest == *blob)
    }

    /// Orders running now, of any kind.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Progress of the orders that changed since the last call (rates refreshed), or `None`.
    pub(crate) fn progress_batch(&self) -> Option<pb::ProgressBatch> {
        let now = Instant::now();
        let mut table = self.lock();
        let mut items = Vec::new();
        for (order_id, o) in table.iter_mut() {
            let Some(p) = &mut o.progress else { continue };
            let (mark_at, mark_bytes) = p.rate_mark;
            let dt = now.saturating_duration_since(mark_at).as_secs_f64();
            if dt >= 0.2 {
                p.rate_bytes_per_sec = (p.bytes_done.saturating_sub(mark_bytes) as f64 / dt) as u64;
                p.rate_mark = (now, p.bytes_done);
            }
            if !p.dirty {
                continue;
            }
            p.dirty = false;
            items.push(pb::BlobProgress {
                order_id: *order_id,
                blob_digest: o.digest.as_bytes().to_vec(),
                chunks_verified: p.chunks_verified,
                bytes_done: p.bytes_done,
                rate_bytes_per_sec: p.rate_bytes_per_sec,
            });
        }
        (!items.is_empty()).then_some(pb::ProgressBatch { items })
    }

    /// Sum of the current receive rates.
    pub(crate) fn download_rate(&self) -> u64 {
        (self.lock().values())
            .filter_map(|o| o.progress.as_ref())
            .map(|p| p.rate_bytes_per_sec)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: u64, blob: Digest) -> pb::FetchOrder {
        pb::FetchOrder {
            order_id: id,
            blob_digest: blob.as_bytes().to_vec(),
            job_id: "job".into(),
            priority: pb::Priority::High as i32,
            kind: Some(pb::fetch_order::Kind::Peers(pb::FromPeers::default())),
        }
    }

    #[tokio::test]
    async fn an_order_lives_from_start_to_finish_and_a_resend_reaches_the_running_task() {
        let orders = RunningOrders::default();
        let blob = Digest::from_bytes([1; 32]);
        let (got_tx, mut got) = mpsc::unbounded_channel();
        let started = orders.start(&order(5, blob), blob, Kind::Peers, |mut control| {
            tokio::spawn(async move {
                while let Some(c) = control.recv().await {
                    let _ = got_tx.send(c);
                }
            })
        });
        assert!(started);
        assert_eq!(orders.len(), 1);
        assert!(
            orders.transfers().is_empty(),
            "no progress before the manifest"
        );
        orders.set_size(5, 4 << 20);
        let shown = orders.transfer_of(&blob).expect("known once sized");
        assert_eq!(
            (shown.job_id.as_str(), shown.priority),
            ("job", pb::Priority::High as i32)
        );
        orders.update(5, 2, 2 << 20, 1);
        let batch = orders.progress_batch().expect("dirty");
        assert_eq!(batch.items[0].chunks_verified, 2);
        assert!(orders.progress_batch().is_none(), "reported once");

        let again = orders.start(&order(5, blob), blob, Kind::Peers, |_| unreachable!());
        assert!(!again);
        assert!(matches!(got.recv().await, Some(Control::Sources { .. })));

        let mut finished = orders.subscribe();
        orders.finish(5, Err("no".into()));
        assert_eq!(orders.len(), 0);
        let f = finished.recv().await.expect("announced");
        assert_eq!((f.digest, f.job_id.as_str()), (blob, "job"));
        assert!(!orders.control(5, Control::Cancel("late".into())));
    }
}
