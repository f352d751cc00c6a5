//! Container images through Shoal, with the real tools: the CNCF registry
//! (`docker-registry`) as the upstream, `skopeo` and `containerd` as clients, and real
//! `shoal` processes (coordinator, four agents with their OCI mirrors); model files by URL
//! are in `models.rs`. Every tool is installed by `scripts/test-all.sh`; a
//! missing one fails the test with the command that installs it.
//!
//! These are the slowest tests of the suite after the simulator's (each starts a registry
//! and a cluster): about 10–30 s each.

#[path = "cluster/harness.rs"]
mod harness;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use harness::{Cluster, read};
use shoal_proto::pb::v1 as pb;
use shoal_tests::oci_image::{self, BuiltImage, ImageSpec};
use shoal_tests::registry::{Registry, http_get};

/// Agents and coordinator configured for a plain-HTTP registry on loopback.
fn configs_with(registry: &str, manifest_cap: Option<u64>, fallback_ms: u64) -> (String, String) {
    let origin = format!(
        "[origin]\n{}\n[[origin.registries]]\nhost = \"{registry}\"\nplain_http = true\n",
        manifest_cap.map_or(String::new(), |c| format!("manifest_max_bytes = {c}"))
    );
    let agent = format!(
        "chunk_size = 262144\n\n[mirror]\ndefault_registry = \"{registry}\"\nfallback_after_ms = {fallback_ms}\n\n{origin}"
    );
    (origin, agent)
}

struct Setup {
    registry: Registry,
    cluster: Cluster,
    _layouts: tempfile::TempDir,
}

async fn setup(agents: usize, manifest_cap: Option<u64>) -> Result<Setup> {
    setup_with(agents, manifest_cap, 20_000, "").await
}

/// `coordinator_extra`: more top-level keys of the coordinator's config.
async fn setup_with(
    agents: usize,
    manifest_cap: Option<u64>,
    fallback_ms: u64,
    coordinator_extra: &str,
) -> Result<Setup> {
    let registry = Registry::start()?;
    let (origin_toml, agent_toml) = configs_with(&registry.host(), manifest_cap, fallback_ms);
    let coordinator_toml = format!("{coordinator_extra}\n{origin_toml}");
    let cluster =
        Cluster::start_configured(agents, &[], 10_000, &coordinator_toml, &agent_toml).await?;
    Ok(Setup {
        registry,
        cluster,
        _layouts: tempfile::tempdir()?,
    })
}

impl Setup {
    /// Builds the sample image `seed` and pushes it as `<repository>:<tag>`.
    fn image(&self, repository: &str, tag: &str, seed: u64) -> Result<Image> {
        let layout = (self._layouts.path()).join(format!("{repository}-{tag}").replace('/', "_"));
        let built = oci_image::build_layout(&layout, &ImageSpec::sample(tag, seed))?;
        oci_image::push_to_registry(&layout, tag, &self.registry.host(), repository)?;
        Ok(Image { built, layout })
    }

    /// Blob GETs the upstream served for `repository`, and their bytes, by digest.
    fn upstream_blob_bytes(
        &self,
        repository: &str,
    ) -> (BTreeMap<String, usize>, BTreeMap<String, u64>) {
        let prefix = format!("/v2/{repository}/blobs/");
        let mut gets = BTreeMap::new();
        let mut bytes = BTreeMap::new();
        for e in self.registry.access_log() {
            if e.method == "GET" && e.status / 100 == 2 {
                if let Some(d) = e.path.strip_prefix(&prefix) {
                    *gets.entry(d.to_string()).or_default() += 1;
                    *bytes.entry(d.to_string()).or_default() += e.bytes;
                }
            }
        }
        (gets, bytes)
    }

    fn agent_logs(&self) -> String {
        (self.cluster.agents.iter())
            .map(|a| read(&a.proc.log))
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

struct Image {
    built: BuiltImage,
    layout: std::path::PathBuf,
}

impl Image {
    /// A blob's bytes, from the layout.
    fn blob(&self, digest: &str) -> Vec<u8> {
        let hex = digest.trim_start_matches("sha256:");
        std::fs::read(self.layout.join("blobs/sha256").join(hex)).expect("blob in the layout")
    }
}

/// The image's blobs (config and layers): digest → size.
fn blobs(image: &Image) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = image.built.layers.iter().cloned().collect();
    let config = image.blob(&image.built.config_digest).len() as u64;
    out.insert(image.built.config_digest.clone(), config);
    out
}

/// `skopeo copy` through a mirror into a fresh directory; returns its files' digests.
fn pull_through(
    mirror: std::net::SocketAddr,
    image: &str,
    dest: &Path,
) -> Result<BTreeMap<String, String>> {
    oci_image::skopeo_copy_to_dir(&format!("docker://{mirror}/{image}"), dest, &[])?;
    oci_image::dir_file_digests(dest)
}

/// Every blob of the image is in the copy, bit for bit.
fn check_copy(copy: &BTreeMap<String, String>, image: &Image) -> Result<()> {
    for digest in blobs(image).keys() {
        let hex = digest.trim_start_matches("sha256:");
        ensure!(
            copy.get(hex) == Some(digest),
            "blob {digest} missing or different in the copy: {copy:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_through_the_mirrors_fetches_each_blob_from_upstream_once() -> Result<()> {
    let s = setup(4, None).await?;
    let image = s.image("team/app", "v1", 1)?;
    let out = tempfile::tempdir()?;

    // One after the other through A and B: B's blobs come from A, not the upstream.
    let a = pull_through(
        s.cluster.agents[0].mirror,
        "team/app:v1",
        &out.path().join("a"),
    )
    .with_context(|| s.agent_logs())?;
    let b = pull_through(
        s.cluster.agents[1].mirror,
        "team/app:v1",
        &out.path().join("b"),
    )
    .with_context(|| s.agent_logs())?;
    check_copy(&a, &image)?;
    assert_eq!(a, b, "the two pulls differ");
    // Each blob left the upstream once (in one GET or in parallel ranges).
    let (_, bytes) = s.upstream_blob_bytes("team/app");
    for (digest, size) in blobs(&image) {
        assert_eq!(
            bytes.get(&digest),
            Some(&size),
            "upstream bytes of {digest}: {bytes:?}"
        );
    }
    let b_agent = &s.cluster.agents[1];
    let from_peers = b_agent.metric("shoal_mirror_sent_bytes_total{source=\"peers\"")?;
    let total: u64 = blobs(&image).values().sum();
    assert_eq!(
        from_peers as u64, total,
        "B's mirror served every byte from peers"
    );
    assert_eq!(b_agent.metric("shoal_mirror_fallbacks_total")?, 0.0);

    // A second image through all four mirrors at once: still one upstream fetch per blob.
    let image = s.image("team/other", "v2", 2)?;
    let mut pulls = Vec::new();
    for (i, agent) in s.cluster.agents.iter().enumerate() {
        let mirror = agent.mirror;
        let dest = out.path().join(format!("c{i}"));
        pulls.push(std::thread::spawn(move || {
            pull_through(mirror, "team/other:v2", &dest)
        }));
    }
    let copies: Vec<_> = pulls
        .into_iter()
        .map(|p| p.join().expect("pull thread"))
        .collect::<Result<_>>()
        .with_context(|| s.agent_logs())?;
    for copy in &copies {
        check_copy(copy, &image)?;
    }
    let (_, by_blob) = s.upstream_blob_bytes("team/other");
    for (digest, size) in blobs(&image) {
        assert_eq!(
            by_blob.get(&digest),
            Some(&size),
            "upstream bytes of {digest}: {by_blob:?}"
        );
    }
    let bytes: u64 = by_blob.values().sum();
    let unique: u64 = blobs(&image).values().sum();
    let ratio = bytes as f64 / unique as f64;
    eprintln!("4 concurrent pulls: upstream blob bytes / unique bytes = {ratio:.3}");
    // The first-byte latency is a Prometheus histogram (buckets), which aggregates across
    // nodes, not a summary; build and process series are there too.
    let mut bucket_counts = 0.0;
    for agent in &s.cluster.agents {
        bucket_counts += agent.metric("shoal_mirror_first_byte_seconds_bucket")?;
        assert_eq!(agent.metric("shoal_build_info")?, 1.0, "shoal_build_info");
        assert!(agent.metric("process_resident_memory_bytes")? > 0.0);
        assert!(agent.metric("process_open_fds")? > 0.0);
        assert!(agent.metric("process_start_time_seconds")? > 1.0e9);
    }
    assert!(
        bucket_counts > 0.0,
        "no first-byte histogram buckets exported"
    );
    assert!(ratio <= 1.05, "upstream bytes {bytes} for {unique} unique");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preheated_image_reaches_containerd_through_the_mirror_not_the_upstream() -> Result<()> {
    // Blobs from 1 MiB up are seeded in ranges by several agents at once.
    let s = setup_with(3, None, 20_000, "stripe_seed_min_bytes = 1048576").await?;
    let image = s.image("team/svc", "v3", 3)?;
    let reference = format!("{}/team/svc:v3", s.registry.host());

    // Preheat to every agent with the CLI, which follows the job to the end.
    let out = harness::shoal()
        .args([
            "preheat",
            &reference,
            "--to",
            "all",
            "--coordinator",
            &s.cluster.url(),
        ])
        .arg("--ca-file")
        .arg(s.cluster.ca_file())
        .arg("--token-file")
        .arg(s.cluster.admin_token_file())
        .output()?;
    ensure!(
        out.status.success(),
        "preheat failed: {}\ncoordinator: {}\nagents: {}",
        String::from_utf8_lossy(&out.stderr),
        read(&s.cluster.coordinator.log),
        s.agent_logs()
    );
    // Every byte left the upstream once; the 4 MiB layer in three ranges, one per agent.
    let (gets, bytes) = s.upstream_blob_bytes("team/svc");
    for (digest, size) in blobs(&image) {
        assert_eq!(
            bytes.get(&digest),
            Some(&size),
            "upstream bytes of {digest}: {bytes:?}"
        );
        let expected = if size >= 1 << 20 { 3 } else { 1 };
        assert_eq!(
            gets.get(&digest),
            Some(&expected),
            "upstream GETs of {digest}: {gets:?}"
        );
    }

    // containerd, pointed at agent 0's mirror by `shoal containerd-config`, which adds it
    // to the node's existing file (a plain-HTTP server and a mirror of its own that is down):
    // containerd reads the merged file and tries Shoal's mirror first.
    let hosts = tempfile::tempdir()?;
    let mirror = format!("http://{}", s.cluster.agents[0].mirror);
    let existing = hosts.path().join(s.registry.host()).join("hosts.toml");
    std::fs::create_dir_all(existing.parent().context("parent")?)?;
    std::fs::write(
        &existing,
        format!(
            "server = \"http://{}\"\n\n[host.\"http://127.0.0.1:9\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            s.registry.host()
        ),
    )?;
    harness::containerd_config(&s.registry.host(), &mirror, hosts.path())?;
    let from_peers =
        |s: &Setup| s.cluster.agents[0].metric("shoal_agent_received_bytes_total{source=\"peer\"");
    let peer_bytes = from_peers(&s)?;
    let containerd = shoal_tests::containerd::Containerd::start()?;
    containerd
        .pull(
            &reference,
            hosts.path(),
            shoal_tests::containerd::DEFAULT_SNAPSHOTTER,
        )
        .with_context(|| format!("containerd log:\n{}", containerd.log()))?;
    assert!(
        containerd.images()?.iter().any(|i| i == &reference),
        "{:?}",
        containerd.images()
    );
    // The bytes came through Shoal: no blob GET from containerd reached the upstream, and
    // the agent's mirror served every blob from its store.
    let direct: Vec<_> = (s.registry.access_log().into_iter())
        .filter(|e| e.path.contains("/blobs/") && e.user_agent.contains("containerd"))
        .collect();
    assert!(
        direct.is_empty(),
        "containerd went to the upstream: {direct:?}"
    );
    let (gets_after, _) = s.upstream_blob_bytes("team/svc");
    assert_eq!(gets, gets_after, "the pull fetched from the upstream again");
    assert_eq!(
        from_peers(&s)?,
        peer_bytes,
        "a preheated image is served from the node's own store, not fetched from peers"
    );
    let local = s.cluster.agents[0].metric("shoal_mirror_sent_bytes_total{source=\"local\"")?;
    let layers: u64 = image.built.layers.iter().map(|(_, n)| n).sum();
    assert!(
        local as u64 >= layers,
        "mirror served {local} bytes, layers are {layers}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_oci_errors_and_nothing_is_stored() -> Result<()> {
    let s = setup(1, Some(300)).await?;
    let image = s.image("team/app", "v1", 4)?;
    let mirror = s.cluster.agents[0].mirror.to_string();
    let code = |r: &shoal_tests::registry::HttpResponse| -> String {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        v["errors"][0]["code"].as_str().unwrap_or("").to_string()
    };
    let unknown = format!("sha256:{}", "ab".repeat(32));

    let r = http_get(&mirror, &format!("/v2/team/app/blobs/{unknown}"), &[])?;
    assert_eq!(
        (r.status, code(&r).as_str()),
        (404, "BLOB_UNKNOWN"),
        "{r:?}"
    );
    let r = http_get(&mirror, "/v2/team/../etc/blobs/sha256:00", &[])?;
    assert_eq!(
        (r.status, code(&r).as_str()),
        (400, "NAME_INVALID"),
        "{r:?}"
    );
    let r = http_get(&mirror, "/v2/Team_App!/manifests/v1", &[])?;
    assert_eq!(
        (r.status, code(&r).as_str()),
        (400, "NAME_INVALID"),
        "{r:?}"
    );
    let r = http_get(&mirror, "/v2/team/app/blobs/sha256:xyz", &[])?;
    assert_eq!(
        (r.status, code(&r).as_str()),
        (400, "DIGEST_INVALID"),
        "{r:?}"
    );

    // The manifest is larger than the 300-byte cap of this cluster.
    let r = http_get(&mirror, "/v2/team/app/manifests/v1", &[])?;
    assert_eq!(r.status, 502, "{r:?}");
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("300"), "the error names the limit: {body}");

    // A range of a layer, served through Shoal.
    let (layer, size) = image.built.layers[1].clone();
    let r = http_get(
        &mirror,
        &format!("/v2/team/app/blobs/{layer}"),
        &[("Range", "bytes=1000-1999")],
    )?;
    assert_eq!(r.status, 206, "{r:?}");
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 1000-1999/{size}").as_str())
    );
    let whole = image.blob(&layer);
    assert_eq!(r.body, whole[1000..2000], "the range's bytes");

    // A registry the mirror does not serve (not its default_registry, not configured):
    // 403 DENIED, and nothing connects to it, whether named by `?ns=` or routed by path
    // (the mirror is no proxy to wherever a client points it).
    let other = std::net::TcpListener::bind("127.0.0.1:0")?;
    other.set_nonblocking(true)?;
    let other_addr = other.local_addr()?.to_string();
    let paths = [
        format!("/v2/team/app/blobs/{unknown}?ns={other_addr}"),
        format!("/v2/team/app/manifests/v1?ns={other_addr}"),
        "/v2/team/app/manifests/v1?ns=169.254.169.254".to_string(),
        format!(
            "/v2/{}/team/app/manifests/v1",
            other_addr.replace(':', "__")
        ),
    ];
    for path in &paths {
        let r = http_get(&mirror, path, &[])?;
        assert_eq!(
            (r.status, code(&r).as_str()),
            (403, "DENIED"),
            "{path}: {r:?}"
        );
        let body = String::from_utf8_lossy(&r.body);
        assert!(
            body.contains("mirror.registries"),
            "the error says what to configure: {body}"
        );
    }
    match other.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the mirror connected to a registry it does not serve: {other:?}"),
    }
    let listed = (s.cluster.client().await?)
        .list_blobs(pb::ListBlobsRequest::default())
        .await?
        .into_inner();
    assert!(
        listed.blobs.iter().all(|b| b.digest != unknown),
        "{listed:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_peer_makes_the_mirror_fall_back_to_the_upstream() -> Result<()> {
    let s = setup_with(2, None, 1_000, "").await?;
    let image = s.image("team/app", "v1", 5)?;
    let (layer, size) = image.built.layers[1].clone();
    let path = format!("/v2/team/app/blobs/{layer}");
    // Agent 0 seeds the layer, then freezes: alive to the coordinator for its lease (10 s),
    // silent to peers.
    let r = http_get(&s.cluster.agents[0].mirror.to_string(), &path, &[])?;
    assert_eq!((r.status, r.body.len() as u64), (200, size));
    let digest: shoal_proto::Digest = layer.parse()?;
    let started = Instant::now();
    loop {
        let blob = (s.cluster.client().await?)
            .get_blob(pb::GetBlobRequest {
                digest: digest.to_string(),
                include_manifest: false,
            })
            .await;
        if blob.is_ok_and(|b| b.into_inner().blob.is_some_and(|b| b.complete_holders == 1)) {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "seed never registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.cluster.agents[0].proc.signal("STOP")?;
    let pulled = std::thread::spawn({
        let mirror = s.cluster.agents[1].mirror.to_string();
        move || http_get(&mirror, &path, &[])
    })
    .join()
    .expect("pull thread");
    s.cluster.agents[0].proc.signal("CONT")?;
    let r = pulled?;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, image.blob(&layer), "the fallback's bytes");
    let b = &s.cluster.agents[1];
    assert_eq!(b.metric("shoal_mirror_fallbacks_total")?, 1.0);
    assert_eq!(
        b.metric("shoal_mirror_sent_bytes_total{source=\"fallback\"")? as u64,
        size
    );
    assert!(
        read(&b.proc.log).contains("fetching from the upstream directly"),
        "the fallback is logged"
    );
    let (_, bytes) = s.upstream_blob_bytes("team/app");
    assert_eq!(
        bytes.get(&layer),
        Some(&(2 * size)),
        "the seed and the fallback: {bytes:?}"
    );
    Ok(())
}
