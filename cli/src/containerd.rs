//! `shoal containerd-config`: writes containerd's registry host files
//! (`<dir>/<registry>/hosts.toml`, see containerd's `docs/hosts.md`) so image pulls go
//! through the local agent's OCI mirror first and fall back to the registry itself.
//!
//! containerd reads these files at each pull (with `config_path` set in its CRI registry
//! configuration), so no restart is needed. An existing file keeps what it says (its
//! `server`, a `ca`, client certificates, other mirrors): the mirror becomes its first host.
//! `--remove` takes the mirror out again. `--hold` writes, then waits for SIGTERM or SIGINT
//! and takes the mirror out before exiting: the chart runs it as a sidecar of the agent, so
//! a node whose agent is gone (uninstalled, or between two versions) pulls straight from
//! the registry instead of dialling a dead mirror first.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::serve::ConfigProblem;

/// The agent's OCI mirror on the node.
pub const DEFAULT_MIRROR: &str = "http://127.0.0.1:7403";
/// Where containerd looks for host files by convention.
pub const DEFAULT_DIR: &str = "/etc/containerd/certs.d";

#[derive(clap::Args, Debug)]
pub struct ContainerdArgs {
    /// A registry to pull through the mirror, as images name it (repeatable), e.g.
    /// docker.io, ghcr.io, registry.example:5000.
    #[arg(long = "registry", value_parser = registry_host)]
    registries: Vec<String>,
    /// Also write `_default/hosts.toml`: every registry without its own file.
    #[arg(long)]
    default: bool,
    /// The agent's mirror URL.
    #[arg(long, default_value = DEFAULT_MIRROR, value_parser = mirror_url)]
    mirror: String,
    /// containerd's `config_path` directory.
    #[arg(long, default_value = DEFAULT_DIR)]
    dir: PathBuf,
    /// Take the mirror out of the files instead (what else they say stays; a file with
    /// nothing else is deleted).
    #[arg(long, conflicts_with = "hold")]
    remove: bool,
    /// Write, then wait for SIGTERM or SIGINT and take the mirror out again before exiting
    /// (a sidecar that lives as long as the agent).
    #[arg(long)]
    hold: bool,
}

/// Writes one file per registry (and `_default` with `--default`), printing each path;
/// with `--hold`, takes them out again at SIGTERM or SIGINT.
pub async fn run(mut args: ContainerdArgs) -> Result<()> {
    if args.registries.is_empty() && !args.default {
        return Err(ConfigProblem(
            "containerd-config: give at least one --registry, or --default".into(),
        )
        .into());
    }
    if !args.hold {
        return apply(&args);
    }
    use tokio::signal::unix::{SignalKind, signal};
    // Installed before the files are written: a signal from then on is not lost.
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    apply(&args)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    args.remove = true;
    apply(&args)
}

/// Writes (or with `--remove`, takes the mirror out of) each file, printing each path.
fn apply(args: &ContainerdArgs) -> Result<()> {
    let mut namespaces: Vec<Option<&str>> = args.registries.iter().map(|r| Some(&**r)).collect();
    if args.default {
        namespaces.push(None);
    }
    for namespace in namespaces {
        let name = namespace.unwrap_or("_default");
        let path = args.dir.join(name).join("hosts.toml");
        let existing = match std::fs::read_to_string(&path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if args.remove {
            match existing.map(|text| without_mirror(&text, &args.mirror)) {
                Some(Some(rest)) => write_atomically(&path, &rest)?,
                Some(None) => std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?,
                None => continue,
            }
        } else {
            let text = match &existing {
                Some(text) => merged(text, namespace, &args.mirror),
                None => hosts_toml(namespace, &args.mirror),
            };
            write_atomically(&path, &text)?;
        }
        println!("{}", path.display());
    }
    Ok(())
}

/// The header of a `[host."URL"]` table (or one of its subtables) that names `mirror`.
fn is_mirror_header(line: &str, mirror: &str) -> bool {
    let t = line.trim();
    let Some(inner) = t.strip_prefix('[').and_then(|r| r.split(']').next()) else {
        return false;
    };
    let inner = inner.trim();
    [format!("host.\"{mirror}\""), format!("host.'{mirror}'")]
        .iter()
        .any(|h| inner == h || inner.starts_with(&format!("{h}.")))
}

fn is_header(line: &str) -> bool {
    line.trim_start().starts_with('[')
}

/// `text` without the tables of `mirror` and without this tool's comment lines.
fn strip_mirror(text: &str, mirror: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut skipping = false;
    for line in text.lines() {
        if is_header(line) {
            skipping = is_mirror_header(line, mirror);
        }
        if !skipping && !line.starts_with(COMMENT_PREFIX) {
            out.push(line.to_string());
        }
    }
    while out.last().is_some_and(|l| l.trim().is_empty()) {
        out.pop();
    }
    out
}

/// An existing file with the mirror added as its first host: what it already says (its
/// `server`, a `ca`, client certificates, other mirrors, which containerd tries after ours)
/// is kept. A file without `server` gets the registry's.
pub fn merged(existing: &str, registry: Option<&str>, mirror: &str) -> String {
    let lines = strip_mirror(existing, mirror);
    let first_table = lines
        .iter()
        .position(|l| is_header(l))
        .unwrap_or(lines.len());
    let (top, tables) = lines.split_at(first_table);
    let has_server = top.iter().any(|l| l.trim_start().starts_with("server"));
    let mut out = String::from(HEADER);
    if let (false, Some(registry)) = (has_server, registry) {
        out.push_str(&format!("server = \"https://{}\"\n", upstream(registry)));
    }
    let mut top: Vec<&String> = top.iter().skip_while(|l| l.trim().is_empty()).collect();
    while top.last().is_some_and(|l| l.trim().is_empty()) {
        top.pop();
    }
    for l in top {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str(&mirror_table(mirror));
    if !tables.is_empty() {
        out.push('\n');
        for l in tables {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// The file without the mirror (`shoal containerd-config --remove`); None when nothing of
/// the file's own would be left (it was this tool's): delete it.
pub fn without_mirror(existing: &str, mirror: &str) -> Option<String> {
    let lines = strip_mirror(existing, mirror);
    let own = lines.iter().any(|l| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with('#') && !t.starts_with("server")
    });
    own.then(|| lines.join("\n") + "\n")
}

/// Every line this tool writes that is not the user's starts with this.
const COMMENT_PREFIX: &str = "# Written by `shoal containerd-config`";
const HEADER: &str = "# Written by `shoal containerd-config`: pull through the local Shoal agent's mirror,\n\
                      # Written by `shoal containerd-config`: then the hosts below, then the registry itself.\n";

fn mirror_table(mirror: &str) -> String {
    format!("\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n")
}

/// The `hosts.toml` of one registry namespace (`None`: `_default`). The mirror is the only
/// `[host]`, so containerd tries it first; when it fails containerd falls back to `server`
/// (for `_default`, the registry the image names).
pub fn hosts_toml(registry: Option<&str>, mirror: &str) -> String {
    merged("", registry, mirror)
}

/// The host that serves a registry's API: docker.io's is registry-1.docker.io.
fn upstream(registry: &str) -> &str {
    match registry {
        "docker.io" | "index.docker.io" => "registry-1.docker.io",
        other => other,
    }
}

/// A registry as images name it: a DNS name or IPv4 address, optionally `:port`. Nothing
/// that could leave the directory (`/`, `..`) or that containerd would not match.
pub fn registry_host(s: &str) -> Result<String, String> {
    let bad = |why: &str| Err(format!("registry {s:?}: {why}"));
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if let Some(p) = port {
        if p.parse::<u16>().map_or(true, |p| p == 0) {
            return bad("the port must be a number from 1 to 65535");
        }
    }
    if host.is_empty() || host.len() > 253 {
        return bad("expected a host name like docker.io or registry.example:5000");
    }
    if s.contains("://") || s.contains('/') {
        return bad("give the host only, without scheme or path");
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return bad("not a valid host name (letters, digits, '-' and '.' only)");
        }
    }
    Ok(s.to_ascii_lowercase())
}

/// The mirror must be an http(s) URL with a host.
fn mirror_url(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') && !r.contains(char::is_whitespace) => {
            Ok(s.trim_end_matches('/').to_string())
        }
        _ => Err(format!(
            "mirror {s:?}: expected an http:// or https:// URL with a host"
        )),
    }
}

/// Writes `contents` to `path` through a temporary file in the same directory and a rename,
/// so containerd never reads half a file.
pub fn write_atomically(path: &Path, contents: &str) -> Result<()> {
    let dir = path.parent().context("the file's path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".shoal-config.")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(contents.as_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    // Readable by anyone, like the rest of containerd's configuration.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .with_context(|| format!("setting permissions of {}", tmp.path().display()))?;
    tmp.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names() {
        for ok in [
            "docker.io",
            "ghcr.io",
            "registry.example:5000",
            "10.0.0.1:5000",
            "quay.io",
        ] {
            assert_eq!(registry_host(ok).as_deref(), Ok(ok), "{ok}");
        }
        assert_eq!(registry_host("GHCR.io").as_deref(), Ok("ghcr.io"));
        for bad in [
            "",
            "https://docker.io",
            "docker.io/library",
            "../etc",
            "..",
            "a..b",
            "-bad.io",
            "bad_name.io",
            "host:0",
            "host:99999",
            "host:",
            "with space.io",
            "_default",
        ] {
            let err = registry_host(bad).expect_err(bad);
            assert!(err.starts_with("registry "), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn mirror_urls() {
        assert_eq!(
            mirror_url("http://127.0.0.1:7403/").as_deref(),
            Ok("http://127.0.0.1:7403")
        );
        for bad in ["127.0.0.1:7403", "http://", "ftp://x", "http:///x"] {
            assert!(mirror_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_existing_file_keeps_what_it_says_and_the_mirror_goes_first() {
        let existing = "server = \"https://registry.internal:5000\"\nca = \"/etc/certs/ca.pem\"\n\n\
                        [host.\"https://other-mirror.internal\"]\n  capabilities = [\"pull\"]\n  \
                        client = [\"/etc/certs/c.pem\", \"/etc/certs/c.key\"]\n";
        let text = merged(existing, Some("registry.internal:5000"), DEFAULT_MIRROR);
        assert_eq!(text.matches("server =").count(), 1, "{text}");
        assert!(text.contains("ca = \"/etc/certs/ca.pem\""), "{text}");
        let ours = text
            .find(&format!("[host.\"{DEFAULT_MIRROR}\"]"))
            .expect("ours");
        let theirs = text
            .find("[host.\"https://other-mirror.internal\"]")
            .expect("theirs");
        assert!(ours < theirs, "the mirror is tried first: {text}");
        assert!(text.contains("client = [\"/etc/certs/c.pem\""), "{text}");
        // Written again: the same file, not a second mirror table.
        assert_eq!(
            merged(&text, Some("registry.internal:5000"), DEFAULT_MIRROR),
            text
        );
        // Removed: what the file said before, and nothing of ours.
        let back = without_mirror(&text, DEFAULT_MIRROR).expect("theirs stays");
        assert!(
            !back.contains(DEFAULT_MIRROR) && !back.contains("shoal"),
            "{back}"
        );
        assert!(
            back.contains("other-mirror") && back.contains("ca ="),
            "{back}"
        );
        // A file that was ours alone goes.
        assert_eq!(
            without_mirror(&hosts_toml(Some("ghcr.io"), DEFAULT_MIRROR), DEFAULT_MIRROR),
            None
        );
    }

    #[test]
    fn docker_hub_falls_back_to_its_api_host() {
        let text = hosts_toml(Some("docker.io"), DEFAULT_MIRROR);
        assert!(text.contains("server = \"https://registry-1.docker.io\""));
        let text = hosts_toml(None, DEFAULT_MIRROR);
        assert!(!text.contains("server"), "{text}");
    }
}
