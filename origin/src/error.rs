//! What can go wrong talking to an origin.

use shoal_proto::Digest;

/// Why an origin request failed. Every message names the URL it concerns (without its query,
/// which may carry a signature) and, where there was one, the HTTP status; none contains a
/// credential or token.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    /// The origin answered 404 Not Found (or the image has no manifest for a platform).
    #[error("not found: {0}")]
    NotFound(String),
    /// The origin answered 401 or 403 even after the token or basic-auth flow, or the token
    /// endpoint refused the configured credentials.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// Any other non-success status. `message` names the URL and includes the registry's own
    /// error text when it sent an OCI `{"errors":[...]}` body.
    #[error("upstream answered {status}: {message}")]
    Upstream { status: u16, message: String },
    /// The request never got a usable answer: DNS, connect, TLS, timeout, or the body broke off
    /// (including a body shorter than its `Content-Length`).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// A manifest (or other bounded document) is larger than the configured limit.
    #[error("{what} is larger than the {limit}-byte limit")]
    TooLarge { what: String, limit: u64 },
    /// Bad input (reference, repository name, tag, URL, range) or a malformed manifest.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Content did not hash to the digest it was requested or announced by.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
}
