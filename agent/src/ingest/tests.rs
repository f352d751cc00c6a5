//! Seeding against real HTTP origins on loopback: parallel ranges, sizes that changed,
//! full local disks and broken origins.

use std::sync::atomic::{AtomicU32, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::store::StoreConfig;

/// An HTTP origin on loopback that answers every GET with `len` bytes announced, of
/// which it sends `sent` before closing; counts the requests.
async fn origin(len: usize, sent: usize) -> (String, Arc<AtomicU32>) {
    origin_tagged(len, sent, false).await
}

/// [`origin`], each answer with the ETag `"v<n>"` of its request's number if `tagged`: a
/// file replaced between any two requests.
async fn origin_tagged(len: usize, sent: usize, tagged: bool) -> (String, Arc<AtomicU32>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicU32::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = vec![0u8; 4096];
                let _ = tcp.read(&mut head).await;
                let etag = match tagged {
                    true => format!("etag: \"v{n}\"\r\n"),
                    false => String::new(),
                };
                let header = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n{etag}connection: close\r\n\r\n"
                );
                let _ = tcp.write_all(header.as_bytes()).await;
                let _ = tcp.write_all(&vec![7u8; sent]).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    (format!("http://{addr}/blob"), requests)
}

fn ingester(dir: &Path) -> Ingester {
    let store = Store::open(StoreConfig {
        root: dir.join("store"),
        quota_bytes: 1 << 30,
    })
    .unwrap();
    let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
    let (coordinator, _outbox) = Coordinator::new(channel, "a1".into());
    Ingester {
        store,
        origin: shoal_origin::Client::new(Default::default()).unwrap(),
        part_dir: dir.join("ingest"),
        chunk_size: 1 << 20,
        coordinator,
        orders: RunningOrders::default(),
        ranges: SeededRanges::default(),
    }
}

fn http(url: &str) -> pb::origin::Origin {
    pb::origin::Origin::Http(pb::HttpOrigin::plain(url))
}

/// `Ingester::fetch` of `origin`'s whole content into `part` (its directory made), with
/// a fresh progress channel, whose receiving end comes back with the outcome.
async fn fetch_whole(
    ingester: &Ingester,
    origin: &pb::origin::Origin,
    blob: Digest,
    expected: Option<Digest>,
    part: &Path,
) -> (
    Result<(Manifest, u64), Failure>,
    watch::Receiver<IngestState>,
) {
    if let Some(dir) = part.parent() {
        tokio::fs::create_dir_all(dir).await.unwrap();
    }
    let (tx, rx) = watch::channel(IngestState::Writing { written: 0 });
    let fetched = ingester
        .fetch(origin, blob, expected, part, &tx, Extent::Whole(None))
        .await;
    (fetched, rx)
}

#[tokio::test]
async fn a_named_origin_of_another_size_fails_before_its_bytes_and_is_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let ingester = ingester(dir.path());
    // The name was made for 3 MiB; the origin now has 2 MiB (and would send them).
    let (url, requests) = origin(2 << 20, 2 << 20).await;
    let named = pb::HttpOrigin {
        url,
        headers: Default::default(),
        size: 3 << 20,
        etag: "\"v1\"".into(),
    };
    let blob = Digest::naming(&named.content_name());
    let origin = pb::origin::Origin::Http(named);
    let part = dir.path().join("named.part");
    let (fetched, rx) = fetch_whole(&ingester, &origin, blob, None, &part).await;
    let failed = fetched.expect_err("another file");
    assert_eq!(failed.reason, FailureReason::Invalid, "{failed:?}");
    assert!(failed.message.contains("it changed"), "{failed:?}");
    assert_eq!(requests.load(Ordering::SeqCst), 1, "retried");
    assert!(matches!(*rx.borrow(), IngestState::Writing { written: 0 }));
}

#[tokio::test]
async fn a_full_local_disk_is_reported_as_such_and_never_retried_against_the_origin() {
    let dir = tempfile::tempdir().unwrap();
    let ingester = ingester(dir.path());
    let (url, requests) = origin(2 << 20, 2 << 20).await;
    // Every write to /dev/full fails with ENOSPC, as a full filesystem would.
    let blob = Digest::from_bytes([0; 32]);
    let (fetched, _) =
        fetch_whole(&ingester, &http(&url), blob, None, Path::new("/dev/full")).await;
    let failed = fetched.expect_err("nothing can be written");
    assert_eq!(failed.reason, FailureReason::DiskFull, "{failed:?}");
    assert_eq!(requests.load(Ordering::SeqCst), 1, "retried a local fault");
}

/// An HTTP origin on loopback serving `data`, honouring `Range` in its first `honoured`
/// GETs (and answering the rest whole); counts the GETs.
async fn ranged_origin(data: bytes::Bytes, honoured: u32) -> (String, Arc<AtomicU32>) {
    use axum::http::{HeaderMap, StatusCode, header};
    let requests = Arc::new(AtomicU32::new(0));
    let counted = requests.clone();
    let answer = move |headers: HeaderMap| {
        let (data, counted) = (data.clone(), counted.clone());
        async move {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            let range = (headers.get(header::RANGE))
                .filter(|_| n < honoured)
                .and_then(|v| v.to_str().ok()?.strip_prefix("bytes=")?.split_once('-'))
                .map(|(a, b)| {
                    let a: usize = a.parse().unwrap();
                    let b = b
                        .parse::<usize>()
                        .map_or(data.len() - 1, |b| b.min(data.len() - 1));
                    (a, b)
                });
            let response = axum::response::Response::builder().header(header::ETAG, "\"v1\"");
            match range {
                Some((a, b)) => response
                    .status(StatusCode::PARTIAL_CONTENT)
                    .header(
                        header::CONTENT_RANGE,
                        format!("bytes {a}-{b}/{}", data.len()),
                    )
                    .body(axum::body::Body::from(data.slice(a..=b))),
                None => response.body(axum::body::Body::from(data)),
            }
            .unwrap()
        }
    };
    let app = axum::Router::new().route("/blob", axum::routing::get(answer));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/blob"), requests)
}

/// Fetches 2 MiB and a bit whole, with ranges of 64 KiB three at once, from an origin
/// honouring `Range` in its first `honoured` GETs; checks the part file and the manifest
/// against the data; returns the origin's GETs.
async fn fetch_in_ranges(honoured: u32) -> u32 {
    let dir = tempfile::tempdir().unwrap();
    let mut ingester = ingester(dir.path());
    ingester.origin = shoal_origin::Client::new(shoal_origin::OriginConfig {
        parallel_ranges: 3,
        parallel_range_bytes: 64 << 10,
        ..Default::default()
    })
    .unwrap();
    let data: bytes::Bytes = (0..(2 << 20) + 12_345u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect::<Vec<u8>>()
        .into();
    let digest = Digest::of(&data);
    let (url, requests) = ranged_origin(data.clone(), honoured).await;
    let part = ingester.part_dir.join("ranged.part");
    let (fetched, _) = fetch_whole(&ingester, &http(&url), digest, Some(digest), &part).await;
    let (manifest, fetched) = fetched.expect("the blob, in order");
    assert_eq!(manifest.digest(), digest);
    assert_eq!(fetched, data.len() as u64);
    assert_eq!(std::fs::read(&part).unwrap(), data);
    requests.load(Ordering::SeqCst)
}

#[tokio::test]
async fn a_whole_blob_is_read_in_parallel_ranges_and_hashed_in_order() {
    // One GET per 64 KiB block: 33 of them, never the whole blob in one.
    assert_eq!(fetch_in_ranges(u32::MAX).await, 33);
}

#[tokio::test]
async fn a_read_in_ranges_that_breaks_is_resumed_as_one_get() {
    // Ranges for the first block only, then every answer is the whole file (another backend
    // behind the same name, say): the first block, the ranges started beside and after it
    // (the next one answered whole fails the read), then one GET for the rest, not a GET
    // per block.
    let n = fetch_in_ranges(1).await;
    assert!((4..=5).contains(&n), "{n} requests");
}

#[tokio::test]
async fn a_broken_origin_is_retried_then_reported_as_the_origins_fault() {
    let dir = tempfile::tempdir().unwrap();
    let ingester = ingester(dir.path());
    // Announces 2 MiB, sends 1 MiB, closes: every attempt breaks.
    let (url, requests) = origin(2 << 20, 1 << 20).await;
    let part = ingester.part_dir.join("broken.part");
    let blob = Digest::from_bytes([0; 32]);
    let (fetched, _) = fetch_whole(&ingester, &http(&url), blob, None, &part).await;
    let failed = fetched.expect_err("the origin never sends it all");
    assert_eq!(failed.reason, FailureReason::OriginError, "{failed:?}");
    assert_eq!(requests.load(Ordering::SeqCst), ATTEMPTS);
}

#[tokio::test]
async fn a_read_resumed_on_another_version_of_the_file_fails_instead_of_joining_them() {
    let dir = tempfile::tempdir().unwrap();
    let ingester = ingester(dir.path());
    // Announces 2 MiB, sends 1 MiB, closes; the file is replaced before the resumed read.
    let (url, requests) = origin_tagged(2 << 20, 1 << 20, true).await;
    let part = ingester.part_dir.join("replaced.part");
    let blob = Digest::from_bytes([0; 32]);
    let (fetched, _) = fetch_whole(&ingester, &http(&url), blob, None, &part).await;
    let failed = fetched.expect_err("two versions");
    assert_eq!(failed.reason, FailureReason::Invalid, "{failed:?}");
    assert!(
        failed.message.contains("changed while it was read"),
        "{failed:?}"
    );
    assert_eq!(requests.load(Ordering::SeqCst), 2);
}
