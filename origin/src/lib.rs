//! Shoal's client for upstream origins: OCI Distribution registries (image manifests and
//! blobs) and plain HTTP(S) URLs (model files).
//!
//! [`Client`] does the requests, with the registry token flow, redirects to blob storage, and
//! streaming bodies; [`Reference`] parses image references; [`resolve_image`] turns one into
//! the blobs a node needs. Everything fails with an [`OriginError`] that names the URL.

mod announced;
mod auth;
mod body;
mod client;
mod config;
mod docker_auth;
mod error;
mod http;
mod image;
mod pacing;
mod redirects;
mod reference;
mod whole;

pub use body::{Body, ByteRange};
pub use client::{Client, FetchedManifest, ManifestHead, PullRight, Pullable, UrlInfo};
pub use config::{Credentials, HttpOriginConfig, OriginConfig, RegistryConfig};
pub use error::OriginError;
pub use http::parse_http_url;
pub use image::{
    DEFAULT_PLATFORM, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, ResolvedImage, resolve_image,
};
pub use pacing::THROTTLED;
pub use whole::{Open, Ranges, Whole, open_whole};

/// How many challenges of a `WWW-Authenticate` value this client understands (Bearer with a
/// realm, Basic). For the fuzz tests: the parser meets whatever a registry sends.
#[doc(hidden)]
pub fn parse_www_authenticate(header: &str) -> usize {
    auth::parse_challenges(header).len()
}
pub use reference::{DOCKER_HUB, NAME_MAX_LEN, Reference, validate_repository, validate_tag};
pub use shoal_proto::Digest;

use std::sync::LazyLock;

use oci_spec::image::MediaType;

/// Media types a mirror or puller should send in `Accept` for manifests: OCI index and
/// manifest (`oci-spec`'s `MediaType::ImageIndex` and `ImageManifest`), Docker manifest list
/// and schema 2 manifest, most general first.
pub static MANIFEST_MEDIA_TYPES: LazyLock<[&'static str; 4]> = LazyLock::new(|| {
    static OCI_INDEX: MediaType = MediaType::ImageIndex;
    static OCI_MANIFEST: MediaType = MediaType::ImageManifest;
    [
        OCI_INDEX.as_ref(),
        DOCKER_MANIFEST_LIST,
        OCI_MANIFEST.as_ref(),
        DOCKER_MANIFEST,
    ]
});
