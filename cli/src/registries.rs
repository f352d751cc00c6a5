//! `shoal registries-conf`: writes a `containers-registries.conf.d` drop-in so that CRI-O,
//! Podman, Buildah and Skopeo pull the given registries through the local agent's OCI
//! mirror first, then from the registry itself (see `containers-registries.conf(5)`).
//!
//! Those tools send no `?ns=` to a mirror, so the mirror location names the upstream in its
//! path: `127.0.0.1:7403/quay.io`, and the agent's mirror takes a first path component that
//! is a host for the upstream (`mirror.route_by_path`). A port is written `__`
//! (`10.0.0.5__5000`), since a `:` may not appear in a repository path.
//!
//! The file is a drop-in of its own (by default `/etc/containers/registries.conf.d/
//! 50-shoal.conf`): the main `registries.conf` is left as it is. A drop-in's `[[registry]]`
//! replaces an earlier one with the same prefix, so a registry that needs settings of its own
//! (plain HTTP: `--insecure`) gets them here. The Docker daemon has no per-registry mirrors
//! (`registry-mirrors` in `daemon.json` applies to Docker Hub only): see OPERATIONS.md.

use std::path::PathBuf;

use anyhow::Result;

use crate::containerd::{DEFAULT_MIRROR, registry_host, write_atomically};
use crate::serve::ConfigProblem;

/// Where CRI-O and Podman read drop-ins from.
pub const DEFAULT_FILE: &str = "/etc/containers/registries.conf.d/50-shoal.conf";

#[derive(clap::Args, Debug)]
pub struct RegistriesArgs {
    /// A registry to pull through the mirror, as images name it (repeatable), e.g.
    /// docker.io, quay.io, registry.example:5000.
    #[arg(long = "registry", value_parser = registry_host, required = true)]
    registries: Vec<String>,
    /// The agent's mirror URL (http:// makes the mirror entries `insecure`).
    #[arg(long, default_value = DEFAULT_MIRROR)]
    mirror: String,
    /// The registries themselves speak plain HTTP or have no trusted certificate.
    #[arg(long)]
    insecure: bool,
    /// The drop-in file to write.
    #[arg(long, default_value = DEFAULT_FILE)]
    file: PathBuf,
}

pub fn run(args: RegistriesArgs) -> Result<()> {
    let text =
        registries_conf(&args.registries, &args.mirror, args.insecure).map_err(ConfigProblem)?;
    write_atomically(&args.file, &text)?;
    println!("{}", args.file.display());
    Ok(())
}

/// The drop-in's text: one `[[registry]]` per registry with the mirror as its first
/// `[[registry.mirror]]`.
pub fn registries_conf(
    registries: &[String],
    mirror: &str,
    insecure: bool,
) -> Result<String, String> {
    let (mirror_insecure, mirror_host) = match (
        mirror.strip_prefix("http://"),
        mirror.strip_prefix("https://"),
    ) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) => (false, rest),
        _ => {
            return Err(format!(
                "mirror {mirror:?}: expected an http:// or https:// URL"
            ));
        }
    };
    let mirror_host = mirror_host.trim_end_matches('/');
    if mirror_host.is_empty()
        || mirror_host.contains('/')
        || mirror_host.contains(char::is_whitespace)
    {
        return Err(format!(
            "mirror {mirror:?}: expected a URL with a host and no path"
        ));
    }
    let mut out = String::from(
        "# Written by `shoal registries-conf`: CRI-O, Podman, Buildah and Skopeo pull these\n\
         # registries through the local Shoal agent's mirror first, then from the registry.\n",
    );
    for registry in registries {
        out.push_str(&format!(
            "\n[[registry]]\nprefix = \"{registry}\"\nlocation = \"{registry}\"\ninsecure = {insecure}\n\n\
             [[registry.mirror]]\nlocation = \"{mirror_host}/{}\"\ninsecure = {mirror_insecure}\n",
            registry.replace(':', "__")
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_registry_gets_the_mirror_with_its_name_in_the_path() {
        let text = registries_conf(
            &["quay.io".into(), "10.0.0.5:5000".into()],
            "http://127.0.0.1:7403",
            true,
        )
        .expect("text");
        assert!(text.contains("prefix = \"quay.io\""), "{text}");
        assert!(
            text.contains("location = \"127.0.0.1:7403/quay.io\""),
            "{text}"
        );
        assert!(
            text.contains("location = \"127.0.0.1:7403/10.0.0.5__5000\""),
            "{text}"
        );
        assert_eq!(text.matches("insecure = true").count(), 4, "{text}");
        let text = registries_conf(&["quay.io".into()], "https://mirror.local", false).unwrap();
        assert_eq!(text.matches("insecure = false").count(), 2, "{text}");
        assert!(registries_conf(&["quay.io".into()], "127.0.0.1:7403", false).is_err());
        assert!(registries_conf(&["quay.io".into()], "http://x/path", false).is_err());
    }
}
