//! Blobs named by their origin instead of their content: a URL pulled without a digest, by
//! many agents at once, before anyone has read it. Its content cannot be addressed yet, so
//! it is addressed by a name (the URL's SHA-256, its ETag and its size: a changed file has
//! another ETag or size, hence another name), streamed from one seeder like any blob, and
//! checked chunk by chunk against the chained table that seeder makes while it reads; the
//! table's last value is the content's SHA-256, known to every copy at the end.
//!
//! A name's address is the bitwise complement of a SHA-256, so no content addresses the
//! same blob as a name (that would take a SHA-256 preimage of a chosen value), and a
//! manifest may describe content other than its address only when it carries the name
//! whose address it is ([`Manifest::name`](crate::Manifest::name)).

use crate::Digest;
use crate::pb::v1::HttpOrigin;
use crate::pb::v1::origin::Origin;

/// The longest name a manifest may carry (an ETag is at most a few hundred bytes).
pub const MAX_NAME_LEN: usize = 1024;

/// The name of the content at `url` with this ETag (empty if the origin sent none) and
/// size. The URL goes in hashed: a presigned URL's signature is not copied into every
/// manifest and log.
pub fn url_name(url: &str, etag: &str, size: u64) -> String {
    format!(
        "url-sha256 {}\netag {etag}\nsize {size}",
        Digest::of(url.as_bytes()).hex()
    )
}

/// A strong ETag (RFC 9110 8.8.3): one that changes with every byte of the content, so that
/// it can name the content and be matched (`If-Match`). A weak one (`W/"..."`) or none
/// cannot: a file replaced at the same size would go on under the old name.
pub fn is_strong(etag: &str) -> bool {
    etag.len() >= 2 && etag.starts_with('"') && etag.ends_with('"')
}

impl Digest {
    /// The address of the blob named `name`: the complement of SHA-256 over a fixed prefix
    /// and the name, which no content's digest can be.
    pub fn naming(name: &str) -> Digest {
        let mut input = Vec::with_capacity(name.len() + 16);
        input.extend_from_slice(b"shoal blob name\n");
        input.extend_from_slice(name.as_bytes());
        let mut bytes = *Digest::of(&input).as_bytes();
        for b in &mut bytes {
            *b = !*b;
        }
        Digest::from_bytes(bytes)
    }
}

impl HttpOrigin {
    /// An origin by its URL alone: no headers, and no size or ETag to name it by.
    pub fn plain(url: &str) -> Self {
        Self {
            url: url.to_string(),
            ..Default::default()
        }
    }

    /// The name of this URL's content by its ETag and size ([`url_name`]).
    pub fn content_name(&self) -> String {
        url_name(&self.url, &self.etag, self.size)
    }

    /// The name `blob` is the address of, if this origin names it instead of its content (a
    /// URL pulled without a digest, with its size and strong ETag, and no headers: headers
    /// could change what the same name fetches).
    pub fn name_of(&self, blob: &Digest) -> Option<String> {
        let nameable = self.size > 0 && is_strong(&self.etag) && self.headers.is_empty();
        let name = nameable.then(|| self.content_name())?;
        (Digest::naming(&name) == *blob).then_some(name)
    }
}

impl Origin {
    /// The name `blob` is the address of, if this origin names it instead of its content
    /// ([`HttpOrigin::name_of`]; a registry's blobs are addressed by their content).
    pub fn name_of(&self, blob: &Digest) -> Option<String> {
        match self {
            Origin::Http(h) => h.name_of(blob),
            Origin::Oci(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_neither_its_text_nor_its_texts_digest_and_changes_with_each_part() {
        let name = url_name("http://h0/model.bin", "\"abc\"", 42);
        let address = Digest::naming(&name);
        assert_ne!(address, Digest::of(name.as_bytes()));
        assert_eq!(address, Digest::naming(&name));
        for other in [
            url_name("http://h0/model2.bin", "\"abc\"", 42),
            url_name("http://h0/model.bin", "\"abd\"", 42),
            url_name("http://h0/model.bin", "\"abc\"", 43),
        ] {
            assert_ne!(Digest::naming(&other), address);
        }
        assert!(!name.contains("h0"), "the URL is hashed: {name}");
    }

    #[test]
    fn only_a_strong_etag_a_size_and_no_headers_name_an_origins_content() {
        let mut h = HttpOrigin {
            url: "http://h0/model.bin".into(),
            headers: Default::default(),
            size: 42,
            etag: "\"abc\"".into(),
        };
        let blob = Digest::naming(&h.content_name());
        assert!(h.name_of(&blob).is_some());
        assert!(h.name_of(&Digest::of(b"content")).is_none());
        for etag in ["", "W/\"abc\"", "abc"] {
            h.etag = etag.into();
            assert!(
                h.name_of(&Digest::naming(&h.content_name())).is_none(),
                "{etag}"
            );
        }
        h.etag = "\"abc\"".into();
        h.headers.insert("Range".into(), "bytes=0-1".into());
        assert!(h.name_of(&blob).is_none(), "headers");
    }
}
