//! Pull: bring a blob into the store (asking the coordinator to distribute it to this
//! agent if it is not here), verify it, and write it out to a path atomically (`output.rs`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use shoal_proto::Digest;
use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::PullState;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{Caller, LocalApi, absolute_path, output, store_status};
use crate::bring;

/// Progress is sent this often while the blob arrives.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// How often a fetched URL's digest is reported before the coordinator has the blob's
/// registration (every [`POLL_EVERY`]: 15 s in all).
const REPORT_TRIES: u32 = 60;

type Tx = mpsc::Sender<Result<pb::PullProgress, Status>>;

/// Announced digests and names (URL, digest or name's address) that a pull by them failed,
/// so that the next pulls of the URL on this agent do not seed a wrong digest (or a name the
/// origin refuses to match) from the origin again first. Forgotten after a while: the
/// failure may have been something else (a full disk), and then this agent only loses
/// streaming for that URL meanwhile.
#[derive(Clone, Debug, Default)]
pub(crate) struct FailedGuesses(Arc<Mutex<VecDeque<(String, Digest, Instant)>>>);

impl FailedGuesses {
    pub(crate) const FORGET_AFTER: Duration = Duration::from_secs(600);
    const KEEP: usize = 256;

    fn is_wrong(&self, url: &str, digest: &Digest, now: Instant) -> bool {
        let mut wrong = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        wrong.retain(|(_, _, at)| now.saturating_duration_since(*at) < Self::FORGET_AFTER);
        wrong.iter().any(|(u, d, _)| u == url && d == digest)
    }

    fn remember(&self, url: &str, digest: Digest, now: Instant) {
        let mut wrong = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if wrong.len() >= Self::KEEP {
            wrong.pop_front();
        }
        wrong.push_back((url.to_string(), digest, now));
    }
}

pub(super) async fn pull(
    shared: LocalApi,
    caller: Caller,
    request: pb::PullRequest,
) -> Result<ReceiverStream<Result<pb::PullProgress, Status>>, Status> {
    let allowed = &shared.config.local_allowed_paths;
    caller.may_transfer(allowed)?;
    let url = (!request.url.is_empty()).then(|| request.url.clone());
    if url.is_some() {
        caller.may_fetch_url()?;
    }
    if let Some(url) = &url {
        shoal_origin::parse_http_url(url).map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    if request.digest.is_empty() && url.is_none() {
        return Err(Status::invalid_argument("digest or url is required"));
    }
    let digest: Option<Digest> = if request.digest.is_empty() {
        None
    } else {
        Some(
            request
                .digest
                .parse()
                .map_err(|e| Status::invalid_argument(format!("digest: {e}")))?,
        )
    };
    let output = if request.output_path.is_empty() {
        None
    } else {
        let path = absolute_path("output_path", &request.output_path)?;
        output::check(&path)?;
        caller.may_write(&path, allowed)?;
        Some(output::Wanted {
            path,
            copy: request.copy,
        })
    };
    let deadline = (request.deadline_ms > 0)
        .then(|| Instant::now() + Duration::from_millis(request.deadline_ms));
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let work = async {
            let (pin, deadline_ms) = (request.pin, request.deadline_ms);
            let url = match digest {
                Some(d) => {
                    let origin = url.map(|u| pb::HttpOrigin::plain(&u));
                    return run(&shared, d, origin, output, pin, deadline_ms, &tx).await;
                }
                // Checked above: without a digest there is a URL.
                None => url.unwrap_or_default(),
            };
            let head = match shared.ingester.origin.head_url(&url, &[]).await {
                Ok(info) => info,
                Err(e) => return Err(Status::unavailable(format!("{url}: {e}"))),
            };
            // What may address the content before anyone has read it, best first: the
            // SHA-256 the origin announces, then the URL's name (its ETag and size). Either is
            // seeded once and streamed to every puller at once, like a pull with `--digest`.
            // A pull by one that fails ABORTED (content not matching the announcement, a file
            // changed under its name) is remembered, and the next is tried.
            let guesses = [
                (head.sha256).map(|d| {
                    (
                        d,
                        pb::HttpOrigin::plain(&url),
                        "the origin's announced digest",
                    )
                }),
                named_origin(&url, &head).map(|o| {
                    let blob = Digest::naming(&o.content_name());
                    (blob, o, "the URL's name (ETag and size)")
                }),
            ];
            for (blob, origin, by) in guesses.into_iter().flatten() {
                if (shared.failed_guesses).is_wrong(&url, &blob, Instant::now()) {
                    continue;
                }
                tracing::info!(url, %blob, "pulling by {by}");
                let pulled = run(
                    &shared,
                    blob,
                    Some(origin),
                    output.clone(),
                    pin,
                    deadline_ms,
                    &tx,
                );
                match pulled.await {
                    Err(s) if s.code() == tonic::Code::Aborted => {
                        tracing::warn!(url, %blob, error = s.message(), "pulling by {by} failed: not trying it again for {} min", FailedGuesses::FORGET_AFTER.as_secs() / 60);
                        (shared.failed_guesses).remember(&url, blob, Instant::now());
                    }
                    other => return other,
                }
            }
            // Nothing to name it by: find out which blob it is (see `identify`).
            let digest = identify(&shared, &url, head, &tx).await?;
            let origin = Some(pb::HttpOrigin::plain(&url));
            run(&shared, digest, origin, output, pin, deadline_ms, &tx).await
        };
        let outcome = match deadline {
            Some(at) => tokio::time::timeout_at(at, work).await.unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!(
                    "not pulled within {} ms",
                    request.deadline_ms
                )))
            }),
            None => work.await,
        };
        if let Err(status) = outcome {
            let _ = tx.send(Err(status)).await;
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// The origin of a URL's content named by its ETag and size (`shoal_proto::url_name`), if
/// the origin gave the size (without it, the blob cannot be streamed: its chunk count is
/// unknown) and a strong ETag (without one, a file replaced at the same size would go on
/// under the old name), and the name is not too long.
fn named_origin(url: &str, head: &shoal_origin::UrlInfo) -> Option<pb::HttpOrigin> {
    let size = head.size.filter(|s| *s > 0)?;
    let etag = head.etag.clone().filter(|e| shoal_proto::is_strong(e))?;
    let origin = pb::HttpOrigin {
        url: url.to_string(),
        headers: Default::default(),
        size,
        etag,
    };
    (origin.content_name().len() <= shoal_proto::MAX_NAME_LEN).then_some(origin)
}

fn progress(shared: &LocalApi, digest: Digest, state: PullState) -> pb::PullProgress {
    let manifest = shared.store.manifest(&digest);
    let bytes_total = manifest.as_ref().map_or(0, |m| m.size());
    let running = shared.orders.transfer_of(&digest).map(|t| t.progress);
    let bytes_done = match (&running, &manifest) {
        (Some(t), _) => t.bytes_done,
        (None, Some(m)) => (u64::from(shared.store.present_count(&digest).unwrap_or(0))
            * u64::from(m.chunk_size()))
        .min(m.size()),
        (None, None) => 0,
    };
    pb::PullProgress {
        state: state as i32,
        bytes_done,
        bytes_total,
        rate_bytes_per_sec: running.as_ref().map_or(0, |t| t.rate_bytes_per_sec),
        active_sources: running.as_ref().map_or(0, |t| t.active_sources),
        // A named blob's content digest, once the whole table is known.
        digest: (manifest.as_ref().and_then(|m| m.content_digest()))
            .unwrap_or(digest)
            .to_string(),
        bytes_from_origin: 0,
        output: String::new(),
    }
}

async fn run(
    shared: &LocalApi,
    digest: Digest,
    origin: Option<pb::HttpOrigin>,
    output: Option<output::Wanted>,
    pin: bool,
    deadline_ms: u64,
    tx: &Tx,
) -> Result<(), Status> {
    // Subscribed before asking, so a failure of the order is not missed.
    let mut finished = shared.orders.subscribe();
    if !shared.store.is_complete(&digest) {
        let _ = tx
            .send(Ok(progress(shared, digest, PullState::Queued)))
            .await;
        let origin = origin.map(|h| pb::Origin {
            origin: Some(pb::origin::Origin::Http(h)),
        });
        let request = bring::Request {
            blob: digest,
            origin,
            priority: pb::Priority::Normal,
            deadline_ms,
            description: format!("pull on agent {}", shared.coordinator.agent_id()),
        };
        let mut bringing = bring::bring_here(&shared.coordinator, request).await?;
        let job_id = bringing.job_id.clone();
        tracing::info!(blob = %digest, job = job_id, "pull: asked the coordinator");
        let mut tick = tokio::time::interval(POLL_EVERY);
        while !shared.store.is_complete(&digest) {
            tokio::select! {
                _ = tick.tick() => {}
                gave_up = bringing.failed() => {
                    let message = format!("fetching {digest} {}", gave_up.why);
                    return Err(if gave_up.cancelled {
                        Status::cancelled(message)
                    } else {
                        Status::aborted(message)
                    });
                }
                f = finished.recv() => match f {
                    Ok(f) if f.digest == digest && f.job_id == job_id => {
                        if let Err(why) = f.result {
                            return Err(Status::aborted(format!("fetching {digest} failed: {why}")));
                        }
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return Err(Status::unavailable("agent shutting down")),
                },
            }
            let state = if shared.store.manifest(&digest).is_some() {
                PullState::Fetching
            } else {
                PullState::Queued
            };
            if tx.send(Ok(progress(shared, digest, state))).await.is_err() {
                // The client went away; the blob still arrives in the store.
                return Ok(());
            }
        }
    }
    let _ = tx
        .send(Ok(progress(shared, digest, PullState::Verifying)))
        .await;
    let store = shared.store.clone();
    tokio::task::spawn_blocking(move || {
        store.ensure_verified(&digest)?;
        if pin {
            store.pin(&digest)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| Status::internal(format!("verify task failed: {e}")))?
    .map_err(|e| store_status(&e))?;
    if pin {
        shared.coordinator.announce_pin(&digest, true);
    }

    if let Some(output::Wanted { path, copy }) = output {
        let _ = tx
            .send(Ok(progress(shared, digest, PullState::Writing)))
            .await;
        let source = shared.store.data_path(&digest).ok_or_else(|| {
            Status::not_found(format!("{digest} was evicted before it was copied"))
        })?;
        let written = tokio::task::spawn_blocking(move || output::write(&source, &path, copy))
            .await
            .map_err(|e| Status::internal(format!("copy task failed: {e}")))??;
        tracing::info!(blob = %digest, how = written.as_str(), "pull: output written");
        let mut done = progress(shared, digest, PullState::Done);
        done.output = written.as_str().into();
        let _ = tx.send(Ok(done)).await;
        return Ok(());
    }
    let _ = tx.send(Ok(progress(shared, digest, PullState::Done))).await;
    Ok(())
}

/// Which blob a URL without a digest is. The coordinator keeps one fetch per (URL, ETag,
/// size): the first agent to ask fetches it and reports its digest, the others wait for
/// that digest and then pull it like any blob, from peers. An origin that gives neither
/// ETag nor size cannot be told apart from a changed file: this agent fetches it alone.
async fn identify(
    shared: &LocalApi,
    url: &str,
    info: shoal_origin::UrlInfo,
    tx: &Tx,
) -> Result<Digest, Status> {
    let state = |state: PullState| async move {
        let _ = tx
            .send(Ok(pb::PullProgress {
                state: state as i32,
                ..Default::default()
            }))
            .await;
    };
    let (etag, size) = (info.etag.unwrap_or_default(), info.size.unwrap_or(0));
    if etag.is_empty() && size == 0 {
        tracing::info!(url, "no ETag or size: fetching alone");
        state(PullState::Fetching).await;
        return fetch_url(shared.clone(), url.to_string()).await;
    }
    let me = shared.coordinator.agent_id();
    let client = shared.coordinator.client();
    let owned_url = url.to_string();
    let ask = move |fetched: Option<Digest>, gave_up: bool| {
        let request = pb::ResolveUrlRequest {
            url: owned_url.clone(),
            etag: etag.clone(),
            size,
            agent_id: me.clone(),
            fetched_digest: fetched.map(|d| d.to_string()).unwrap_or_default(),
            gave_up,
        };
        let mut client = client.clone();
        async move {
            client
                .resolve_url(request)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| Status::new(s.code(), format!("coordinator: {}", s.message())))
        }
    };
    loop {
        let answer = ask(None, false).await?;
        if !answer.digest.is_empty() {
            return answer
                .digest
                .parse()
                .map_err(|e| Status::internal(format!("coordinator sent a bad digest: {e}")));
        }
        if answer.fetcher == shared.coordinator.agent_id() {
            state(PullState::Fetching).await;
            // Its own task: the others wait for its report, so it finishes and reports even
            // if this pull is dropped (deadline, client gone).
            let (shared, url) = (shared.clone(), url.to_string());
            let report = ask.clone();
            let fetched = tokio::spawn(async move {
                let result = fetch_url(shared, url).await;
                match &result {
                    // The blob is stored either way: a lost report costs others a refetch.
                    Ok(digest) => {
                        // The coordinator takes the digest only once it has our registration
                        // of the blob, which travels on the session, not with this call.
                        for _ in 0..REPORT_TRIES {
                            match report(Some(*digest), false).await {
                                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                                    tokio::time::sleep(POLL_EVERY).await;
                                }
                                _ => break,
                            }
                        }
                    }
                    Err(_) => drop(report(None, true).await),
                }
                result
            });
            return fetched
                .await
                .map_err(|e| Status::internal(format!("fetch task failed: {e}")))?;
        }
        state(PullState::Queued).await;
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Fetches `url` into the store on this agent; its digest.
async fn fetch_url(shared: LocalApi, url: String) -> Result<Digest, Status> {
    (shared.ingester.fetch_url(&url).await)
        .map(|m| m.digest())
        .map_err(|f| Status::unavailable(format!("fetching {url}: {}", f.message)))
}
