//! The hashes of the secrets issued with agent ids (see `sessions.rs` for the rule). Loaded
//! at start and kept in memory, so a Join reads no disk; a new one is written through the
//! writer (`crate::writer`), and the Join that got it is answered once it is stored.

use std::collections::HashMap;

use crate::db::{Db, Write};
use crate::writer::{Then, Writer};

pub struct Secrets {
    writer: Writer,
    hashes: HashMap<String, [u8; 32]>,
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
        })
    }

    /// The hash of the secret issued with agent id `id`, if one was.
    pub fn get(&self, id: &str) -> Option<&[u8; 32]> {
        self.hashes.get(id)
    }

    /// Records the hash of a new secret for `id` (at once in memory, so a rejoin already
    /// needs it); `then` runs once it is stored.
    pub fn record(&mut self, id: &str, hash: [u8; 32], then: Then) {
        self.hashes.insert(id.to_string(), hash);
        self.writer
            .write_then(Write::AgentSecret(id.to_string(), hash), then);
    }
}
