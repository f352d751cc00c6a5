//! The benchmark's HTTP origin: GET and HEAD of one file, single byte ranges, keep-alive,
//! an nginx-style strong ETag, optionally RFC 9530's `Repr-Digest` and a per-connection
//! rate cap (as object stores serve each connection).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;

/// Answers the requests of one client connection until it closes, each body at most `cap`
/// bytes per second (0: as fast as the connection goes).
pub(super) fn serve_connection(
    s: &mut TcpStream,
    file: &Path,
    repr_digest: Option<&str>,
    cap: u64,
) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // The whole head, or closing with part of it unread resets the connection and the
        // client loses the end of the body.
        let end = loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            pending.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&pending[..end]).to_lowercase();
        pending.drain(..end + 4);
        let head_only = head.starts_with("head ");
        let mut f = std::fs::File::open(file)?;
        let len = f.metadata()?.len();
        let range = head
            .lines()
            .find_map(|l| l.strip_prefix("range:"))
            .and_then(|r| r.trim().strip_prefix("bytes="))
            .and_then(|r| {
                let (a, b) = r.split_once('-')?;
                let a: u64 = a.parse().ok()?;
                let b: u64 = if b.is_empty() {
                    len.checked_sub(1)?
                } else {
                    b.parse().ok()?
                };
                (a <= b && b < len).then_some((a, b))
            });
        let (status, first, count) = match range {
            Some((a, b)) => ("206 Partial Content", a, b - a + 1),
            None => ("200 OK", 0, len),
        };
        // A strong ETag from the file's mtime and length, as nginx makes it.
        let mtime = (f.metadata()?.modified()?)
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        write!(
            s,
            "HTTP/1.1 {status}\r\nContent-Length: {count}\r\nAccept-Ranges: bytes\r\nETag: \"{mtime:x}-{len:x}\"\r\n"
        )?;
        if range.is_some() {
            write!(
                s,
                "Content-Range: bytes {first}-{}/{len}\r\n",
                first + count - 1
            )?;
        }
        if let Some(sha) = repr_digest {
            write!(s, "Repr-Digest: sha-256=:{sha}:\r\n")?;
        }
        write!(s, "\r\n")?;
        if !head_only {
            f.seek(SeekFrom::Start(first))?;
            send_paced(&mut f.take(count), s, cap)?;
        }
    }
}

/// Copies `from` to `to`, at most `cap` bytes per second (0: no cap).
fn send_paced(from: &mut impl Read, to: &mut TcpStream, cap: u64) -> Result<()> {
    if cap == 0 {
        std::io::copy(from, to)?;
        return Ok(());
    }
    let start = Instant::now();
    let mut buf = vec![0u8; 64 << 10];
    let mut sent = 0u64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n])?;
        sent += n as u64;
        let due = Duration::from_secs_f64(sent as f64 / cap as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}
