//! Fetch orders: what the coordinator asks of this agent, one task per order, and the
//! reports (BlobDone / BlobFailed) that end them.

use std::sync::Arc;

use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::FailureReason;
use shoal_proto::pb::v1::agent_message::Msg;
use shoal_proto::pb::v1::coordinator_message::Msg as Incoming;
use shoal_proto::{Digest, Manifest};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::download::Downloader;
use crate::failure::{Failure, blocking};
use crate::ingest::Ingester;
use crate::link::Coordinator;
use crate::orders::{Control, Kind, RunningOrders};
use crate::store::{Store, StoreError};

/// What orders run with: the order table, and the handles their tasks need. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Executor {
    pub orders: RunningOrders,
    pub coordinator: Coordinator,
    pub store: Store,
    pub downloader: Downloader,
    pub ingester: Ingester,
}

impl Executor {
    /// Acts on one message from the coordinator. Never waits: the session task calls it
    /// between draining the outbox, so waiting here on anything the session drains would
    /// deadlock.
    pub(crate) fn handle(&self, msg: Incoming) {
        match msg {
            Incoming::FetchOrder(order) => self.start(order),
            Incoming::SourceUpdate(u) => {
                let control = Control::Sources {
                    add: u.add,
                    remove: u.remove,
                };
                if !self.orders.control(u.order_id, control) {
                    tracing::debug!(
                        order_id = u.order_id,
                        "source update for an order not running"
                    );
                }
            }
            Incoming::ChunkDigests(c) => {
                let control = Control::Digests {
                    first: c.first_chunk,
                    digests: Digest::from_table(&c.chunk_digests).unwrap_or_default(),
                };
                if !self.orders.control(c.order_id, control) {
                    tracing::debug!(
                        order_id = c.order_id,
                        "chunk digests for an order not running"
                    );
                }
            }
            Incoming::Cancel(c) => {
                if !self.orders.control(c.order_id, Control::Cancel(c.reason)) {
                    tracing::debug!(order_id = c.order_id, "cancel for an order not running");
                }
            }
            Incoming::DropBlob(d) => self.drop_blob(d),
            Incoming::RevokedAgents(r) => {
                tracing::info!(agents = ?r.agent_ids, replace = r.replace, "revoked agents");
                self.downloader.endpoint.revoke(&r.agent_ids, r.replace);
            }
            Incoming::RegisterBlobs(r) => {
                let this = self.clone();
                tokio::spawn(async move { this.register_again(r).await });
            }
        }
    }

    /// The coordinator's catalog lacks blobs this agent reported whole: registers those it
    /// still holds whole, each read against its digest first (once per process; not at all
    /// under a chained manifest, whose chunk checks were the blob's) so that this agent
    /// never vouches for a copy that does not match (that one is dropped instead).
    async fn register_again(self, r: pb::RegisterBlobs) {
        for digest in &r.blob_digests {
            let Ok(blob) = Digest::from_slice(digest) else {
                continue;
            };
            let Some(manifest) = (self.store.manifest(&blob)).filter(|m| !m.is_provisional())
            else {
                continue;
            };
            if !self.store.is_complete(&blob) {
                continue;
            }
            let store = self.store.clone();
            if let Err(f) = blocking(move || verify_whole(&store, &blob)).await {
                tracing::warn!(%blob, error = f.message, "not registering a blob that failed its check");
                continue;
            }
            tracing::info!(%blob, "registering a blob again, as the coordinator asked");
            self.coordinator
                .send(Msg::BlobRegistered(pb::BlobRegistered {
                    manifest: Some(pb::Manifest::from(manifest.as_ref())),
                }));
        }
    }

    /// An operator unpinned or removed the blob (RemoveBlob). The coordinator cancelled any
    /// order for it first; the removal reaches it through `Store::removals`.
    fn drop_blob(&self, d: pb::DropBlob) {
        let Ok(blob) = Digest::from_slice(&d.blob_digest) else {
            tracing::warn!("drop for a blob digest that is not 32 bytes");
            return;
        };
        let done = if d.unpin_only {
            self.store.unpin(&blob).map(|()| {
                if self.store.is_complete(&blob) {
                    self.coordinator.announce_pin(&blob, false);
                }
            })
        } else {
            self.store.remove(&blob)
        };
        match done {
            Ok(()) if d.unpin_only => tracing::info!(%blob, "unpinned by an operator"),
            Ok(()) => tracing::info!(%blob, "removed by an operator"),
            Err(StoreError::UnknownBlob(_)) => tracing::debug!(%blob, "drop for a blob not held"),
            Err(e) => tracing::warn!(%blob, error = %e, "could not drop the blob"),
        }
    }

    fn start(&self, order: pb::FetchOrder) {
        let order_id = order.order_id;
        let Ok(digest) = Digest::from_slice(&order.blob_digest) else {
            self.report_failed(
                order_id,
                &order.blob_digest,
                Failure::new(FailureReason::Invalid, "blob digest is not 32 bytes"),
            );
            return;
        };
        let Some(kind) = Kind::of(&order) else {
            self.report_failed(
                order_id,
                &order.blob_digest,
                Failure::new(
                    FailureReason::Invalid,
                    "the order has no kind (a coordinator newer than this agent?)",
                ),
            );
            return;
        };
        let this = self.clone();
        let (table, first) = (self.orders.clone(), order.clone());
        table.start(&first, digest, kind, move |control| {
            tokio::spawn(this.run(order, digest, control))
        });
    }

    async fn run(
        self,
        order: pb::FetchOrder,
        digest: Digest,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let started = Instant::now();
        let order_id = order.order_id;
        tracing::info!(order_id, blob = %digest, job = order.job_id, "fetch order");
        metrics::gauge!(crate::metrics::ACTIVE_TRANSFERS).increment(1.0);
        let result = self.execute(&order, digest, &mut control).await;
        metrics::gauge!(crate::metrics::ACTIVE_TRANSFERS).decrement(1.0);
        match result {
            Ok(None) => self.orders.finish(order_id, Ok(())),
            Ok(Some((size, bytes_from_peers, bytes_from_origin))) => {
                metrics::counter!(crate::metrics::TRANSFERS_FINISHED, "outcome" => "done")
                    .increment(1);
                let duration_ms = started.elapsed().as_millis() as u64;
                tracing::info!(order_id, blob = %digest, size, duration_ms, bytes_from_peers, bytes_from_origin, "blob complete");
                self.orders.finish(order_id, Ok(()));
                self.coordinator.send(Msg::BlobDone(pb::BlobDone {
                    blob_digest: digest.as_bytes().to_vec(),
                }));
            }
            Err(f) => {
                metrics::counter!(crate::metrics::TRANSFERS_FINISHED, "outcome" => "failed")
                    .increment(1);
                tracing::warn!(order_id, blob = %digest, reason = ?f.reason, message = f.message, "fetch order failed");
                self.orders.finish(order_id, Err(f.message.clone()));
                self.report_failed(order_id, digest.as_bytes(), f);
            }
        }
    }

    /// Returns (size, bytes from peers, bytes from the origin) once the blob is whole and
    /// verified; None for a range seed order (it reports itself).
    async fn execute(
        &self,
        order: &pb::FetchOrder,
        digest: Digest,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Result<Option<(u64, u64, u64)>, Failure> {
        use pb::fetch_order::Kind as K;
        let peers = match &order.kind {
            Some(K::Peers(p)) => p,
            Some(K::OriginRange(range)) => {
                // One range of a large blob: reported with RangeSeeded, not BlobDone.
                let seed = self.ingester.seed_range(order, range, digest);
                unless_cancelled(control, seed).await?;
                return Ok(None);
            }
            Some(K::Origin(from)) => {
                // Nobody holds it yet: this agent seeds it from the origin.
                let seed = self.ingester.ingest(order, from, digest);
                let (size, from_origin) = unless_cancelled(control, seed).await?;
                return Ok(Some((size, 0, from_origin)));
            }
            None => {
                return Err(Failure::new(
                    FailureReason::Invalid,
                    "the order has no kind",
                ));
            }
        };
        let Some(wire) = &peers.manifest else {
            return Err(Failure::new(
                FailureReason::Invalid,
                "a peer fetch order without a manifest",
            ));
        };
        let mut sources = peers.sources.clone();
        let manifest = if peers.table_digest.is_empty() {
            Manifest::try_from(wire)
                .map_err(|e| Failure::new(FailureReason::Invalid, format!("manifest: {e}")))?
        } else {
            // The order came without its chunk table: the sources have it.
            let table = Digest::from_slice(&peers.table_digest)
                .map_err(|e| Failure::new(FailureReason::Invalid, format!("table digest: {e}")))?;
            (self.downloader)
                .learn_table(order.order_id, wire, table, &mut sources, control)
                .await?
        };
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
        let store = self.store.clone();
        let m = manifest.clone();
        // Kept from eviction while the order runs; released on return (a user's pin is
        // separate).
        let _hold = blocking(move || {
            store.insert_manifest(&m)?;
            store.hold(&m.digest())
        })
        .await?;
        // A range this agent seeded for the blob goes in first: it is what peers lack. (A
        // provisional manifest is of a blob seeded whole, elsewhere.)
        if !manifest.is_provisional() {
            self.ingester.import_ranges(&manifest).await;
        }
        self.orders.set_size(order.order_id, manifest.size());
        let bytes_from_peers = if self.store.is_complete(&digest) {
            0
        } else {
            let fetched = (self.downloader)
                .download(order.order_id, manifest.clone(), sources, control)
                .await;
            if fetched.is_err()
                && self
                    .store
                    .manifest(&digest)
                    .is_some_and(|m| m.is_provisional())
            {
                // A stream that ended here leaves nothing: a later order brings the real
                // manifest, which the provisional one might contradict.
                let _ = self.store.remove(&digest);
            }
            fetched?
        };
        let store = self.store.clone();
        // A manifest checked against the blob digest by an agent that read the whole blob
        // vouches for a blob whose every chunk matched it: no second read of the blob. A
        // chained manifest (a stream's among them) needs no voucher: `verify_whole` does not
        // read a blob whose every chunk matched its chaining value (`manifest/chain.rs`).
        let vouched = peers.verified && !peers.provisional;
        blocking(move || {
            if vouched {
                store.trust_verified(&digest)
            } else {
                verify_whole(&store, &digest)
            }
        })
        .await?;
        Ok(Some((manifest.size(), bytes_from_peers, 0)))
    }

    fn report_failed(&self, order_id: u64, digest: &[u8], f: Failure) {
        self.coordinator.send(Msg::BlobFailed(pb::BlobFailed {
            order_id,
            blob_digest: digest.to_vec(),
            reason: f.reason as i32,
            message: f.message,
        }));
    }
}

/// Reads the whole blob once (at most once per blob per process). Blocking.
fn verify_whole(store: &Store, digest: &Digest) -> Result<(), StoreError> {
    if let Err(e) = store.ensure_verified(digest) {
        if matches!(e, StoreError::Verify(_)) {
            // Every chunk matched a manifest that does not describe the blob (one assembled
            // from seeded ranges of an origin serving other bytes): drop it, or the store
            // would offer it as complete.
            let _ = store.remove(digest);
        }
        return Err(e);
    }
    Ok(())
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
                Some(Control::Sources { .. } | Control::Digests { .. }) => {}
                None => std::future::pending::<()>().await,
            }
        }
    };
    tokio::select! {
        result = work => result,
        why = cancelled => Err(Failure::cancelled(Some(&why))),
    }
}
