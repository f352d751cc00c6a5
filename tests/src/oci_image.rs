//! OCI images built offline, byte for byte reproducible from a spec, and moved with the real
//! `skopeo`: into a registry ([`push_to_registry`]) and out of one ([`skopeo_copy_to_dir`]).
//!
//! Layer contents are pseudo-random from a seed, so they do not compress: a layer with a few
//! MiB of files is a blob of a few MiB, which spans several of Shoal's 1 MiB chunks.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use flate2::Compression;
use flate2::write::GzEncoder;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::registry::http_get;
use crate::tools;

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// An uncompressed layer ([`build_layout_uncompressed`]).
pub const TAR_LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// Every tar entry's mtime, so that layers are reproducible (2023-11-14).
const MTIME: u64 = 1_700_000_000;

/// An image to build: its layers, bottom first, and the tag it gets in the layout.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    pub layers: Vec<LayerSpec>,
    pub tag: String,
}

/// One layer: regular files with pseudo-random contents. Parent directories get their own
/// tar entries.
#[derive(Debug, Clone, Default)]
pub struct LayerSpec {
    pub files: Vec<FileSpec>,
}

/// A file of `size` bytes drawn from `SmallRng::seed_from_u64(seed)`, at `path` (relative,
/// `/`-separated, e.g. `opt/app/data.bin`).
#[derive(Debug, Clone)]
pub struct FileSpec {
    pub path: String,
    pub size: u64,
    pub seed: u64,
}

/// What [`build_layout`] wrote. Digests are `sha256:<hex>`.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub manifest_digest: String,
    pub config_digest: String,
    /// Each layer's compressed blob: digest and size, bottom first.
    pub layers: Vec<(String, u64)>,
    /// Each layer's uncompressed tar digest (the config's `rootfs.diff_ids`), bottom first.
    pub diff_ids: Vec<String>,
    pub manifest_bytes: Vec<u8>,
}

impl LayerSpec {
    /// Adds a file (builder style).
    pub fn file(mut self, path: &str, size: u64, seed: u64) -> LayerSpec {
        self.files.push(FileSpec {
            path: path.to_string(),
            size,
            seed,
        });
        self
    }
}

impl ImageSpec {
    /// Three layers: a few small files, one 4 MiB file (a blob over four 1 MiB chunks), and
    /// a layer that overwrites a file of the first. Different `seed`s give unrelated images.
    pub fn sample(tag: &str, seed: u64) -> ImageSpec {
        let seed = seed.wrapping_mul(1000);
        ImageSpec {
            layers: vec![
                LayerSpec::default()
                    .file("etc/app/config", 300, seed + 1)
                    .file("usr/bin/app", 200 << 10, seed + 2),
                LayerSpec::default().file("opt/app/model.bin", 4 << 20, seed + 3),
                LayerSpec::default()
                    .file("etc/app/config", 500, seed + 4)
                    .file("var/lib/app/state", 64 << 10, seed + 5),
            ],
            tag: tag.to_string(),
        }
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Writes an OCI image layout for `spec` into `dir` (created if missing): `oci-layout`,
/// `blobs/sha256/*` (layers, config, manifest) and an `index.json` naming the manifest with
/// `spec.tag`. An existing `index.json` is replaced. The same spec gives the same bytes.
pub fn build_layout(dir: &Path, spec: &ImageSpec) -> Result<BuiltImage> {
    build(dir, spec, true)
}

/// [`build_layout`] with uncompressed tar layers (`application/vnd.oci.image.layer.v1.tar`):
/// for benchmarks, where gzip of random bytes only costs CPU.
pub fn build_layout_uncompressed(dir: &Path, spec: &ImageSpec) -> Result<BuiltImage> {
    build(dir, spec, false)
}

fn build(dir: &Path, spec: &ImageSpec, gzip: bool) -> Result<BuiltImage> {
    ensure!(!spec.layers.is_empty(), "an image needs at least one layer");
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let write_blob = |bytes: &[u8]| -> Result<(String, u64)> {
        let digest = sha256_digest(bytes);
        let hex = digest.trim_start_matches("sha256:");
        std::fs::write(blobs.join(hex), bytes)?;
        Ok((digest, bytes.len() as u64))
    };

    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (index, layer) in spec.layers.iter().enumerate() {
        let tar = layer_tar(layer).with_context(|| format!("layer {index}"))?;
        diff_ids.push(sha256_digest(&tar));
        if gzip {
            let mut gz = GzEncoder::new(Vec::new(), Compression::default());
            gz.write_all(&tar)?;
            layers.push(write_blob(&gz.finish()?)?);
        } else {
            layers.push(write_blob(&tar)?);
        }
    }

    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": spec.layers.iter().enumerate().map(|(i, _)| json!({
            "created": "2023-11-14T22:13:20Z",
            "created_by": format!("shoal-tests layer {i}"),
        })).collect::<Vec<_>>(),
    });
    let (config_digest, config_size) = write_blob(&serde_json::to_vec(&config)?)?;

    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": descriptor(CONFIG_MEDIA_TYPE, &config_digest, config_size),
        "layers": layers
            .iter()
            .map(|(digest, size)| {
                let media_type = if gzip { LAYER_MEDIA_TYPE } else { TAR_LAYER_MEDIA_TYPE };
                descriptor(media_type, digest, *size)
            })
            .collect::<Vec<_>>(),
    });
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let (manifest_digest, manifest_size) = write_blob(&manifest_bytes)?;

    let mut manifest_descriptor = descriptor(MANIFEST_MEDIA_TYPE, &manifest_digest, manifest_size);
    manifest_descriptor["annotations"] = json!({ REF_NAME_ANNOTATION: spec.tag });
    let index = json!({ "schemaVersion": 2, "manifests": [manifest_descriptor] });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;

    Ok(BuiltImage {
        manifest_digest,
        config_digest,
        layers,
        diff_ids,
        manifest_bytes,
    })
}

fn descriptor(media_type: &str, digest: &str, size: u64) -> Value {
    json!({ "mediaType": media_type, "digest": digest, "size": size })
}

/// The layer as an uncompressed tar: every parent directory once (before its contents),
/// then the files, in spec order; root-owned, fixed mtime.
fn layer_tar(layer: &LayerSpec) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut directories = BTreeSet::new();
    for file in &layer.files {
        let path = Path::new(&file.path);
        ensure!(
            path.is_relative()
                && path
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_))),
            "layer file path {:?} must be relative without `.` or `..`",
            file.path
        );
        let parents: Vec<&Path> = path.ancestors().skip(1).collect();
        for parent in parents.into_iter().rev() {
            if parent.as_os_str().is_empty() || !directories.insert(parent.to_path_buf()) {
                continue;
            }
            let mut header = tar_header(tar::EntryType::Directory, 0o755, 0);
            tar.append_data(&mut header, parent, std::io::empty())?;
        }
        let mut contents = vec![0; usize::try_from(file.size)?];
        SmallRng::seed_from_u64(file.seed).fill_bytes(&mut contents);
        let mut header = tar_header(tar::EntryType::Regular, 0o644, file.size);
        tar.append_data(&mut header, path, contents.as_slice())?;
    }
    Ok(tar.into_inner()?)
}

fn tar_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(MTIME);
    header.set_uid(0);
    header.set_gid(0);
    header
}

/// The manifest digest that `index.json` in `layout` names `tag`.
pub fn layout_manifest_digest(layout: &Path, tag: &str) -> Result<String> {
    let index_path = layout.join("index.json");
    let index: Value = serde_json::from_slice(
        &std::fs::read(&index_path).with_context(|| format!("reading {}", index_path.display()))?,
    )?;
    index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"][REF_NAME_ANNOTATION] == tag)
        .and_then(|m| m["digest"].as_str())
        .map(str::to_string)
        .with_context(|| format!("{} has no manifest tagged {tag:?}", index_path.display()))
}

/// Pushes `oci:<layout>:<tag>` to `docker://<registry_host>/<repository>:<tag>` over plain
/// HTTP with `skopeo copy --preserve-digests`, then checks that the registry serves the
/// manifest under the layout's digest (so every blob kept its digest: skopeo neither
/// recompressed the layers nor converted the manifest).
///
/// # Panics
/// If `skopeo` is not installed.
pub fn push_to_registry(
    layout: &Path,
    tag: &str,
    registry_host: &str,
    repository: &str,
) -> Result<()> {
    push_to_registry_as(layout, tag, registry_host, repository, None)
}

/// [`push_to_registry`] with `user:password` credentials for a registry that asks for them.
pub fn push_to_registry_as(
    layout: &Path,
    tag: &str,
    registry_host: &str,
    repository: &str,
    credentials: Option<(&str, &str)>,
) -> Result<()> {
    let expected = layout_manifest_digest(layout, tag)?;
    let skopeo = tools::require("skopeo", "skopeo");
    let mut copy = Command::new(skopeo);
    copy.args(["--insecure-policy", "copy", "--quiet", "--preserve-digests"])
        .arg("--dest-tls-verify=false");
    if let Some((user, password)) = credentials {
        copy.arg(format!("--dest-creds={user}:{password}"));
    }
    tools::run(
        copy.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{registry_host}/{repository}:{tag}")),
    )?;
    let authorization = credentials.map(|(user, password)| basic_authorization(user, password));
    let mut headers = vec![("Accept", MANIFEST_MEDIA_TYPE)];
    if let Some(value) = &authorization {
        headers.push(("Authorization", value));
    }
    let response = http_get(
        registry_host,
        &format!("/v2/{repository}/manifests/{tag}"),
        &headers,
    )?;
    ensure!(
        response.status == 200,
        "registry answers {} for the pushed manifest {repository}:{tag}",
        response.status
    );
    let served = sha256_digest(&response.body);
    if served != expected {
        bail!(
            "skopeo changed the image on push: {registry_host}/{repository}:{tag} is {served}, \
             the layout's manifest is {expected}"
        );
    }
    Ok(())
}

/// The `Authorization` value of HTTP Basic credentials.
pub fn basic_authorization(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

/// `skopeo copy --src-tls-verify=false <extra_args> <source> dir:<dest>`: a pull by the real
/// client. `source` is e.g. `docker://127.0.0.1:7403/app:v1`; `dest` is created if missing.
///
/// # Panics
/// If `skopeo` is not installed.
pub fn skopeo_copy_to_dir(source: &str, dest: &Path, extra_args: &[&str]) -> Result<()> {
    let skopeo = tools::require("skopeo", "skopeo");
    tools::run(
        Command::new(skopeo)
            .args([
                "--insecure-policy",
                "copy",
                "--quiet",
                "--src-tls-verify=false",
            ])
            .args(extra_args)
            .arg(source)
            .arg(format!("dir:{}", dest.display())),
    )?;
    Ok(())
}

/// `sha256:<hex>` of every file in a directory (a `dir:` copy: `manifest.json`, `version`
/// and one file per blob, named by its hex digest), by file name. Two pulls are bit for bit
/// the same when their maps are equal.
pub fn dir_file_digests(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut digests = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let name = entry.file_name().to_string_lossy().into_owned();
            digests.insert(name, sha256_digest(&std::fs::read(entry.path())?));
        }
    }
    Ok(digests)
}
