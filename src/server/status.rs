//! The one place where store errors become gRPC statuses.

use tonic::{Code, Status};

use crate::store::{StoreError, WatchError};

pub fn from_store(e: StoreError) -> Status {
    let code = match &e {
        StoreError::Invalid(_) => Code::InvalidArgument,
        StoreError::NoLeader(_) | StoreError::NotLeader { .. } | StoreError::NoQuorum(_) | StoreError::Stopped(_) => {
            Code::Unavailable
        }
        StoreError::Timeout { .. } => Code::DeadlineExceeded,
        // Not UNAVAILABLE: that code promises the write was never applied.
        StoreError::Indeterminate(_) => Code::Unknown,
        StoreError::Forwarded { status, .. } => return Status::new(status.code(), e.to_string()),
        StoreError::Membership(_) => Code::FailedPrecondition,
        StoreError::Engine(_)
        | StoreError::Corrupt { .. }
        | StoreError::DataVersion { .. }
        | StoreError::DataDir { .. } => Code::Internal,
    };
    Status::new(code, e.to_string())
}

pub fn from_watch(e: &WatchError) -> Status {
    match e {
        WatchError::Compacted { .. } | WatchError::Reset { .. } => Status::out_of_range(e.to_string()),
        WatchError::Slow { .. } => Status::resource_exhausted(e.to_string()),
    }
}
