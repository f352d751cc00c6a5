//! A real OCI Distribution registry (the CNCF `distribution` registry, Debian's
//! `docker-registry`) on loopback, started and stopped by a test, and its access log read back
//! so tests can count which requests reached it.
//!
//! ## The access log this registry writes (2.8.2, `log.accesslog.disabled: false`)
//! Each request gives two lines on the process's output:
//! - a logrus line on stderr, `time="…" level=info msg="response completed" … http.request.method=GET
//!   http.request.uri=/v2/…` (its shape follows `log.formatter`, and it is absent below level
//!   info). Ignored here.
//! - an Apache "combined" line on stdout from gorilla/handlers, written once the handler has
//!   returned (so just *after* the client got the last byte):
//!   `127.0.0.1 - - [25/Nov/2026:18:02:51 +0000] "GET /v2/foo/blobs/sha256:… HTTP/1.1" 200 157 "" "containerd/1.6.20~ds1"`
//!   Request line, referer and user agent are quoted with `"` and `\` escaped as `\"` and
//!   `\\`. This is the line [`Registry::access_log`] parses; any line that does not have
//!   exactly this shape is skipped, so interleaved logrus lines are harmless.
//!
//! Because the combined line is written after the response, [`Registry::access_log`] first
//! sends a marker request of its own and waits until that is logged: counts read right after
//! a client finished are complete. The fixture's own requests (readiness, markers,
//! [`http_get`]) carry the user agent [`FIXTURE_USER_AGENT`] and are left out of the counts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::tools;

/// The user agent of every request the fixtures themselves send to a registry; such requests
/// are not in [`Registry::access_log`].
pub const FIXTURE_USER_AGENT: &str = "shoal-tests-fixture";

const START_TIMEOUT: Duration = Duration::from_secs(20);
const LOG_SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// A running registry with filesystem storage in its own temporary directory, listening on
/// plain HTTP on `127.0.0.1:<free port>`. Dropping it kills the process.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    addr: SocketAddr,
    log_path: PathBuf,
    markers_sent: AtomicU64,
    /// Asks for credentials (`GET /v2/` answers 401).
    authenticated: bool,
    // Last: removed after the process is gone (fields drop in order, after `Drop::drop`).
    _dir: tempfile::TempDir,
}

/// One request from the registry's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    pub method: String,
    /// The request target without its query string, e.g. `/v2/app/blobs/sha256:…`.
    pub path: String,
    /// The query string without `?`, if any.
    pub query: Option<String>,
    pub status: u16,
    /// Body bytes written (`-` in the log counts as 0).
    pub bytes: u64,
    pub user_agent: String,
}

impl Registry {
    /// Starts `docker-registry serve` and waits (up to 20 s) until `GET /v2/` answers.
    ///
    /// # Panics
    /// If `docker-registry` is not installed (see [`tools::require`]).
    pub fn start() -> Result<Registry> {
        Registry::start_with_users(&[])
    }

    /// Like [`Registry::start`], with HTTP Basic authentication for these (user, password)
    /// pairs if any: then every request needs one of them (pushes and pulls alike).
    pub fn start_with_users(users: &[(&str, &str)]) -> Result<Registry> {
        let binary = tools::require("/usr/bin/docker-registry", "docker-registry");
        // The port is free when picked but not reserved: another process may take it before
        // the registry binds, so try again on another port if the bind fails.
        let mut last_error = None;
        for _ in 0..3 {
            match Registry::start_on_free_port(&binary, users) {
                Ok(registry) => return Ok(registry),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("three attempts"))
    }

    fn start_on_free_port(binary: &std::path::Path, users: &[(&str, &str)]) -> Result<Registry> {
        let dir = tempfile::Builder::new()
            .prefix("shoal-registry-")
            .tempdir()?;
        let addr = free_loopback_port()?;
        let storage = dir.path().join("storage");
        let config_path = dir.path().join("config.yml");
        let log_path = dir.path().join("registry.log");
        let config = format!(
            r#"version: 0.1
log:
  accesslog:
    disabled: false
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {addr}
  secret: shoal-tests-not-a-secret
"#,
            storage = storage.display(),
        );
        let config = if users.is_empty() {
            config
        } else {
            let htpasswd = dir.path().join("htpasswd");
            let mut lines = String::new();
            for (user, password) in users {
                let hashed = bcrypt::hash(password, 4)?;
                lines.push_str(&format!("{user}:{hashed}\n"));
            }
            std::fs::write(&htpasswd, lines)?;
            format!(
                "{config}auth:\n  htpasswd:\n    realm: shoal-tests\n    path: {}\n",
                htpasswd.display()
            )
        };
        std::fs::write(&config_path, config)?;
        let child = tools::spawn_logged(
            Command::new(binary).arg("serve").arg(&config_path),
            &log_path,
        )?;
        let mut registry = Registry {
            child,
            addr,
            log_path,
            markers_sent: AtomicU64::new(0),
            authenticated: !users.is_empty(),
            _dir: dir,
        };
        registry.wait_ready()?;
        Ok(registry)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "docker-registry exited ({status}) before serving; log tail:\n{}",
                    tools::tail(&self.log(), 30)
                );
            }
            // The port was free when picked, but another test's registry may have taken it
            // meanwhile: only this process's "listening on" line proves the answer is ours.
            let listening = self.log().contains(&format!("listening on {}", self.addr));
            match http_get(&self.host(), "/v2/", &[]) {
                Ok(response) if response.status == 200 && listening => return Ok(()),
                Ok(response) if response.status == 401 && self.authenticated && listening => {
                    return Ok(());
                }
                Ok(_) | Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Ok(response) => bail!(
                    "docker-registry answers GET /v2/ with {} after {START_TIMEOUT:?}; log tail:\n{}",
                    response.status,
                    tools::tail(&self.log(), 30)
                ),
                Err(e) => bail!(
                    "docker-registry does not answer GET /v2/ on {} after {START_TIMEOUT:?} \
                     ({e:#}); log tail:\n{}",
                    self.addr,
                    tools::tail(&self.log(), 30)
                ),
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, the registry part of an image reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Everything the registry wrote so far (logrus lines and access log).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Every client request so far, oldest first, the fixture's own left out. Complete up
    /// to the moment of the call (see the module doc).
    ///
    /// # Panics
    /// If the registry does not log a marker request within 10 s.
    pub fn access_log(&self) -> Vec<AccessLogEntry> {
        let marker = self.send_log_marker();
        let deadline = Instant::now() + LOG_SYNC_TIMEOUT;
        loop {
            let entries = parse_access_log(&self.log());
            if entries.iter().any(|e| e.user_agent == marker) {
                return entries
                    .into_iter()
                    .filter(|e| !e.user_agent.starts_with(FIXTURE_USER_AGENT))
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "registry {} did not log the marker request {marker:?}; log tail:\n{}",
                self.addr,
                tools::tail(&self.log(), 30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn send_log_marker(&self) -> String {
        let n = self.markers_sent.fetch_add(1, Ordering::Relaxed);
        let marker = format!("{FIXTURE_USER_AGENT}/log-marker-{n}");
        if let Err(e) = http_get_as(&self.host(), "/v2/", &[], &marker) {
            panic!(
                "registry {} does not answer: {e:#}; log tail:\n{}",
                self.addr,
                tools::tail(&self.log(), 30)
            );
        }
        marker
    }

    /// How many `GET /v2/<repository>/blobs/<digest>` the registry served (any status;
    /// `HEAD` not counted).
    pub fn blob_gets(&self, repository: &str, digest: &str) -> usize {
        let path = format!("/v2/{repository}/blobs/{digest}");
        self.access_log()
            .iter()
            .filter(|e| e.method == "GET" && e.path == path)
            .count()
    }

    /// How many `GET` or `HEAD` of `/v2/<repository>/manifests/<tag or digest>` it served.
    pub fn manifest_requests(&self, repository: &str) -> usize {
        let prefix = format!("/v2/{repository}/manifests/");
        self.access_log()
            .iter()
            .filter(|e| matches!(e.method.as_str(), "GET" | "HEAD") && e.path.starts_with(&prefix))
            .count()
    }

    /// How many requests came with a user agent containing `substring` (e.g. `containerd`,
    /// `containers/` for skopeo).
    pub fn requests_from_user_agent(&self, substring: &str) -> usize {
        self.access_log()
            .iter()
            .filter(|e| e.user_agent.contains(substring))
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Picks a port that is free on 127.0.0.1 now.
pub fn free_loopback_port() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Parses the combined-format lines of a registry's output; other lines are skipped.
pub fn parse_access_log(log: &str) -> Vec<AccessLogEntry> {
    log.lines().filter_map(parse_combined_line).collect()
}

/// `host ident user [time] "request line" status bytes "referer" "user agent"`
fn parse_combined_line(line: &str) -> Option<AccessLogEntry> {
    let mut rest = line;
    for _ in 0..3 {
        let (field, tail) = rest.split_once(' ')?;
        if field.is_empty() || field.starts_with('"') {
            return None;
        }
        rest = tail;
    }
    let rest = rest.strip_prefix('[')?;
    let (_time, rest) = rest.split_once("] ")?;
    let (request, rest) = quoted(rest)?;
    let rest = rest.strip_prefix(' ')?;
    let (status, rest) = rest.split_once(' ')?;
    let (bytes, rest) = rest.split_once(' ')?;
    let (_referer, rest) = quoted(rest)?;
    let (user_agent, rest) = quoted(rest.strip_prefix(' ')?)?;
    if !rest.is_empty() {
        return None;
    }
    let mut parts = request.splitn(3, ' ');
    let (method, target, _protocol) = (parts.next()?, parts.next()?, parts.next()?);
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_string())),
        None => (target, None),
    };
    Some(AccessLogEntry {
        method: method.to_string(),
        path: path.to_string(),
        query,
        status: status.parse().ok()?,
        bytes: if bytes == "-" { 0 } else { bytes.parse().ok()? },
        user_agent,
    })
}

/// A `"…"` field with `\"` and `\\` unescaped, and what follows it.
fn quoted(s: &str) -> Option<(String, &str)> {
    let s = s.strip_prefix('"')?;
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &s[i + 1..])),
            '\\' => {
                let (_, escaped) = chars.next()?;
                if !matches!(escaped, '"' | '\\') {
                    // Other escapes (\xNN, \n…) are kept as written.
                    value.push('\\');
                }
                value.push(escaped);
            }
            c => value.push(c),
        }
    }
    None
}

/// A response from [`http_get`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A plain-HTTP/1.1 `GET http://<host><path>`, with [`FIXTURE_USER_AGENT`] so the request is
/// not counted in [`Registry::access_log`]. Enough for a loopback registry: one request per
/// connection, `Content-Length` or chunked bodies.
pub fn http_get(host: &str, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
    http_get_as(host, path, headers, FIXTURE_USER_AGENT)
}

fn http_get_as(
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    user_agent: &str,
) -> Result<HttpResponse> {
    let addr: SocketAddr = host
        .parse()
        .with_context(|| format!("{host} is not IP:PORT"))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {user_agent}\r\nConnection: close\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw).with_context(|| format!("GET http://{host}{path}"))
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("response without end of headers")?;
    let head = std::str::from_utf8(&raw[..end]).context("response headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut response = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };
    let body = &raw[end + 4..];
    response.body = if response
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        dechunk(body)?
    } else if let Some(length) = response.header("content-length") {
        let length: usize = length.parse().context("bad Content-Length")?;
        ensure!(
            body.len() >= length,
            "body cut short: {} of {length} bytes",
            body.len()
        );
        body[..length].to_vec()
    } else {
        body.to_vec()
    };
    Ok(response)
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line")?;
        let size_field = std::str::from_utf8(&body[..line_end])?;
        let size_field = size_field.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_field, 16).context("bad chunk size")?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        ensure!(body.len() >= size + 2, "chunk cut short");
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_combined_lines_and_skips_logrus_lines() {
        let log = concat!(
            "time=\"2026-11-25T18:02:51Z\" level=info msg=\"response completed\" http.request.method=GET\n",
            "127.0.0.1 - - [25/Nov/2026:18:02:51 +0000] \"GET /v2/ HTTP/1.1\" 200 2 \"\" \"curl/7.88.1\"\n",
            "127.0.0.1 - - [25/Nov/2026:18:02:51 +0000] \"HEAD /v2/a/b/blobs/sha256:00?x=1 HTTP/1.1\" 404 - \"\" \"my agent \\\"q\\\"\"\n",
        );
        let entries = parse_access_log(log);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].path, "/v2/");
        assert_eq!(entries[0].user_agent, "curl/7.88.1");
        assert_eq!(entries[1].method, "HEAD");
        assert_eq!(entries[1].path, "/v2/a/b/blobs/sha256:00");
        assert_eq!(entries[1].query.as_deref(), Some("x=1"));
        assert_eq!(entries[1].status, 404);
        assert_eq!(entries[1].bytes, 0);
        assert_eq!(entries[1].user_agent, "my agent \"q\"");
    }

    #[test]
    fn decodes_chunked_bodies() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let response = parse_response(raw).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.body, b"abcde");
    }
}
