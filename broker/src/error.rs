//! The errors a caller of the hub can see, and their one mapping to gRPC status codes.

use crate::store::StoreError;
use crate::transport::TransportError;

/// Everything that can refuse or fail a request. Each variant maps to one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A field is malformed: names the field.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// Something named in the request does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller did not say who it is.
    #[error("{0}")]
    Unauthenticated(String),
    /// A size or count limit was exceeded: names the limit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A document with this id but other content exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request no longer applies (an ack token from a closed stream).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The hub cannot take the request now; retry later.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Transport(#[from] TransportError),
}

impl HubError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        HubError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<HubError> for tonic::Status {
    fn from(error: HubError) -> Self {
        let message = error.to_string();
        match error {
            HubError::InvalidArgument { .. } => tonic::Status::invalid_argument(message),
            HubError::NotFound(_) => tonic::Status::not_found(message),
            HubError::PermissionDenied(_) => {
                // The security log: every refusal names the identity and the action.
                tracing::warn!(target: "lienthong::security", %message, "permission denied");
                tonic::Status::permission_denied(message)
            }
            HubError::Unauthenticated(_) => tonic::Status::unauthenticated(message),
            HubError::ResourceExhausted(_) => tonic::Status::resource_exhausted(message),
            HubError::AlreadyExists(_) => tonic::Status::already_exists(message),
            HubError::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            HubError::Unavailable(_) => tonic::Status::unavailable(message),
            HubError::Store(StoreError::Nothing(_)) => tonic::Status::failed_precondition(message),
            HubError::Store(failure) => {
                tracing::error!(%message, "storage failure");
                match failure {
                    // The disk failed: the hub stops and starts again, and what was asked can
                    // be asked again then.
                    StoreError::Failed(_) | StoreError::Sled(sled::Error::Io(_)) => {
                        tonic::Status::unavailable(message)
                    }
                    _ => tonic::Status::internal(format!("storage failure: {message}")),
                }
            }
            HubError::Transport(_) => {
                tracing::warn!(%message, "transport failure");
                tonic::Status::unavailable(format!("transport unavailable: {message}"))
            }
        }
    }
}
