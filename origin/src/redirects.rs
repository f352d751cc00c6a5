//! Where a redirect may lead. Registries redirect blob downloads to their storage, and model
//! hosts to CDNs, so redirects are followed; but a redirect is the origin telling this agent
//! where to connect next, and an origin a caller chose (a URL, a registry named by a mirror
//! client) must not be able to point the agent at the services around it. A hop is followed
//! when it:
//! - stays on the host it comes from (any port; never from https down to http), or
//! - goes to https on a public name or address (not `localhost`, loopback, private,
//!   link-local, shared or unspecified addresses), or
//! - goes to a host the configuration trusts: `[origin] redirect_hosts`, and every
//!   `[[origin.registries]]` host and endpoint.
//!
//! A name that resolves to a private address passes the second rule: the check is on what
//! the URL says, not on DNS (see docs/SECURITY notes in OPERATIONS.md).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use reqwest::Url;

use crate::config::OriginConfig;

/// The most hops a request follows.
pub(crate) const MAX_REDIRECTS: usize = 10;

/// The hosts a redirect may always lead to, lower-cased, as `host` (any port) or
/// `host:port`.
#[derive(Debug, Default)]
pub(crate) struct RedirectPolicy {
    trusted: HashSet<String>,
}

impl RedirectPolicy {
    pub(crate) fn new(config: &OriginConfig) -> Self {
        let mut trusted: HashSet<String> = (config.redirect_hosts.iter())
            .map(|h| h.to_ascii_lowercase())
            .collect();
        for registry in &config.registries {
            trusted.insert(registry.host.to_ascii_lowercase());
            let endpoint = registry
                .endpoint
                .as_deref()
                .and_then(|e| Url::parse(e).ok());
            if let Some(url) = endpoint {
                trusted.extend(authority(&url));
            }
        }
        Self { trusted }
    }

    /// Whether the `hop`-th redirect of a request (from 1), `from` → `to`, may be followed:
    /// [`RedirectPolicy::check`], and at most [`MAX_REDIRECTS`] of them. A refusal is logged.
    pub(crate) fn follow(&self, hop: usize, from: &Url, to: &Url) -> Result<(), String> {
        let checked = if hop > MAX_REDIRECTS {
            Err("too many redirects".to_string())
        } else {
            self.check(from, to)
        };
        if let Err(why) = &checked {
            tracing::warn!(to = %crate::http::display_url(to), why, "redirect refused");
        }
        checked
    }

    /// Whether the hop `from` → `to` may be followed; why not if it may not.
    pub(crate) fn check(&self, from: &Url, to: &Url) -> Result<(), String> {
        if !matches!(to.scheme(), "http" | "https") {
            return Err(format!("a redirect to a {} URL is refused", to.scheme()));
        }
        let downgrade = from.scheme() == "https" && to.scheme() == "http";
        let same_host = from.host_str().map(str::to_ascii_lowercase)
            == to.host_str().map(str::to_ascii_lowercase);
        if same_host && !downgrade {
            return Ok(());
        }
        if authority(to).iter().any(|a| self.trusted.contains(a)) {
            return Ok(());
        }
        if to.scheme() == "https" && to.host_str().is_some_and(|h| !internal(h)) {
            return Ok(());
        }
        Err(format!(
            "a redirect from {} to {}://{} is refused (plain http or an internal address on another host): add {:?} to [origin] redirect_hosts to allow it",
            from.host_str().unwrap_or("?"),
            to.scheme(),
            to.host_str().unwrap_or("?"),
            to.host_str().unwrap_or("?"),
        ))
    }
}

/// Follows redirects as [`crate::redirects`] allows, at most
/// [`MAX_REDIRECTS`] hops.
pub(crate) fn reqwest_policy(config: &OriginConfig) -> reqwest::redirect::Policy {
    let policy = RedirectPolicy::new(config);
    reqwest::redirect::Policy::custom(move |attempt| {
        let hop = attempt.previous().len();
        let checked = match attempt.previous().last() {
            Some(from) => policy.follow(hop, from, attempt.url()),
            None => Ok(()),
        };
        match checked {
            Ok(()) => attempt.follow(),
            Err(why) => attempt.error(why),
        }
    })
}

/// `host` and `host:port` of a URL (the port as written or the scheme's default).
fn authority(url: &Url) -> Vec<String> {
    let Some(host) = url.host_str().map(str::to_ascii_lowercase) else {
        return Vec::new();
    };
    let mut out = vec![host.clone()];
    if let Some(port) = url.port_or_known_default() {
        out.push(format!("{host}:{port}"));
    }
    out
}

/// Names and addresses that are the agent's own or its network's rather than the
/// internet's.
/// `host` as a URL gives it: a name, an IPv4 address, or an IPv6 one in brackets.
fn internal(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => internal_v4(ip),
        Ok(IpAddr::V6(ip)) => internal_v6(ip),
        Err(_) => {
            let name = host.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
    }
}

fn internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        // 100.64.0.0/10, carrier-grade NAT and many clusters' pod networks.
        || (a == 100 && (64..128).contains(&b))
        || a == 0
}

fn internal_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return internal_v4(v4);
    }
    let first = ip.segments()[0];
    ip.is_loopback()
        || ip.is_unspecified()
        // fc00::/7 unique local, fe80::/10 link-local.
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RegistryConfig;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn hops() {
        let policy = RedirectPolicy::new(&OriginConfig {
            registries: vec![RegistryConfig {
                host: "harbor.corp".into(),
                endpoint: Some("http://10.1.2.3:8080".into()),
                ..Default::default()
            }],
            redirect_hosts: vec!["minio.corp:9000".into()],
            ..Default::default()
        });
        let registry = url("https://registry.example/v2/x/blobs/sha256:1");
        let ok = |to: &str| policy.check(&registry, &url(to));
        // Public https: storage and CDNs.
        assert!(ok("https://storage.googleapis.com/x").is_ok());
        assert!(ok("https://93.184.216.34/x").is_ok());
        // Internal addresses, plain http elsewhere, other schemes.
        for refused in [
            "http://storage.example/x",
            "https://127.0.0.1/x",
            "https://localhost:8443/x",
            "https://10.0.0.5/x",
            "https://192.168.1.1/x",
            "https://169.254.169.254/latest/meta-data",
            "https://100.64.0.1/x",
            "https://[::1]/x",
            "https://[fd00::1]/x",
            "https://[fe80::1]/x",
            "https://[::ffff:127.0.0.1]/x",
            "https://0.0.0.0/x",
            "file:///etc/passwd",
            "http://registry.example/x",
        ] {
            assert!(ok(refused).is_err(), "{refused} was allowed");
        }
        // The same host, any port; never a downgrade.
        assert!(ok("https://registry.example:8443/x").is_ok());
        let plain = url("http://127.0.0.1:5000/v2/");
        assert!(
            policy
                .check(&plain, &url("http://127.0.0.1:9000/x"))
                .is_ok()
        );
        // Trusted by configuration: redirect_hosts (with its port only), registries and
        // their endpoints.
        assert!(ok("http://minio.corp:9000/x").is_ok());
        assert!(ok("http://minio.corp:9001/x").is_err());
        assert!(ok("http://harbor.corp/x").is_ok());
        assert!(ok("http://10.1.2.3:8080/x").is_ok());
        let err = ok("http://10.9.9.9/x").unwrap_err();
        assert!(err.contains("redirect_hosts"), "{err}");
    }
}
