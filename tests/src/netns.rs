//! A shaped network of hosts, each in its own network namespace: one veth per host into a
//! bridge that lives in a namespace of its own, `tbf` on both ends of every veth (the host's
//! upload on its side, its download on the bridge's side). Nothing touches the root
//! namespace's interfaces, and every namespace is deleted on drop, on a signal in a binary
//! that asked for it ([`clean_up_on_signal`]), and, for fabrics whose process died, by the
//! next fabric made.
//!
//! Needs root, `ip` and `tc` (iproute2).

pub mod shoal;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

/// Names of every fabric's namespaces start with this, then the owning process id in hex.
const PREFIX: &str = "shoalfab";

/// A running fabric.
#[derive(Debug)]
pub struct Fabric {
    tag: String,
    rates_mbit: Vec<u32>,
}

/// Fails with how to get what a fabric needs, if anything is missing.
pub fn require() -> Result<()> {
    if !nix_is_root() {
        bail!("network namespaces need root: run this as root");
    }
    for tool in ["ip", "tc"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            bail!("`{tool}` not found: install it with `apt-get install iproute2`");
        }
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
            .unwrap_or(false)
    })
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Deletes the namespaces and CPU groups of fabrics whose process is gone, and kills what
/// still runs in them (a benchmark or test killed by a signal leaves its origins and agents
/// behind).
fn remove_stale() {
    let gone = |owner: u32| !PathBuf::from(format!("/proc/{owner}")).exists();
    remove_fabrics(gone);
    remove_groups(gone);
}

/// Deletes the namespaces of fabrics whose owning process id `doomed` picks, after killing
/// what runs in them.
fn remove_fabrics(doomed: impl Fn(u32) -> bool) {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let owner = rest.split('-').next().unwrap_or("");
        if u32::from_str_radix(owner, 16).is_ok_and(&doomed) {
            kill_inside(name);
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}

/// From now on, a SIGINT, SIGTERM or SIGHUP to this process kills what runs in its fabrics
/// and CPU groups, deletes them, and exits with 128 + the signal's number: a signal ends a
/// process without running its drops, and a benchmark interrupted by hand would otherwise
/// leave its namespaces, agents and origins to the next fabric made. For a binary's `main`
/// (a test harness handles signals its own way).
pub fn clean_up_on_signal() -> Result<()> {
    use nix::sys::signal::Signal;
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    // Registered before this returns, so that no signal from here on is missed.
    let (mut int, mut term, mut hup) = {
        let _entered = runtime.enter();
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        )
    };
    std::thread::Builder::new()
        .name("netns-signals".into())
        .spawn(move || {
            let got = runtime.block_on(async {
                tokio::select! {
                    _ = int.recv() => Signal::SIGINT,
                    _ = term.recv() => Signal::SIGTERM,
                    _ = hup.recv() => Signal::SIGHUP,
                }
            });
            SIGNALLED.store(true, std::sync::atomic::Ordering::SeqCst);
            eprintln!("{got}: removing this run's network namespaces and CPU groups");
            let me = std::process::id();
            remove_fabrics(|owner| owner == me);
            remove_groups(|owner| owner == me);
            std::process::exit(128 + got as i32);
        })?;
    Ok(())
}

/// Set by [`clean_up_on_signal`]'s thread when a signal came, before it kills anything.
static SIGNALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// For the end of a `main` that called [`clean_up_on_signal`]: if a signal came, the
/// run's processes died of its cleanup, which is still under way and ends the process with
/// the signal's status; this waits for that instead of exiting with the run's own.
pub fn wait_if_signalled() {
    if SIGNALLED.load(std::sync::atomic::Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
}

/// SIGKILLs every process in namespace `name`.
fn kill_inside(name: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Fabric {
    /// Hosts `0..rates.len()`, host `i` with a link of `rates[i]` Mbit/s each way, at
    /// 10.77.0.(i+1)/24.
    pub fn new(rates_mbit: &[u32]) -> Result<Fabric> {
        require()?;
        if rates_mbit.is_empty() || rates_mbit.len() > 200 {
            bail!("a fabric has 1 to 200 hosts, not {}", rates_mbit.len());
        }
        remove_stale();
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let fabric = Fabric {
            tag: format!("{:x}-{n}", std::process::id()),
            rates_mbit: rates_mbit.to_vec(),
        };
        // From here on, drop removes whatever was made.
        fabric.build().context("building the network namespaces")?;
        Ok(fabric)
    }

    fn bridge(&self) -> String {
        format!("{PREFIX}{}-br", self.tag)
    }

    /// The namespace of host `i`.
    pub fn ns(&self, i: usize) -> String {
        format!("{PREFIX}{}-h{i}", self.tag)
    }

    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, i as u8 + 1)
    }

    pub fn hosts(&self) -> usize {
        self.rates_mbit.len()
    }

    /// Host `i`'s link rate, bytes per second.
    pub fn rate_bytes(&self, i: usize) -> f64 {
        f64::from(self.rates_mbit[i]) * 125_000.0
    }

    fn build(&self) -> Result<()> {
        let br = self.bridge();
        run(&["ip", "netns", "add", &br])?;
        run(&["ip", "-n", &br, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &br, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &br, "link", "set", "br0", "up"])?;
        for (i, &mbit) in self.rates_mbit.iter().enumerate() {
            let ns = self.ns(i);
            // Short, unique in the root namespace while they pass through it.
            let (vh, vb) = (
                format!("sfh{}{i}", self.tag.replace('-', "")),
                format!("sfb{}{i}", self.tag.replace('-', "")),
            );
            let (vh, vb) = (truncate(&vh), truncate(&vb));
            run(&["ip", "netns", "add", &ns])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            run(&[
                "ip", "link", "add", &vh, "netns", &ns, "type", "veth", "peer", "name", &vb,
                "netns", &br,
            ])?;
            run(&["ip", "-n", &ns, "link", "set", &vh, "name", "eth0"])?;
            let addr = format!("{}/24", self.ip(i));
            run(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &br, "link", "set", &vb, "master", "br0"])?;
            run(&["ip", "-n", &br, "link", "set", &vb, "up"])?;
            shape(&ns, "eth0", mbit)?;
            shape(&br, &vb, mbit)?;
        }
        Ok(())
    }

    /// Takes host `i`'s link down (`up` false: nothing in or out, as a pulled cable) or
    /// brings it back up.
    pub fn set_link(&self, i: usize, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        run(&["ip", "-n", &self.ns(i), "link", "set", "eth0", state])
    }

    /// Partitions hosts `a` from hosts `b` (`cut` false: heals it): every packet between the
    /// two sides is dropped, both ways, while each side still reaches its own hosts, as a
    /// rack whose uplink failed.
    pub fn partition(&self, a: &[usize], b: &[usize], cut: bool) -> Result<()> {
        let verb = if cut { "add" } else { "del" };
        for (&x, &y) in a.iter().flat_map(|x| b.iter().map(move |y| (x, y))) {
            for (from, to) in [(x, y), (y, x)] {
                let dst = format!("{}/32", self.ip(to));
                run(&["ip", "-n", &self.ns(from), "route", verb, "blackhole", &dst])?;
            }
        }
        Ok(())
    }

    /// `program` run in host `i`'s namespace.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i)]).arg(program);
        c
    }

    /// Runs `f` on a thread in host `i`'s namespace: sockets it opens are on that host.
    pub fn run_in<T: Send + 'static>(
        &self,
        i: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        let path = format!("/run/netns/{}", self.ns(i));
        std::thread::spawn(move || -> Result<T> {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns {path}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread in {} panicked", self.ns(i)))?
    }
}

/// Interface names are at most 15 bytes.
fn truncate(name: &str) -> String {
    name.chars().take(15).collect()
}

/// A token bucket on `dev`'s egress: `mbit` with a burst of about 5 ms (at least 32 KiB)
/// and at most 20 ms of queue.
fn shape(ns: &str, dev: &str, mbit: u32) -> Result<()> {
    let rate = u64::from(mbit) * 125_000;
    let burst = (rate / 200).max(32 << 10);
    run(&[
        "tc",
        "-n",
        ns,
        "qdisc",
        "add",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        &format!("{mbit}mbit"),
        "burst",
        &burst.to_string(),
        "latency",
        "20ms",
    ])
}

impl Drop for Fabric {
    fn drop(&mut self) {
        for i in 0..self.rates_mbit.len() {
            let _ = run(&["ip", "netns", "del", &self.ns(i)]);
        }
        let _ = run(&["ip", "netns", "del", &self.bridge()]);
    }
}

/// CPU time of a set of processes, counted by a cgroup (v1 `cpuacct`, else v2): every
/// process started through [`CpuGroup::wrap`] and its children.
#[derive(Debug)]
pub struct CpuGroup {
    dir: PathBuf,
    v2: bool,
}

impl CpuGroup {
    pub fn new(name: &str) -> Result<CpuGroup> {
        let Some((base, v2)) = cgroup_base() else {
            bail!("no cgroup hierarchy to count CPU time in under /sys/fs/cgroup");
        };
        let dir = base.join(format!("{PREFIX}-{:x}-{name}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(CpuGroup { dir, v2 })
    }

    /// `command`, made to join this group before it runs (so all of its CPU time counts):
    /// a shell writes its own pid into the group, then execs the command.
    pub fn wrap(&self, command: Command) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "echo $$ > '{}' && exec \"$@\"",
                self.dir.join("cgroup.procs").display()
            ))
            .arg("sh")
            .arg(command.get_program())
            .args(command.get_args());
        // What the command was given besides its arguments (the client commands' coordinator
        // address, CA and token come in the environment).
        for (key, value) in command.get_envs() {
            match value {
                Some(v) => c.env(key, v),
                None => c.env_remove(key),
            };
        }
        if let Some(dir) = command.get_current_dir() {
            c.current_dir(dir);
        }
        c
    }

    /// CPU seconds used so far, by the group and by the whole machine.
    pub fn usage(&self) -> Result<Usage> {
        Ok(Usage {
            group: self.seconds()?,
            machine: machine_busy_seconds()?,
        })
    }

    /// CPU seconds used so far.
    pub fn seconds(&self) -> Result<f64> {
        if self.v2 {
            let stat = std::fs::read_to_string(self.dir.join("cpu.stat"))?;
            let usec = stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .context("cpu.stat has no usage_usec")?;
            Ok(usec.trim().parse::<f64>()? / 1e6)
        } else {
            let ns = std::fs::read_to_string(self.dir.join("cpuacct.usage"))?;
            Ok(ns.trim().parse::<f64>()? / 1e9)
        }
    }
}

/// CPU seconds used: by a [`CpuGroup`]'s processes, and by the whole machine.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    pub group: f64,
    pub machine: f64,
}

impl std::ops::Sub for Usage {
    type Output = Usage;
    fn sub(self, before: Usage) -> Usage {
        Usage {
            group: self.group - before.group,
            machine: self.machine - before.machine,
        }
    }
}

/// CPU seconds the whole machine has been busy since boot (every core; `/proc/stat`'s user,
/// nice, system, irq, softirq and steal): what a group's figure misses is the kernel's work
/// outside its processes (softirq run by `ksoftirqd`, the bridge, `tbf`).
pub fn machine_busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = (stat.lines())
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    let ticks: Vec<f64> = (line.split_whitespace().skip(1))
        .map(|v| v.parse::<f64>())
        .collect::<Result<_, _>>()
        .context("/proc/stat's cpu line")?;
    ensure!(ticks.len() >= 8, "/proc/stat's cpu line is short: {line:?}");
    // user nice system idle iowait irq softirq steal, in USER_HZ (100 on Linux).
    let busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7];
    Ok(busy / 100.0)
}

/// Where CPU groups are made, and whether it is cgroup v2: v1's `cpuacct` if mounted.
fn cgroup_base() -> Option<(PathBuf, bool)> {
    let v1 = PathBuf::from("/sys/fs/cgroup/cpuacct");
    if v1.join("cpuacct.usage").exists() {
        Some((v1, false))
    } else if PathBuf::from("/sys/fs/cgroup/cgroup.controllers").exists() {
        Some((PathBuf::from("/sys/fs/cgroup"), true))
    } else if PathBuf::from("/sys/fs/cgroup/unified/cgroup.procs").exists() {
        Some((PathBuf::from("/sys/fs/cgroup/unified"), true))
    } else {
        None
    }
}

/// Removes the CPU groups whose owning process id `doomed` picks, after killing what runs
/// in them (a group is removable only once empty).
fn remove_groups(doomed: impl Fn(u32) -> bool) {
    let Some((base, _)) = cgroup_base() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(&base) else {
        return;
    };
    let prefix = format!("{PREFIX}-");
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let owner = rest.split('-').next().unwrap_or("");
        if !u32::from_str_radix(owner, 16).is_ok_and(&doomed) {
            continue;
        }
        let dir = entry.path();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() || std::time::Instant::now() > deadline {
                break;
            }
            for pid in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir(&dir);
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        // Empty once its processes are gone; the caller kills them first.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_fabrics_namespace_goes_with_what_still_runs_in_it() -> Result<()> {
        require()?;
        // The namespace of a fabric whose process is gone (no pid is this high), with a
        // process left running in it, as a benchmark killed by a signal leaves them.
        let name = format!("{PREFIX}7ffffff0-0-h0");
        let _ = run(&["ip", "netns", "del", &name]);
        run(&["ip", "netns", "add", &name])?;
        let mut left = Command::new("ip")
            .args(["netns", "exec", &name, "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while Command::new("ip")
            .args(["netns", "pids", &name])
            .output()?
            .stdout
            .is_empty()
        {
            ensure!(std::time::Instant::now() < deadline, "sleep never started");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        remove_stale();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let status = loop {
            if let Some(status) = left.try_wait()? {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = left.kill();
                bail!("the process left behind still runs");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        ensure!(
            !status.success(),
            "the process left behind ended by itself: {status}"
        );
        let list = Command::new("ip").args(["netns", "list"]).output()?;
        ensure!(
            !String::from_utf8_lossy(&list.stdout).contains(&name),
            "the stale namespace is still there"
        );
        Ok(())
    }
}
