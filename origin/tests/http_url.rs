//! Plain HTTP(S) origins: HEAD and GET with ETag and ranges, origins that ignore Range,
//! bodies that break off, dead and silent servers.

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body as AxumBody;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use axum::routing::get;
use base64::Engine;
use bytes::Bytes;
use shoal_origin::{Body, ByteRange, Client, OriginConfig, OriginError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ETAG: &str = "\"model-v1\"";

fn model() -> Bytes {
    (0..50_000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// Requests that reached a redirect naming its content (`X-Linked-Etag`).
static LINKED_HEADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Serves `model()` at /model.bin with ETag and ranges, and at /plain.bin ignoring Range;
/// /private needs `Authorization: Bearer hf_x`.
async fn start_files() -> SocketAddr {
    async fn ranged(headers: HeaderMap) -> Response {
        let bytes = model();
        let mut builder = Response::builder()
            .header(header::ETAG, ETAG)
            .header(header::ACCEPT_RANGES, "bytes");
        // RFC 9530: the representation's SHA-256, to a client that asks for it.
        if headers.contains_key("want-repr-digest") {
            let sha = shoal_proto::Digest::of(&bytes);
            let b64 = base64::engine::general_purpose::STANDARD.encode(sha.as_bytes());
            builder = builder.header("repr-digest", format!("sha-256=:{b64}:"));
        }
        let range = headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes="))
            .and_then(|v| v.split_once('-'));
        match range {
            Some((start, end)) => {
                let start: usize = start.parse().unwrap();
                let end: usize = if end.is_empty() {
                    bytes.len() - 1
                } else {
                    end.parse().unwrap()
                };
                builder
                    .status(StatusCode::PARTIAL_CONTENT)
                    .header(
                        header::CONTENT_RANGE,
                        format!("bytes {start}-{end}/{}", bytes.len()),
                    )
                    .body(AxumBody::from(bytes.slice(start..=end)))
                    .unwrap()
            }
            None => builder.body(AxumBody::from(bytes)).unwrap(),
        }
    }
    async fn plain() -> Response {
        Response::new(AxumBody::from(model()))
    }
    async fn private(headers: HeaderMap) -> Response {
        if headers
            .get(header::AUTHORIZATION)
            .is_some_and(|v| v == "Bearer hf_x")
        {
            Response::new(AxumBody::from("secret weights"))
        } else {
            Response::builder()
                .status(StatusCode::FORBIDDEN)
                .body(AxumBody::from("<html>\n  <b>Access denied</b>\n</html>"))
                .unwrap()
        }
    }
    // Hugging Face's shape: the file's URL redirects to storage, and only the redirect
    // names the content (`X-Linked-Etag`); the storage answers with its own ETag.
    async fn linked(tag: String) -> Response {
        LINKED_HEADS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, "/storage/model.bin")
            .header("x-linked-etag", tag)
            .header(header::ETAG, "\"redirect\"")
            .body(AxumBody::empty())
            .unwrap()
    }
    // Two hops: a plain redirect, then one naming other content than its target, which
    // announces the model's (`Repr-Digest`).
    async fn conflict() -> Response {
        Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, "/resolve/other.bin")
            .body(AxumBody::empty())
            .unwrap()
    }
    async fn other(tag: String) -> Response {
        Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header(header::LOCATION, "/model.bin")
            .header("x-linked-etag", tag)
            .body(AxumBody::empty())
            .unwrap()
    }
    async fn storage() -> Response {
        Response::builder()
            .header(header::ETAG, "\"storage-etag\"")
            .body(AxumBody::from(model()))
            .unwrap()
    }
    let sha = shoal_proto::Digest::of(&model()).hex();
    let lfs = format!("\"{sha}\"");
    let git = format!("\"{}\"", &sha[..40]);
    let other_tag = format!("\"{}\"", shoal_proto::Digest::of(b"other").hex());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/resolve/lfs.bin", get(move || linked(lfs.clone())))
        .route("/resolve/git.txt", get(move || linked(git.clone())))
        .route("/resolve/other.bin", get(move || other(other_tag.clone())))
        .route("/resolve/conflict.bin", get(conflict))
        .route("/storage/model.bin", get(storage))
        .route("/model.bin", get(ranged))
        .route("/plain.bin", get(plain))
        .route("/private", get(private));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn client(request_timeout_ms: u64) -> Client {
    Client::new(OriginConfig {
        request_timeout_ms,
        connect_timeout_ms: 2000,
        ..Default::default()
    })
    .unwrap()
}

async fn read_all(mut body: Body) -> Result<Vec<u8>, OriginError> {
    let mut out = Vec::new();
    while let Some(piece) = body.chunk().await? {
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

#[tokio::test]
async fn head_and_get_with_etag_and_ranges() {
    let addr = start_files().await;
    let client = client(5000);
    let url = format!("http://{addr}/model.bin?token=abc");
    let info = client.head_url(&url, &[]).await.unwrap();
    assert_eq!(info.size, Some(50_000));
    assert_eq!(info.etag.as_deref(), Some(ETAG));
    assert!(info.accept_ranges);
    // Asked for with `Want-Repr-Digest`, announced with `Repr-Digest`.
    assert_eq!(info.sha256, Some(shoal_proto::Digest::of(&model())));
    let plain = client
        .head_url(&format!("http://{addr}/plain.bin"), &[])
        .await
        .unwrap();
    assert_eq!(plain.sha256, None);

    let body = client.get_url(&url, &[], None).await.unwrap();
    assert_eq!(body.etag.as_deref(), Some(ETAG));
    assert_eq!(body.len, Some(50_000));
    assert!(!body.partial);
    assert_eq!(read_all(body).await.unwrap(), model());

    let range = ByteRange {
        start: 12_345,
        end_inclusive: Some(22_344),
    };
    let body = client.get_url(&url, &[], Some(range)).await.unwrap();
    assert!(body.partial);
    assert_eq!((body.len, body.total), (Some(10_000), Some(50_000)));
    assert_eq!(read_all(body).await.unwrap(), &model()[12_345..22_345]);
}

#[tokio::test]
async fn a_redirect_naming_its_content_announces_the_sha256() {
    let addr = start_files().await;
    let client = client(5000);
    let before = LINKED_HEADS.load(std::sync::atomic::Ordering::SeqCst);
    let info = (client.head_url(&format!("http://{addr}/resolve/lfs.bin"), &[]))
        .await
        .unwrap();
    assert_eq!(info.sha256, Some(shoal_proto::Digest::of(&model())));
    // The redirect is asked once: its answer is followed, not asked for again.
    assert_eq!(
        LINKED_HEADS.load(std::sync::atomic::Ordering::SeqCst) - before,
        1
    );
    // The rest is the storage's answer, where the bytes come from.
    assert_eq!(info.etag.as_deref(), Some("\"storage-etag\""));
    assert_eq!(info.size, Some(50_000));
    // A file kept in git names its SHA-1 blob there: no claim on the content.
    let git = (client.head_url(&format!("http://{addr}/resolve/git.txt"), &[]))
        .await
        .unwrap();
    assert_eq!((git.sha256, git.size), (None, Some(50_000)));
    // The second of two hops names other content than the final answer's `Repr-Digest`:
    // they disagree, so nothing is announced.
    let conflict = (client.head_url(&format!("http://{addr}/resolve/conflict.bin"), &[]))
        .await
        .unwrap();
    assert_eq!(conflict.sha256, None);
}

#[tokio::test]
async fn origin_ignoring_range_still_yields_exactly_the_range() {
    let addr = start_files().await;
    let client = client(5000);
    let url = format!("http://{addr}/plain.bin");
    let info = client.head_url(&url, &[]).await.unwrap();
    assert!(!info.accept_ranges);
    assert_eq!(info.etag, None);
    for (start, end, want) in [
        (40_000, Some(40_099), 40_000..40_100),
        (49_990, None, 49_990..50_000),
        (49_990, Some(60_000), 49_990..50_000),
    ] {
        let range = ByteRange {
            start,
            end_inclusive: end,
        };
        let body = client.get_url(&url, &[], Some(range)).await.unwrap();
        assert!(!body.partial);
        assert_eq!(body.len, Some(want.len() as u64));
        assert_eq!(read_all(body).await.unwrap(), &model()[want]);
    }
    let past_end = ByteRange {
        start: 50_000,
        end_inclusive: None,
    };
    assert!(matches!(
        client.get_url(&url, &[], Some(past_end)).await,
        Err(OriginError::Invalid(_))
    ));
}

#[tokio::test]
async fn caller_headers_are_sent_and_denials_are_unauthorized() {
    let addr = start_files().await;
    let client = client(5000);
    let url = format!("http://{addr}/private");
    let auth = [("Authorization".to_string(), "Bearer hf_x".to_string())];
    let body = client.get_url(&url, &auth, None).await.unwrap();
    assert_eq!(read_all(body).await.unwrap(), b"secret weights");
    let err = client.get_url(&url, &[], None).await.unwrap_err();
    let OriginError::Unauthorized(message) = &err else {
        panic!("want Unauthorized, got {err:?}")
    };
    assert!(
        message.contains("403") && message.contains("/private"),
        "{message}"
    );
    assert!(message.contains("Access denied"), "{message}");
    let err = client
        .get_url(&format!("http://{addr}/absent?sig=SECRET"), &[], None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OriginError::NotFound(m) if m.contains("/absent") && !m.contains("SECRET")),
        "{err:?}"
    );
}

#[tokio::test]
async fn urls_must_be_absolute_http() {
    let client = client(5000);
    for bad in ["file:///etc/passwd", "ftp://h/x", "/model.bin", "model.bin"] {
        assert!(
            matches!(
                client.get_url(bad, &[], None).await,
                Err(OriginError::Invalid(_))
            ),
            "{bad}"
        );
        assert!(
            matches!(
                client.head_url(bad, &[]).await,
                Err(OriginError::Invalid(_))
            ),
            "{bad}"
        );
    }
}

/// A raw server that promises `Content-Length: 1000`, sends 100 bytes and closes.
#[tokio::test]
async fn body_closed_early_is_an_error_not_a_truncation() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut request = vec![0u8; 4096];
                let _ = socket.read(&mut request).await;
                let head = "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n";
                socket.write_all(head.as_bytes()).await.unwrap();
                socket.write_all(&[7u8; 100]).await.unwrap();
                socket.shutdown().await.unwrap();
            });
        }
    });
    let url = format!("http://{addr}/short.bin");
    let mut body = client(5000).get_url(&url, &[], None).await.unwrap();
    assert_eq!(body.len, Some(1000));
    let mut got = 0;
    let err = loop {
        match body.chunk().await {
            Ok(Some(piece)) => got += piece.len(),
            Ok(None) => panic!("body ended silently after {got} of 1000 bytes"),
            Err(e) => break e,
        }
    };
    assert!(got <= 100);
    let OriginError::Unreachable(message) = &err else {
        panic!("want Unreachable, got {err:?}")
    };
    assert!(message.contains("/short.bin"), "{message}");
    assert!(matches!(body.chunk().await, Ok(None)), "stays ended");
}

#[tokio::test]
async fn connection_refused_is_unreachable_naming_the_url() {
    // Bind and drop to get a port that nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/model.bin?X-Signature=SECRET");
    let err = client(5000).get_url(&url, &[], None).await.unwrap_err();
    let OriginError::Unreachable(message) = &err else {
        panic!("want Unreachable, got {err:?}")
    };
    assert!(
        message.contains(&format!("http://127.0.0.1:{port}/model.bin")),
        "{message}"
    );
    assert!(!message.contains("SECRET"), "{message}");
    assert!(message.to_lowercase().contains("refused"), "{message}");

    // Registries too.
    let err = client(5000)
        .head_blob(
            &format!("127.0.0.1:{port}"),
            "library/x",
            &shoal_origin::Digest::of(b""),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OriginError::Unreachable(m) if m.contains(&format!("https://127.0.0.1:{port}/v2/library/x/blobs/"))),
        "{err:?}"
    );
}

/// Headers that never come are bounded by `request_timeout_ms`; so is a body that stalls.
#[tokio::test]
async fn silent_servers_time_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 4096];
            let n = socket.read(&mut request).await.unwrap();
            if String::from_utf8_lossy(&request[..n]).contains("/stall-body") {
                let head = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc";
                socket.write_all(head.as_bytes()).await.unwrap();
            }
            held.push(socket);
        }
    });
    let client = client(300);
    let started = std::time::Instant::now();
    let err = client
        .head_url(&format!("http://{addr}/no-headers"), &[])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OriginError::Unreachable(m) if m.contains("/no-headers") && m.contains("300 ms")),
        "{err:?}"
    );
    let mut body = client
        .get_url(&format!("http://{addr}/stall-body"), &[], None)
        .await
        .unwrap();
    assert_eq!(body.chunk().await.unwrap().as_deref(), Some(&b"abc"[..]));
    let err = body.chunk().await.unwrap_err();
    assert!(
        matches!(&err, OriginError::Unreachable(m) if m.contains("no data for 300 ms")),
        "{err:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

/// A body that keeps coming, a few bytes within every idle timeout, but slower than
/// `min_bytes_per_sec` over a window, fails instead of holding its reader for ever; a body
/// at a healthy rate is unaffected.
#[tokio::test]
async fn a_dripping_body_fails_under_the_rate_floor() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut request = vec![0u8; 4096];
                let n = socket.read(&mut request).await.unwrap_or(0);
                let drip = String::from_utf8_lossy(&request[..n]).contains("/drip");
                let total = 200_000;
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n");
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let piece = vec![7u8; if drip { 10 } else { 20_000 }];
                let mut sent = 0;
                while sent < total {
                    if socket.write_all(&piece).await.is_err() {
                        return;
                    }
                    sent += piece.len();
                    // The drip: 10 bytes every 50 ms, 200 B/s, always within the idle timeout.
                    tokio::time::sleep(std::time::Duration::from_millis(if drip { 50 } else { 1 }))
                        .await;
                }
            });
        }
    });
    let client = Client::new(OriginConfig {
        request_timeout_ms: 2000,
        connect_timeout_ms: 2000,
        min_bytes_per_sec: 10_000,
        min_rate_window_ms: 500,
        ..Default::default()
    })
    .unwrap();
    let started = std::time::Instant::now();
    let body = client
        .get_url(&format!("http://{addr}/drip"), &[], None)
        .await
        .unwrap();
    let err = read_all(body).await.unwrap_err();
    assert!(
        matches!(&err, OriginError::Unreachable(m) if m.contains("min_bytes_per_sec")),
        "{err:?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let body = client
        .get_url(&format!("http://{addr}/steady"), &[], None)
        .await
        .unwrap();
    assert_eq!(read_all(body).await.unwrap().len(), 200_000);
}

#[tokio::test]
async fn configured_headers_apply_by_url_prefix_and_read_secret_files() {
    let addr = start_files().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("token");
    std::fs::write(&secret, "Bearer hf_x\n").unwrap();
    let config = |prefix: String| OriginConfig {
        http: vec![shoal_origin::HttpOriginConfig {
            url_prefix: prefix,
            header_files: [("Authorization".to_string(), secret.clone())].into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let url = format!("http://{addr}/private");
    let client = Client::new(config(format!("http://{addr}/"))).unwrap();
    let body = client.get_url(&url, &[], None).await.unwrap();
    assert_eq!(read_all(body).await.unwrap(), b"secret weights");
    // Another host's prefix: no header, denied.
    let client = Client::new(config("http://elsewhere.example/".into())).unwrap();
    let err = client.get_url(&url, &[], None).await.unwrap_err();
    assert!(matches!(err, OriginError::Unauthorized(_)), "{err:?}");
    // A secret file that is missing: a clear error naming the file.
    std::fs::remove_file(&secret).unwrap();
    let client = Client::new(config(format!("http://{addr}/"))).unwrap();
    let err = client.get_url(&url, &[], None).await.unwrap_err();
    assert!(
        matches!(&err, OriginError::Invalid(m) if m.contains("token")),
        "{err:?}"
    );
}
