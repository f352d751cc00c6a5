//! Registry authentication: parsing `WWW-Authenticate` challenges and caching bearer tokens.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long a token lives when the token endpoint does not say (`expires_in`), per the Docker
/// token spec.
pub(crate) const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Tokens are dropped this much before they expire so a request does not race the expiry.
const EXPIRY_MARGIN: Duration = Duration::from_secs(5);

/// One challenge from a `WWW-Authenticate` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// Parses the challenges of one `WWW-Authenticate` value (RFC 7235: a scheme then
/// `key=value` or `key="quoted"` parameters; several challenges may share one header).
/// Schemes other than Bearer and Basic, and Bearer without a realm, are left out.
pub(crate) fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out = Vec::new();
    let mut rest = header.trim_start();
    while !rest.is_empty() {
        let scheme_end = rest
            .find(|c: char| c.is_ascii_whitespace() || c == ',')
            .unwrap_or(rest.len());
        let scheme = &rest[..scheme_end];
        rest = rest[scheme_end..].trim_start();
        let mut params: HashMap<String, String> = HashMap::new();
        loop {
            rest = rest.trim_start_matches(|c: char| c == ',' || c.is_ascii_whitespace());
            // A parameter is `token=`; anything else starts the next challenge.
            let key_end = rest
                .find(|c: char| c == '=' || c == ',' || c.is_ascii_whitespace())
                .unwrap_or(rest.len());
            if key_end == 0 || !rest[key_end..].trim_start().starts_with('=') {
                break;
            }
            let key = rest[..key_end].to_ascii_lowercase();
            rest = rest[key_end..].trim_start()[1..].trim_start();
            let value;
            (value, rest) = if let Some(quoted) = rest.strip_prefix('"') {
                read_quoted(quoted)
            } else {
                let end = rest
                    .find(|c: char| c == ',' || c.is_ascii_whitespace())
                    .unwrap_or(rest.len());
                (rest[..end].to_string(), &rest[end..])
            };
            params.insert(key, value);
        }
        if scheme.eq_ignore_ascii_case("bearer") {
            if let Some(realm) = params.remove("realm") {
                out.push(Challenge::Bearer {
                    realm,
                    service: params.remove("service"),
                    scope: params.remove("scope"),
                });
            }
        } else if scheme.eq_ignore_ascii_case("basic") {
            out.push(Challenge::Basic);
        }
        if scheme.is_empty() {
            // Not a token where a scheme should be: give up rather than loop.
            break;
        }
    }
    out
}

/// Reads a quoted-string body (after the opening quote), returning it unescaped and the text
/// after the closing quote. An unclosed string takes the rest of the header.
fn read_quoted(s: &str) -> (String, &str) {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return (value, &s[i + 1..]),
            '\\' => {
                if let Some((_, escaped)) = chars.next() {
                    value.push(escaped);
                }
            }
            c => value.push(c),
        }
    }
    (value, "")
}

/// A bearer token. Debug does not show it.
#[derive(Clone)]
pub(crate) struct Token(pub(crate) String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// What a registry asked for last time, so the next request can authenticate up front.
#[derive(Clone, Debug)]
pub(crate) enum Known {
    Bearer(Token),
    Basic,
}

/// Bearer tokens per (registry, scope), and which registries want Basic.
#[derive(Debug, Default)]
pub(crate) struct TokenCache {
    tokens: Mutex<HashMap<(String, String), (Token, Instant)>>,
    basic: Mutex<std::collections::HashSet<String>>,
}

impl TokenCache {
    /// The unexpired token for (registry, scope), or what else the registry is known to want.
    pub(crate) fn lookup(&self, registry: &str, scope: &str, now: Instant) -> Option<Known> {
        if lock(&self.basic).contains(registry) {
            return Some(Known::Basic);
        }
        let mut tokens = lock(&self.tokens);
        let key = (registry.to_string(), scope.to_string());
        match tokens.get(&key) {
            Some((token, expires)) if *expires > now => Some(Known::Bearer(token.clone())),
            Some(_) => {
                tokens.remove(&key);
                None
            }
            None => None,
        }
    }

    pub(crate) fn store(
        &self,
        registry: &str,
        scope: &str,
        token: Token,
        lifetime: Duration,
        now: Instant,
    ) {
        let lifetime = lifetime.saturating_sub(EXPIRY_MARGIN.min(lifetime / 2));
        let mut tokens = lock(&self.tokens);
        // Expired entries would otherwise pile up on a long-lived agent.
        tokens.retain(|_, (_, expires)| *expires > now);
        tokens.insert(
            (registry.to_string(), scope.to_string()),
            (token, now + lifetime),
        );
    }

    pub(crate) fn forget(&self, registry: &str, scope: &str) {
        lock(&self.tokens).remove(&(registry.to_string(), scope.to_string()));
    }

    pub(crate) fn mark_basic(&self, registry: &str) {
        lock(&self.basic).insert(registry.to_string());
    }
}

// A poisoned lock only means another request panicked mid-insert; the map is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The token endpoint's answer (Docker token spec; OAuth2 servers say `access_token`).
#[derive(serde::Deserialize)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    pub(crate) token: Option<String>,
    #[serde(default)]
    pub(crate) access_token: Option<String>,
    #[serde(default)]
    pub(crate) expires_in: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_bearer_challenge() {
        let h = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#;
        assert_eq!(
            parse_challenges(h),
            vec![Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/ubuntu:pull".into()),
            }]
        );
    }

    #[test]
    fn parses_case_spacing_tokens_and_escapes() {
        let h =
            r#"bearer  Realm = "http://a/t\"x" , service=reg ,scope="repository:a/b:pull,push""#;
        assert_eq!(
            parse_challenges(h),
            vec![Challenge::Bearer {
                realm: "http://a/t\"x".into(),
                service: Some("reg".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }]
        );
    }

    #[test]
    fn parses_basic_and_multiple_challenges() {
        assert_eq!(
            parse_challenges(r#"Basic realm="Registry Realm""#),
            vec![Challenge::Basic]
        );
        assert_eq!(
            parse_challenges(r#"Basic realm="x", Bearer realm="https://t/token",service="s""#),
            vec![
                Challenge::Basic,
                Challenge::Bearer {
                    realm: "https://t/token".into(),
                    service: Some("s".into()),
                    scope: None,
                }
            ]
        );
        // Unknown schemes, a Bearer without realm and junk yield nothing.
        assert_eq!(parse_challenges(r#"Negotiate abc"#), vec![]);
        assert_eq!(parse_challenges(r#"Bearer service="s""#), vec![]);
        assert_eq!(parse_challenges(r#", ,="#), vec![]);
        assert_eq!(parse_challenges(""), vec![]);
        assert_eq!(
            parse_challenges(r#"Bearer realm="unterminated"#),
            vec![Challenge::Bearer {
                realm: "unterminated".into(),
                service: None,
                scope: None
            }]
        );
    }

    #[test]
    fn cache_honours_expiry_per_scope() {
        let cache = TokenCache::default();
        let now = Instant::now();
        cache.store("r", "s1", Token("t".into()), Duration::from_secs(300), now);
        assert!(matches!(
            cache.lookup("r", "s1", now),
            Some(Known::Bearer(_))
        ));
        assert!(cache.lookup("r", "s2", now).is_none());
        assert!(cache.lookup("other", "s1", now).is_none());
        let later = now + Duration::from_secs(296);
        assert!(
            cache.lookup("r", "s1", later).is_none(),
            "expired (with margin)"
        );
        cache.store("r", "s1", Token("t".into()), Duration::from_secs(300), now);
        cache.forget("r", "s1");
        assert!(cache.lookup("r", "s1", now).is_none());
        cache.mark_basic("b");
        assert!(matches!(cache.lookup("b", "any", now), Some(Known::Basic)));
        assert!(!format!("{:?}", Token("secret".into())).contains("secret"));
    }
}
