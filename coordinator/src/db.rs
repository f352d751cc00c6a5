//! Durable state in one redb file: the blob catalog, the jobs, and the order-id counter.
//! Everything else is soft, rebuilt when agents reconnect.

use std::path::Path;

use prost::Message as _;
use redb::{Database, ReadableTable, TableDefinition};
use shoal_proto::pb::v1 as pb;

const BLOBS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("blobs");
const JOBS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("jobs");
/// Small named values: `order_ceiling`, the order id no order of this state reaches.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const ORDER_CEILING: &str = "order_ceiling";
/// Agent id -> SHA-256 of the secret issued with it (the proof a rejoin under that id needs).
const AGENT_SECRETS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("agent_secrets");

#[derive(Debug, thiserror::Error)]
#[error("coordinator state database: {0}")]
pub struct DbError(String);

fn err(e: impl std::fmt::Display) -> DbError {
    DbError(e.to_string())
}

/// A row that does not decode (a bit flipped on disk, a write from a newer version) costs
/// that row, not the coordinator's start: it is logged and counted, and left in place for
/// inspection (a later write of the same key replaces it).
fn bad_row(table: &str, key: &str, e: &prost::DecodeError) {
    tracing::error!(table, key, error = %e, "skipping a row of the state database that does not decode");
    metrics::counter!(crate::metrics::BAD_ROWS, "table" => table.to_string()).increment(1);
}

/// A catalog entry as stored: the manifest and who registered it when.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredBlob {
    #[prost(message, optional, tag = "1")]
    pub manifest: Option<pb::Manifest>,
    #[prost(string, tag = "2")]
    pub registered_by: String,
    #[prost(message, optional, tag = "3")]
    pub registered_at: Option<prost_types::Timestamp>,
}

#[derive(Debug)]
pub struct Db {
    db: Database,
}

impl Db {
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let db = Database::create(path).map_err(err)?;
        let txn = db.begin_write().map_err(err)?;
        txn.open_table(BLOBS).map_err(err)?;
        txn.open_table(JOBS).map_err(err)?;
        txn.open_table(META).map_err(err)?;
        txn.open_table(AGENT_SECRETS).map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(Self { db })
    }

    /// The order-id ceiling last reserved, if any was.
    pub fn order_ceiling(&self) -> Result<Option<u64>, DbError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(META).map_err(err)?;
        Ok(table.get(ORDER_CEILING).map_err(err)?.map(|v| v.value()))
    }

    /// Reserves order ids below `ceiling`: once this returns, no later run issues them.
    pub fn set_order_ceiling(&self, ceiling: u64) -> Result<(), DbError> {
        let txn = self.db.begin_write().map_err(err)?;
        txn.open_table(META)
            .map_err(err)?
            .insert(ORDER_CEILING, ceiling)
            .map_err(err)?;
        txn.commit().map_err(err)
    }

    /// The hash of the secret issued with agent id `id`, if one was.
    pub fn agent_secret(&self, id: &str) -> Result<Option<[u8; 32]>, DbError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(AGENT_SECRETS).map_err(err)?;
        let hash = table.get(id).map_err(err)?;
        // A row of the wrong length still says a secret was issued: no secret matches it
        // (never "none on record", which would let the next claimer take the id).
        Ok(hash.map(|h| <[u8; 32]>::try_from(h.value()).unwrap_or([0; 32])))
    }

    pub fn put_agent_secret(&self, id: &str, hash: &[u8; 32]) -> Result<(), DbError> {
        let txn = self.db.begin_write().map_err(err)?;
        txn.open_table(AGENT_SECRETS)
            .map_err(err)?
            .insert(id, &hash[..])
            .map_err(err)?;
        txn.commit().map_err(err)
    }

    pub fn put_blob(&self, digest: &[u8; 32], blob: &StoredBlob) -> Result<(), DbError> {
        let txn = self.db.begin_write().map_err(err)?;
        txn.open_table(BLOBS)
            .map_err(err)?
            .insert(&digest[..], &blob.encode_to_vec()[..])
            .map_err(err)?;
        txn.commit().map_err(err)
    }

    pub fn delete_blob(&self, digest: &[u8; 32]) -> Result<(), DbError> {
        let txn = self.db.begin_write().map_err(err)?;
        txn.open_table(BLOBS)
            .map_err(err)?
            .remove(&digest[..])
            .map_err(err)?;
        txn.commit().map_err(err)
    }

    /// The job with its targets, as `Job { progress: JobProgress { targets } }`.
    pub fn put_job(&self, job: &pb::Job) -> Result<(), DbError> {
        let txn = self.db.begin_write().map_err(err)?;
        txn.open_table(JOBS)
            .map_err(err)?
            .insert(job.job_id.as_str(), &job.encode_to_vec()[..])
            .map_err(err)?;
        txn.commit().map_err(err)
    }

    pub fn delete_job(&self, job_id: &str) -> Result<(), DbError> {
        let txn = self.db.begin_write().map_err(err)?;
        txn.open_table(JOBS)
            .map_err(err)?
            .remove(job_id)
            .map_err(err)?;
        txn.commit().map_err(err)
    }

    pub fn blobs(&self) -> Result<Vec<StoredBlob>, DbError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(BLOBS).map_err(err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            match StoredBlob::decode(v.value()) {
                Ok(blob) => out.push(blob),
                Err(e) => bad_row("blobs", &hex::encode(k.value()), &e),
            }
        }
        Ok(out)
    }

    pub fn jobs(&self) -> Result<Vec<pb::Job>, DbError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(JOBS).map_err(err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            match pb::Job::decode(v.value()) {
                Ok(job) => out.push(job),
                Err(e) => bad_row("jobs", k.value(), &e),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row that does not decode is skipped; the others load, and the database still
    /// opens and writes.
    #[test]
    fn a_bad_row_costs_only_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.redb");
        let db = Db::open(&path).expect("open");
        let job = pb::Job {
            job_id: "job-good".into(),
            ..Default::default()
        };
        db.put_job(&job).expect("put");
        let blob = StoredBlob {
            registered_by: "a".into(),
            ..Default::default()
        };
        db.put_blob(&[1; 32], &blob).expect("put");
        {
            // What a flipped bit or a newer writer leaves: bytes that are no protobuf.
            let txn = db.db.begin_write().expect("txn");
            txn.open_table(JOBS)
                .expect("jobs")
                .insert("job-bad", &[0xff, 0xff, 0xff][..])
                .expect("insert");
            txn.open_table(BLOBS)
                .expect("blobs")
                .insert(&[2u8; 32][..], &[0x0a, 0x7f][..])
                .expect("insert");
            txn.commit().expect("commit");
        }
        drop(db);
        let db = Db::open(&path).expect("reopen");
        let jobs = db.jobs().expect("jobs load");
        assert_eq!(
            jobs.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(),
            ["job-good"]
        );
        let blobs = db.blobs().expect("blobs load");
        assert_eq!(blobs, vec![blob]);
        db.put_job(&pb::Job {
            job_id: "job-bad".into(),
            ..Default::default()
        })
        .expect("the bad row's key is written over");
        assert_eq!(db.jobs().expect("jobs").len(), 2);
    }
}
