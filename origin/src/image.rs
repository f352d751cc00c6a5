//! Resolving an image reference to the blobs a node needs to run it.
//!
//! Manifests, indexes and their descriptors are `oci-spec`'s types, parsed from the bytes
//! [`Client::get_manifest`] returns, which it read within `manifest_max_bytes`: nothing here
//! reads from the network unbounded. Docker's schema 2 manifest and manifest list have the
//! same shape as OCI's; `oci-spec` reads their media types as `MediaType::Other`, so they
//! are named here. What is Shoal's own: which layers preheat skips, platform selection
//! (containerd's default variants), nested indexes refused, and the errors.

use oci_spec::image::{Arch, Descriptor, ImageIndex, ImageManifest, MediaType, Os, Platform};
use shoal_proto::Digest;

use crate::{Client, MANIFEST_MEDIA_TYPES, OriginError, Reference};

/// Docker manifest list (schema 2).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker's foreign layer: a Windows base layer, pulled from its `urls`, not the registry.
const DOCKER_FOREIGN_LAYER: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

/// Layers that registries do not serve (Windows base layers pulled from their `urls`):
/// Docker's foreign layers and OCI's non-distributable ones.
fn is_foreign(media_type: &MediaType) -> bool {
    match media_type {
        MediaType::ImageLayerNonDistributable
        | MediaType::ImageLayerNonDistributableGzip
        | MediaType::ImageLayerNonDistributableZstd => true,
        MediaType::Other(t) => t == DOCKER_FOREIGN_LAYER,
        _ => false,
    }
}

/// The platform used when none is asked for.
pub const DEFAULT_PLATFORM: &str = "linux/amd64";

/// The blobs of an image, for preheating.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedImage {
    /// Digest of the manifest the reference names (the index, for a multi-platform image).
    pub manifest_digest: Digest,
    /// The platform manifests selected, with their sizes; for a single-platform image, just
    /// the top manifest.
    pub manifests: Vec<(Digest, u64)>,
    /// Every config and layer blob with its size: all configs first, then all layers, in
    /// manifest order, each digest once.
    pub blobs: Vec<(Digest, u64)>,
}

/// How a manifest is to be read.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Index,
    Image,
}

/// Resolves `reference` to its blobs. An index or manifest list resolves to the manifests of
/// `platforms` (`"os/arch"` or `"os/arch/variant"`; empty means `linux/amd64`), each
/// fetched by digest and verified. A platform the index lacks is `NotFound` listing the
/// platforms it has. A single image manifest is taken as it is, whatever `platforms` say.
/// Nested indexes and Docker schema 1 are `Invalid`.
pub async fn resolve_image(
    client: &Client,
    reference: &Reference,
    platforms: &[String],
) -> Result<ResolvedImage, OriginError> {
    let wanted: Vec<Platform> = if platforms.is_empty() {
        vec![parse_platform(DEFAULT_PLATFORM)?]
    } else {
        platforms
            .iter()
            .map(|p| parse_platform(p))
            .collect::<Result<_, _>>()?
    };
    let top = client
        .get_manifest(
            &reference.registry,
            &reference.repository,
            &reference.reference(),
            MANIFEST_MEDIA_TYPES.as_slice(),
        )
        .await?;
    let mut manifests = Vec::new();
    let mut images = Vec::new();
    match kind_of(&top.media_type, &top.bytes, reference)? {
        Kind::Image => {
            manifests.push((top.digest, top.bytes.len() as u64));
            images.push(parse_image(&top.bytes, reference)?);
        }
        Kind::Index => {
            let index: ImageIndex = parse_json(&top.bytes, "index", reference)?;
            for platform in &wanted {
                let chosen = select(&index, platform).ok_or_else(|| {
                    let available: Vec<String> = (index.manifests().iter())
                        .filter_map(|d| d.platform().as_ref().map(platform_string))
                        .collect();
                    OriginError::NotFound(format!(
                        "{reference} has no manifest for platform {}; it has {}",
                        platform_string(platform),
                        if available.is_empty() {
                            "none".to_string()
                        } else {
                            available.join(", ")
                        }
                    ))
                })?;
                let digest = parse_digest(chosen, reference)?;
                if manifests.iter().any(|(d, _)| *d == digest) {
                    continue;
                }
                let child = client
                    .get_manifest(
                        &reference.registry,
                        &reference.repository,
                        &digest.to_string(),
                        MANIFEST_MEDIA_TYPES.as_slice(),
                    )
                    .await?;
                if kind_of(&child.media_type, &child.bytes, reference)? != Kind::Image {
                    return Err(OriginError::Invalid(format!(
                        "{reference}: manifest {digest} for {} is itself an index; nested indexes are not supported",
                        platform_string(platform)
                    )));
                }
                manifests.push((digest, child.bytes.len() as u64));
                images.push(parse_image(&child.bytes, reference)?);
            }
        }
    }
    Ok(ResolvedImage {
        manifest_digest: top.digest,
        manifests,
        blobs: blobs_of(&images, reference)?,
    })
}

/// Every config, then every layer that registries serve, of `images`, each digest once.
fn blobs_of(
    images: &[ImageManifest],
    reference: &Reference,
) -> Result<Vec<(Digest, u64)>, OriginError> {
    let mut blobs: Vec<(Digest, u64)> = Vec::new();
    let mut add = |d: &Descriptor| -> Result<(), OriginError> {
        let digest = parse_digest(d, reference)?;
        if !blobs.iter().any(|(seen, _)| *seen == digest) {
            blobs.push((digest, d.size()));
        }
        Ok(())
    };
    for image in images {
        add(image.config())?;
    }
    for image in images {
        for layer in image.layers() {
            if !is_foreign(layer.media_type()) {
                add(layer)?;
            }
        }
    }
    Ok(blobs)
}

/// Decides from the media type (or, when that is missing or generic, the JSON shape)
/// whether a manifest is an index or an image manifest.
fn kind_of(media_type: &str, bytes: &[u8], reference: &Reference) -> Result<Kind, OriginError> {
    match MediaType::from(media_type) {
        MediaType::ImageIndex => Ok(Kind::Index),
        MediaType::ImageManifest => Ok(Kind::Image),
        MediaType::Other(t) if t == DOCKER_MANIFEST_LIST => Ok(Kind::Index),
        MediaType::Other(t) if t == DOCKER_MANIFEST => Ok(Kind::Image),
        MediaType::Other(t) if t.starts_with("application/vnd.docker.distribution.manifest.v1") => {
            Err(OriginError::Invalid(format!(
                "{reference}: Docker schema 1 manifests ({t}) are not supported"
            )))
        }
        _ => {
            #[derive(serde::Deserialize)]
            struct Shape {
                manifests: Option<serde_json::Value>,
                config: Option<serde_json::Value>,
            }
            let shape: Shape = parse_json(bytes, "manifest", reference)?;
            match (shape.manifests, shape.config) {
                (Some(_), _) => Ok(Kind::Index),
                (None, Some(_)) => Ok(Kind::Image),
                (None, None) => Err(OriginError::Invalid(format!(
                    "{reference}: manifest of type {media_type:?} is neither an index nor an image manifest"
                ))),
            }
        }
    }
}

fn parse_image(bytes: &[u8], reference: &Reference) -> Result<ImageManifest, OriginError> {
    parse_json(bytes, "image manifest", reference)
}

/// Parses a manifest already read within `manifest_max_bytes`.
fn parse_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
    reference: &Reference,
) -> Result<T, OriginError> {
    serde_json::from_slice(bytes)
        .map_err(|e| OriginError::Invalid(format!("{reference}: malformed {what}: {e}")))
}

/// The descriptor's digest as Shoal's (SHA-256 only; `oci-spec` also accepts others).
fn parse_digest(descriptor: &Descriptor, reference: &Reference) -> Result<Digest, OriginError> {
    let text = descriptor.digest().as_ref();
    text.parse()
        .map_err(|e| OriginError::Invalid(format!("{reference}: descriptor digest {text:?}: {e}")))
}

/// `"linux/amd64"`, `"linux/arm64/v8"`.
fn parse_platform(text: &str) -> Result<Platform, OriginError> {
    let parts: Vec<&str> = text.split('/').collect();
    let bad = || {
        OriginError::Invalid(format!(
            "platform {text:?}: expected os/architecture or os/architecture/variant"
        ))
    };
    if parts.iter().any(|p| p.is_empty()) {
        return Err(bad());
    }
    let (os, arch, variant) = match parts.as_slice() {
        [os, arch] => (os, arch, None),
        [os, arch, variant] => (os, arch, Some(variant.to_string())),
        _ => return Err(bad()),
    };
    let mut platform = Platform::default();
    platform
        .set_os(Os::from(*os))
        .set_architecture(Arch::from(*arch))
        .set_variant(variant);
    Ok(platform)
}

fn platform_string(p: &Platform) -> String {
    match p.variant() {
        Some(v) => format!("{}/{}/{v}", p.os(), p.architecture()),
        None => format!("{}/{}", p.os(), p.architecture()),
    }
}

/// The variant an architecture has when an index leaves it out, as containerd assumes.
fn default_variant(architecture: &Arch) -> Option<&'static str> {
    match architecture {
        Arch::ARM64 => Some("v8"),
        Arch::ARM => Some("v7"),
        _ => None,
    }
}

/// The first manifest of `index` for `wanted`. Without a variant in `wanted`, any variant
/// matches; with one, the entry's variant (or the architecture's default) must equal it.
fn select<'a>(index: &'a ImageIndex, wanted: &Platform) -> Option<&'a Descriptor> {
    index.manifests().iter().find(|d| {
        let Some(p) = d.platform() else { return false };
        if p.os() != wanted.os() || p.architecture() != wanted.architecture() {
            return false;
        }
        match wanted.variant() {
            None => true,
            Some(v) => {
                p.variant().as_deref().or(default_variant(p.architecture())) == Some(v.as_str())
            }
        }
    })
}

#[cfg(test)]
mod tests;
