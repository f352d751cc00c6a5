//! Resolving an image reference to the blobs a node needs to run it.

use shoal_proto::Digest;

use crate::{Client, MANIFEST_MEDIA_TYPES, OriginError, Reference};

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list (schema 2).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Layers that registries do not serve (Windows base layers pulled from their `urls`).
const FOREIGN_LAYERS: &[&str] = &[
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
];

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

/// A content descriptor as in OCI manifests and indexes.
#[derive(serde::Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(serde::Deserialize, Clone, Debug, PartialEq, Eq)]
struct Platform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(serde::Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(serde::Deserialize)]
struct ImageManifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
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
            MANIFEST_MEDIA_TYPES,
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
            let index: Index = parse_json(&top.bytes, "index", reference)?;
            for platform in &wanted {
                let chosen = select(&index, platform).ok_or_else(|| {
                    let available: Vec<String> = index
                        .manifests
                        .iter()
                        .filter_map(|d| d.platform.as_ref().map(platform_string))
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
                let digest = parse_digest(&chosen.digest, reference)?;
                if manifests.iter().any(|(d, _)| *d == digest) {
                    continue;
                }
                let child = client
                    .get_manifest(
                        &reference.registry,
                        &reference.repository,
                        &digest.to_string(),
                        MANIFEST_MEDIA_TYPES,
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

    let mut blobs: Vec<(Digest, u64)> = Vec::new();
    let mut add = |d: Digest, size: u64| {
        if !blobs.iter().any(|(seen, _)| *seen == d) {
            blobs.push((d, size));
        }
    };
    for image in &images {
        add(
            parse_digest(&image.config.digest, reference)?,
            image.config.size,
        );
    }
    for image in &images {
        for layer in &image.layers {
            if FOREIGN_LAYERS.contains(&layer.media_type.as_str()) {
                continue;
            }
            add(parse_digest(&layer.digest, reference)?, layer.size);
        }
    }
    Ok(ResolvedImage {
        manifest_digest: top.digest,
        manifests,
        blobs,
    })
}

/// Decides from the media type (or, when that is missing or generic, the JSON shape)
/// whether a manifest is an index or an image manifest.
fn kind_of(media_type: &str, bytes: &[u8], reference: &Reference) -> Result<Kind, OriginError> {
    match media_type {
        OCI_INDEX | DOCKER_MANIFEST_LIST => Ok(Kind::Index),
        OCI_MANIFEST | DOCKER_MANIFEST => Ok(Kind::Image),
        t if t.starts_with("application/vnd.docker.distribution.manifest.v1") => {
            Err(OriginError::Invalid(format!(
                "{reference}: Docker schema 1 manifests ({t}) are not supported"
            )))
        }
        other => {
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
                    "{reference}: manifest of type {other:?} is neither an index nor an image manifest"
                ))),
            }
        }
    }
}

fn parse_image(bytes: &[u8], reference: &Reference) -> Result<ImageManifest, OriginError> {
    parse_json(bytes, "image manifest", reference)
}

fn parse_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
    reference: &Reference,
) -> Result<T, OriginError> {
    serde_json::from_slice(bytes)
        .map_err(|e| OriginError::Invalid(format!("{reference}: malformed {what}: {e}")))
}

fn parse_digest(text: &str, reference: &Reference) -> Result<Digest, OriginError> {
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
    match parts.as_slice() {
        [os, arch] => Ok(Platform {
            os: os.to_string(),
            architecture: arch.to_string(),
            variant: None,
        }),
        [os, arch, variant] => Ok(Platform {
            os: os.to_string(),
            architecture: arch.to_string(),
            variant: Some(variant.to_string()),
        }),
        _ => Err(bad()),
    }
}

fn platform_string(p: &Platform) -> String {
    match &p.variant {
        Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
        None => format!("{}/{}", p.os, p.architecture),
    }
}

/// The variant an architecture has when an index leaves it out, as containerd assumes.
fn default_variant(architecture: &str) -> Option<&'static str> {
    match architecture {
        "arm64" => Some("v8"),
        "arm" => Some("v7"),
        _ => None,
    }
}

/// The first manifest of `index` for `wanted`. Without a variant in `wanted`, any variant
/// matches; with one, the entry's variant (or the architecture's default) must equal it.
fn select<'a>(index: &'a Index, wanted: &Platform) -> Option<&'a Descriptor> {
    index.manifests.iter().find(|d| {
        let Some(p) = &d.platform else { return false };
        if p.os != wanted.os || p.architecture != wanted.architecture {
            return false;
        }
        match &wanted.variant {
            None => true,
            Some(v) => {
                p.variant.as_deref().or(default_variant(&p.architecture)) == Some(v.as_str())
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(json: &str) -> Index {
        serde_json::from_str(json).unwrap()
    }

    const INDEX: &str = r#"{"manifests":[
        {"mediaType":"m","digest":"d-amd64","size":1,"platform":{"os":"linux","architecture":"amd64"}},
        {"mediaType":"m","digest":"d-arm-v6","size":1,"platform":{"os":"linux","architecture":"arm","variant":"v6"}},
        {"mediaType":"m","digest":"d-arm64","size":1,"platform":{"os":"linux","architecture":"arm64"}},
        {"mediaType":"m","digest":"d-attest","size":1,"platform":{"os":"unknown","architecture":"unknown"}}
    ]}"#;

    fn pick(p: &str) -> Option<String> {
        select(&index(INDEX), &parse_platform(p).unwrap()).map(|d| d.digest.clone())
    }

    #[test]
    fn platform_selection() {
        assert_eq!(pick("linux/amd64").as_deref(), Some("d-amd64"));
        assert_eq!(pick("linux/arm64").as_deref(), Some("d-arm64"));
        // arm64 without a variant in the index is v8.
        assert_eq!(pick("linux/arm64/v8").as_deref(), Some("d-arm64"));
        assert_eq!(pick("linux/arm/v6").as_deref(), Some("d-arm-v6"));
        assert_eq!(pick("linux/arm/v7"), None);
        assert_eq!(pick("windows/amd64"), None);
    }

    #[test]
    fn platform_parsing() {
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", ""] {
            assert!(parse_platform(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            platform_string(&parse_platform("linux/arm64/v8").unwrap()),
            "linux/arm64/v8"
        );
    }

    #[test]
    fn kind_from_media_type_or_shape() {
        let r: Reference = "x".parse().unwrap();
        assert_eq!(kind_of(OCI_INDEX, b"", &r).unwrap(), Kind::Index);
        assert_eq!(kind_of(DOCKER_MANIFEST, b"", &r).unwrap(), Kind::Image);
        assert_eq!(
            kind_of("", br#"{"manifests":[]}"#, &r).unwrap(),
            Kind::Index
        );
        assert_eq!(
            kind_of("application/json", br#"{"config":{}}"#, &r).unwrap(),
            Kind::Image
        );
        assert!(kind_of("", b"{}", &r).is_err());
        assert!(kind_of("", b"nope", &r).is_err());
        assert!(
            kind_of(
                "application/vnd.docker.distribution.manifest.v1+prettyjws",
                b"",
                &r
            )
            .is_err()
        );
    }
}
