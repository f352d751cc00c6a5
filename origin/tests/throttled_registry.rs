//! A registry that answers `429 Too Many Requests` (Docker Hub's pull limits): the client
//! waits for its `Retry-After` and tries again, pauses every request to that registry
//! meanwhile, gives up with the 429 after a few tries, and keeps to a configured request
//! budget.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use shoal_origin::{Client, Digest, OriginConfig, OriginError, RegistryConfig};

const REPO: &str = "team/app";

struct Registry {
    /// 429s still to answer before serving.
    refuse: AtomicUsize,
    requests: AtomicUsize,
    blob: Bytes,
}

async fn blob(State(r): State<Arc<Registry>>) -> Response {
    r.requests.fetch_add(1, Ordering::SeqCst);
    let refuse = r.refuse.load(Ordering::SeqCst);
    if refuse > 0 {
        r.refuse.store(refuse - 1, Ordering::SeqCst);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"pull limit"}]}"#,
        )
            .into_response();
    }
    (StatusCode::OK, r.blob.clone()).into_response()
}

async fn start(refuse: usize) -> (Arc<Registry>, SocketAddr) {
    let registry = Arc::new(Registry {
        refuse: AtomicUsize::new(refuse),
        requests: AtomicUsize::new(0),
        blob: Bytes::from_static(b"layer bytes"),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/v2/team/app/blobs/{digest}", get(blob))
        .with_state(registry.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (registry, addr)
}

fn client(addr: SocketAddr, budget: Option<f64>) -> Client {
    Client::new(OriginConfig {
        registries: vec![RegistryConfig {
            host: addr.to_string(),
            plain_http: true,
            max_requests_per_second: budget,
            ..Default::default()
        }],
        max_retry_wait_ms: 5000,
        ..Default::default()
    })
    .unwrap()
}

async fn read(client: &Client, addr: SocketAddr, r: &Registry) -> Result<Vec<u8>, OriginError> {
    let mut body = client
        .get_blob(&addr.to_string(), REPO, &Digest::of(&r.blob), None)
        .await?;
    let mut out = Vec::new();
    while let Some(piece) = body.chunk().await? {
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

#[tokio::test]
async fn a_429_is_waited_out_and_tried_again() {
    let (r, addr) = start(2).await;
    let client = client(addr, None);
    let started = Instant::now();
    assert_eq!(read(&client, addr, &r).await.unwrap(), r.blob);
    assert_eq!(r.requests.load(Ordering::SeqCst), 3);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "each Retry-After: 1 was waited out: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_registry_that_keeps_refusing_is_a_clear_429_error() {
    let (r, addr) = start(100).await;
    let client = client(addr, None);
    let err = read(&client, addr, &r).await.unwrap_err();
    match &err {
        OriginError::Upstream {
            status: 429,
            message,
        } => {
            assert!(message.contains("TOOMANYREQUESTS"), "{message}")
        }
        other => panic!("want the 429, got {other:?}"),
    }
    assert_eq!(
        r.requests.load(Ordering::SeqCst),
        4,
        "one try and three more"
    );
}

#[tokio::test]
async fn a_request_budget_spaces_requests_out() {
    let (r, addr) = start(0).await;
    let client = client(addr, Some(5.0));
    let started = Instant::now();
    for _ in 0..4 {
        read(&client, addr, &r).await.unwrap();
    }
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "four requests at five per second: {:?}",
        started.elapsed()
    );
}
