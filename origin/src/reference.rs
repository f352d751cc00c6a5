//! Image references and the OCI name grammars, after docker/distribution's `reference`
//! package.
//!
//! Written here rather than taken from `oci-spec`'s `distribution::Reference` (0.10), which
//! fails this module's tests: it refuses bracketed IPv6
//! registries (`[::1]:5000/app`), accepts ports of any length (`host:123456/app`), 64-hex
//! image ids as names, and names over 255 characters with their registry (it counts only the
//! repository); it takes an uppercase first component for a Docker Hub namespace
//! (`Myhost/app` becomes `docker.io/Myhost/app`, not registry `Myhost`), accepts non-ASCII
//! tags (`\w` is Unicode) and uppercase digest hex, and says only "invalid reference format".

use std::fmt;
use std::str::FromStr;

use shoal_proto::Digest;

use crate::OriginError;

/// Docker Hub's name in references; short names like `ubuntu` expand to it.
pub const DOCKER_HUB: &str = "docker.io";
/// The longest repository name (and the longest `registry/repository`), as in distribution.
pub const NAME_MAX_LEN: usize = 255;

/// An image reference such as `ghcr.io/org/app:1.2`, `127.0.0.1:5000/app@sha256:…` or
/// `ubuntu`, fully expanded: Docker Hub short names get `docker.io` and `library/`, and a
/// reference with neither tag nor digest gets the tag `latest`. `Display` gives the full form
/// (`docker.io/library/ubuntu:latest`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// Registry host as written, with port: `docker.io`, `localhost:5000`.
    pub registry: String,
    /// Repository path within the registry: `library/ubuntu`.
    pub repository: String,
    /// The tag, if given (or defaulted to `latest`).
    pub tag: Option<String>,
    /// The digest, if given. When both are set the digest is what gets fetched.
    pub digest: Option<Digest>,
}

impl Reference {
    /// What to put after `/manifests/`: the digest if set, else the tag.
    pub fn reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            // Only reachable for a hand-built value; parsing always sets one of the two.
            (None, None) => "latest".to_string(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = OriginError;

    fn from_str(input: &str) -> Result<Self, OriginError> {
        let bad = |why: &str| OriginError::Invalid(format!("image reference {input:?}: {why}"));
        if input.is_empty() {
            return Err(bad("is empty"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, d)) => {
                let digest = d.parse::<Digest>().map_err(|e| bad(&e.to_string()))?;
                (rest, Some(digest))
            }
            None => (input, None),
        };
        // A tag's ':' comes after the last '/'; an earlier ':' is a registry port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&rest[..at], Some(rest[at + 1..].to_string()))
            }
            None => (rest, None),
        };
        if let Some(tag) = &tag {
            validate_tag(tag).map_err(|e| bad(&e.to_string()))?;
        }
        if name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad("a 64-character hex string is an image id, not a name"));
        }
        let (registry, repository) = split_registry(name);
        validate_registry(registry).map_err(|e| bad(&e.to_string()))?;
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository.to_string()
        };
        validate_repository(&repository).map_err(|e| bad(&e.to_string()))?;
        if registry.len() + 1 + repository.len() > NAME_MAX_LEN {
            return Err(bad(&format!(
                "name is longer than {NAME_MAX_LEN} characters"
            )));
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(Self {
            registry: registry.to_string(),
            repository,
            tag,
            digest,
        })
    }
}

/// Splits `name` into registry and repository like distribution's `splitDockerDomain`: the
/// first component is a registry if it contains '.' or ':', is `localhost`, or has uppercase.
fn split_registry(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            let registry = if first == "index.docker.io" {
                DOCKER_HUB
            } else {
                first
            };
            (registry, rest)
        }
        _ => (DOCKER_HUB, name),
    }
}

/// A registry host: DNS labels or an IPv4 address or a bracketed IPv6 address, with an
/// optional `:port`.
pub(crate) fn validate_registry(host: &str) -> Result<(), OriginError> {
    let bad = |why: &str| Err(OriginError::Invalid(format!("registry {host:?}: {why}")));
    let (name, port) = if let Some(v6) = host.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return bad("unclosed '['");
        };
        if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return bad("not an IPv6 address");
        }
        match after {
            "" => return Ok(()),
            _ => match after.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return bad("unexpected text after ']'"),
            },
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (Some(name), Some(port)),
            None => (Some(host), None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return bad("port must be 1 to 5 digits");
        }
    }
    if let Some(name) = name {
        if name.is_empty() {
            return bad("is empty");
        }
        for label in name.split('.') {
            let ok = !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return bad("each dot-separated part must be letters, digits and inner '-'");
            }
        }
    }
    Ok(())
}

/// Checks an OCI repository name: `/`-separated components, each
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, at most 255 characters in all. Rejects empty
/// components, `..`, uppercase and anything that could escape a URL path.
pub fn validate_repository(name: &str) -> Result<(), OriginError> {
    let bad = |why: &str| {
        Err(OriginError::Invalid(format!(
            "repository name {name:?}: {why}"
        )))
    };
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > NAME_MAX_LEN {
        return bad(&format!("is longer than {NAME_MAX_LEN} characters"));
    }
    for component in name.split('/') {
        if !is_path_component(component.as_bytes()) {
            return bad(
                "each '/'-separated part must be lowercase letters and digits, \
                 joined by '.', '_', '__' or dashes",
            );
        }
    }
    Ok(())
}

fn is_path_component(c: &[u8]) -> bool {
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    loop {
        // A run of [a-z0-9]+ ...
        let start = i;
        while i < c.len() && alnum(&c[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == c.len() {
            return true;
        }
        // ... then a separator: '.', '_', '__' or '-'+.
        match c[i] {
            b'.' => i += 1,
            b'_' => i += if c.get(i + 1) == Some(&b'_') { 2 } else { 1 },
            b'-' => {
                while c.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

/// Checks a tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), OriginError> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 128
        && word(bytes[0])
        && bytes[1..]
            .iter()
            .all(|&b| word(b) || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(OriginError::Invalid(format!(
            "tag {tag:?}: must be 1 to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn parse(s: &str) -> Reference {
        s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn expands_docker_hub_names() {
        let r = parse("ubuntu");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/ubuntu");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.digest, None);
        assert_eq!(r.to_string(), "docker.io/library/ubuntu:latest");
        assert_eq!(r.reference(), "latest");

        assert_eq!(
            parse("bitnami/redis:7").to_string(),
            "docker.io/bitnami/redis:7"
        );
        assert_eq!(
            parse("docker.io/ubuntu:22.04").to_string(),
            "docker.io/library/ubuntu:22.04"
        );
        assert_eq!(
            parse("index.docker.io/library/ubuntu").to_string(),
            "docker.io/library/ubuntu:latest"
        );
    }

    #[test]
    fn registry_is_first_component_with_dot_colon_or_localhost() {
        let r = parse("127.0.0.1:5000/team/app:v1");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "team/app", Some("v1"))
        );
        let r = parse("localhost/app");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("localhost", "app")
        );
        let r = parse("localhost:5000/app");
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let r = parse("ghcr.io/org/app");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("ghcr.io", "org/app")
        );
        // No dot, colon or "localhost": a Docker Hub namespace, not a registry.
        let r = parse("myhost/app");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "myhost/app")
        );
        let r = parse("[::1]:5000/app:1");
        assert_eq!(r.registry, "[::1]:5000");
    }

    #[test]
    fn digests_and_tags() {
        let r = parse(&format!("ghcr.io/org/app@{D}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.unwrap().to_string(), D);
        assert_eq!(r.reference(), D);
        assert_eq!(r.to_string(), format!("ghcr.io/org/app@{D}"));

        let r = parse(&format!("ubuntu:22.04@{D}"));
        assert_eq!(r.tag.as_deref(), Some("22.04"));
        assert_eq!(r.reference(), D, "the digest wins over the tag");
        assert_eq!(r.to_string(), format!("docker.io/library/ubuntu:22.04@{D}"));
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "",
            "Ubuntu",
            "ubuntu:",
            "ubuntu:-x",
            "ubuntu@sha256:abc",
            "ubuntu@md5:abc",
            "ghcr.io/",
            "ghcr.io//app",
            "ghcr.io/../app",
            "ghcr.io/App",
            "-bad.io/app",
            "host:port/app",
            "host:123456/app",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "a b",
        ] {
            let err = bad.parse::<Reference>().expect_err(bad);
            assert!(matches!(err, OriginError::Invalid(_)), "{bad:?}: {err}");
        }
        let long = format!("ghcr.io/{}", "a".repeat(250));
        assert!(long.parse::<Reference>().is_err());
    }

    #[test]
    fn repository_grammar() {
        for ok in ["a", "library/ubuntu", "a.b_c__d---e/f0", "x/y/z", "0"] {
            validate_repository(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for bad in [
            "", "..", "a/..", "a//b", "/a", "a/", "A", "a_", "a___b", ".a", "a..b", "a b", "a%2fb",
            "a?b",
        ] {
            assert!(validate_repository(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_repository(&"a".repeat(255)).is_ok());
        assert!(validate_repository(&"a".repeat(256)).is_err());
    }

    #[test]
    fn tag_grammar() {
        for ok in ["latest", "v1.2.3", "_x", "A-b_C.9", &"t".repeat(128)] {
            validate_tag(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", "a b", &"t".repeat(129)] {
            assert!(validate_tag(bad).is_err(), "{bad:?} accepted");
        }
    }
}
