//! What an HTTP origin says its content's SHA-256 is, so that a URL pulled without a digest
//! can be named before anyone has read it (and so streamed to every puller while it is
//! seeded, as a pull with `--digest` is). The announcement is a claim, never trusted for
//! the bytes: the content is checked against it as against a digest the user gave.
//!
//! Understood, from the response to `HEAD`:
//! - `Repr-Digest: sha-256=:<base64>:` (RFC 9530; asked for with `Want-Repr-Digest`);
//! - `Digest: SHA-256=<base64>` (RFC 3230, its predecessor);
//! - `x-amz-checksum-sha256: <base64>` (S3 and its clones), unless the checksum is a
//!   composite of parts (`-N` suffix or `x-amz-checksum-type: COMPOSITE`), which is not the
//!   object's SHA-256;
//! - `X-Linked-Etag: "<64 hex digits>"` (Hugging Face: an LFS file's SHA-256, sent with the
//!   redirect to its storage, which does not repeat it; see [`linked_sha256`]). Only a
//!   strong tag of exactly 64 hex digits counts: a file kept in git has a 40-digit SHA-1
//!   there, which is not its content's digest.
//!
//! Headers that disagree announce nothing.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::header::HeaderMap;
use shoal_proto::Digest;

/// Sent with `HEAD`: asks a server that supports RFC 9530 for the representation's SHA-256.
pub(crate) const WANT_REPR_DIGEST: (&str, &str) = ("want-repr-digest", "sha-256=10");

/// The SHA-256 the response's headers announce for the whole representation, if any do and
/// all that do agree.
pub(crate) fn announced_sha256(headers: &HeaderMap) -> Option<Digest> {
    let values = |name: &str| {
        (headers.get_all(name).iter())
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>()
    };
    let mut found = Vec::new();
    for member in values("repr-digest") {
        // A Structured Field dictionary member: `sha-256=:BASE64:` (parameters after `;`).
        let Some((key, value)) = member.split_once('=') else {
            continue;
        };
        let value = value.split(';').next().unwrap_or("").trim();
        if key.trim().eq_ignore_ascii_case("sha-256")
            && let Some(b64) = value.strip_prefix(':').and_then(|v| v.strip_suffix(':'))
        {
            found.push(decode(b64));
        }
    }
    for member in values("digest") {
        if let Some((alg, b64)) = member.split_once('=')
            && alg.trim().eq_ignore_ascii_case("sha-256")
        {
            found.push(decode(b64.trim()));
        }
    }
    let composite = (headers.get("x-amz-checksum-type"))
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("composite"));
    if !composite {
        for value in values("x-amz-checksum-sha256") {
            if !value.contains('-') {
                found.push(decode(value));
            }
        }
    }
    found.extend(linked(headers));
    agreed(&found)
}

/// What a redirect says of the content it leads to: only Hugging Face's `X-Linked-Etag`
/// (the other headers of a redirect describe the redirect itself).
pub(crate) fn linked_sha256(headers: &HeaderMap) -> Option<Digest> {
    agreed(&linked(headers))
}

/// The SHA-256s `X-Linked-Etag` headers carry (None for one that is not a strong tag of
/// 64 hex digits).
fn linked(headers: &HeaderMap) -> Vec<Option<Digest>> {
    (headers.get_all("x-linked-etag").iter())
        .map(|v| {
            let tag = v.to_str().ok()?.trim();
            let hex = tag.strip_prefix('"')?.strip_suffix('"')?;
            if hex.len() != 64 {
                return None;
            }
            format!("sha256:{}", hex.to_ascii_lowercase()).parse().ok()
        })
        .collect()
}

/// The one digest every reading found; none if any was unreadable or they disagree.
pub(crate) fn agreed(found: &[Option<Digest>]) -> Option<Digest> {
    let first = (*found.first()?)?;
    found.iter().all(|d| *d == Some(first)).then_some(first)
}

fn decode(b64: &str) -> Option<Digest> {
    let bytes = STANDARD.decode(b64).ok()?;
    let raw: [u8; 32] = bytes.try_into().ok()?;
    Some(Digest::from_bytes(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn b64(d: &Digest) -> String {
        STANDARD.encode(d.as_bytes())
    }

    #[test]
    fn each_header_that_carries_a_sha256_announces_it() {
        let d = Digest::of(b"model weights");
        let cases = [
            ("repr-digest", format!("sha-256=:{}:", b64(&d))),
            (
                "repr-digest",
                format!("sha-512=:AAAA:, sha-256=:{}:;p=1", b64(&d)),
            ),
            ("digest", format!("SHA-256={}", b64(&d))),
            ("digest", format!("md5=AAAA, sha-256={}", b64(&d))),
            ("x-amz-checksum-sha256", b64(&d)),
            ("x-linked-etag", format!("\"{}\"", d.hex())),
            (
                "x-linked-etag",
                format!("\"{}\"", d.hex().to_ascii_uppercase()),
            ),
        ];
        for (name, value) in cases {
            assert_eq!(
                announced_sha256(&headers(&[(name, &value)])),
                Some(d),
                "{name}: {value}"
            );
        }
    }

    #[test]
    fn nothing_is_announced_by_other_algorithms_parts_or_disagreeing_headers() {
        let d = Digest::of(b"a");
        let e = Digest::of(b"b");
        let none = [
            vec![],
            vec![("repr-digest", "sha-512=:AAAA:".to_string())],
            vec![("repr-digest", format!("sha-256={}", b64(&d)))],
            vec![("repr-digest", "sha-256=:AAAA:".to_string())],
            vec![("digest", "sha-256=not base64!".to_string())],
            vec![("x-amz-checksum-sha256", format!("{}-3", b64(&d)))],
            vec![
                ("x-amz-checksum-sha256", b64(&d)),
                ("x-amz-checksum-type", "COMPOSITE".to_string()),
            ],
            vec![
                ("repr-digest", format!("sha-256=:{}:", b64(&d))),
                ("digest", format!("sha-256={}", b64(&e))),
            ],
            vec![
                ("repr-digest", format!("sha-256=:{}:", b64(&d))),
                ("digest", "sha-256=AAAA".to_string()),
            ],
            // An ETag, even one that looks like a SHA-256, is only an ETag.
            vec![("etag", format!("\"{}\"", d.hex()))],
            // A file kept in git: its blob's SHA-1, not the content's SHA-256.
            vec![("x-linked-etag", format!("\"{}\"", &d.hex()[..40]))],
            // Weak, unquoted or not hex: no claim on the bytes.
            vec![("x-linked-etag", format!("W/\"{}\"", d.hex()))],
            vec![("x-linked-etag", d.hex())],
            vec![("x-linked-etag", format!("\"{}\"", "g".repeat(64)))],
            vec![
                ("x-linked-etag", format!("\"{}\"", d.hex())),
                ("repr-digest", format!("sha-256=:{}:", b64(&e))),
            ],
        ];
        for pairs in none {
            let pairs: Vec<(&'static str, &str)> =
                pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_eq!(announced_sha256(&headers(&pairs)), None, "{pairs:?}");
        }
    }

    #[test]
    fn a_redirect_names_its_target_only_by_x_linked_etag() {
        let d = Digest::of(b"weights");
        let tag = format!("\"{}\"", d.hex());
        assert_eq!(linked_sha256(&headers(&[("x-linked-etag", &tag)])), Some(d));
        // A redirect's Repr-Digest is the redirect's own (empty) body's.
        let repr = format!("sha-256=:{}:", b64(&d));
        assert_eq!(linked_sha256(&headers(&[("repr-digest", &repr)])), None);
    }
}
