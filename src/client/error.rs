//! The client's one error type. Every failed call ends in exactly one of three outcomes that
//! matter to a caller: a replica's answer, no replica could serve it (nothing happened), or
//! nobody can say whether it happened.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no replica address given")]
    NoEndpoints,
    #[error("invalid replica address {addr:?}: {source}")]
    BadAddress {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the bearer token holds characters that cannot go in a header")]
    BadToken,
    /// A replica's answer, which stands (NotFound, AlreadyExists, a conflict, invalid...).
    #[error("{addr}: {}", describe(status))]
    Status { addr: String, status: Status },
    /// No replica could serve the call; it was not acted on anywhere. `last` is the last
    /// failure seen, for its message.
    #[error("no replica could serve the request (tried {tried}): {addr}: {}", describe(last))]
    Unavailable { tried: usize, addr: String, last: Status },
    /// The request reached a replica, or may have, and no answer says whether it took
    /// effect. It was not sent again: read the object to find out.
    #[error("the result is unknown: {addr}: {}; check with get", describe(status))]
    Indeterminate { addr: String, status: Status },
}

fn describe(s: &Status) -> String {
    format!("{} ({:?})", s.message(), s.code())
}

impl ClientError {
    /// The gRPC code of the answer (UNAVAILABLE when no replica could serve, UNKNOWN when the
    /// outcome is unknown).
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status { status, .. } => Some(status.code()),
            ClientError::Unavailable { .. } => Some(Code::Unavailable),
            ClientError::Indeterminate { .. } => Some(Code::Unknown),
            _ => None,
        }
    }

    /// The replica's own status, when one answered.
    pub fn status(&self) -> Option<&Status> {
        match self {
            ClientError::Status { status, .. } => Some(status),
            _ => None,
        }
    }

    /// The server's message, or this error's own text.
    pub fn message(&self) -> String {
        match self {
            ClientError::Status { status, .. } => status.message().to_string(),
            other => other.to_string(),
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status().is_some_and(|s| s.code() == Code::NotFound)
    }

    pub fn is_already_exists(&self) -> bool {
        self.status().is_some_and(|s| s.code() == Code::AlreadyExists)
    }

    /// An optimistic-concurrency conflict: re-read and try again.
    pub fn is_conflict(&self) -> bool {
        self.status().is_some_and(|s| s.code() == Code::Aborted)
    }

    pub fn is_indeterminate(&self) -> bool {
        matches!(self, ClientError::Indeterminate { .. })
    }

    /// A watch's resourceVersion is older than the history the replica keeps: re-list.
    pub fn is_expired(&self) -> bool {
        self.status().is_some_and(|s| s.code() == Code::OutOfRange)
    }
}
