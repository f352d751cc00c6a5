//! The fixtures for the OCI mirror's end-to-end tests, checked against the real tools and no
//! Shoal code: an image built offline goes into a real registry with skopeo and comes back
//! out bit for bit with skopeo and with containerd, and the registry's access log counts the
//! blob fetches.
//!
//! Needs `docker-registry`, `skopeo` and `containerd` (scripts/test-all.sh installs them);
//! without them these tests fail and say how to install. Each test starts its own daemons
//! on loopback and takes a second or two.

use std::path::Path;

use anyhow::Result;
use shoal_tests::containerd::{self, Containerd, DEFAULT_SNAPSHOTTER};
use shoal_tests::oci_image::{self, BuiltImage, ImageSpec};
use shoal_tests::registry::Registry;

const REPOSITORY: &str = "shoal/app";
const TAG: &str = "v1";

/// A three-layer image (one layer a 4 MiB incompressible blob) pushed to a fresh registry.
struct Pushed {
    layout: tempfile::TempDir,
    image: BuiltImage,
    registry: Registry,
}

fn push_sample_image(seed: u64) -> Result<Pushed> {
    let layout = tempfile::tempdir()?;
    let image = oci_image::build_layout(layout.path(), &ImageSpec::sample(TAG, seed))?;
    assert_eq!(image.layers.len(), 3);
    assert!(
        image.layers.iter().any(|(_, size)| *size >= 3 << 20),
        "one layer spans several 1 MiB chunks: {:?}",
        image.layers
    );
    let registry = Registry::start()?;
    oci_image::push_to_registry(layout.path(), TAG, &registry.host(), REPOSITORY)?;
    Ok(Pushed {
        layout,
        image,
        registry,
    })
}

fn layout_blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    std::fs::read(layout.join("blobs/sha256").join(hex)).expect("blob in layout")
}

#[test]
fn skopeo_pulls_back_every_blob_bit_for_bit_and_each_layer_once() -> Result<()> {
    let Pushed {
        layout,
        image,
        registry,
    } = push_sample_image(1)?;
    // The push uploads (HEAD, POST, PATCH, PUT) but never GETs a blob.
    for (digest, _) in &image.layers {
        assert_eq!(registry.blob_gets(REPOSITORY, digest), 0, "{digest}");
    }

    let pulled = tempfile::tempdir()?;
    let source = format!("docker://{}/{REPOSITORY}:{TAG}", registry.host());
    oci_image::skopeo_copy_to_dir(&source, pulled.path(), &[])?;

    let files = oci_image::dir_file_digests(pulled.path())?;
    let blobs = image
        .layers
        .iter()
        .map(|(digest, _)| digest)
        .chain([&image.config_digest]);
    for digest in blobs {
        let hex = digest.trim_start_matches("sha256:");
        assert_eq!(files.get(hex), Some(digest), "pulled blob {hex}");
        assert!(
            std::fs::read(pulled.path().join(hex))? == layout_blob(layout.path(), digest),
            "pulled blob {digest} differs from the layout's"
        );
    }
    let manifest = std::fs::read(pulled.path().join("manifest.json"))?;
    assert_eq!(oci_image::sha256_digest(&manifest), image.manifest_digest);
    assert_eq!(manifest, image.manifest_bytes);

    for (digest, _) in &image.layers {
        assert_eq!(registry.blob_gets(REPOSITORY, digest), 1, "{digest}");
    }
    assert_eq!(registry.blob_gets(REPOSITORY, &image.config_digest), 1);
    assert_eq!(registry.manifest_requests(REPOSITORY), 1);
    assert!(registry.requests_from_user_agent("skopeo/") > 0);

    // A second pull is counted again: the counts are requests, not distinct blobs.
    let again = tempfile::tempdir()?;
    oci_image::skopeo_copy_to_dir(&source, again.path(), &[])?;
    assert_eq!(oci_image::dir_file_digests(again.path())?, files);
    for (digest, _) in &image.layers {
        assert_eq!(registry.blob_gets(REPOSITORY, digest), 2, "{digest}");
    }
    Ok(())
}

#[test]
fn containerd_pulls_and_unpacks_from_the_registry_over_plain_http() -> Result<()> {
    let Pushed {
        layout: _layout,
        image,
        registry,
    } = push_sample_image(2)?;
    let containerd = Containerd::start()?;
    let hosts_dir = containerd.scratch_dir().join("hosts.d");
    containerd::write_hosts_toml(&hosts_dir, &registry.host(), &[])?;

    let image_ref = format!("{}/{REPOSITORY}:{TAG}", registry.host());
    containerd.pull(&image_ref, &hosts_dir, DEFAULT_SNAPSHOTTER)?;

    assert_eq!(containerd.images()?, vec![image_ref]);
    for (digest, _) in &image.layers {
        assert_eq!(registry.blob_gets(REPOSITORY, digest), 1, "{digest}");
    }
    assert_eq!(registry.blob_gets(REPOSITORY, &image.config_digest), 1);
    let containerd_blob_gets = registry
        .access_log()
        .iter()
        .filter(|e| e.method == "GET" && e.path.contains("/blobs/"))
        .filter(|e| e.user_agent.starts_with("containerd/"))
        .count();
    assert_eq!(
        containerd_blob_gets,
        image.layers.len() + 1,
        "layers and config"
    );
    // Unpacked: a committed snapshot per layer, named by chain ID, which containerd only
    // commits after checking each uncompressed layer against the config's diff_ids.
    let snapshots = containerd.committed_snapshots(DEFAULT_SNAPSHOTTER)?;
    for chain_id in containerd::chain_ids(&image.diff_ids) {
        assert!(snapshots.contains(&chain_id), "{chain_id} in {snapshots:?}");
    }
    Ok(())
}

/// The shape Shoal's mirror will have on a node: the image is named after an upstream that
/// cannot be reached, and hosts.toml sends containerd to a mirror (here the registry itself).
#[test]
fn containerd_pulls_through_the_mirror_that_hosts_toml_names() -> Result<()> {
    let Pushed {
        layout: _layout,
        image,
        registry,
    } = push_sample_image(3)?;
    let containerd = Containerd::start()?;
    let hosts_dir = containerd.scratch_dir().join("hosts.d");
    let upstream = "registry.shoal.invalid";
    let mirror = format!("http://{}", registry.host());
    containerd::write_hosts_toml(&hosts_dir, upstream, &[&mirror])?;

    let image_ref = format!("{upstream}/{REPOSITORY}:{TAG}");
    containerd.pull(&image_ref, &hosts_dir, DEFAULT_SNAPSHOTTER)?;

    assert_eq!(containerd.images()?, vec![image_ref]);
    for (digest, _) in &image.layers {
        assert_eq!(registry.blob_gets(REPOSITORY, digest), 1, "{digest}");
    }
    Ok(())
}
