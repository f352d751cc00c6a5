//! Model files by URL through Shoal: Python's `http.server` as the origin (installed by
//! `scripts/test-all.sh`; missing, it fails the test with the command that installs it) and
//! real `shoal` processes (coordinator and four agents). About 5–15 s each.

#[path = "cluster/harness.rs"]
mod harness;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use harness::{Cluster, read};
use shoal_proto::pb::v1 as pb;

/// Python's http.server on loopback serving `dir`, its request log in a file.
struct HttpServer {
    child: std::process::Child,
    port: u16,
    log: std::path::PathBuf,
}

/// http.server's handler (argv: port, rate, repr, linked, etag): sending bodies at `rate`
/// bytes per second unless it is 0, and announcing `repr` (base64) as the files' SHA-256 in
/// RFC 9530's `Repr-Digest` unless it is empty. With `linked` (hex), as Hugging Face does:
/// `/resolve/F` redirects to `/F`, naming `linked` as its SHA-256 in `X-Linked-Etag` on the
/// redirect only. With `etag` = "fixed", the strong ETag "v1" on every answer (as nginx
/// sends one); with "changed", a file replaced right after every HEAD: the HEAD says "v1",
/// a GET "v2", and a GET with `If-Match` other than "v2" gets 412.
const SERVER: &str = r#"
import http.server, sys, time
rate, repr_digest, linked = float(sys.argv[2]), sys.argv[3], sys.argv[4]
etag = sys.argv[5]
changed = etag == "changed"
class Handler(http.server.SimpleHTTPRequestHandler):
    def redirected(self):
        if not (linked and self.path.startswith("/resolve/")):
            return False
        self.send_response(302)
        self.send_header("Location", self.path[len("/resolve"):])
        self.send_header("X-Linked-Etag", '"%s"' % linked)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True
    def do_HEAD(self):
        if not self.redirected():
            super().do_HEAD()
    def do_GET(self):
        if changed and self.headers.get("If-Match") not in (None, '"v2"'):
            self.send_response(412)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if not self.redirected():
            super().do_GET()
    def end_headers(self):
        if etag == "fixed":
            self.send_header("ETag", '"v1"')
        if changed:
            self.send_header("ETag", '"v1"' if self.command == "HEAD" else '"v2"')
        if repr_digest:
            self.send_header("Repr-Digest", "sha-256=:%s:" % repr_digest)
        super().end_headers()
    def copyfile(self, src, dst):
        while True:
            piece = src.read(65536)
            if not piece:
                break
            dst.write(piece)
            dst.flush()
            if rate:
                time.sleep(len(piece) / rate)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

/// How a test origin names its files' content.
#[derive(Clone, Copy)]
enum Announce {
    Nothing,
    /// RFC 9530's `Repr-Digest` on every answer.
    ReprDigest(shoal_proto::Digest),
    /// Hugging Face's `X-Linked-Etag` on the redirect of `/resolve/F` to `/F`.
    LinkedEtag(shoal_proto::Digest),
    /// Nothing but a strong ETag, as nginx does.
    Etag,
    /// Only a strong ETag, and every file changes (its ETag) right after each HEAD.
    ChangedAfterHead,
}

impl HttpServer {
    fn start(dir: &Path) -> Result<Self> {
        Self::spawn(dir, None, Announce::Nothing)
    }

    /// One that sends bodies at `rate` bytes per second: an origin slower than the agents.
    fn start_throttled(dir: &Path, rate: u64) -> Result<Self> {
        Self::spawn(dir, Some(rate), Announce::Nothing)
    }

    /// One that announces `sha256` as every file's SHA-256 (`Repr-Digest`), at `rate` bytes
    /// per second if given.
    fn start_announcing(
        dir: &Path,
        sha256: &shoal_proto::Digest,
        rate: Option<u64>,
    ) -> Result<Self> {
        Self::spawn(dir, rate, Announce::ReprDigest(*sha256))
    }

    fn spawn(dir: &Path, rate: Option<u64>, announce: Announce) -> Result<Self> {
        let python = shoal_tests::tools::require("python3", "python3");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = dir.join("http.log");
        let mut cmd = Command::new(python);
        let (repr, linked) = match announce {
            Announce::Nothing => (String::new(), String::new()),
            Announce::ReprDigest(d) => {
                use base64::Engine;
                let b64 = base64::engine::general_purpose::STANDARD.encode(d.as_bytes());
                (b64, String::new())
            }
            Announce::LinkedEtag(d) => (String::new(), d.hex()),
            Announce::Etag | Announce::ChangedAfterHead => (String::new(), String::new()),
        };
        let etag = match announce {
            Announce::Etag => "fixed",
            Announce::ChangedAfterHead => "changed",
            _ => "",
        };
        match (rate, announce) {
            (None, Announce::Nothing) => cmd.args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ]),
            (rate, _) => cmd.args([
                "-c",
                SERVER,
                &port.to_string(),
                &rate.unwrap_or(0).to_string(),
                &repr,
                &linked,
                etag,
            ]),
        };
        let child = cmd
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                bail!("http.server did not start: {}", read(&log));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { child, port, log })
    }

    fn gets(&self, path: &str) -> usize {
        read(&self.log)
            .lines()
            .filter(|l| l.contains(&format!("\"GET {path} ")))
            .count()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_file_reaches_four_agents_with_one_upstream_fetch() -> Result<()> {
    let cluster = Cluster::start_configured(4, &[], 10_000, "", "chunk_size = 262144\n").await?;
    let files = tempfile::tempdir()?;
    let model = harness::random_file(files.path(), "model.safetensors", 3 << 20, 11)?;
    let content = std::fs::read(&model)?;
    let digest = shoal_proto::Digest::of(&content).to_string();
    let server = HttpServer::start(files.path())?;
    let url = format!("http://127.0.0.1:{}/model.safetensors", server.port);

    let out = harness::shoal()
        .args(["distribute", &digest, "--from-url", &url, "--to", "all"])
        .args(["--coordinator", &cluster.url()])
        .arg("--ca-file")
        .arg(cluster.ca_file())
        .env("SHOAL_TOKEN", harness::ADMIN_TOKEN)
        .output()?;
    ensure!(
        out.status.success(),
        "distribute failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        read(&cluster.coordinator.log)
    );
    assert_eq!(
        server.gets("/model.safetensors"),
        1,
        "{}",
        read(&server.log)
    );

    // A pull by URL and digest on an agent that holds it: no new fetch, same bytes.
    let dest = files.path().join("pulled");
    let out = harness::shoal()
        .args(["pull", &url, "--digest", &digest, "-o"])
        .arg(&dest)
        .arg("--socket")
        .arg(cluster.agents[3].socket())
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&dest)?, content);
    assert_eq!(server.gets("/model.safetensors"), 1);

    // A URL whose content does not match the digest given: a clear failure, nothing kept.
    let wrong = format!("sha256:{}", "cd".repeat(32));
    let out = harness::shoal()
        .args(["pull", &url, "--digest", &wrong, "-o"])
        .arg(files.path().join("wrong"))
        .arg("--socket")
        .arg(cluster.agents[0].socket())
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hashes to") || err.contains(&digest), "{err}");
    assert!(!files.path().join("wrong").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_agents_pulling_a_url_without_digest_fetch_it_once() -> Result<()> {
    let cluster = Cluster::start_configured(4, &[], 10_000, "", "chunk_size = 262144\n").await?;
    let files = tempfile::tempdir()?;
    let model = harness::random_file(files.path(), "model.bin", 5 << 20, 12)?;
    let content = std::fs::read(&model)?;
    let server = HttpServer::start(files.path())?;
    let url = format!("http://127.0.0.1:{}/model.bin", server.port);
    pull_everywhere(&cluster, &url, None, files.path(), &content)?;
    assert_eq!(server.gets("/model.bin"), 1, "{}", read(&server.log));
    Ok(())
}

/// `shoal pull URL [--digest D] -o out-<i>` on every agent at once; each copy must be
/// `content`.
fn pull_everywhere(
    cluster: &Cluster,
    url: &str,
    digest: Option<&str>,
    dir: &Path,
    content: &[u8],
) -> Result<()> {
    let pulls: Vec<_> = (cluster.agents.iter().enumerate())
        .map(|(i, agent)| {
            let mut cmd = harness::shoal();
            cmd.args(["pull", url]);
            if let Some(d) = digest {
                cmd.args(["--digest", d]);
            }
            cmd.arg("-o")
                .arg(dir.join(format!("out-{i}")))
                .arg("--socket")
                .arg(agent.socket());
            std::thread::spawn(move || cmd.output())
        })
        .collect();
    for (i, p) in pulls.into_iter().enumerate() {
        let out = p.join().expect("pull thread")?;
        ensure!(
            out.status.success(),
            "pull {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            std::fs::read(dir.join(format!("out-{i}")))? == content,
            "pull {i}'s copy differs"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_pulls_by_digest_fetch_from_the_seeder_while_it_seeds() -> Result<()> {
    // An origin slower than the agents, as a registry or model store is for a whole
    // cluster: the first pull seeds the file, and the others fetch its chunks from the
    // seeder (and each other) as they arrive, not after the whole file.
    let cluster = Cluster::start_configured(4, &[], 10_000, "", "chunk_size = 262144\n").await?;
    let files = tempfile::tempdir()?;
    let model = harness::random_file(files.path(), "model.bin", 6 << 20, 13)?;
    let content = std::fs::read(&model)?;
    let digest = shoal_proto::Digest::of(&content).to_string();
    let server = HttpServer::start_throttled(files.path(), 4 << 20)?;
    let url = format!("http://127.0.0.1:{}/model.bin", server.port);
    pull_everywhere(&cluster, &url, Some(&digest), files.path(), &content)?;
    assert_eq!(server.gets("/model.bin"), 1, "{}", read(&server.log));
    all_but_the_seeder_fetched_while_it_seeded(&cluster)
}

/// Every agent but the seeder learned chunk digests from the running seed: it fetched while
/// the seed ran, not after.
fn all_but_the_seeder_fetched_while_it_seeded(cluster: &Cluster) -> Result<()> {
    let streamed: Vec<f64> = (cluster.agents.iter())
        .map(|a| a.metric("shoal_agent_streamed_digests_total"))
        .collect::<Result<_>>()?;
    let joined = streamed.iter().filter(|n| **n > 0.0).count();
    assert_eq!(
        joined,
        cluster.agents.len() - 1,
        "agents that fetched while the seed ran: {streamed:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_without_a_digest_stream_when_the_origin_announces_the_sha256() -> Result<()> {
    // No `--digest`, but the origin names the content (`Repr-Digest`): one agent seeds it
    // and the others fetch its chunks while it seeds, as with `--digest`, instead of
    // waiting for the whole file to learn which blob it is.
    pulls_without_a_digest_stream(Announce::ReprDigest, "/model.bin", 14).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_stream_when_a_redirect_names_the_content_as_hugging_face_does() -> Result<()> {
    // `https://huggingface.co/R/resolve/main/F` answers with a redirect to storage that
    // carries the LFS file's SHA-256 (`X-Linked-Etag`); the storage does not repeat it.
    pulls_without_a_digest_stream(Announce::LinkedEtag, "/resolve/model.bin", 16).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_without_a_digest_stream_under_the_urls_name_when_nothing_is_announced() -> Result<()>
{
    // An origin that says nothing of the content but its strong ETag (nginx): the pulls
    // name it by URL, ETag and size and stream it from one seeder, checked against the table
    // that seeder makes, instead of one agent fetching it whole before the others start.
    pulls_without_a_digest_stream(|_| Announce::Etag, "/model.bin", 17).await
}

/// Four agents pull `path` (no `--digest`) at once from an origin slower than they are
/// that names the content as `announce` does: the origin sends the file once, and every
/// agent but the seeder fetches while the seed runs.
async fn pulls_without_a_digest_stream(
    announce: fn(shoal_proto::Digest) -> Announce,
    path: &str,
    seed: u64,
) -> Result<()> {
    let cluster = Cluster::start_configured(4, &[], 10_000, "", "chunk_size = 262144\n").await?;
    let files = tempfile::tempdir()?;
    let model = harness::random_file(files.path(), "model.bin", 6 << 20, seed)?;
    let content = std::fs::read(&model)?;
    let digest = shoal_proto::Digest::of(&content);
    let server = HttpServer::spawn(files.path(), Some(4 << 20), announce(digest))?;
    let url = format!("http://127.0.0.1:{}{path}", server.port);
    pull_everywhere(&cluster, &url, None, files.path(), &content)?;
    assert_eq!(server.gets("/model.bin"), 1, "{}", read(&server.log));
    all_but_the_seeder_fetched_while_it_seeded(&cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_after_it_was_named_is_never_sent_under_the_old_name() -> Result<()> {
    // The name says ETag "v1"; by the seed's GET the origin has "v2" and refuses the
    // If-Match. Nothing goes out under the old name: every pull ends with the origin's
    // bytes by fetching it as if it could not be named.
    let cluster = Cluster::start_configured(4, &[], 10_000, "", "chunk_size = 262144\n").await?;
    let files = tempfile::tempdir()?;
    let model = harness::random_file(files.path(), "model.bin", 3 << 20, 18)?;
    let content = std::fs::read(&model)?;
    let server = HttpServer::spawn(files.path(), None, Announce::ChangedAfterHead)?;
    let url = format!("http://127.0.0.1:{}/model.bin", server.port);
    pull_everywhere(&cluster, &url, None, files.path(), &content)?;
    let log = read(&server.log);
    assert!(log.contains("\"GET /model.bin HTTP/1.1\" 412"), "{log}");
    let name = shoal_proto::url_name(&url, "\"v1\"", content.len() as u64);
    for held in held_by_each(&cluster).await? {
        assert!(
            !held.contains(&shoal_proto::Digest::naming(&name).to_string()),
            "{held:?}"
        );
    }
    // An agent pulling the URL again remembers that the name failed: no second seed of it,
    // the content comes from its store.
    pull_again_without_the_origin(&cluster, &server, &url, files.path(), &content)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_announcing_a_wrong_sha256_is_pulled_as_if_it_announced_none() -> Result<()> {
    // The announcement is a claim: content that does not match it is never kept under it,
    // and every pull still ends with the origin's true bytes.
    let cluster = Cluster::start_configured(4, &[], 10_000, "", "chunk_size = 262144\n").await?;
    let files = tempfile::tempdir()?;
    let model = harness::random_file(files.path(), "model.bin", 3 << 20, 15)?;
    let content = std::fs::read(&model)?;
    let wrong = shoal_proto::Digest::of(b"not the model");
    let server = HttpServer::start_announcing(files.path(), &wrong, None)?;
    let url = format!("http://127.0.0.1:{}/model.bin", server.port);
    pull_everywhere(&cluster, &url, None, files.path(), &content)?;
    // One seed by the announced digest that failed, then one fetch that named the content
    // (a pull that asked after the failed seed ended may seed the wrong digest once more).
    let gets = server.gets("/model.bin");
    assert!(
        (2..=5).contains(&gets),
        "{gets} GETs: {}",
        read(&server.log)
    );
    // An agent pulling the URL again remembers the announcement was wrong: no new seed of
    // it from the origin, the content comes from the store.
    pull_again_without_the_origin(&cluster, &server, &url, files.path(), &content)?;
    for held in held_by_each(&cluster).await? {
        assert_eq!(
            held,
            vec![shoal_proto::Digest::of(&content).to_string()],
            "what an agent keeps"
        );
    }
    Ok(())
}

/// One more `shoal pull URL` on agent 2 gets `content` without a request to the origin.
fn pull_again_without_the_origin(
    cluster: &Cluster,
    server: &HttpServer,
    url: &str,
    dir: &Path,
    content: &[u8],
) -> Result<()> {
    let gets = server.gets("/model.bin");
    let again = dir.join("again");
    let out = harness::shoal()
        .args(["pull", url, "-o"])
        .arg(&again)
        .arg("--socket")
        .arg(cluster.agents[2].socket())
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&again)?, content);
    assert_eq!(server.gets("/model.bin"), gets, "{}", read(&server.log));
    Ok(())
}

/// The blobs each agent holds, by digest.
async fn held_by_each(cluster: &Cluster) -> Result<Vec<Vec<String>>> {
    let mut all = Vec::new();
    for agent in &cluster.agents {
        let mut c = shoal_agent::local_api::connect(agent.socket()).await?;
        let status = (c.status(pb::StatusRequest {
            include_blobs: true,
        }))
        .await?
        .into_inner();
        all.push(status.blobs.into_iter().map(|b| b.digest).collect());
    }
    Ok(all)
}
