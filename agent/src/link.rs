//! The agent's link to its coordinator, as the rest of the agent sees it: a queue for
//! reports, the gRPC channel for the public API, the agent id and whether the session is up.
//!
//! The session task (`session.rs`) owns the other end: it drains the queue onto the
//! session stream and is the only writer of the id (a re-join may assign a new one) and of
//! the connected flag. Everyone else holds a clone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use shoal_proto::Digest;
use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::agent_message::Msg;
use shoal_proto::pb::v1::coordinator_client::CoordinatorClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// Messages for the coordinator, as the session task receives them.
pub(crate) type Outbox = mpsc::UnboundedReceiver<pb::AgentMessage>;

#[derive(Clone, Debug)]
pub(crate) struct Coordinator {
    /// One HTTP/2 channel to the coordinator: the session and the public API share it. The
    /// session task replaces it when a re-join brings a certificate for a new id.
    channel: Arc<RwLock<Channel>>,
    /// Unbounded so that queueing never waits: only reports go here (one or two per order,
    /// chunk rejections, stalls, registrations, pins); progress, load and heartbeats are
    /// made by the session itself.
    outbox: mpsc::UnboundedSender<pb::AgentMessage>,
    agent_id: Arc<RwLock<String>>,
    connected: Arc<AtomicBool>,
}

impl Coordinator {
    pub(crate) fn new(channel: Channel, agent_id: String) -> (Self, Outbox) {
        let (outbox, rx) = mpsc::unbounded_channel();
        let link = Self {
            channel: Arc::new(RwLock::new(channel)),
            outbox,
            agent_id: Arc::new(RwLock::new(agent_id)),
            connected: Arc::default(),
        };
        (link, rx)
    }

    /// Queues a message for the coordinator. Never waits; dropped if the agent is stopping.
    pub(crate) fn send(&self, msg: Msg) {
        let _ = self.outbox.send(pb::AgentMessage { msg: Some(msg) });
    }

    /// A user pinned (or an operator unpinned) `blob`, held whole: the coordinator, which
    /// shows pins in GetBlob's holders, hears it in an inventory update rather than at the
    /// next snapshot.
    pub(crate) fn announce_pin(&self, blob: &Digest, pinned: bool) {
        self.send(Msg::Inventory(pb::Inventory {
            replace: false,
            blobs: vec![pb::HeldBlob {
                blob_digest: blob.as_bytes().to_vec(),
                complete: true,
                chunks: None,
                pinned,
            }],
            removed_blobs: Vec::new(),
        }));
    }

    /// A blob this agent held whole lost chunks (found corrupt and dropped): `bits` of
    /// `chunk_count` is what is left. The coordinator hears it as a removal followed by the
    /// partial holding, in that order: its planner only ever adds to a holding, so a plain
    /// update would leave this agent listed as complete.
    pub(crate) fn announce_incomplete(
        &self,
        blob: &Digest,
        chunk_count: u32,
        bits: &[u8],
        pinned: bool,
    ) {
        self.send(Msg::Inventory(pb::Inventory {
            replace: false,
            blobs: Vec::new(),
            removed_blobs: vec![blob.as_bytes().to_vec()],
        }));
        if bits.iter().all(|b| *b == 0) {
            return;
        }
        self.send(Msg::Inventory(pb::Inventory {
            replace: false,
            blobs: vec![pb::HeldBlob {
                blob_digest: blob.as_bytes().to_vec(),
                complete: false,
                chunks: Some(pb::ChunkBitmap {
                    chunk_count,
                    bits: bits.to_vec(),
                }),
                pinned,
            }],
            removed_blobs: Vec::new(),
        }));
    }

    /// Tells the coordinator of every blob that leaves the store (`removals`, see
    /// `Store::removals`) as it happens, batched, until the agent stops; a lagging receiver
    /// leaves the rest to the next snapshot.
    pub(crate) async fn report_removals(
        self,
        mut removals: tokio::sync::broadcast::Receiver<Digest>,
        mut stop: crate::shutdown::Stop,
    ) {
        use tokio::sync::broadcast::error::{RecvError, TryRecvError};
        loop {
            let first = tokio::select! {
                _ = crate::shutdown::stopped(&mut stop) => return,
                r = removals.recv() => r,
            };
            let mut removed = match first {
                Ok(d) => vec![d],
                Err(RecvError::Closed) => return,
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(
                        missed = n,
                        "removal reports fell behind: the next inventory snapshot carries them"
                    );
                    continue;
                }
            };
            loop {
                match removals.try_recv() {
                    Ok(d) => removed.push(d),
                    Err(TryRecvError::Lagged(_)) => continue,
                    Err(_) => break,
                }
            }
            tracing::debug!(count = removed.len(), "reporting removed blobs");
            self.send(Msg::Inventory(pb::Inventory {
                replace: false,
                blobs: Vec::new(),
                removed_blobs: removed.iter().map(|d| d.as_bytes().to_vec()).collect(),
            }));
        }
    }

    pub(crate) fn agent_id(&self) -> String {
        self.agent_id
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The coordinator's public API, on the shared channel.
    pub(crate) fn client(&self) -> CoordinatorClient<Channel> {
        // GetBlob answers carry manifests (32 MiB for a 1 TiB blob).
        CoordinatorClient::new(self.channel())
            .max_decoding_message_size(shoal_proto::MAX_SESSION_MESSAGE_BYTES)
    }

    pub(crate) fn channel(&self) -> Channel {
        self.channel
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_channel(&self, channel: Channel) {
        *self.channel.write().unwrap_or_else(|e| e.into_inner()) = channel;
    }

    /// True while the session is up.
    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// For the session task only.
    pub(crate) fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }

    /// For the session task only: the coordinator assigned another id on a re-join.
    pub(crate) fn set_agent_id(&self, id: String) {
        *self.agent_id.write().unwrap_or_else(|e| e.into_inner()) = id;
    }
}
