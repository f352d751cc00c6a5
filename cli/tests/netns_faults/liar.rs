//! A joined agent that lies: it tells the coordinator it holds the blob whole, and answers
//! every request for it NotFound. Its certificate is real (it joined with the token), so
//! nothing but its answers gives it away.

use std::net::SocketAddr;
use std::sync::Mutex;

use anyhow::{Context, Result, ensure};
use shoal_agent::store::{Store, StoreConfig};
use shoal_agent::transport::{self, ChunkEndpoint, TransportConfig};
use shoal_proto::pb::v1 as pb;
use shoal_tests::impostor::{Impostor, holds_whole};
use shoal_tests::netns::Fabric;
use shoal_tests::netns::shoal::{Cluster, JOIN_TOKEN};

use super::{Setup, start_with, workdir};

/// The liar's parts, alive as long as it lies.
struct Liar {
    endpoint: ChunkEndpoint,
    _session: tokio::sync::mpsc::Sender<pb::AgentMessage>,
    _store_dir: tempfile::TempDir,
    /// Last: its worker threads run the endpoint and the session.
    _runtime: tokio::runtime::Runtime,
}

/// Joins `cluster` from host 0's namespace, beside the real agent there (its own port), and
/// claims `digest` whole with an empty store.
fn lie_about(fabric: &Fabric, cluster: &Cluster<'_>, digest: &str) -> Result<Liar> {
    let url = cluster.coordinator_url();
    let ca_file = cluster.ca_file();
    let digest: shoal_proto::Digest = digest.parse()?;
    let addr = SocketAddr::new(fabric.ip(0).into(), 7002);
    fabric.run_in(0, move || -> Result<Liar> {
        // Built here, its worker threads are in the namespace with this one.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let store_dir = tempfile::tempdir()?;
        let store = Store::open(StoreConfig {
            root: store_dir.path().to_path_buf(),
            quota_bytes: 1 << 30,
        })?;
        let (endpoint, session) = runtime.block_on(async {
            let socket = transport::bind_udp_socket(addr, 1 << 20)?;
            let liar = Impostor::join(&url, &ca_file, JOIN_TOKEN, &addr.to_string()).await?;
            let endpoint = ChunkEndpoint::from_socket(
                socket,
                &liar.identity,
                store,
                TransportConfig::default(),
            )?;
            let session = liar.session(vec![holds_whole(&digest)]).await?;
            anyhow::Ok((endpoint, session))
        })?;
        Ok(Liar {
            endpoint,
            _session: session,
            _store_dir: store_dir,
            _runtime: runtime,
        })
    })?
}

#[test]
fn a_source_that_claims_the_blob_and_answers_not_found_does_not_hold_up_the_job() -> Result<()> {
    let (_tmp, dir) = workdir()?;
    let fabric = Fabric::new(&[100; 4])?;
    let liar: Mutex<Option<Liar>> = Mutex::new(None);
    let join = |cluster: &Cluster<'_>, digest: &str| {
        let l = lie_about(&fabric, cluster, digest)?;
        *liar.lock().unwrap_or_else(|e| e.into_inner()) = Some(l);
        // Listed as a whole holder before the job plans, so that targets are sent to it.
        let started = std::time::Instant::now();
        while cluster.blob_holders(digest)? < 2 {
            ensure!(
                started.elapsed() < std::time::Duration::from_secs(20),
                "the liar's claim never reached the catalog"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(())
    };
    let setup = Setup {
        before_job: &join,
        ..Setup::default()
    };
    let run = start_with(&fabric, &dir, setup)?;
    run.finish()?;
    let liar = liar.lock().unwrap_or_else(|e| e.into_inner()).take();
    let stats = liar
        .context("the liar never started")?
        .endpoint
        .serve_stats();
    ensure!(
        stats.not_found > 0,
        "no target asked the liar: nothing was tested ({stats:?})"
    );
    Ok(())
}
