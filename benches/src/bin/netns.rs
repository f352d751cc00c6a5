//! Shoal on real, shaped links against the fabric's floor, one HTTP origin and a BitTorrent
//! swarm, in one run. Every host is a network namespace with its own veth into a bridge,
//! shaped with `tbf` both ways (`shoal_tests::netns`); every role is its own process.
//!
//! Systems, each delivering one blob from host 0 to hosts 1..=N:
//! - `floor`: every host sends the blob's size to the next one over TCP at once (a ring):
//!   what the fabric itself delivers when every link is busy both ways;
//! - `http`: every target GETs the blob from an HTTP server on host 0;
//! - `bt`: aria2c on every host, opentracker on host 0, 1 MiB pieces (mktorrent);
//! - `distribute`: a coordinator and an agent on host 0, an agent on every target, the blob
//!   pushed on host 0, then `shoal distribute --to role=target`;
//! - `pull`: the same cluster, fresh, and every target runs `shoal pull DIGEST -o FILE` at
//!   once (the output a hard link to the store's file: both are on one filesystem here);
//!   `pull-copy` the same with `--copy` (each output a copy of its own);
//! - `pull-url`: the same cluster, fresh, nothing pushed, an HTTP origin on host 0 (GET, HEAD,
//!   ranges), and every target runs `shoal pull http://h0/blob.bin -o FILE` at once (a model
//!   rollout, issue 14); `pull-url-digest` the same with `--digest`; `pull-url-announced`
//!   the same without, from an origin that announces the SHA-256 (`Repr-Digest`);
//!   `distribute-url` a `shoal distribute --from-url` of it;
//! - `containerd-direct` / `containerd-shoal`: a `docker-registry` on host 0 holding a
//!   two-layer image of the blob's size, a containerd on every target, and `ctr images pull`
//!   on every target at once, from the registry or through each host's agent's OCI mirror
//!   (issue 14's deploy; needs docker-registry, skopeo and containerd); `deploy-direct` /
//!   `deploy-shoal` the same with six images sharing a base layer, target `h` pulling image
//!   `(h - 1) % 6`; `containerd-preheated` / `deploy-preheated` through the mirror after
//!   `shoal preheat` put the layers in every target's store (containerd's own cost here: the
//!   floor of the other two). Each also prints when the first layer byte reached each node's
//!   containerd (p50 and max), to set against the direct pull's.
//!
//! Printed per system: makespan, p50 and p99 of the targets' completion times, each as a
//! multiple of the target's own bound (size ÷ its link rate), and CPU seconds per delivered
//! GB (all of the system's processes, counted by a cgroup, over the transfer only; in
//! brackets the whole machine's busy CPU over the same window, which also counts the
//! kernel's work outside those processes: `shoal-sim netns` is calibrated from it). Every
//! copy is checked bit for bit.
//!
//! Needs root, iproute2, aria2, opentracker, mktorrent, and `shoal` built in release:
//! `cargo build --release -p shoal -p shoal-benches && sudo target/release/netns`
//! (`--help` for N, size, rates).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};
use containerd_run::Via;
use sha2::{Digest as _, Sha256};
use shoal_tests::netns::{CpuGroup, Fabric, Usage};

#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    helper: Option<Helper>,
    #[command(flatten)]
    args: Args,
}

#[derive(clap::Args, Debug, Clone)]
struct Args {
    /// Targets (hosts 1..=N); host 0 holds the blob.
    #[arg(long, default_value_t = 8)]
    targets: usize,
    /// Blob size, MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Link rate of every host, Mbit/s, both ways.
    #[arg(long, default_value_t = 200)]
    rate_mbit: u32,
    /// This many targets (the last ones) run at half the rate.
    #[arg(long, default_value_t = 0)]
    slow: usize,
    /// Systems to run, comma-separated: floor,http,bt,distribute,pull,pull-copy,pull-url,
    /// pull-url-digest,pull-url-announced,distribute-url,containerd-direct,containerd-shoal,
    /// containerd-preheated,deploy-direct,deploy-shoal,deploy-preheated.
    #[arg(
        long,
        default_value = "floor,http,bt,distribute,pull,pull-url,pull-url-digest"
    )]
    systems: String,
    /// Also give every agent upload and download limits of this fraction of its link
    /// (0: none, the default: capacity unknown to Shoal, as in most deployments).
    #[arg(long, default_value_t = 0.0)]
    shoal_rate_fraction: f64,
    /// Extra lines for every agent's agent.toml (`\n` separates lines), to try settings.
    #[arg(long, default_value = "")]
    agent_toml: String,
    /// Extra lines for coordinator.toml (`\n` separates lines), to try settings.
    #[arg(long, default_value = "")]
    coordinator_toml: String,
    /// Layers of the containerd systems' image (the blob's size split evenly).
    #[arg(long, default_value_t = 2)]
    layers: u64,
    /// Where the blob, the copies and the logs go (default: a temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The HTTP origin sends each connection at most this many Mbit/s, as object stores
    /// serve each connection at a fraction of a fast host's link (0: no cap).
    #[arg(long, default_value_t = 0)]
    origin_conn_mbit: u64,
}

/// Run inside a host's namespace by the benchmark itself.
#[derive(Subcommand, Debug)]
enum Helper {
    /// Receives `bytes` on `port` (one connection), prints the wall-clock µs it ended.
    #[command(hide = true)]
    Sink { port: u16, bytes: u64 },
    /// Sends `bytes` of zeros to `to`.
    #[command(hide = true)]
    Source { to: SocketAddr, bytes: u64 },
    /// Serves `file` on `port` as a plain origin does: GET and HEAD, single byte ranges,
    /// keep-alive; with `--repr-digest`, announcing that SHA-256 (base64) as RFC 9530's
    /// `Repr-Digest` does.
    #[command(hide = true)]
    Serve {
        port: u16,
        file: PathBuf,
        #[arg(long)]
        repr_digest: Option<String>,
        /// Mbit/s each connection is sent at most (0: no cap).
        #[arg(long, default_value_t = 0)]
        conn_mbit: u64,
    },
    /// GETs `url`'s path from `addr` into `out`, prints the wall-clock µs it ended.
    #[command(hide = true)]
    Get { addr: SocketAddr, out: PathBuf },
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn helper(h: Helper) -> Result<()> {
    match h {
        Helper::Sink { port, bytes } => {
            let listener = TcpListener::bind(("0.0.0.0", port))?;
            println!("listening");
            std::io::stdout().flush()?;
            let (mut s, _) = listener.accept()?;
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0u64;
            while got < bytes {
                let n = s.read(&mut buf)?;
                ensure!(n > 0, "sender closed after {got} bytes");
                got += n as u64;
            }
            println!("{}", wall_us());
        }
        Helper::Source { to, bytes } => {
            let mut s = connect_retry(to)?;
            let buf = vec![0u8; 1 << 20];
            let mut sent = 0u64;
            while sent < bytes {
                let n = (bytes - sent).min(buf.len() as u64) as usize;
                s.write_all(&buf[..n])?;
                sent += n as u64;
            }
            s.shutdown(std::net::Shutdown::Write)?;
            let _ = s.read(&mut [0u8; 1]);
        }
        Helper::Serve {
            port,
            file,
            repr_digest,
            conn_mbit,
        } => {
            let listener = TcpListener::bind(("0.0.0.0", port))?;
            println!("listening");
            std::io::stdout().flush()?;
            let cap = conn_mbit * 125_000;
            for s in listener.incoming() {
                let (mut s, file, sha) = (s?, file.clone(), repr_digest.clone());
                std::thread::spawn(move || {
                    origin::serve_connection(&mut s, &file, sha.as_deref(), cap)
                });
            }
        }
        Helper::Get { addr, out } => {
            let mut s = connect_retry(addr)?;
            s.write_all(format!("GET /blob HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())?;
            let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&out)?);
            let mut buf = vec![0u8; 1 << 20];
            let mut head = Vec::new();
            let mut body_len: Option<u64> = None;
            let mut got = 0u64;
            loop {
                if body_len.is_some_and(|l| got >= l) {
                    break;
                }
                let n = s.read(&mut buf)?;
                ensure!(n > 0, "connection closed after {got} bytes");
                match body_len {
                    Some(_) => {
                        f.write_all(&buf[..n])?;
                        got += n as u64;
                    }
                    None => {
                        head.extend_from_slice(&buf[..n]);
                        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                            let text = String::from_utf8_lossy(&head[..end]).to_lowercase();
                            let len = text
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .context("no content-length")?
                                .trim()
                                .parse()?;
                            body_len = Some(len);
                            f.write_all(&head[end + 4..])?;
                            got = (head.len() - end - 4) as u64;
                        }
                    }
                }
            }
            f.flush()?;
            println!("{}", wall_us());
        }
    }
    Ok(())
}

fn connect_retry(to: SocketAddr) -> Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(to) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {to}")),
        }
    }
}

/// Processes killed on drop.
#[derive(Default)]
struct Procs(Vec<Child>);

impl Procs {
    fn spawn(&mut self, mut c: Command, log: &Path) -> Result<usize> {
        let log = std::fs::File::create(log)?;
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
        self.0.push(c.spawn().context("spawning")?);
        Ok(self.0.len() - 1)
    }

    /// Spawns with stdout and stderr both into `log` (for chatty tools nobody reads).
    fn spawn_logged(&mut self, mut c: Command, log: &Path) -> Result<usize> {
        let file = std::fs::File::create(log)?;
        c.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        self.0.push(c.spawn().context("spawning")?);
        Ok(self.0.len() - 1)
    }

    fn child(&mut self, i: usize) -> &mut Child {
        &mut self.0[i]
    }

    /// The first line the process prints.
    fn line(&mut self, i: usize) -> Result<String> {
        let out = self.0[i].stdout.as_mut().context("no stdout")?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while out.read(&mut byte)? == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What one system did.
struct Outcome {
    /// Seconds from the start to each target's completion, by host.
    done: BTreeMap<usize, f64>,
    /// CPU used from the start of the transfer to its end: by the system's processes, and
    /// by the whole machine (what the simulator's shared CPU is calibrated from).
    used: Usage,
    note: String,
}

struct Bench {
    args: Args,
    fabric: Fabric,
    dir: PathBuf,
    blob: PathBuf,
    sha: [u8; 32],
    size: u64,
    exe: PathBuf,
    shoal: PathBuf,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(h) = cli.helper {
        return helper(h);
    }
    let result = bench(cli.args);
    // Stopped by a signal, the run's processes died of its cleanup, which ends the process.
    shoal_tests::netns::wait_if_signalled();
    result
}

fn bench(args: Args) -> Result<()> {
    ensure!(args.targets >= 1, "--targets must be at least 1");
    ensure!(args.slow <= args.targets, "--slow is more than --targets");
    let hosts = args.targets + 1;
    let total = hosts as f64 * f64::from(args.rate_mbit) / 1000.0;
    if total > 4.5 {
        eprintln!(
            "warning: (N + 1) × rate = {total:.1} Gbit/s: past about 4.5 on two cores the CPU, not the links, is measured"
        );
    }
    let exe = std::env::current_exe()?;
    let shoal = exe.with_file_name("shoal");
    let systems: Vec<String> = args.systems.split(',').map(str::to_string).collect();
    ensure!(
        shoal.exists()
            || systems
                .iter()
                .all(|s| ["floor", "http", "bt"].contains(&s.as_str())),
        "{} not found: build it with `cargo build --release -p shoal`",
        shoal.display()
    );
    for s in &systems {
        ensure!(
            [
                "floor",
                "http",
                "bt",
                "containerd-direct",
                "containerd-shoal",
                "containerd-preheated",
                "deploy-direct",
                "deploy-shoal",
                "deploy-preheated",
            ]
            .contains(&s.as_str())
                || shoal_run::Mode::of_system(s).is_some(),
            "unknown system {s:?}"
        );
    }
    if systems.iter().any(|s| s == "bt") {
        for tool in ["aria2c", "opentracker", "mktorrent"] {
            ensure!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .stdout(Stdio::null())
                    .status()?
                    .success(),
                "{tool} not found: install it with `apt-get install aria2 opentracker mktorrent`"
            );
        }
    }
    let temp;
    let dir = match &args.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let mut rates = vec![args.rate_mbit; hosts];
    for r in rates.iter_mut().skip(hosts - args.slow) {
        *r /= 2;
    }
    shoal_tests::netns::clean_up_on_signal()?;
    let fabric = Fabric::new(&rates)?;
    let size = args.size_mib << 20;
    let blob = dir.join("blob");
    let sha = write_blob(&blob, size)?;
    let bench = Bench {
        args: args.clone(),
        fabric,
        dir: dir.clone(),
        blob,
        sha,
        size,
        exe,
        shoal,
    };
    println!(
        "{} targets, {} MiB, {} Mbit/s{}; bound {:.2} s (size ÷ link)",
        args.targets,
        args.size_mib,
        args.rate_mbit,
        if args.slow > 0 {
            format!(", {} targets at half rate", args.slow)
        } else {
            String::new()
        },
        size as f64 / bench.fabric.rate_bytes(1)
    );
    println!(
        "\n| system | makespan × bound | p50 × bound | p99 × bound | CPU s per delivered GB: its processes (the machine) | note |"
    );
    println!("|---|---|---|---|---|---|");
    for system in &systems {
        let outcome = match system.as_str() {
            "floor" => bench.floor(),
            "http" => bench.http(),
            "bt" => bench.bittorrent(),
            "containerd-direct" => bench.containerd(Via::Direct, false),
            "containerd-shoal" => bench.containerd(Via::Shoal, false),
            "containerd-preheated" => bench.containerd(Via::Preheated, false),
            "deploy-direct" => bench.containerd(Via::Direct, true),
            "deploy-shoal" => bench.containerd(Via::Shoal, true),
            "deploy-preheated" => bench.containerd(Via::Preheated, true),
            shoal => match shoal_run::Mode::of_system(shoal) {
                Some(mode) => bench.shoal(mode),
                None => Err(anyhow::anyhow!("unknown system {shoal}")),
            },
        };
        match outcome {
            Ok(o) => println!("{}", bench.row(system, &o)),
            Err(e) => println!("| {system} | failed: {e:#} | | | | |"),
        }
    }
    Ok(())
}

/// Writes `size` pseudo-random bytes; their SHA-256.
fn write_blob(path: &Path, size: u64) -> Result<[u8; 32]> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(size);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        hash.update(&buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(hash.finalize().into())
}

fn sha_of(path: &Path) -> Result<[u8; 32]> {
    let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    Ok(hash.finalize().into())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Bench {
    fn targets(&self) -> std::ops::RangeInclusive<usize> {
        1..=self.args.targets
    }

    fn bound(&self, host: usize) -> f64 {
        self.size as f64 / self.fabric.rate_bytes(host)
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    fn row(&self, system: &str, o: &Outcome) -> String {
        let mut ratios: Vec<f64> = (o.done.iter()).map(|(h, t)| t / self.bound(*h)).collect();
        ratios.sort_by(f64::total_cmp);
        if ratios.len() < self.args.targets {
            return format!(
                "| {system} | incomplete: {} of {} | | | | {} |",
                ratios.len(),
                self.args.targets,
                o.note
            );
        }
        let delivered_gb = (self.args.targets as u64 * self.size) as f64 / 1e9;
        let mut note = o.note.clone();
        if self.args.slow > 0 {
            let fast = self.args.targets - self.args.slow;
            let worst_fast = (o.done.iter())
                .filter(|(h, _)| **h <= fast)
                .map(|(h, t)| t / self.bound(*h))
                .fold(0.0, f64::max);
            note = format!("fast hosts ≤ {worst_fast:.2}× their bound; {note}");
        }
        format!(
            "| {system} | {:.2} | {:.2} | {:.2} | {:.1} ({:.1}) | {note} |",
            ratios[ratios.len() - 1],
            percentile(&ratios, 50.0),
            percentile(&ratios, 99.0),
            o.used.group / delivered_gb,
            o.used.machine / delivered_gb,
        )
    }

    /// Waits for helpers that print their end time, returns seconds since `t0` per host.
    fn ends(
        &self,
        procs: &mut Procs,
        by_host: &[(usize, usize)],
        t0: u64,
    ) -> Result<BTreeMap<usize, f64>> {
        let mut done = BTreeMap::new();
        for &(host, p) in by_host {
            let line = procs.line(p)?;
            let end: u64 = line
                .trim()
                .parse()
                .with_context(|| format!("host {host} printed {line:?}"))?;
            done.insert(host, end.saturating_sub(t0) as f64 / 1e6);
        }
        Ok(done)
    }

    fn floor(&self) -> Result<Outcome> {
        let cpu = CpuGroup::new("floor")?;
        let mut procs = Procs::default();
        let hosts = self.fabric.hosts();
        let mut sinks = Vec::new();
        for h in 0..hosts {
            let mut c = self.fabric.command(h, &self.exe);
            c.args(["sink", "5001", &self.size.to_string()]);
            let c = cpu.wrap(c);
            let p = procs.spawn(c, &self.log(&format!("floor-sink-{h}")))?;
            ensure!(
                procs.line(p)? == "listening",
                "sink on host {h} did not start"
            );
            sinks.push((h, p));
        }
        let before = cpu.usage()?;
        let t0 = wall_us();
        for h in 0..hosts {
            let to = SocketAddr::new(self.fabric.ip((h + 1) % hosts).into(), 5001);
            let mut c = self.fabric.command(h, &self.exe);
            c.args(["source", &to.to_string(), &self.size.to_string()]);
            let c = cpu.wrap(c);
            procs.spawn(c, &self.log(&format!("floor-source-{h}")))?;
        }
        let mut done = self.ends(&mut procs, &sinks, t0)?;
        done.remove(&0);
        let used = cpu.usage()? - before;
        drop(procs);
        Ok(Outcome {
            done,
            used,
            note: "every host sends and receives at once".into(),
        })
    }

    fn http(&self) -> Result<Outcome> {
        let cpu = CpuGroup::new("http")?;
        let mut procs = Procs::default();
        let mut c = self.fabric.command(0, &self.exe);
        c.args(["serve", "8080"]).arg(&self.blob);
        c.args(["--conn-mbit", &self.args.origin_conn_mbit.to_string()]);
        let c = cpu.wrap(c);
        let server = procs.spawn(c, &self.log("http-server"))?;
        ensure!(
            procs.line(server)? == "listening",
            "HTTP server did not start"
        );
        let before = cpu.usage()?;
        let t0 = wall_us();
        let mut gets = Vec::new();
        let addr = SocketAddr::new(self.fabric.ip(0).into(), 8080);
        for h in self.targets() {
            let out = self.dir.join(format!("http-{h}"));
            let mut c = self.fabric.command(h, &self.exe);
            c.args(["get", &addr.to_string()]).arg(&out);
            let c = cpu.wrap(c);
            gets.push((h, procs.spawn(c, &self.log(&format!("http-get-{h}")))?));
        }
        let done = self.ends(&mut procs, &gets, t0)?;
        let used = cpu.usage()? - before;
        drop(procs);
        self.check_copies("http")?;
        Ok(Outcome {
            done,
            used,
            note: "every target from one server".into(),
        })
    }

    fn check_copies(&self, prefix: &str) -> Result<()> {
        for h in self.targets() {
            let copy = self.dir.join(format!("{prefix}-{h}"));
            ensure!(
                sha_of(&copy)? == self.sha,
                "host {h}'s copy differs ({prefix})"
            );
            let _ = std::fs::remove_file(copy);
        }
        Ok(())
    }

    fn bittorrent(&self) -> Result<Outcome> {
        let bt = self.dir.join("bt");
        let _ = std::fs::remove_dir_all(&bt);
        std::fs::create_dir_all(bt.join("seed"))?;
        std::fs::hard_link(&self.blob, bt.join("seed/blob"))
            .or_else(|_| std::fs::copy(&self.blob, bt.join("seed/blob")).map(|_| ()))?;
        let tracker = format!("http://{}:6969/announce", self.fabric.ip(0));
        let torrent = bt.join("blob.torrent");
        let made = Command::new("mktorrent")
            .args(["-l", "20", "-a", &tracker, "-o"])
            .arg(&torrent)
            .arg(bt.join("seed/blob"))
            .output()?;
        ensure!(
            made.status.success(),
            "mktorrent: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        // Debian's opentracker serves only whitelisted torrents.
        let shown = Command::new("aria2c").arg("-S").arg(&torrent).output()?;
        let info_hash = String::from_utf8_lossy(&shown.stdout)
            .lines()
            .find_map(|l| l.trim().strip_prefix("Info Hash: ").map(str::to_string))
            .context("aria2c -S printed no info hash")?;
        std::fs::write(bt.join("whitelist"), format!("{info_hash}\n"))?;
        let hook = bt.join("done.sh");
        std::fs::write(&hook, "#!/bin/sh\ndate +%s%6N > \"$3.done\"\n")?;
        std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;

        let cpu = CpuGroup::new("bt")?;
        let mut procs = Procs::default();
        let mut c = self.fabric.command(0, "opentracker");
        c.args([
            "-i",
            &self.fabric.ip(0).to_string(),
            "-p",
            "6969",
            "-P",
            "6969",
            "-w",
            "whitelist",
            "-d",
        ])
        .arg(&bt);
        let c = cpu.wrap(c);
        procs.spawn(c, &self.log("bt-tracker"))?;
        let aria = |h: usize, dir: &Path| {
            let mut c = self.fabric.command(h, "aria2c");
            c.arg(format!("--dir={}", dir.display()))
                .args([
                    "--seed-ratio=0.0",
                    "--enable-dht=false",
                    "--enable-dht6=false",
                    "--bt-enable-lpd=false",
                    "--disable-ipv6=true",
                    "--summary-interval=0",
                    "--console-log-level=warn",
                    "--file-allocation=none",
                    "--bt-seed-unverified=true",
                    "--listen-port=6881",
                    "--bt-max-peers=0",
                ])
                .arg(format!("--on-bt-download-complete={}", hook.display()))
                .arg(&torrent);
            c
        };
        let c = aria(0, &bt.join("seed"));
        let c = cpu.wrap(c);
        procs.spawn(c, &self.log("bt-seed"))?;
        std::thread::sleep(Duration::from_millis(500));
        let before = cpu.usage()?;
        let t0 = wall_us();
        for h in self.targets() {
            let dir = bt.join(format!("h{h}"));
            std::fs::create_dir_all(&dir)?;
            let c = aria(h, &dir);
            let c = cpu.wrap(c);
            procs.spawn(c, &self.log(&format!("bt-{h}")))?;
        }
        let deadline = Instant::now() + Duration::from_secs_f64(self.bound(1) * 20.0 + 60.0);
        let mut done = BTreeMap::new();
        while done.len() < self.args.targets {
            ensure!(Instant::now() < deadline, "BitTorrent did not finish");
            for h in self.targets() {
                let mark = bt.join(format!("h{h}/blob.done"));
                if let Ok(text) = std::fs::read_to_string(&mark) {
                    if let Ok(end) = text.trim().parse::<u64>() {
                        done.entry(h).or_insert(end.saturating_sub(t0) as f64 / 1e6);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let used = cpu.usage()? - before;
        drop(procs);
        for h in self.targets() {
            let copy = bt.join(format!("h{h}/blob"));
            ensure!(
                sha_of(&copy)? == self.sha,
                "host {h}'s BitTorrent copy differs"
            );
        }
        let _ = std::fs::remove_dir_all(&bt);
        Ok(Outcome {
            done,
            used,
            note: "aria2c + opentracker, 1 MiB pieces".into(),
        })
    }
}

#[path = "netns/containerd_run.rs"]
mod containerd_run;
#[path = "netns/origin.rs"]
mod origin;
#[path = "netns/shoal_run.rs"]
mod shoal_run;
