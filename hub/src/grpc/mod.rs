//! Thin gRPC adapters. Each handler: establish the caller from its certificate, check the role, call into
//! `Hub`, map the error to a Status through the one `ApiError` -> `Status` mapping below.

pub mod agent;
pub mod join;
pub mod operator;
pub mod runs;
pub mod runview;
pub mod webhooks;

use tonic::{Request, Status};
use upkeep_core::ids::{Principal, Role};

/// Every failure a handler can return, mapped once to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No client certificate or an unusable identity in it.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's certificate does not allow this.
    #[error("{0}")]
    PermissionDenied(String),
    /// A request field is wrong; the message names it.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Refused by a rule in the current state; the message says what to change first.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller holds too much of the hub already; the message says what to release.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The store failed.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        // Whatever a handler put in it, a message fits in a status (SPEC §7: long values cut).
        let msg = upkeep_core::limits::cut_message(&e.to_string());
        match e {
            ApiError::Unauthenticated(_) => Status::unauthenticated(msg),
            ApiError::PermissionDenied(_) => Status::permission_denied(msg),
            ApiError::InvalidArgument(_) => Status::invalid_argument(msg),
            ApiError::NotFound(_) => Status::not_found(msg),
            ApiError::FailedPrecondition(_) => Status::failed_precondition(msg),
            ApiError::ResourceExhausted(_) => Status::resource_exhausted(msg),
            ApiError::Internal(_) => Status::internal(msg),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        match e {
            crate::store::StoreError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            other => {
                tracing::error!(error = %other, "store failure");
                ApiError::Internal(other.to_string())
            }
        }
    }
}

/// The principal of a request, from its verified client certificate only.
pub fn principal_of<T>(req: &Request<T>) -> Result<Principal, ApiError> {
    let certs = req.peer_certs().ok_or_else(|| ApiError::Unauthenticated("no client certificate presented".into()))?;
    let leaf = certs.first().ok_or_else(|| ApiError::Unauthenticated("empty client certificate chain".into()))?;
    upkeep_proto::tls::principal_from_der(leaf.as_ref()).map_err(|e| ApiError::Unauthenticated(e.to_string()))
}

/// Requires one of `roles`; `action` describes what was attempted, for the error.
pub fn require(principal: &Principal, roles: &[Role], action: &str) -> Result<(), ApiError> {
    if roles.contains(&principal.role) {
        Ok(())
    } else {
        let allowed: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        Err(ApiError::PermissionDenied(format!(
            "{} may not {action}; this needs a certificate with role {}",
            principal.uri(),
            allowed.join(" or ")
        )))
    }
}
