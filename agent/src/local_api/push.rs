//! Push: ingest a local file. The file is read twice, once to build the manifest (blob and
//! chunk digests) and once to store each chunk, which the store verifies against the
//! manifest (so a file changed in between is caught rather than stored torn).

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::time::Instant;

use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::agent_message::Msg;
use shoal_proto::{Digest, Manifest, ManifestBuilder};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{Caller, LocalApi, absolute_path, store_status};
use crate::store::{ImportError, Store, StoreError, read_full};

/// Progress messages at most this often.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

pub(super) async fn push(
    shared: LocalApi,
    caller: Caller,
    request: pb::PushRequest,
) -> Result<ReceiverStream<Result<pb::PushProgress, Status>>, Status> {
    let allowed = &shared.config.local_allowed_paths;
    caller.may_transfer(allowed)?;
    let path = absolute_path("path", &request.path)?;
    caller.may_read(&path, allowed)?;
    let expected = if request.expected_digest.is_empty() {
        None
    } else {
        Some(
            request
                .expected_digest
                .parse::<Digest>()
                .map_err(|e| Status::invalid_argument(format!("expected_digest: {e}")))?,
        )
    };
    let size = check_file(&path).await?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let outcome = ingest(&shared, path, size, request.pin, expected, tx.clone()).await;
        let last = match outcome {
            Ok(result) => Ok(pb::PushProgress {
                bytes_done: size,
                bytes_total: size,
                rate_bytes_per_sec: 0,
                result: Some(result),
            }),
            Err(status) => Err(status),
        };
        let _ = tx.send(last).await;
    });
    Ok(ReceiverStream::new(rx))
}

/// The file's size, or the status a user should see for a path that cannot be pushed.
async fn check_file(path: &std::path::Path) -> Result<u64, Status> {
    let shown = path.display();
    let meta = match tokio::fs::metadata(path).await {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Status::not_found(format!("{shown}: no such file")));
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(Status::permission_denied(format!(
                "{shown}: the agent may not read it"
            )));
        }
        Err(e) => return Err(Status::internal(format!("{shown}: {e}"))),
    };
    if meta.is_dir() {
        return Err(Status::invalid_argument(format!(
            "{shown} is a directory; push takes a file"
        )));
    }
    if !meta.is_file() {
        return Err(Status::invalid_argument(format!(
            "{shown} is not a regular file"
        )));
    }
    if meta.len() == 0 {
        return Err(Status::invalid_argument(format!(
            "{shown} is empty; empty blobs are not distributed"
        )));
    }
    if meta.len() > shoal_proto::MAX_BLOB_SIZE {
        return Err(Status::invalid_argument(format!(
            "{shown} is {} bytes; the largest blob is 1 TiB",
            meta.len()
        )));
    }
    Ok(meta.len())
}

struct Progress {
    tx: mpsc::Sender<Result<pb::PushProgress, Status>>,
    total: u64,
    started: Instant,
    last: Instant,
}

impl Progress {
    /// Both passes count half: bars move forward once from 0 to the file's size.
    fn report(&mut self, hashed: u64, stored: u64) {
        if self.last.elapsed() < PROGRESS_EVERY {
            return;
        }
        self.last = Instant::now();
        let done = (hashed + stored) / 2;
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        // Ignored if the client went away: the push still completes.
        let _ = self.tx.blocking_send(Ok(pb::PushProgress {
            bytes_done: done,
            bytes_total: self.total,
            rate_bytes_per_sec: (done as f64 / secs) as u64,
            result: None,
        }));
    }
}

async fn ingest(
    shared: &LocalApi,
    path: PathBuf,
    size: u64,
    pin: bool,
    expected: Option<Digest>,
    tx: mpsc::Sender<Result<pb::PushProgress, Status>>,
) -> Result<pb::PushResult, Status> {
    let store = shared.store.clone();
    let chunk_size = shared.config.chunk_size;
    let (manifest, already_present) = tokio::task::spawn_blocking(move || {
        let now = Instant::now();
        let mut progress = Progress {
            tx,
            total: size,
            started: now,
            last: now,
        };
        store_file(&store, &path, chunk_size, pin, expected, &mut progress)
    })
    .await
    .map_err(|e| Status::internal(format!("push task failed: {e}")))??;
    metrics::counter!(crate::metrics::BYTES_PUSHED).increment(if already_present {
        0
    } else {
        size
    });
    let registered = shared.coordinator.is_connected();
    shared
        .coordinator
        .send(Msg::BlobRegistered(pb::BlobRegistered {
            manifest: Some(pb::Manifest::from(&manifest)),
        }));
    if pin {
        // After the registration: the coordinator ignores holdings of blobs it does not know.
        shared.coordinator.announce_pin(&manifest.digest(), true);
    }
    tracing::info!(blob = %manifest.digest(), size, already_present, pin, "pushed");
    Ok(pb::PushResult {
        digest: manifest.digest().to_string(),
        size,
        chunk_size: manifest.chunk_size(),
        chunk_count: manifest.chunk_count(),
        registered,
        already_present,
    })
}

fn store_file(
    store: &Store,
    path: &std::path::Path,
    chunk_size: u32,
    pin: bool,
    expected: Option<Digest>,
    progress: &mut Progress,
) -> Result<(Manifest, bool), Status> {
    let shown = path.display();
    let read_err = |e: io::Error| Status::internal(format!("reading {shown}: {e}"));
    let open = || File::open(path).map_err(read_err);

    let mut builder = ManifestBuilder::new(chunk_size)
        .map_err(|e| Status::invalid_argument(format!("chunk size: {e}")))?;
    let mut file = open()?;
    let mut buf = vec![0u8; chunk_size as usize];
    let mut hashed = 0u64;
    loop {
        let n = read_full(&mut file, &mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        builder.update(&buf[..n]);
        hashed += n as u64;
        progress.report(hashed, 0);
    }
    let manifest = builder
        .finish()
        .map_err(|e| Status::invalid_argument(format!("{shown}: {e}")))?;
    if let Some(want) = expected {
        if manifest.digest() != want {
            return Err(Status::data_loss(format!(
                "{shown} hashes to {}, expected {want}",
                manifest.digest()
            )));
        }
    }
    let digest = manifest.digest();
    let already_present = store.is_complete(&digest);
    if !already_present {
        store
            .insert_manifest(&manifest)
            .map_err(|e| store_status(&e))?;
        let mut file = open()?;
        let mut stored = 0u64;
        let imported = store.import_chunks(&manifest, &mut file, manifest.chunk_indices(), |n| {
            stored += n;
            progress.report(hashed, stored);
        });
        match imported {
            Ok(_) => {}
            Err(ImportError::Short { .. } | ImportError::Store(StoreError::Verify(_))) => {
                return Err(changed(path));
            }
            Err(ImportError::Read(e)) => return Err(read_err(e)),
            Err(ImportError::Store(e)) => return Err(store_status(&e)),
        }
    }
    if pin {
        store.pin(&digest).map_err(|e| store_status(&e))?;
    }
    // Held already, perhaps under a manifest of the same bytes made otherwise (plain chunk
    // digests from ranges, or from before manifests were chained): that one is registered,
    // so that this agent's orders and its store agree.
    let manifest = match store.manifest(&digest) {
        Some(stored) if already_present => Manifest::clone(&stored),
        _ => manifest,
    };
    Ok((manifest, already_present))
}

fn changed(path: &std::path::Path) -> Status {
    Status::aborted(format!(
        "{} changed while it was being pushed; push it again",
        path.display()
    ))
}
