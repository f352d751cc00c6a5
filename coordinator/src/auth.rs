//! Who may call what on the coordinator's gRPC port.
//!
//! API callers present a bearer token (`authorization: Bearer <token>`) that the
//! configuration names with a role; agents present the certificate the cluster CA issued them
//! at Join (TLS client authentication, see `listener.rs`). A call without either fails
//! UNAUTHENTICATED; a caller whose role does not allow the call gets PERMISSION_DENIED. On an
//! insecure coordinator (`insecure = true`) nothing is checked.
//!
//! | call | admin | deployer | reader | agent |
//! |---|---|---|---|---|
//! | Distribute | yes | yes | | to itself only |
//! | Preheat | yes | yes | | |
//! | CancelJob | yes | jobs it created | | |
//! | GetJob, WatchJob, GetBlob | yes | yes | yes | yes |
//! | ListJobs, ListAgents, ListBlobs | yes | yes | yes | |
//! | RemoveBlob, DrainAgent, RemoveAgent | yes | | | |
//! | ResolveUrl | | | | for itself only |
//! | Session | | | | its own id only |

use std::path::{Path, PathBuf};

use shoal_proto::Digest;
use tonic::Status;

use crate::listener::PeerInfo;

/// What an API token allows (see the module's table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Deployer,
    Reader,
}

/// One API token: a name (shown as a job's creator and in logs; the token never is), its
/// role, and the file holding the token (a mounted Secret).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    pub name: String,
    pub role: Role,
    pub token_file: PathBuf,
}

/// Tokens shorter than this are refused at startup: a bearer token must not be guessable.
const MIN_TOKEN_LEN: usize = 16;

/// The configured tokens, kept as SHA-256 hashes.
#[derive(Debug, Default)]
pub(crate) struct Tokens {
    entries: Vec<(String, Role, [u8; 32])>,
}

impl Tokens {
    /// Reads every token file. A missing or short token, or one name or token used twice,
    /// is an error that names the entry (never the token).
    pub(crate) fn load(configured: &[ApiToken]) -> Result<Self, String> {
        let mut entries: Vec<(String, Role, [u8; 32])> = Vec::new();
        for (i, t) in configured.iter().enumerate() {
            let at = format!("api_tokens[{i}] ({:?})", t.name);
            if t.name.is_empty() || t.name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!("{at}: name must be non-empty, without spaces"));
            }
            let token = read_token(&t.token_file).map_err(|e| format!("{at}: {e}"))?;
            let hash = *Digest::of(token.as_bytes()).as_bytes();
            if entries.iter().any(|(n, _, _)| *n == t.name) {
                return Err(format!("{at}: the name is used twice"));
            }
            if entries.iter().any(|(_, _, h)| *h == hash) {
                return Err(format!("{at}: the same token is configured twice"));
            }
            entries.push((t.name.clone(), t.role, hash));
        }
        Ok(Self { entries })
    }

    /// The name and role of `given`, compared against every entry in constant time.
    fn find(&self, given: &str) -> Option<(&str, Role)> {
        let given = Digest::of(given.as_bytes());
        let mut found = None;
        for (name, role, hash) in &self.entries {
            if same_digest(hash, given.as_bytes()) {
                found = Some((name.as_str(), *role));
            }
        }
        found
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Whether `secret` hashes to `hash`, in time that depends on neither: SHA-256 digests (fixed
/// length, so no early exit on a length difference) compared byte for byte without stopping
/// at the first difference. Join tokens, agent secrets and API tokens all go through it.
pub(crate) fn same_hash(hash: &[u8; 32], secret: &str) -> bool {
    same_digest(hash, Digest::of(secret.as_bytes()).as_bytes())
}

/// Whether two digests are equal, without stopping at the first difference.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let differ = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(differ) == 0
}

fn read_token(path: &Path) -> Result<String, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("token_file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "token_file {}: the token must be at least {MIN_TOKEN_LEN} characters",
            path.display()
        ));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "token_file {}: the token must be one word (no spaces or newlines inside)",
            path.display()
        ));
    }
    Ok(token.to_string())
}

/// Who made a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Caller {
    /// An insecure coordinator checks nothing.
    Unchecked,
    Token {
        name: String,
        role: Role,
    },
    Agent(String),
}

impl Caller {
    /// What a job records as its creator.
    pub(crate) fn creator(&self) -> String {
        match self {
            Caller::Unchecked => String::new(),
            Caller::Token { name, .. } => format!("token:{name}"),
            Caller::Agent(id) => format!("agent:{id}"),
        }
    }
}

/// What a call needs (see the module's table).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Need {
    /// Distribute: admin, deployer, or an agent (which may target only itself).
    Deploy,
    /// Preheat.
    Preheat,
    /// CancelJob: admin, or a deployer for its own jobs.
    Cancel,
    /// GetJob, WatchJob, GetBlob: any role, or an agent.
    Read,
    /// ListJobs, ListAgents, ListBlobs: any role.
    List,
    /// RemoveBlob, DrainAgent, RemoveAgent.
    Admin,
    /// ResolveUrl: an agent, for itself.
    AgentOnly,
}

/// The coordinator's access policy.
#[derive(Debug)]
pub(crate) struct Policy {
    /// Off on an insecure coordinator.
    enforced: bool,
    tokens: Tokens,
}

impl Policy {
    pub(crate) fn new(enforced: bool, tokens: Tokens) -> Self {
        Self { enforced, tokens }
    }

    /// Who made `req`, if they may make a call that needs `need`.
    pub(crate) fn check<T>(&self, req: &tonic::Request<T>, need: Need) -> Result<Caller, Status> {
        if !self.enforced {
            return Ok(Caller::Unchecked);
        }
        let caller = self.caller(req)?;
        let allowed = match (&caller, need) {
            (Caller::Unchecked, _) => true,
            (
                Caller::Token {
                    role: Role::Admin, ..
                },
                n,
            ) => !matches!(n, Need::AgentOnly),
            (
                Caller::Token {
                    role: Role::Deployer,
                    ..
                },
                n,
            ) => matches!(
                n,
                Need::Deploy | Need::Preheat | Need::Cancel | Need::Read | Need::List
            ),
            (
                Caller::Token {
                    role: Role::Reader, ..
                },
                n,
            ) => matches!(n, Need::Read | Need::List),
            (Caller::Agent(_), n) => matches!(n, Need::Deploy | Need::Read | Need::AgentOnly),
        };
        if allowed {
            Ok(caller)
        } else {
            tracing::info!(caller = caller.creator(), call = ?need, "call refused: role does not allow it");
            Err(Status::permission_denied(format!(
                "{} may not make this call",
                describe(&caller)
            )))
        }
    }

    /// The agent whose verified certificate this connection presented, for the agents' own
    /// calls (Session); UNAUTHENTICATED without one.
    pub(crate) fn agent<T>(&self, req: &tonic::Request<T>) -> Result<Option<String>, Status> {
        if !self.enforced {
            return Ok(None);
        }
        match peer(req).and_then(|p| p.agent.clone()) {
            Some(id) => Ok(Some(id)),
            None => Err(Status::unauthenticated(
                "an agent session needs the agent's certificate (TLS client authentication)",
            )),
        }
    }

    fn caller<T>(&self, req: &tonic::Request<T>) -> Result<Caller, Status> {
        if let Some(value) = req.metadata().get("authorization") {
            let value = value
                .to_str()
                .map_err(|_| Status::unauthenticated("authorization: not text"))?;
            let token = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .ok_or_else(|| {
                    Status::unauthenticated("authorization: expected `Bearer <token>`")
                })?;
            return match self.tokens.find(token.trim()) {
                Some((name, role)) => Ok(Caller::Token {
                    name: name.to_string(),
                    role,
                }),
                None => {
                    tracing::info!(remote = ?peer(req).and_then(|p| p.remote), "call refused: unknown API token");
                    Err(Status::unauthenticated("unknown API token"))
                }
            };
        }
        if let Some(id) = peer(req).and_then(|p| p.agent.clone()) {
            return Ok(Caller::Agent(id));
        }
        Err(Status::unauthenticated(
            "this coordinator needs credentials: an API token (`authorization: Bearer <token>`; \
             shoal --token-file or SHOAL_TOKEN) or an agent certificate",
        ))
    }
}

fn peer<T>(req: &tonic::Request<T>) -> Option<&PeerInfo> {
    req.extensions().get::<PeerInfo>()
}

fn describe(caller: &Caller) -> String {
    match caller {
        Caller::Unchecked => "anyone".into(),
        Caller::Token { name, role } => format!("token {name:?} (role {role:?})").to_lowercase(),
        Caller::Agent(id) => format!("agent {id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_file(dir: &Path, name: &str, token: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("{token}\n")).unwrap();
        p
    }

    #[test]
    fn tokens_load_checked_and_match_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let ci = token_file(dir.path(), "ci", "0123456789abcdef-ci");
        let ro = token_file(dir.path(), "ro", "0123456789abcdef-ro");
        let tokens = Tokens::load(&[
            ApiToken {
                name: "ci".into(),
                role: Role::Deployer,
                token_file: ci.clone(),
            },
            ApiToken {
                name: "ro".into(),
                role: Role::Reader,
                token_file: ro,
            },
        ])
        .unwrap();
        assert_eq!(
            tokens.find("0123456789abcdef-ci"),
            Some(("ci", Role::Deployer))
        );
        assert_eq!(
            tokens.find("0123456789abcdef-ro"),
            Some(("ro", Role::Reader))
        );
        assert_eq!(tokens.find("0123456789abcdef-r"), None);
        assert_eq!(tokens.find(""), None);

        let short = token_file(dir.path(), "short", "tooshort");
        let refused = |t: Vec<ApiToken>| Tokens::load(&t).unwrap_err();
        let entry = |name: &str, file: &Path| ApiToken {
            name: name.into(),
            role: Role::Admin,
            token_file: file.into(),
        };
        assert!(refused(vec![entry("a", &short)]).contains("at least 16"));
        assert!(refused(vec![entry("a", &dir.path().join("none"))]).contains("token_file"));
        assert!(refused(vec![entry("a", &ci), entry("b", &ci)]).contains("same token"));
        let other = token_file(dir.path(), "other", "0123456789abcdef-other");
        assert!(refused(vec![entry("a", &ci), entry("a", &other)]).contains("used twice"));
        assert!(refused(vec![entry("", &ci)]).contains("name"));
        // The token itself never appears in an error.
        assert!(!refused(vec![entry("a", &ci), entry("b", &ci)]).contains("abcdef"));
    }
}
