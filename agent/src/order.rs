//! Fetch orders: what the coordinator asks of this agent, one task per order, and the
//! reports (BlobDone / BlobFailed) that end them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::FailureReason;
use shoal_proto::pb::v1::agent_message::Msg;
use shoal_proto::pb::v1::coordinator_message::Msg as Incoming;
use shoal_proto::{Digest, Manifest};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::agent::Shared;
use crate::download;
use crate::store::StoreError;

/// Changes to a running order.
#[derive(Debug)]
pub(crate) enum Control {
    Sources {
        add: Vec<pb::Source>,
        remove: Vec<String>,
    },
    Cancel(String),
}

/// Why an order failed, as reported to the coordinator.
#[derive(Debug)]
pub(crate) struct Failure {
    pub reason: FailureReason,
    pub message: String,
}

impl Failure {
    pub(crate) fn new(reason: FailureReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    pub(crate) fn from_store(e: &StoreError) -> Self {
        let reason = match e {
            StoreError::DiskFull { .. } | StoreError::QuotaExceeded { .. } => {
                FailureReason::DiskFull
            }
            StoreError::ManifestConflict(_) => FailureReason::Invalid,
            StoreError::Verify(_) => FailureReason::DigestMismatch,
            _ => FailureReason::IoError,
        };
        Self::new(reason, e.to_string())
    }
}

#[derive(Debug)]
struct OrderHandle {
    digest: Digest,
    control: mpsc::UnboundedSender<Control>,
    abort: AbortHandle,
}

/// The running orders.
#[derive(Debug, Default)]
pub(crate) struct Orders {
    table: Mutex<HashMap<u64, OrderHandle>>,
}

impl Orders {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, OrderHandle>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn control(&self, order_id: u64, c: Control) -> bool {
        self.lock()
            .get(&order_id)
            .is_some_and(|h| h.control.send(c).is_ok())
    }

    /// Stops every order without reporting (the agent is shutting down).
    pub(crate) async fn abort_all(&self) {
        let handles: Vec<_> = self.lock().drain().map(|(_, h)| h.abort).collect();
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
}

/// Acts on one message from the coordinator. Never waits: the session task calls it between
/// draining the outbox, so waiting here on anything the session drains would deadlock.
pub(crate) fn handle(shared: &Arc<Shared>, msg: Incoming) {
    match msg {
        Incoming::FetchOrder(order) => start(shared, order),
        Incoming::SourceUpdate(u) => {
            let known = shared.orders.control(
                u.order_id,
                Control::Sources {
                    add: u.add,
                    remove: u.remove,
                },
            );
            if !known {
                tracing::debug!(
                    order_id = u.order_id,
                    "source update for an order not running"
                );
            }
        }
        Incoming::Cancel(c) => {
            let targets: Vec<u64> = if c.order_id != 0 {
                vec![c.order_id]
            } else {
                let digest = Digest::from_slice(&c.blob_digest).ok();
                shared
                    .orders
                    .lock()
                    .iter()
                    .filter(|(_, h)| Some(h.digest) == digest)
                    .map(|(id, _)| *id)
                    .collect()
            };
            for id in targets {
                shared.orders.control(id, Control::Cancel(c.reason.clone()));
            }
        }
    }
}

fn start(shared: &Arc<Shared>, order: pb::FetchOrder) {
    let order_id = order.order_id;
    let Ok(digest) = Digest::from_slice(&order.blob_digest) else {
        report_failed(
            shared,
            order_id,
            &order.blob_digest,
            Failure::new(FailureReason::Invalid, "blob digest is not 32 bytes"),
        );
        return;
    };
    let (control, control_rx) = mpsc::unbounded_channel();
    let mut table = shared.orders.lock();
    if let Some(running) = table.get(&order_id) {
        // Sent again (e.g. after a reconnect): take any new sources, keep going.
        if let Some(pb::fetch_order::Kind::Peers(p)) = order.kind {
            let _ = running.control.send(Control::Sources {
                add: p.sources,
                remove: Vec::new(),
            });
        }
        return;
    }
    let task = tokio::spawn(run(shared.clone(), order, digest, control_rx));
    table.insert(
        order_id,
        OrderHandle {
            digest,
            control,
            abort: task.abort_handle(),
        },
    );
}

async fn run(
    shared: Arc<Shared>,
    order: pb::FetchOrder,
    digest: Digest,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let started = Instant::now();
    let order_id = order.order_id;
    tracing::info!(order_id, blob = %digest, job = order.job_id, "fetch order");
    metrics::gauge!(crate::metrics::ACTIVE_TRANSFERS).increment(1.0);
    let result = execute(&shared, &order, digest, &mut control).await;
    metrics::gauge!(crate::metrics::ACTIVE_TRANSFERS).decrement(1.0);
    match result {
        Ok(None) => {}
        Ok(Some((size, bytes_from_peers, bytes_from_origin))) => {
            metrics::counter!(crate::metrics::TRANSFERS_FINISHED, "outcome" => "done").increment(1);
            let duration_ms = started.elapsed().as_millis() as u64;
            tracing::info!(order_id, blob = %digest, duration_ms, bytes_from_peers, "blob complete");
            shared
                .transfers
                .finish(order_id, digest, order.job_id.clone(), Ok(()));
            shared.send(Msg::BlobDone(pb::BlobDone {
                order_id,
                blob_digest: digest.as_bytes().to_vec(),
                size,
                duration_ms,
                bytes_from_peers,
                bytes_from_origin,
            }));
        }
        Err(f) => {
            metrics::counter!(crate::metrics::TRANSFERS_FINISHED, "outcome" => "failed")
                .increment(1);
            tracing::warn!(order_id, blob = %digest, reason = ?f.reason, message = f.message, "fetch order failed");
            shared.transfers.finish(
                order_id,
                digest,
                order.job_id.clone(),
                Err(f.message.clone()),
            );
            report_failed(&shared, order_id, digest.as_bytes(), f);
        }
    }
    shared.orders.lock().remove(&order_id);
}

/// Returns (size, bytes from peers, bytes from the origin) once the blob is whole and
/// verified; None for a range seed order (it reports itself).
async fn execute(
    shared: &Arc<Shared>,
    order: &pb::FetchOrder,
    digest: Digest,
    control: &mut mpsc::UnboundedReceiver<Control>,
) -> Result<Option<(u64, u64, u64)>, Failure> {
    let peers = match &order.kind {
        Some(pb::fetch_order::Kind::Peers(p)) => p,
        Some(pb::fetch_order::Kind::OriginRange(range)) => {
            // One range of a large blob: reported with RangeSeeded, not BlobDone.
            let seed = crate::ingest::seed_range(shared, order, range, digest);
            unless_cancelled(control, seed).await?;
            return Ok(None);
        }
        Some(pb::fetch_order::Kind::Origin(from)) => {
            // Nobody holds it yet: this agent seeds it from the origin.
            let seed = crate::ingest::ingest(shared, order, from, digest);
            let (size, from_origin) = unless_cancelled(control, seed).await?;
            return Ok(Some((size, 0, from_origin)));
        }
        None => {
            return Err(Failure::new(
                FailureReason::Invalid,
                "the order has no kind (an agent newer than its coordinator?)",
            ));
        }
    };
    let Some(wire) = &peers.manifest else {
        return Err(Failure::new(
            FailureReason::Invalid,
            "a peer fetch order without a manifest",
        ));
    };
    let manifest = Manifest::try_from(wire)
        .map_err(|e| Failure::new(FailureReason::Invalid, format!("manifest: {e}")))?;
    if manifest.digest() != digest {
        return Err(Failure::new(
            FailureReason::Invalid,
            format!(
                "manifest describes {}, order is for {digest}",
                manifest.digest()
            ),
        ));
    }
    let manifest = Arc::new(manifest);
    let store = shared.store.clone();
    let m = manifest.clone();
    // Kept from eviction while the order runs; released on return (a user's pin is separate).
    let _hold = blocking(move || {
        store.insert_manifest(&m)?;
        store.hold(&m.digest())
    })
    .await?;
    // A range this agent seeded for the blob goes in first: it is what peers lack.
    crate::ingest::import_range(shared, &manifest).await;
    shared.transfers.start(
        order.order_id,
        digest,
        order.job_id.clone(),
        order.priority,
        manifest.chunk_count(),
        manifest.size(),
    );
    let bytes_from_peers = if shared.store.is_complete(&digest) {
        0
    } else {
        let sources = peers.sources.clone();
        download::download(shared, order.order_id, manifest.clone(), sources, control).await?
    };
    let store = shared.store.clone();
    blocking(move || {
        // At most one whole-blob read per blob per process.
        if let Err(e) = store.ensure_verified(&digest) {
            if matches!(e, StoreError::Verify(_)) {
                // Every chunk matched a manifest that does not describe the blob (one
                // assembled from seeded ranges of an origin serving other bytes): drop it,
                // or the store would offer it as complete.
                let _ = store.remove(&digest);
            }
            return Err(e);
        }
        Ok(())
    })
    .await?;
    Ok(Some((manifest.size(), bytes_from_peers, 0)))
}

/// Runs `work` until it ends or the order is cancelled (dropping it: its part files go with
/// it). Source updates mean nothing to a seed order.
async fn unless_cancelled<T>(
    control: &mut mpsc::UnboundedReceiver<Control>,
    work: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    let cancelled = async {
        loop {
            match control.recv().await {
                Some(Control::Cancel(why)) => return why,
                Some(Control::Sources { .. }) => {}
                None => std::future::pending::<()>().await,
            }
        }
    };
    tokio::select! {
        result = work => result,
        why = cancelled => Err(Failure::new(FailureReason::Cancelled, format!("cancelled: {why}"))),
    }
}

/// Runs store work off the async threads, mapping its errors to order failures.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Failure> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure::from_store(&e)),
        Err(e) => Err(Failure::new(
            FailureReason::Internal,
            format!("store task failed: {e}"),
        )),
    }
}

fn report_failed(shared: &Shared, order_id: u64, digest: &[u8], f: Failure) {
    let chunks_verified = Digest::from_slice(digest)
        .ok()
        .and_then(|d| shared.store.present_count(&d))
        .unwrap_or(0);
    shared.send(Msg::BlobFailed(pb::BlobFailed {
        order_id,
        blob_digest: digest.to_vec(),
        reason: f.reason as i32,
        message: f.message,
        chunks_verified,
    }));
}
