//! A whole object read in parallel ranges (`open_whole`): in order and bit for bit, from
//! any offset, with several ranges in flight at once; as one GET from an origin that ignores
//! `Range`; and never mixing two versions of an object.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body as AxumBody;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use shoal_origin::{Client, Open, OriginConfig, OriginError, Ranges, Whole, open_whole};

const LEN: usize = 50_000;

fn object() -> Bytes {
    (0..LEN as u32)
        .map(|i| (i.wrapping_mul(7919) % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// What one route of the origin saw.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

/// Answers with `object()`, honouring `Range` if `ranges(request number)`; each answer waits
/// 30 ms first (so requests sent together overlap), and its ETag is `etag(request number)`.
async fn answer(
    seen: Arc<Seen>,
    headers: HeaderMap,
    ranges: fn(usize) -> bool,
    etag: fn(usize) -> String,
) -> Response {
    let n = seen.requests.fetch_add(1, Ordering::SeqCst);
    let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    seen.most_in_flight.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(30)).await;
    seen.in_flight.fetch_sub(1, Ordering::SeqCst);
    let bytes = object();
    let builder = Response::builder().header(header::ETAG, etag(n));
    let range = (headers.get(header::RANGE))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .filter(|_| ranges(n));
    match range {
        Some((start, end)) => {
            let start: usize = start.parse().unwrap();
            let end: usize = match end {
                "" => LEN - 1,
                e => e.parse::<usize>().unwrap().min(LEN - 1),
            };
            builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{LEN}"))
                .body(AxumBody::from(bytes.slice(start..=end)))
                .unwrap()
        }
        None => builder.body(AxumBody::from(bytes)).unwrap(),
    }
}

/// An origin at /ranged, /plain (ignores Range), /changing (a new ETag per answer),
/// /first-range (honours only the first Range) and /empty (no bytes: 416 to any Range).
async fn origin() -> (SocketAddr, Arc<Seen>, Arc<Seen>) {
    let (ranged, plain) = (Arc::new(Seen::default()), Arc::new(Seen::default()));
    let (changing, first) = (Arc::new(Seen::default()), Arc::new(Seen::default()));
    let same = |_| "\"v1\"".to_string();
    let app = Router::new()
        .route(
            "/ranged",
            get({
                let s = ranged.clone();
                move |h: HeaderMap| answer(s.clone(), h, |_| true, same)
            }),
        )
        .route(
            "/plain",
            get({
                let s = plain.clone();
                move |h: HeaderMap| answer(s.clone(), h, |_| false, same)
            }),
        )
        .route(
            "/changing",
            get(move |h: HeaderMap| answer(changing.clone(), h, |_| true, |n| format!("\"v{n}\""))),
        )
        .route(
            "/first-range",
            get(move |h: HeaderMap| answer(first.clone(), h, |n| n == 0, same)),
        )
        .route(
            "/empty",
            get(|h: HeaderMap| async move {
                let status = match h.contains_key(header::RANGE) {
                    true => StatusCode::RANGE_NOT_SATISFIABLE,
                    false => StatusCode::OK,
                };
                (status, "")
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, ranged, plain)
}

fn opener(url: String) -> Open {
    let client = Client::new(OriginConfig::default()).unwrap();
    Arc::new(move |range| {
        let (client, url) = (client.clone(), url.clone());
        Box::pin(async move { client.get_url(&url, &[], range).await })
    })
}

async fn read(mut whole: Whole) -> Result<Vec<u8>, OriginError> {
    let mut out = Vec::new();
    while let Some(piece) = whole.chunk().await? {
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

const RANGES: Ranges = Ranges {
    connections: 3,
    block: 4096,
};

/// Reads `path` whole from the origin at `addr`, in `RANGES`.
async fn read_path(addr: SocketAddr, path: &str) -> Result<Vec<u8>, OriginError> {
    let whole = open_whole(0, RANGES, opener(format!("http://{addr}{path}"))).await?;
    read(whole).await
}

#[tokio::test]
async fn a_whole_object_comes_in_order_from_ranges_in_flight_together() {
    let (addr, seen, _) = origin().await;
    let open = opener(format!("http://{addr}/ranged"));
    let whole = open_whole(0, RANGES, open.clone()).await.unwrap();
    assert_eq!(whole.len, Some(LEN as u64));
    assert_eq!(read(whole).await.unwrap(), object());
    // One GET per 4 KiB block, up to three at once.
    assert_eq!(seen.requests.load(Ordering::SeqCst), LEN.div_ceil(4096));
    let most = seen.most_in_flight.load(Ordering::SeqCst);
    assert!((2..=3).contains(&most), "{most} requests in flight at most");

    // From an offset (a fetch resumed after a failure): the rest, and only it.
    let whole = open_whole(30_001, RANGES, open.clone()).await.unwrap();
    assert_eq!(whole.len, Some((LEN - 30_001) as u64));
    assert_eq!(read(whole).await.unwrap(), &object()[30_001..]);

    // One connection, or a rest within one block: a single GET.
    let before = seen.requests.load(Ordering::SeqCst);
    let one = Ranges {
        connections: 1,
        ..RANGES
    };
    assert_eq!(
        read(open_whole(0, one, open.clone()).await.unwrap())
            .await
            .unwrap(),
        object()
    );
    let tail = open_whole(LEN as u64 - 100, RANGES, open).await.unwrap();
    assert_eq!(read(tail).await.unwrap(), &object()[LEN - 100..]);
    assert_eq!(seen.requests.load(Ordering::SeqCst) - before, 2);
}

#[tokio::test]
async fn an_origin_that_ignores_range_is_read_in_one_get() {
    let (addr, _, seen) = origin().await;
    let open = opener(format!("http://{addr}/plain"));
    let whole = open_whole(0, RANGES, open.clone()).await.unwrap();
    assert_eq!(whole.len, Some(LEN as u64));
    assert_eq!(read(whole).await.unwrap(), object());
    assert_eq!(seen.requests.load(Ordering::SeqCst), 1);
    // Resumed: the answer is skipped to the offset, then read to the end.
    let whole = open_whole(20_000, RANGES, open).await.unwrap();
    assert_eq!(read(whole).await.unwrap(), &object()[20_000..]);
    assert_eq!(seen.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn ranges_of_another_version_fail_the_read_instead_of_mixing_it() {
    read_fails("/changing", "changed while it was read").await;
}

#[test]
fn a_registry_with_a_request_budget_is_read_in_one_get() {
    let budgeted = shoal_origin::RegistryConfig {
        host: "registry.example".into(),
        max_requests_per_second: Some(2.0),
        ..Default::default()
    };
    let client = Client::new(OriginConfig {
        registries: vec![budgeted],
        ..Default::default()
    })
    .unwrap();
    let many = Ranges {
        connections: 4,
        block: 2 << 20,
    };
    assert_eq!(client.ranges(None), many);
    assert_eq!(client.ranges(Some("other.example")), many);
    let one = client.ranges(Some("registry.example"));
    assert_eq!(one.connections, 1);
    // And the settings are checked.
    for (parallel_ranges, parallel_range_bytes) in
        [(0, 2 << 20), (65, 2 << 20), (4, 1000), (4, 512 << 20)]
    {
        let bad = Client::new(OriginConfig {
            parallel_ranges,
            parallel_range_bytes,
            ..Default::default()
        });
        assert!(
            matches!(bad, Err(OriginError::Invalid(_))),
            "{parallel_ranges} {parallel_range_bytes}"
        );
    }
}

#[tokio::test]
async fn a_range_answered_with_the_whole_object_fails_the_read() {
    read_fails("/first-range", "answered with the whole object").await;
}

/// Reading `path` in ranges fails as unreachable, saying `why`.
async fn read_fails(path: &str, why: &str) {
    let (addr, _, _) = origin().await;
    let err = read_path(addr, path).await.unwrap_err();
    assert!(
        matches!(&err, OriginError::Unreachable(m) if m.contains(why)),
        "{err}"
    );
}

#[tokio::test]
async fn an_empty_object_is_read_as_empty() {
    let (addr, _, _) = origin().await;
    let whole = open_whole(0, RANGES, opener(format!("http://{addr}/empty")))
        .await
        .unwrap();
    assert_eq!(whole.len, Some(0));
    assert_eq!(read(whole).await.unwrap(), b"");
}
