//! The client against an in-process, token-protected registry (axum on 127.0.0.1:0): the
//! bearer and basic flows, size caps, digests, ranges, redirects to storage, error mapping and
//! manifest-list resolution.

#[path = "support/fake_registry.rs"]
mod fake;

use std::sync::atomic::Ordering;

use base64::Engine as _;
use fake::*;
use shoal_origin::{
    ByteRange, Client, DOCKER_MANIFEST, Digest, MANIFEST_MEDIA_TYPES, OriginConfig, OriginError,
    Reference, RegistryConfig, resolve_image,
};

#[tokio::test]
async fn bearer_token_flow_with_password_file_and_cache() {
    let h = Harness::start(Mode::Bearer).await;
    let client = h.client();
    let m = client
        .get_manifest(&h.host(), REPO, "v1", MANIFEST_MEDIA_TYPES.as_slice())
        .await
        .unwrap();
    assert_eq!(m.bytes, h.fake.manifest);
    assert_eq!(m.media_type, DOCKER_MANIFEST);
    assert_eq!(m.digest, Digest::of(&h.fake.manifest));
    assert_eq!(h.fake.token_requests.load(Ordering::SeqCst), 1);
    assert_eq!(h.fake.unauthorized_answers.load(Ordering::SeqCst), 1);

    // The cached token is sent up front: no second challenge, no second token fetch, also
    // from a clone of the client.
    let clone = client.clone();
    let by_digest = clone
        .get_manifest(&h.host(), REPO, &m.digest.to_string(), &[])
        .await
        .unwrap();
    assert_eq!(by_digest.digest, m.digest);
    let size = clone
        .head_blob(&h.host(), REPO, &Digest::of(&h.fake.layer))
        .await
        .unwrap();
    assert_eq!(size, 100_000);
    let head = clone
        .head_manifest(&h.host(), REPO, "v1", MANIFEST_MEDIA_TYPES.as_slice())
        .await
        .unwrap();
    assert_eq!(head.size, h.fake.manifest.len() as u64);
    assert_eq!(head.digest, Some(m.digest));
    assert_eq!(head.media_type, DOCKER_MANIFEST);
    assert_eq!(h.fake.token_requests.load(Ordering::SeqCst), 1);
    assert_eq!(h.fake.unauthorized_answers.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_unauthorized() {
    let h = Harness::start(Mode::Bearer).await;
    let wrong = h._dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let err = h
        .client_with(Some(USER), Some(wrong))
        .get_manifest(&h.host(), REPO, "v1", &[])
        .await
        .unwrap_err();
    let OriginError::Unauthorized(message) = &err else {
        panic!("want Unauthorized, got {err:?}")
    };
    assert!(message.contains("/token"), "{message}");
    assert!(message.contains("alice"), "{message}");
    assert!(!message.contains("not-the-password"), "{message}");

    let err = h
        .client_with(None, None)
        .get_blob(&h.host(), REPO, &Digest::of(&h.fake.layer), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OriginError::Unauthorized(m) if m.contains("anonymous")),
        "{err:?}"
    );
}

#[tokio::test]
async fn basic_challenge_uses_credentials_and_remembers() {
    let h = Harness::start(Mode::Basic).await;
    let client = h.client();
    let m = client
        .get_manifest(&h.host(), REPO, "v1", &[])
        .await
        .unwrap();
    assert_eq!(m.bytes, h.fake.manifest);
    client
        .get_manifest(&h.host(), REPO, "v1", &[])
        .await
        .unwrap();
    assert_eq!(h.fake.unauthorized_answers.load(Ordering::SeqCst), 1);
    assert_eq!(h.fake.token_requests.load(Ordering::SeqCst), 0);

    let err = h
        .client_with(None, None)
        .get_manifest(&h.host(), REPO, "v1", &[])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OriginError::Unauthorized(m) if m.contains("basic auth")),
        "{err:?}"
    );
}

#[tokio::test]
async fn manifest_over_the_cap_is_too_large() {
    let h = Harness::start(Mode::Bearer).await;
    let client = h.client();
    let started = std::time::Instant::now();
    for tag in ["big", "big-chunked"] {
        let err = client
            .get_manifest(&h.host(), REPO, tag, &[])
            .await
            .unwrap_err();
        match err {
            OriginError::TooLarge { what, limit } => {
                assert_eq!(limit, MANIFEST_CAP);
                assert!(
                    what.contains(&format!("/v2/{REPO}/manifests/{tag}")),
                    "{what}"
                );
            }
            other => panic!("{tag}: want TooLarge, got {other:?}"),
        }
    }
    // Well under the 5 s request timeout: the announced size was refused without reading.
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[tokio::test]
async fn manifest_digest_mismatch() {
    let h = Harness::start(Mode::Bearer).await;
    let asked = Digest::of(b"something else");
    let err = h
        .client()
        .get_manifest(&h.host(), REPO, &asked.to_string(), &[])
        .await
        .unwrap_err();
    match err {
        OriginError::DigestMismatch { expected, actual } => {
            assert_eq!(expected, asked);
            assert_eq!(actual, Digest::of(&h.fake.manifest));
        }
        other => panic!("want DigestMismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn ranged_blob_get_returns_exactly_the_range() {
    let h = Harness::start(Mode::Bearer).await;
    let client = h.client();
    let digest = Digest::of(&h.fake.layer);
    let range = ByteRange {
        start: 1000,
        end_inclusive: Some(1999),
    };
    let body = client
        .get_blob(&h.host(), REPO, &digest, Some(range))
        .await
        .unwrap();
    assert!(body.partial);
    assert_eq!(body.len, Some(1000));
    assert_eq!(body.total, Some(100_000));
    assert_eq!(read_all(body).await.unwrap(), &h.fake.layer[1000..2000]);

    let tail = client
        .get_blob(
            &h.host(),
            REPO,
            &digest,
            Some(ByteRange {
                start: 99_990,
                end_inclusive: None,
            }),
        )
        .await
        .unwrap();
    assert_eq!(tail.len, Some(10));
    assert_eq!(read_all(tail).await.unwrap(), &h.fake.layer[99_990..]);

    let whole = client
        .get_blob(&h.host(), REPO, &digest, None)
        .await
        .unwrap();
    assert!(!whole.partial);
    assert_eq!(whole.len, Some(100_000));
    assert_eq!(read_all(whole).await.unwrap(), h.fake.layer);
}

#[tokio::test]
async fn redirect_to_storage_drops_authorization() {
    let h = Harness::start(Mode::Bearer).await;
    let digest: Digest = REDIRECTED.parse().unwrap();
    let body = h
        .client()
        .get_blob(&h.host(), REPO, &digest, None)
        .await
        .unwrap();
    assert_eq!(read_all(body).await.unwrap(), h.fake.layer);
    let seen = h.fake.storage_auth.lock().unwrap().clone();
    // Neither the token nor the registry URL (via Referer) reaches the storage host.
    assert_eq!(seen, vec![(None, None)]);
}

#[tokio::test]
async fn statuses_map_to_errors_naming_the_url() {
    let h = Harness::start(Mode::Bearer).await;
    let client = h.client();
    let missing = Digest::of(b"missing");
    let err = client
        .get_blob(&h.host(), REPO, &missing, None)
        .await
        .unwrap_err();
    let OriginError::NotFound(message) = &err else {
        panic!("want NotFound, got {err:?}")
    };
    assert!(
        message.contains(&format!("/v2/{REPO}/blobs/{missing}")),
        "{message}"
    );
    assert!(message.contains("BLOB_UNKNOWN"), "{message}");
    assert!(matches!(
        client.head_blob(&h.host(), REPO, &missing).await,
        Err(OriginError::NotFound(_))
    ));
    assert!(matches!(
        client
            .get_manifest(&h.host(), "team/other", "v1", &[])
            .await,
        Err(OriginError::NotFound(_))
    ));

    let err = client
        .get_manifest(&h.host(), REPO, "broken", &[])
        .await
        .unwrap_err();
    match &err {
        OriginError::Upstream { status, message } => {
            assert_eq!(*status, 500);
            assert!(message.contains("UNKNOWN: disk on fire"), "{message}");
            assert!(message.contains("/manifests/broken"), "{message}");
        }
        other => panic!("want Upstream, got {other:?}"),
    }

    // Bad input never reaches the network.
    for (repo, reference) in [
        ("team/../x", "v1"),
        ("Team/app", "v1"),
        (REPO, "a/b"),
        (REPO, "sha256:zz"),
    ] {
        assert!(
            matches!(
                client.get_manifest(&h.host(), repo, reference, &[]).await,
                Err(OriginError::Invalid(_))
            ),
            "{repo} {reference}"
        );
    }
    assert!(matches!(
        client.get_manifest("evil.io/x?", REPO, "v1", &[]).await,
        Err(OriginError::Invalid(_))
    ));
}

#[tokio::test]
async fn resolves_a_docker_manifest_list_per_platform() {
    let h = Harness::start(Mode::Bearer).await;
    let client = h.client();
    let reference: Reference = format!("{}/{REPO}:multi", h.host()).parse().unwrap();
    let f = &h.fake;
    let (config, layer, arm_layer) = (
        Digest::of(&f.config),
        Digest::of(&f.layer),
        Digest::of(&f.arm_layer),
    );

    let amd = resolve_image(&client, &reference, &[]).await.unwrap();
    assert_eq!(amd.manifest_digest, Digest::of(&f.list));
    assert_eq!(
        amd.manifests,
        vec![(Digest::of(&f.manifest), f.manifest.len() as u64)]
    );
    assert_eq!(
        amd.blobs,
        vec![(config, f.config.len() as u64), (layer, 100_000)]
    );

    let both = resolve_image(
        &client,
        &reference,
        &["linux/amd64".to_string(), "linux/arm64/v8".to_string()],
    )
    .await
    .unwrap();
    assert_eq!(both.manifests.len(), 2);
    // Configs first, then layers, each once.
    assert_eq!(
        both.blobs,
        vec![
            (config, f.config.len() as u64),
            (layer, 100_000),
            (arm_layer, 3000)
        ]
    );

    let err = resolve_image(&client, &reference, &["linux/s390x".to_string()])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OriginError::NotFound(m) if m.contains("linux/arm64/v8") && m.contains("linux/s390x")),
        "{err:?}"
    );

    // A single-platform tag is its own platform manifest.
    let single: Reference = format!("{}/{REPO}:v1", h.host()).parse().unwrap();
    let one = resolve_image(&client, &single, &["linux/arm64".to_string()])
        .await
        .unwrap();
    assert_eq!(one.manifest_digest, Digest::of(&f.manifest));
    assert_eq!(
        one.manifests,
        vec![(one.manifest_digest, f.manifest.len() as u64)]
    );
    assert_eq!(one.blobs.len(), 2);
}

/// A client with no `[[origin.registries]]` credentials, only `[origin] auth_file`.
fn client_with_auth_file(h: &Harness, auth_file: std::path::PathBuf) -> Client {
    Client::new(OriginConfig {
        registries: vec![RegistryConfig {
            host: h.host(),
            plain_http: true,
            ..Default::default()
        }],
        auth_file: Some(auth_file),
        request_timeout_ms: 5000,
        ..Default::default()
    })
    .unwrap()
}

#[tokio::test]
async fn a_docker_config_json_gives_credentials_and_is_read_again_when_rotated() {
    let h = Harness::start(Mode::Bearer).await;
    let auth_file = h._dir.path().join("config.json");
    // As a kubernetes.io/dockerconfigjson Secret holds it: `auth` is base64 of user:password.
    let write = |password: &str| {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{password}"));
        let json = format!(
            r#"{{"auths": {{"http://{}/v2/": {{"auth": "{auth}"}}}}}}"#,
            h.host()
        );
        std::fs::write(&auth_file, json).unwrap();
    };
    write("stale");
    let client = client_with_auth_file(&h, auth_file.clone());
    let err = client
        .get_manifest(&h.host(), REPO, "v1", &[])
        .await
        .unwrap_err();
    assert!(matches!(err, OriginError::Unauthorized(_)), "{err:?}");
    // The Secret is rotated: the next token fetch reads it again.
    write(PASSWORD);
    let m = client
        .get_manifest(&h.host(), REPO, "v1", &[])
        .await
        .unwrap();
    assert_eq!(m.bytes, h.fake.manifest);
}
