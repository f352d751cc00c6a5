//! Plumbing shared by registry and URL requests: sending with a header timeout, turning
//! statuses into [`OriginError`]s, and reading bounded bodies.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap};
use reqwest::{Response, StatusCode, Url};

use crate::OriginError;
use crate::body::{Body, BodyParts};

/// How much of an error response is read for its message.
const ERROR_BODY_MAX: u64 = 16 << 10;

/// `scheme://host:port/path` of `url`: no user info, query or fragment, which may carry
/// credentials or signatures. Use this for every URL in an error or log line.
pub(crate) fn display_url(url: &Url) -> String {
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(url.path());
    shown
}

/// A reqwest error and its causes on one line ("error sending request: client error
/// (Connect): tcp connect error: Connection refused"), without the URL reqwest attaches.
pub(crate) fn error_chain(e: reqwest::Error) -> String {
    let timeout = e.is_timeout();
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let part = s.to_string();
        // hyper and reqwest often repeat the inner message in the outer one.
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    if timeout && !text.contains("timed out") {
        text.push_str(" (timed out)");
    }
    text
}

/// Sends `request`, waiting at most `timeout` for the response headers (not the body).
pub(crate) async fn send(
    request: reqwest::RequestBuilder,
    shown_url: &str,
    timeout: Duration,
) -> Result<Response, OriginError> {
    match tokio::time::timeout(timeout, request.send()).await {
        Err(_) => Err(OriginError::Unreachable(format!(
            "{shown_url}: no response within {} ms",
            timeout.as_millis()
        ))),
        Ok(Err(e)) => Err(OriginError::Unreachable(format!(
            "{shown_url}: {}",
            error_chain(e)
        ))),
        Ok(Ok(response)) => Ok(response),
    }
}

/// Passes a success response through; turns anything else into the matching error, with the
/// origin's own explanation if it sent one.
pub(crate) async fn check_status(
    response: Response,
    shown_url: &str,
    idle_timeout: Duration,
) -> Result<Response, OriginError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    Err(status_error(response, shown_url, idle_timeout).await)
}

pub(crate) async fn status_error(
    response: Response,
    shown_url: &str,
    idle_timeout: Duration,
) -> OriginError {
    let status = response.status();
    let detail = error_detail(response, shown_url, idle_timeout).await;
    let message = format!("{shown_url}: {status}{detail}");
    match status {
        StatusCode::NOT_FOUND => OriginError::NotFound(message),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => OriginError::Unauthorized(message),
        _ => OriginError::Upstream {
            status: status.as_u16(),
            message,
        },
    }
}

/// `": CODE: message; CODE: message"` from an OCI `{"errors":[...]}` body, else a short
/// excerpt of a text body, else nothing.
async fn error_detail(response: Response, shown_url: &str, idle_timeout: Duration) -> String {
    let bytes = match read_capped_lenient(response, shown_url, idle_timeout).await {
        Some(b) if !b.is_empty() => b,
        _ => return String::new(),
    };
    #[derive(serde::Deserialize)]
    struct OciErrors {
        errors: Vec<OciError>,
    }
    #[derive(serde::Deserialize)]
    struct OciError {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    if let Ok(parsed) = serde_json::from_slice::<OciErrors>(&bytes) {
        let parts: Vec<String> = parsed
            .errors
            .iter()
            .map(|e| match (e.code.is_empty(), e.message.is_empty()) {
                (false, false) => format!("{}: {}", e.code, e.message),
                (false, true) => e.code.clone(),
                _ => e.message.clone(),
            })
            .filter(|s| !s.is_empty())
            .collect();
        if !parts.is_empty() {
            return format!(": {}", parts.join("; "));
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    let excerpt: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(200)
        .collect();
    if excerpt.is_empty() {
        String::new()
    } else {
        format!(": {excerpt}")
    }
}

/// Reads at most [`ERROR_BODY_MAX`] bytes of an error body; failures just end it.
async fn read_capped_lenient(
    response: Response,
    shown_url: &str,
    idle_timeout: Duration,
) -> Option<Bytes> {
    let mut body = plain_body(response, shown_url, idle_timeout);
    let mut out = BytesMut::new();
    while let Ok(Some(piece)) = body.chunk().await {
        let room = ERROR_BODY_MAX as usize - out.len();
        out.extend_from_slice(&piece[..piece.len().min(room)]);
        if out.len() >= ERROR_BODY_MAX as usize {
            break;
        }
    }
    Some(out.freeze())
}

/// Reads a whole body that must not exceed `limit` bytes: a `Content-Length` over the limit is
/// refused before reading, and reading stops as soon as the limit is passed.
pub(crate) async fn read_capped(
    response: Response,
    shown_url: &str,
    what: &str,
    limit: u64,
    idle_timeout: Duration,
) -> Result<Bytes, OriginError> {
    let too_large = || OriginError::TooLarge {
        what: format!("{what} {shown_url}"),
        limit,
    };
    if content_length(response.headers()).is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = plain_body(response, shown_url, idle_timeout);
    let mut out = BytesMut::new();
    while let Some(piece) = body.chunk().await? {
        if (out.len() + piece.len()) as u64 > limit {
            return Err(too_large());
        }
        out.extend_from_slice(&piece);
    }
    Ok(out.freeze())
}

/// The whole response as a [`Body`], no range handling.
pub(crate) fn plain_body(response: Response, shown_url: &str, idle_timeout: Duration) -> Body {
    let length = content_length(response.headers());
    Body::new(BodyParts {
        etag: header_str(response.headers(), reqwest::header::ETAG),
        response,
        url: shown_url.to_string(),
        len: length,
        partial: false,
        total: length,
        skip: 0,
        content_length: length,
        idle_timeout,
        // Small documents (manifests, tokens), capped in size: the idle timeout bounds them.
        min_rate: None,
    })
}

/// `Content-Length` from the header itself: reqwest's `content_length()` reads the body's
/// size hint, which is 0 for HEAD responses.
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub(crate) fn header_str(
    headers: &HeaderMap,
    name: impl reqwest::header::AsHeaderName,
) -> Option<String> {
    headers
        .get(name)?
        .to_str()
        .ok()
        .map(|s| s.trim().to_string())
}

/// The media type of `Content-Type`, without parameters (`; charset=utf-8`).
pub(crate) fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = header_str(headers, CONTENT_TYPE)?;
    let essence = value.split(';').next().unwrap_or("").trim();
    (!essence.is_empty()).then(|| essence.to_string())
}

/// Parses and checks an absolute `http://` or `https://` URL with a host. Its error never
/// shows the query, which may hold a signature.
pub fn parse_http_url(url: &str) -> Result<Url, OriginError> {
    let parsed = Url::parse(url).map_err(|e| {
        // The raw text may hold a signature; show only what precedes the query.
        let shown = url.split(['?', '#']).next().unwrap_or("");
        OriginError::Invalid(format!("URL {shown:?}: {e}"))
    })?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(OriginError::Invalid(format!(
            "URL {}: must be absolute http:// or https://",
            display_url(&parsed)
        )));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_url_drops_secrets() {
        let u = Url::parse("https://user:pw@s3.example:8443/b/k?X-Amz-Signature=abc#f").unwrap();
        assert_eq!(display_url(&u), "https://s3.example:8443/b/k");
    }

    #[test]
    fn only_absolute_http_urls() {
        assert!(parse_http_url("http://127.0.0.1:1/x").is_ok());
        assert!(parse_http_url("https://h/x?sig=1").is_ok());
        for bad in [
            "ftp://h/x",
            "file:///etc/passwd",
            "/relative",
            "h/x",
            "",
            "unix:/x",
        ] {
            let err = parse_http_url(bad).unwrap_err();
            assert!(matches!(err, OriginError::Invalid(_)), "{bad:?}: {err}");
        }
        let err = parse_http_url("ht tp://h/?secret=1").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
