//! The chunk table of an order that came without it (`FromPeers.table_digest`): a large
//! blob's table is 32 bytes a chunk, and the coordinator would otherwise send it to every
//! target. The order names the table's SHA-256; the agent asks its sources, each of which
//! holds the manifest (it serves the blob's chunks), a couple at a time, and takes the first
//! table that matches the digest, so a source cannot make it check chunks against a forged
//! one. If no source serves it soon (sources that are themselves waiting for their table,
//! sources of an older release), the agent asks the coordinator (`TableWanted`), which
//! answers with the whole table as a `ChunkDigests`.
//!
//! Meanwhile the order's control messages still count: new sources are tried (and go on to
//! the download), a cancel ends the wait.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use shoal_proto::pb::v1::agent_message::Msg;
use shoal_proto::pb::v1::{self as pb, FailureReason};
use shoal_proto::{Digest, Manifest};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::Downloader;
use crate::failure::Failure;
use crate::orders::Control;
use crate::transport::ChunkEndpoint;

/// Sources asked at once: the first answer usually wins; a second covers a slow one.
const PARALLEL: usize = 2;
/// Without a table this long, the coordinator is asked (again every [`ASK_AGAIN`]: a
/// question lost with a broken session is not resent).
const ASK_AFTER: Duration = Duration::from_millis(1500);
const ASK_AGAIN: Duration = Duration::from_secs(10);
/// Sources that all failed are asked again after this.
const ROUND: Duration = Duration::from_millis(500);
/// Without a table this long the order fails (`NO_SOURCE`), to be planned again: an order
/// the coordinator no longer knows (it restarted, or replaced the order) is never answered.
const GIVE_UP: Duration = Duration::from_secs(120);

impl Downloader {
    /// The manifest of a slim order: `wire` without its chunk table, which this learns
    /// from `sources` (updated by control messages meanwhile, for the download that
    /// follows) or the coordinator, and checks against `table_digest`.
    pub(crate) async fn learn_table(
        &self,
        order_id: u64,
        wire: &pb::Manifest,
        table_digest: Digest,
        sources: &mut Vec<pb::Source>,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Result<Manifest, Failure> {
        let invalid = |e: String| Failure::new(FailureReason::Invalid, format!("manifest: {e}"));
        let blob = Digest::from_slice(&wire.digest).map_err(|e| invalid(e.to_string()))?;
        let chunks = wire.size.div_ceil(u64::from(wire.chunk_size.max(1)));
        let len = usize::try_from(chunks)
            .ok()
            .and_then(|c| c.checked_mul(Digest::LEN))
            .ok_or_else(|| invalid("too many chunks".into()))?;
        // The manifest with `digests` as its table, if they are the table the order names.
        let checked = |digests: Bytes| {
            if digests.len() != len || Digest::of(&digests) != table_digest {
                return None;
            }
            let mut full = wire.clone();
            full.chunk_digests = digests;
            Some(Manifest::try_from(&full).map_err(|e| invalid(e.to_string())))
        };
        // A copy of the blob already here (a download that stopped, a held blob, another
        // order's download meanwhile) has it.
        let held = || {
            let m = self.store.manifest(&blob).filter(|m| !m.is_provisional())?;
            checked(Digest::table_bytes(m.chunk_digests()).into())
        };
        if let Some(manifest) = held() {
            return manifest;
        }
        let started = Instant::now();
        let mut asked: Option<Instant> = None;
        let mut tried: HashSet<String> = HashSet::new();
        // Sources that served another table: never asked again for this order.
        let mut refused: HashSet<String> = HashSet::new();
        let mut asking: JoinSet<(String, Result<Bytes, String>)> = JoinSet::new();
        let mut round = started + ROUND;
        loop {
            while asking.len() < PARALLEL {
                let Some(s) = sources.iter().find(|s| !tried.contains(&s.agent_id)) else {
                    break;
                };
                tried.insert(s.agent_id.clone());
                let (endpoint, id) = (self.endpoint.clone(), s.agent_id.clone());
                let addrs: Vec<SocketAddr> = s
                    .quic_addresses
                    .iter()
                    .filter_map(|a| a.parse().ok())
                    .collect();
                asking.spawn(async move {
                    let got = ask(&endpoint, blob, &id, &addrs, len).await;
                    (id, got)
                });
            }
            let exhausted = asking.is_empty();
            let ask_at = match asked {
                None if exhausted && !sources.is_empty() => Instant::now(),
                None => started + ASK_AFTER,
                Some(at) => at + ASK_AGAIN,
            };
            if Instant::now() >= ask_at {
                tracing::debug!(order_id, %blob, "no source served the chunk table: asking the coordinator");
                self.coordinator.send(Msg::TableWanted(pb::TableWanted {
                    order_id,
                    blob_digest: blob.as_bytes().to_vec(),
                }));
                asked = Some(Instant::now());
                continue;
            }
            tokio::select! {
                Some(joined) = asking.join_next(), if !asking.is_empty() => {
                    let Ok((agent, got)) = joined else { continue };
                    match got.map(checked) {
                        Ok(Some(manifest)) => {
                            self.counters.table_learned(true);
                            return manifest;
                        }
                        Ok(None) => {
                            tracing::warn!(%agent, %blob, "a source served a chunk table that does not match the order's");
                            refused.insert(agent);
                        }
                        Err(e) => tracing::debug!(%agent, %blob, error = %e, "a source did not serve the chunk table"),
                    }
                }
                c = control.recv() => match c {
                    Some(Control::Sources { add, remove }) => {
                        sources.retain(|s| !remove.contains(&s.agent_id));
                        for s in add {
                            tried.remove(&s.agent_id);
                            sources.retain(|old| old.agent_id != s.agent_id);
                            sources.push(s);
                        }
                    }
                    // The coordinator's answer (or a resend's table): first 0, the whole table.
                    Some(Control::Digests { first: 0, digests }) if !digests.is_empty() => {
                        if let Some(manifest) = checked(Digest::table_bytes(&digests).into()) {
                            self.counters.table_learned(false);
                            return manifest;
                        }
                        tracing::warn!(%blob, "the coordinator's chunk table does not match the order's digest");
                    }
                    Some(Control::Digests { .. }) => {}
                    Some(Control::Cancel(why)) => return Err(Failure::cancelled(Some(&why))),
                    None => return Err(Failure::cancelled(None)),
                },
                () = tokio::time::sleep_until(round.min(ask_at)) => {
                    if Instant::now() >= round {
                        round = Instant::now() + ROUND;
                        if let Some(manifest) = held() {
                            return manifest;
                        }
                        if started.elapsed() >= GIVE_UP {
                            return Err(Failure::new(
                                FailureReason::NoSource,
                                format!("no source nor the coordinator sent the chunk table in {GIVE_UP:?}"),
                            ));
                        }
                        if asking.is_empty() {
                            // Every source failed: they may have it by now.
                            tried.clone_from(&refused);
                        }
                    }
                }
            }
        }
    }
}

/// Asks the source `id` (at each of its addresses in turn) for the table.
async fn ask(
    endpoint: &ChunkEndpoint,
    blob: Digest,
    id: &str,
    addrs: &[SocketAddr],
    len: usize,
) -> Result<Bytes, String> {
    let mut last = format!("agent {id} has no usable address");
    for addr in addrs {
        let peer = match endpoint.peer_named(*addr, id).await {
            Ok(p) => p,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        match peer.fetch_table(blob, len).await {
            Ok(digests) => return Ok(digests),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::Counters;
    use crate::link::{Coordinator, Outbox};
    use crate::orders::RunningOrders;
    use crate::readers::Readers;
    use crate::store::{Store, StoreConfig};
    use crate::transport::TransportConfig;
    use crate::transport::tls::{ClusterCa, Identity};

    struct Node {
        endpoint: ChunkEndpoint,
        _dir: tempfile::TempDir,
    }

    fn node(identity: &Identity) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(StoreConfig {
            root: dir.path().to_path_buf(),
            quota_bytes: 1 << 30,
        })
        .expect("store");
        let endpoint = ChunkEndpoint::bind(
            "127.0.0.1:0".parse().expect("addr"),
            identity,
            store,
            TransportConfig::default(),
        )
        .expect("endpoint");
        Node {
            endpoint,
            _dir: dir,
        }
    }

    fn source(id: &str, n: &Node) -> pb::Source {
        pb::Source {
            agent_id: id.into(),
            quic_addresses: vec![n.endpoint.local_addr().to_string()],
            ..Default::default()
        }
    }

    fn downloader(n: &Node) -> (Downloader, Outbox, tokio::sync::watch::Sender<bool>) {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let (coordinator, outbox) = Coordinator::new(channel, "target".into());
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let d = Downloader {
            store: n.endpoint.store().clone(),
            endpoint: n.endpoint.clone(),
            coordinator,
            counters: Counters::default(),
            readers: Readers::default(),
            orders: RunningOrders::default(),
            stop,
        };
        (d, outbox, stop_tx)
    }

    /// Waits for the task to ask the coordinator for the table of `order_id`.
    async fn asked_for_the_table(outbox: &mut Outbox, order_id: u64, m: &Manifest) {
        let asked = outbox.recv().await.expect("a message");
        match asked.msg {
            Some(Msg::TableWanted(w)) => {
                assert_eq!(w.order_id, order_id);
                assert_eq!(&w.blob_digest[..], &m.digest().as_bytes()[..]);
            }
            other => panic!("not a TableWanted: {other:?}"),
        }
    }

    /// Answers as the coordinator does: the whole table, as digests for the order.
    fn answer_with(control: &mpsc::UnboundedSender<Control>, digests: Vec<Digest>) {
        let _ = control.send(Control::Digests { first: 0, digests });
    }

    /// A 100-chunk blob; the order's manifest without its table, and the table's digest.
    fn blob() -> (Manifest, pb::Manifest, Digest) {
        let data: Vec<u8> = (0..100 * 4096u32).map(|i| (i % 251) as u8).collect();
        let m = Manifest::from_reader(&data[..], 4096).expect("manifest");
        let mut slim = pb::Manifest::from(&m);
        let table = Digest::of(&slim.chunk_digests);
        slim.chunk_digests = Bytes::new();
        (m, slim, table)
    }

    #[tokio::test]
    async fn a_table_comes_from_the_source_that_has_it_and_a_forged_one_is_refused() {
        let ca = ClusterCa::generate().expect("ca");
        let (holder, forger, empty) = (
            node(&ca.issue("holder").expect("id")),
            node(&ca.issue("forger").expect("id")),
            node(&ca.issue("empty").expect("id")),
        );
        // A source with no table answers NotFound; the holder serves the table.
        let target = node(&ca.issue("target").expect("id"));
        let (m, slim, table) = blob();
        holder.endpoint.store().insert_manifest(&m).expect("insert");
        // Another table under the same blob digest: it must not be taken.
        let mut lies = m.chunk_digests().to_vec();
        lies.swap(3, 4);
        let lie = Manifest::new(m.digest(), m.size(), m.chunk_size(), lies).expect("lie");
        forger
            .endpoint
            .store()
            .insert_manifest(&lie)
            .expect("insert");

        let (d, outbox, _stop) = downloader(&target);
        let (_control, mut rx) = mpsc::unbounded_channel();
        let mut sources = vec![source("empty", &empty), source("holder", &holder)];
        let got = (d.learn_table(7, &slim, table, &mut sources, &mut rx).await).expect("table");
        assert_eq!(got, m);
        assert_eq!(d.counters.tables(), (1, 0));
        drop(outbox);

        // A source with another table under the blob's digest is not believed: the
        // coordinator is asked (see below for its answer).
        let (d, mut outbox, _stop) = downloader(&target);
        let (control, mut rx) = mpsc::unbounded_channel();
        let mut sources = vec![source("forger", &forger)];
        let learning = d.learn_table(8, &slim, table, &mut sources, &mut rx);
        let answer = async {
            asked_for_the_table(&mut outbox, 8, &m).await;
            answer_with(&control, m.chunk_digests().to_vec());
        };
        let (got, ()) = tokio::join!(learning, answer);
        assert_eq!(got.expect("table"), m);
        assert_eq!(d.counters.tables(), (0, 1));
    }

    #[tokio::test]
    async fn a_source_still_learning_the_table_answers_once_it_has_it() {
        let ca = ClusterCa::generate().expect("ca");
        let late = node(&ca.issue("late").expect("id"));
        let target = node(&ca.issue("target").expect("id"));
        let (m, slim, table) = blob();
        let (d, mut outbox, _stop) = downloader(&target);
        let (_control, mut rx) = mpsc::unbounded_channel();
        let mut sources = vec![source("late", &late)];
        let store = late.endpoint.store().clone();
        let manifest = m.clone();
        // The source's own order brings it the table a moment after it was asked.
        let learns = async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            store.insert_manifest(&manifest).expect("insert");
        };
        let (got, ()) = tokio::join!(
            d.learn_table(7, &slim, table, &mut sources, &mut rx),
            learns
        );
        assert_eq!(got.expect("table"), m);
        assert_eq!(d.counters.tables(), (1, 0));
        assert!(
            outbox.try_recv().is_err(),
            "the coordinator was not asked: the source waited for its table"
        );
    }

    #[tokio::test]
    async fn without_a_source_that_has_it_the_coordinator_is_asked() {
        let ca = ClusterCa::generate().expect("ca");
        let empty = node(&ca.issue("empty").expect("id"));
        let target = node(&ca.issue("target").expect("id"));
        let (m, slim, table) = blob();
        let (d, mut outbox, _stop) = downloader(&target);
        let (control, mut rx) = mpsc::unbounded_channel();
        let mut sources = vec![source("empty", &empty)];
        let learning = d.learn_table(7, &slim, table, &mut sources, &mut rx);
        let answer = async {
            // The one source has no table (NotFound, after waiting for one): the coordinator
            // is asked.
            asked_for_the_table(&mut outbox, 7, &m).await;
            // A source added meanwhile is kept for the download; a wrong table ignored.
            let added = pb::Source {
                agent_id: "later".into(),
                ..Default::default()
            };
            let _ = control.send(Control::Sources {
                add: vec![added],
                remove: vec!["empty".into()],
            });
            let mut wrong = m.chunk_digests().to_vec();
            wrong.swap(0, 1);
            answer_with(&control, wrong);
            answer_with(&control, m.chunk_digests().to_vec());
        };
        let (got, ()) = tokio::join!(learning, answer);
        assert_eq!(got.expect("table"), m);
        assert_eq!(d.counters.tables(), (0, 1));
        let ids: Vec<&str> = sources.iter().map(|s| s.agent_id.as_str()).collect();
        assert_eq!(ids, ["later"]);
    }

    #[tokio::test]
    async fn a_cancel_ends_the_wait() {
        let ca = ClusterCa::generate().expect("ca");
        let target = node(&ca.issue("target").expect("id"));
        let (_, slim, table) = blob();
        let (d, _outbox, _stop) = downloader(&target);
        let (control, mut rx) = mpsc::unbounded_channel();
        let _ = control.send(Control::Cancel("job cancelled".into()));
        let got = d
            .learn_table(7, &slim, table, &mut Vec::new(), &mut rx)
            .await;
        let failure = got.expect_err("cancelled");
        assert_eq!(failure.reason, FailureReason::Cancelled);
    }
}
