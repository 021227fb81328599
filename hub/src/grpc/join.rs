//! The join service: the one service served to callers without a client certificate. Its handlers authenticate
//! by join token instead (`Join` starts with the token check; `CaCertificate` returns only the public fleet CA).
//! The tidy test holds both to that.

use super::ApiError;
use crate::fleet::{Fleet, now_ms};
use crate::join::{check_csr, parse_token, refusal_line};
use crate::pki::Ca;
use crate::store::JoinTokenRecord;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use upkeep_core::ids::validate_name;
use upkeep_proto::v1;

/// Largest join request (a token, a name and a CSR).
pub const JOIN_MESSAGE_LIMIT: usize = 16 * 1024;

/// The JoinService implementation.
pub struct JoinApi {
    fleet: Arc<Fleet>,
    /// The issuing CA (`tls.issuer_cert`/`tls.issuer_key`); None: joins are refused.
    issuer: Option<Arc<Ca>>,
    /// The fleet CA certificate(s) (`tls.ca`), public.
    ca_pem: String,
}

impl JoinApi {
    /// Over `fleet`, signing with `issuer`, handing out `ca_pem`.
    pub fn new(fleet: Arc<Fleet>, issuer: Option<Arc<Ca>>, ca_pem: String) -> JoinApi {
        JoinApi { fleet, issuer, ca_pem }
    }

    /// The token check every join starts with: the token must be known, unexpired and have a use left (read
    /// only; the use is taken once the request is known to be good).
    fn check_token(&self, req: &Request<v1::JoinRequest>) -> Result<(JoinTokenRecord, String), ApiError> {
        let (id, hash) = parse_token(&req.get_ref().token).map_err(ApiError::InvalidArgument)?;
        match self.fleet.store().check_join_token(&id, &hash, now_ms())? {
            Ok(t) => Ok((t, hash)),
            Err(refusal) => {
                tracing::warn!(token = %id, node = %req.get_ref().node_name, ?refusal, "join refused");
                Err(ApiError::PermissionDenied(refusal_line(refusal, &id)))
            }
        }
    }
}

/// The fleet CA is public: anyone may fetch it (and must check its fingerprint before trusting it).
fn public_ca_only<T>(_req: &Request<T>) {}

#[tonic::async_trait]
impl v1::join_service_server::JoinService for JoinApi {
    async fn ca_certificate(
        &self,
        req: Request<v1::CaCertificateRequest>,
    ) -> Result<Response<v1::CaCertificateResponse>, Status> {
        public_ca_only(&req);
        Ok(Response::new(v1::CaCertificateResponse { ca_pem: self.ca_pem.clone() }))
    }

    async fn join(&self, req: Request<v1::JoinRequest>) -> Result<Response<v1::JoinResponse>, Status> {
        let (token, hash) = self.check_token(&req)?;
        let r = req.get_ref();
        let issuer = self.issuer.as_ref().ok_or_else(|| {
            ApiError::FailedPrecondition(
                "this hub signs no certificates for joining nodes: set tls.issuer_cert and tls.issuer_key in hub.toml \
                 (issuer.pem and issuer.key from `upkeepctl pki init`)"
                    .into(),
            )
        })?;
        validate_name("node name", &r.node_name).map_err(|e| ApiError::InvalidArgument(format!("--name: {e}")))?;
        // A token for one member must not hand out another member's node identity: a name the hub knows in
        // another member is refused (an operator moves a node by forgetting it first).
        if let Some(known) = self.fleet.store().get_node(&r.node_name).map_err(ApiError::from)?
            && known.facts.member != token.member
        {
            tracing::warn!(token = %token.id, node = %r.node_name, member = %known.facts.member,
                token_member = %token.member, "join refused: the node exists in another member");
            return Err(ApiError::PermissionDenied(format!(
                "--name: node {} exists in member {}, and this token is for member {}: use a token for member {},                  or `upkeepctl node forget {}` first",
                r.node_name, known.facts.member, token.member, known.facts.member, r.node_name
            ))
            .into());
        }
        let public_key = check_csr(&r.csr_pem).map_err(ApiError::InvalidArgument)?;
        // Everything is known to be good: take the use (the store checks the token again in the same
        // transaction, so two joins racing for the last use cannot both have it).
        let used =
            self.fleet.store().use_join_token(&token.id, &hash, &r.node_name, now_ms()).map_err(ApiError::from)?;
        let token = match used {
            Ok(t) => t,
            Err(refusal) => return Err(ApiError::PermissionDenied(refusal_line(refusal, &token.id)).into()),
        };
        let chain = issuer.issue_node_for_key(&r.node_name, &public_key).map_err(|e| {
            tracing::error!(token = %token.id, node = %r.node_name, error = %e, "signing a joining node's certificate");
            ApiError::Internal(e.to_string())
        })?;
        tracing::info!(token = %token.id, node = %r.node_name, member = %token.member, pool = %token.node_pool,
            uses_left = token.uses_left, "node joined: certificate issued");
        Ok(Response::new(v1::JoinResponse {
            certificate_chain_pem: chain,
            ca_pem: self.ca_pem.clone(),
            member: token.member,
            pool: token.node_pool,
        }))
    }
}
