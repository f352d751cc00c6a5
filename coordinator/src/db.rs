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

#[derive(Debug, thiserror::Error)]
#[error("coordinator state database: {0}")]
pub struct DbError(String);

fn err(e: impl std::fmt::Display) -> DbError {
    DbError(e.to_string())
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

    pub fn put_blob(&self, digest: &[u8; 32], blob: &StoredBlob) -> Result<(), DbError> {
        let txn = self.db.begin_write().map_err(err)?;
        txn.open_table(BLOBS)
            .map_err(err)?
            .insert(&digest[..], &blob.encode_to_vec()[..])
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
            let (_, v) = row.map_err(err)?;
            out.push(StoredBlob::decode(v.value()).map_err(err)?);
        }
        Ok(out)
    }

    pub fn jobs(&self) -> Result<Vec<pb::Job>, DbError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(JOBS).map_err(err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(err)? {
            let (_, v) = row.map_err(err)?;
            out.push(pb::Job::decode(v.value()).map_err(err)?);
        }
        Ok(out)
    }
}
