//! Streaming response bodies and byte ranges.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;

use crate::OriginError;

/// A byte range of a blob or file, as in an HTTP `Range` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte, from 0.
    pub start: u64,
    /// Last byte, inclusive; `None` reads to the end.
    pub end_inclusive: Option<u64>,
}

impl ByteRange {
    /// The `Range` header value: `bytes=0-99` or `bytes=100-`. `Invalid` if the end is before
    /// the start.
    pub fn header_value(&self) -> Result<String, OriginError> {
        match self.end_inclusive {
            Some(end) if end < self.start => Err(OriginError::Invalid(format!(
                "byte range {}-{end} ends before it starts",
                self.start
            ))),
            Some(end) => Ok(format!("bytes={}-{end}", self.start)),
            None => Ok(format!("bytes={}-", self.start)),
        }
    }

    /// The number of bytes in the range, if it has an end.
    pub fn byte_len(&self) -> Option<u64> {
        self.end_inclusive
            .map(|end| end.saturating_sub(self.start) + 1)
    }
}

/// `Content-Range: bytes <first>-<last>/<total or *>` of a 206 response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ContentRange {
    pub(crate) first: u64,
    pub(crate) last: u64,
    pub(crate) total: Option<u64>,
}

pub(crate) fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (span, total) = rest.split_once('/')?;
    let (first, last) = span.trim().split_once('-')?;
    let (first, last) = (first.parse().ok()?, last.parse().ok()?);
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    (first <= last).then_some(ContentRange { first, last, total })
}

/// A response body being streamed from an origin. Read it with [`Body::chunk`] until `None`;
/// nothing is buffered beyond the piece in hand.
///
/// For a ranged request the pieces are exactly the requested range: if the origin ignored
/// `Range` and sent the whole object (`partial == false`), the bytes before the range are read
/// and dropped and the stream stops at the range's end, so such an origin costs bandwidth but
/// never returns wrong bytes.
///
/// The content is not checked against any digest here: a caller fetching a blob must hash it.
pub struct Body {
    /// Bytes this body will yield, when known: the `Content-Length` of the response, or the
    /// range length for a ranged request.
    pub len: Option<u64>,
    /// True when the origin answered 206 Partial Content.
    pub partial: bool,
    /// Size of the whole object, when known (from `Content-Range` or a 200's length).
    pub total: Option<u64>,
    /// The response's `ETag`, if any, as sent (quotes included).
    pub etag: Option<String>,
    response: reqwest::Response,
    /// For display in errors, without query.
    url: String,
    /// Bytes still to drop before the range starts (origin ignored `Range`).
    skip: u64,
    /// Bytes yielded so far.
    yielded: u64,
    /// Bytes the origin still has to send according to its `Content-Length`.
    expected_from_origin: Option<u64>,
    received_from_origin: u64,
    idle_timeout: Duration,
    /// The slowest the body may come, bytes per second over each window (see
    /// `OriginConfig::min_bytes_per_sec`); None: no floor.
    min_rate: Option<(u64, Duration)>,
    /// Bytes received and when, at the start of the current rate window.
    rate_mark: (u64, tokio::time::Instant),
    done: bool,
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Body")
            .field("url", &self.url)
            .field("len", &self.len)
            .field("partial", &self.partial)
            .field("total", &self.total)
            .field("yielded", &self.yielded)
            .finish_non_exhaustive()
    }
}

pub(crate) struct BodyParts {
    pub(crate) response: reqwest::Response,
    pub(crate) url: String,
    pub(crate) len: Option<u64>,
    pub(crate) partial: bool,
    pub(crate) total: Option<u64>,
    pub(crate) etag: Option<String>,
    pub(crate) skip: u64,
    pub(crate) content_length: Option<u64>,
    pub(crate) idle_timeout: Duration,
    pub(crate) min_rate: Option<(u64, Duration)>,
}

impl Body {
    pub(crate) fn new(p: BodyParts) -> Self {
        Self {
            len: p.len,
            partial: p.partial,
            total: p.total,
            etag: p.etag,
            response: p.response,
            url: p.url,
            skip: p.skip,
            yielded: 0,
            expected_from_origin: p.content_length,
            received_from_origin: 0,
            idle_timeout: p.idle_timeout,
            min_rate: p.min_rate,
            rate_mark: (0, tokio::time::Instant::now()),
            done: false,
        }
    }

    /// Fails a body slower than its floor over a whole window: an origin that drips a few
    /// bytes within every idle timeout would otherwise hold its waiters for ever.
    fn check_rate(&mut self) -> Result<(), OriginError> {
        let Some((min, window)) = self.min_rate else {
            return Ok(());
        };
        let (bytes, since) = self.rate_mark;
        let elapsed = since.elapsed();
        if elapsed < window {
            return Ok(());
        }
        let got = self.received_from_origin - bytes;
        if (got as f64) < min as f64 * elapsed.as_secs_f64() {
            self.done = true;
            return Err(OriginError::Unreachable(format!(
                "{}: {got} bytes in the last {} ms, under the floor of {min} bytes/s (origin.min_bytes_per_sec), after {} bytes",
                self.url,
                elapsed.as_millis(),
                self.received_from_origin
            )));
        }
        self.rate_mark = (self.received_from_origin, tokio::time::Instant::now());
        Ok(())
    }

    /// An answer that ignored `Range` (`partial == false`), read from the range's start to
    /// the object's end instead of the range's end: the whole object from a range at 0.
    /// Call before the first [`Body::chunk`]; a partial answer is returned as it is.
    pub fn to_end(mut self) -> Self {
        if !self.partial && self.yielded == 0 && self.received_from_origin == 0 {
            self.len = self
                .expected_from_origin
                .map(|n| n.saturating_sub(self.skip));
        }
        self
    }

    /// The URL this body comes from, without query.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The next piece of the body, `None` at its end. A body that ends before `len` bytes, a
    /// broken connection, or no data for `request_timeout_ms` is an [`OriginError::Unreachable`],
    /// never a silent truncation. After `None` or an error, further calls return `None`.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, OriginError> {
        while !self.done {
            if self.len.is_some_and(|len| self.yielded >= len) {
                self.done = true;
                break;
            }
            let piece = match tokio::time::timeout(self.idle_timeout, self.response.chunk()).await {
                Err(_) => {
                    self.done = true;
                    return Err(OriginError::Unreachable(format!(
                        "{}: no data for {} ms after {} bytes",
                        self.url,
                        self.idle_timeout.as_millis(),
                        self.received_from_origin
                    )));
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(OriginError::Unreachable(format!(
                        "{}: body broke off after {} bytes{}: {}",
                        self.url,
                        self.received_from_origin,
                        self.expected_from_origin
                            .map(|n| format!(" of {n}"))
                            .unwrap_or_default(),
                        crate::http::error_chain(e)
                    )));
                }
                Ok(Ok(piece)) => piece,
            };
            let Some(mut piece) = piece else {
                self.done = true;
                let short = match (self.len, self.expected_from_origin) {
                    (Some(len), _) if self.yielded < len => true,
                    (_, Some(n)) => self.received_from_origin < n,
                    _ => false,
                };
                if short {
                    return Err(OriginError::Unreachable(format!(
                        "{}: body ended after {} of {} bytes",
                        self.url,
                        self.received_from_origin,
                        self.expected_from_origin.or(self.len).unwrap_or_default()
                    )));
                }
                break;
            };
            self.received_from_origin += piece.len() as u64;
            self.check_rate()?;
            if self.skip > 0 {
                let drop = self.skip.min(piece.len() as u64);
                self.skip -= drop;
                piece = piece.slice(drop as usize..);
            }
            if let Some(len) = self.len {
                let room = len - self.yielded;
                if piece.len() as u64 > room {
                    piece.truncate(room as usize);
                }
            }
            if piece.is_empty() {
                continue;
            }
            self.yielded += piece.len() as u64;
            return Ok(Some(piece));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_header_values() {
        let r = |start, end| ByteRange {
            start,
            end_inclusive: end,
        };
        assert_eq!(r(0, Some(99)).header_value().unwrap(), "bytes=0-99");
        assert_eq!(r(100, None).header_value().unwrap(), "bytes=100-");
        assert_eq!(r(7, Some(7)).header_value().unwrap(), "bytes=7-7");
        assert_eq!(r(7, Some(7)).byte_len(), Some(1));
        assert_eq!(r(0, Some(99)).byte_len(), Some(100));
        assert_eq!(r(5, None).byte_len(), None);
        assert!(matches!(
            r(8, Some(7)).header_value(),
            Err(OriginError::Invalid(_))
        ));
    }

    #[test]
    fn content_range_parsing() {
        assert_eq!(
            parse_content_range("bytes 10-19/100"),
            Some(ContentRange {
                first: 10,
                last: 19,
                total: Some(100)
            })
        );
        assert_eq!(
            parse_content_range("bytes 0-0/*"),
            Some(ContentRange {
                first: 0,
                last: 0,
                total: None
            })
        );
        for bad in [
            "bytes */100",
            "bytes 5-4/10",
            "items 0-1/2",
            "bytes 0-x/1",
            "",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad:?}");
        }
    }
}
