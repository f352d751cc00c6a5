//! Why an order failed, as reported to the coordinator (`BlobFailed.reason`), and the
//! mapping from the store's errors.

use shoal_proto::pb::v1::FailureReason;

use crate::store::StoreError;

#[derive(Debug)]
pub(crate) struct Failure {
    pub reason: FailureReason,
    pub message: String,
}

impl Failure {
    pub(crate) fn new(reason: FailureReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// The order was cancelled (`why`), or its control channel closed (the order is gone
    /// from the agent's table).
    pub(crate) fn cancelled(why: Option<&str>) -> Self {
        match why {
            Some(why) => Self::new(FailureReason::Cancelled, format!("cancelled: {why}")),
            None => Self::new(FailureReason::Cancelled, "order dropped"),
        }
    }

    /// A fault of this agent's store: its disk, its quota, or a manifest it already holds.
    pub(crate) fn from_store(e: &StoreError) -> Self {
        let reason = match e {
            StoreError::DiskFull { .. } | StoreError::QuotaExceeded { .. } => {
                FailureReason::DiskFull
            }
            StoreError::ManifestConflict(_) => FailureReason::Invalid,
            StoreError::DigestConflict(_) => FailureReason::DigestMismatch,
            StoreError::Verify(_) => FailureReason::DigestMismatch,
            _ => FailureReason::IoError,
        };
        Self::new(reason, e.to_string())
    }

    /// A fault of this agent's local disk outside the store (part files): DISK_FULL when
    /// the filesystem is full, else IO_ERROR. Never the origin's fault.
    pub(crate) fn from_local_io(what: &str, e: &std::io::Error) -> Self {
        let reason = if e.raw_os_error() == Some(28) || e.kind() == std::io::ErrorKind::StorageFull
        {
            FailureReason::DiskFull
        } else {
            FailureReason::IoError
        };
        Self::new(reason, format!("{what}: {e}"))
    }
}

/// Runs store work off the async threads, mapping its errors to order failures.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Failure> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure::from_store(&e)),
        Err(e) => Err(Failure::new(
            FailureReason::Internal,
            format!("store task failed: {e}"),
        )),
    }
}
