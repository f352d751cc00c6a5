//! The client against the real CNCF Distribution registry (Debian's `docker-registry`):
//! push an OCI index of two platform images with the push API, then read it back with the
//! client and `resolve_image`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use oci_spec::image::MediaType;
use shoal_origin::{
    ByteRange, Client, Digest, MANIFEST_MEDIA_TYPES, OriginConfig, OriginError, Reference,
    RegistryConfig, resolve_image,
};

const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";
const REPO: &str = "shoal/test-app";

/// The registry process; killed when the test ends, however it ends.
struct RegistryProcess {
    child: Child,
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `docker-registry serve` on a free port over a fresh directory and waits until
/// `/v2/` answers.
async fn start_registry(dir: &Path) -> (RegistryProcess, String) {
    assert!(
        Path::new(REGISTRY_BINARY).exists(),
        "{REGISTRY_BINARY} is missing: this test needs the CNCF registry, run \
         `apt-get install docker-registry`"
    );
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\n\
             log:\n  level: warn\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let log_path = dir.join("registry.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(REGISTRY_BINARY)
        .arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {REGISTRY_BINARY}: {e}"));
    let mut process = RegistryProcess { child };
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http.get(format!("http://{addr}/v2/")).send().await {
            if r.status().is_success() {
                return (process, addr);
            }
        }
        let exited = process.child.try_wait().unwrap();
        if exited.is_some() || Instant::now() > deadline {
            panic!(
                "docker-registry did not come up on {addr} ({exited:?}); its log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The OCI push API: POST an upload session, PUT the bytes with `?digest=`.
async fn push_blob(http: &reqwest::Client, addr: &str, bytes: &Bytes) -> Digest {
    let digest = Digest::of(bytes);
    let started = http
        .post(format!("http://{addr}/v2/{REPO}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202, "{:?}", started.text().await);
    let location = started.headers()["location"].to_str().unwrap().to_string();
    let location = if location.starts_with('/') {
        format!("http://{addr}{location}")
    } else {
        location
    };
    let separator = if location.contains('?') { '&' } else { '?' };
    let put = http
        .put(format!("{location}{separator}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201, "{:?}", put.text().await);
    digest
}

async fn push_manifest(
    http: &reqwest::Client,
    addr: &str,
    reference: &str,
    media_type: &str,
    bytes: &Bytes,
) -> Digest {
    let put = http
        .put(format!("http://{addr}/v2/{REPO}/manifests/{reference}"))
        .header("content-type", media_type)
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201, "{:?}", put.text().await);
    Digest::of(bytes)
}

fn descriptor(media_type: &str, bytes: &Bytes) -> serde_json::Value {
    serde_json::json!({
        "mediaType": media_type,
        "digest": Digest::of(bytes).to_string(),
        "size": bytes.len(),
    })
}

fn oci_manifest(config: &Bytes, layers: &[&Bytes]) -> Bytes {
    let layers: Vec<_> = layers
        .iter()
        .map(|l| descriptor("application/vnd.oci.image.layer.v1.tar+gzip", l))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MediaType::ImageManifest.as_ref(),
        "config": descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": layers,
    }))
    .unwrap()
    .into()
}

fn pseudo_random(len: usize, seed: u64) -> Bytes {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

async fn read_all(mut body: shoal_origin::Body) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(piece) = body.chunk().await.unwrap() {
        out.extend_from_slice(&piece);
    }
    out
}

#[tokio::test]
async fn client_reads_what_was_pushed_to_the_cncf_registry() {
    // The OCI media types, as oci-spec names them.
    let (index_type, manifest_type) = (
        MediaType::ImageIndex.to_string(),
        MediaType::ImageManifest.to_string(),
    );
    let dir = tempfile::tempdir().unwrap();
    let (_registry, addr) = start_registry(dir.path()).await;
    let http = reqwest::Client::new();

    let amd_config = Bytes::from_static(
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    );
    let arm_config = Bytes::from_static(br#"{"architecture":"arm64","variant":"v8","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#);
    let base_layer = pseudo_random(300_000, 1);
    let arm_layer = pseudo_random(5_000, 2);
    for blob in [&amd_config, &arm_config, &base_layer, &arm_layer] {
        push_blob(&http, &addr, blob).await;
    }
    let amd_manifest = oci_manifest(&amd_config, &[&base_layer]);
    let arm_manifest = oci_manifest(&arm_config, &[&base_layer, &arm_layer]);
    let amd_digest = push_manifest(&http, &addr, "amd64", &manifest_type, &amd_manifest).await;
    let arm_digest = push_manifest(&http, &addr, "arm64", &manifest_type, &arm_manifest).await;
    let mut amd_entry = descriptor(&manifest_type, &amd_manifest);
    amd_entry["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
    let mut arm_entry = descriptor(&manifest_type, &arm_manifest);
    arm_entry["platform"] =
        serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
    let index: Bytes = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": index_type,
        "manifests": [amd_entry, arm_entry],
    }))
    .unwrap()
    .into();
    let index_digest = push_manifest(&http, &addr, "latest", &index_type, &index).await;

    let client = Client::new(OriginConfig {
        registries: vec![RegistryConfig {
            host: addr.clone(),
            plain_http: true,
            ..Default::default()
        }],
        ..Default::default()
    })
    .unwrap();

    // Manifests, by tag and by digest.
    let top = client
        .get_manifest(&addr, REPO, "latest", MANIFEST_MEDIA_TYPES.as_slice())
        .await
        .unwrap();
    assert_eq!(top.bytes, index);
    assert_eq!(top.media_type, index_type);
    assert_eq!(top.digest, index_digest);
    let head = client
        .head_manifest(&addr, REPO, "latest", MANIFEST_MEDIA_TYPES.as_slice())
        .await
        .unwrap();
    assert_eq!(head.size, index.len() as u64);
    assert_eq!(head.digest, Some(index_digest));
    assert_eq!(head.media_type, index_type);
    let by_digest = client
        .get_manifest(
            &addr,
            REPO,
            &arm_digest.to_string(),
            MANIFEST_MEDIA_TYPES.as_slice(),
        )
        .await
        .unwrap();
    assert_eq!(by_digest.bytes, arm_manifest);
    assert_eq!(by_digest.media_type, manifest_type);

    // Blobs: size, whole, ranged, missing.
    let layer_digest = Digest::of(&base_layer);
    assert_eq!(
        client.head_blob(&addr, REPO, &layer_digest).await.unwrap(),
        300_000
    );
    let whole = client
        .get_blob(&addr, REPO, &layer_digest, None)
        .await
        .unwrap();
    assert_eq!(whole.len, Some(300_000));
    assert_eq!(read_all(whole).await, base_layer);
    let range = ByteRange {
        start: 123_456,
        end_inclusive: Some(200_000),
    };
    let part = client
        .get_blob(&addr, REPO, &layer_digest, Some(range))
        .await
        .unwrap();
    assert!(part.partial);
    assert_eq!(part.total, Some(300_000));
    assert_eq!(read_all(part).await, &base_layer[123_456..=200_000]);
    let missing = Digest::of(b"never pushed");
    let err = client
        .get_blob(&addr, REPO, &missing, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OriginError::NotFound(m) if m.contains("BLOB_UNKNOWN")),
        "{err:?}"
    );
    let err = client
        .get_manifest(&addr, REPO, "no-such-tag", &[])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OriginError::NotFound(m) if m.contains("MANIFEST_UNKNOWN")),
        "{err:?}"
    );

    // resolve_image over the index: default platform, a variant, and both.
    let image: Reference = format!("{addr}/{REPO}").parse().unwrap();
    assert_eq!(image.tag.as_deref(), Some("latest"));
    let amd = resolve_image(&client, &image, &[]).await.unwrap();
    assert_eq!(amd.manifest_digest, index_digest);
    assert_eq!(amd.manifests, vec![(amd_digest, amd_manifest.len() as u64)]);
    assert_eq!(
        amd.blobs,
        vec![
            (Digest::of(&amd_config), amd_config.len() as u64),
            (layer_digest, 300_000),
        ]
    );
    let both = resolve_image(
        &client,
        &image,
        &["linux/amd64".to_string(), "linux/arm64/v8".to_string()],
    )
    .await
    .unwrap();
    assert_eq!(
        both.manifests,
        vec![
            (amd_digest, amd_manifest.len() as u64),
            (arm_digest, arm_manifest.len() as u64),
        ]
    );
    assert_eq!(
        both.blobs,
        vec![
            (Digest::of(&amd_config), amd_config.len() as u64),
            (Digest::of(&arm_config), arm_config.len() as u64),
            (layer_digest, 300_000),
            (Digest::of(&arm_layer), 5_000),
        ]
    );

    // A platform manifest by digest resolves to itself.
    let pinned: Reference = format!("{addr}/{REPO}@{arm_digest}").parse().unwrap();
    let arm = resolve_image(&client, &pinned, &[]).await.unwrap();
    assert_eq!(arm.manifest_digest, arm_digest);
    assert_eq!(arm.blobs.len(), 3);
}
