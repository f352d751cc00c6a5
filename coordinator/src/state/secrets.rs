//! The hashes of the secrets issued with agent ids (see `sessions.rs` for the rule), and the
//! ids an operator revoked (RemoveAgent). Loaded at start and kept in memory, so a Join reads
//! no disk; a new one is written through the writer (`crate::writer`), and the Join that got
//! it is answered once it is stored.

use std::collections::{BTreeSet, HashMap};

use crate::db::{Db, Write};
use crate::writer::{Then, Writer};

pub struct Secrets {
    writer: Writer,
    hashes: HashMap<String, [u8; 32]>,
    /// Removed agents: their certificates are refused by peers, their ids never reused.
    revoked: BTreeSet<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("agents", &self.hashes.len())
            .finish_non_exhaustive()
    }
}

impl Secrets {
    pub fn load(db: &Db, writer: Writer) -> Result<Self, crate::db::DbError> {
        Ok(Self {
            writer,
            hashes: db.agent_secrets()?.into_iter().collect(),
            revoked: db.revoked_agents()?.into_iter().collect(),
        })
    }

    /// The hash of the secret issued with agent id `id`, if one was (never for a revoked id).
    pub fn get(&self, id: &str) -> Option<&[u8; 32]> {
        self.hashes.get(id)
    }

    pub fn is_revoked(&self, id: &str) -> bool {
        self.revoked.contains(id)
    }

    /// Every revoked agent id.
    pub fn revoked(&self) -> impl Iterator<Item = &String> {
        self.revoked.iter()
    }

    /// Revokes `id`: its secret is forgotten (a rejoin under it gets a new id) and peers are
    /// to refuse its certificate.
    pub fn revoke(&mut self, id: &str, now: std::time::SystemTime) {
        self.hashes.remove(id);
        self.revoked.insert(id.to_string());
        let at = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.writer.write(Write::RevokeAgent(id.to_string(), at));
    }

    /// Records the hash of a new secret for `id` (at once in memory, so a rejoin already
    /// needs it); `then` runs once it is stored.
    pub fn record(&mut self, id: &str, hash: [u8; 32], then: Then) {
        self.hashes.insert(id.to_string(), hash);
        self.writer
            .write_then(Write::AgentSecret(id.to_string(), hash), then);
    }
}
