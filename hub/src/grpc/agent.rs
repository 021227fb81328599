//! The agent service: one bidirectional session per node.
//!
//! The first message must be a Register whose node name equals the certificate's; every later report is held
//! to the same rule. A node certificate is the only way in; a node may speak only for itself.

use super::{ApiError, principal_of, require};
use crate::artifacts::{ArtifactError, Artifacts};
use crate::fleet::{Fleet, SessionTx, desired_config};
use crate::maintenance::Maintenance;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::collections::HashMap;
use std::io::SeekFrom;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use upkeep_core::ids::Role;
use upkeep_proto::convert::check_report;
use upkeep_proto::v1::{self, agent_message::Body};

/// How long a new session may take to send its Register.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued to one agent before pushes are dropped (the agent resyncs on reconnect).
pub const SESSION_QUEUE: usize = 32;

/// Bytes per chunk when streaming an artifact.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// The AgentService implementation.
pub struct AgentApi {
    fleet: Arc<Fleet>,
    maintenance: Arc<Maintenance>,
    artifacts: Artifacts,
    /// Image downloads open per node, and how many one node may have.
    fetches: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    fetches_per_node: usize,
    /// Signs renewed node certificates (None: renewals are refused, naming the settings).
    issuer: Option<Arc<crate::pki::Ca>>,
}

impl AgentApi {
    /// Over the given fleet, lease desk and artifact store; a node may have `fetches_per_node` downloads open.
    pub fn new(
        fleet: Arc<Fleet>,
        maintenance: Arc<Maintenance>,
        artifacts: Artifacts,
        fetches_per_node: usize,
    ) -> Self {
        AgentApi { fleet, maintenance, artifacts, fetches: Arc::default(), fetches_per_node, issuer: None }
    }

    /// Renews node certificates with `issuer` (`tls.issuer_cert`/`tls.issuer_key`; None: renewals are refused).
    pub fn with_issuer(mut self, issuer: Option<Arc<crate::pki::Ca>>) -> Self {
        self.issuer = issuer;
        self
    }
}

/// One open image download of a node; counted until the stream is dropped (finished or abandoned).
struct FetchSlot {
    fetches: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    node: String,
}

impl FetchSlot {
    fn take(
        fetches: &Arc<std::sync::Mutex<HashMap<String, usize>>>,
        node: &str,
        per_node: usize,
    ) -> Result<FetchSlot, ApiError> {
        let mut open = fetches.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(node.to_string()).or_default();
        if *n >= per_node {
            return Err(ApiError::ResourceExhausted(format!(
                "node {node:?} already has {n} image downloads open (the limit is {per_node}); finish or cancel one \
                 first"
            )));
        }
        *n += 1;
        Ok(FetchSlot { fetches: fetches.clone(), node: node.to_string() })
    }
}

impl Drop for FetchSlot {
    fn drop(&mut self) {
        let mut open = self.fetches.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.node);
            }
        }
    }
}

fn claim_matches(cert_name: &str, claimed: &str) -> Result<(), ApiError> {
    if cert_name == claimed {
        Ok(())
    } else {
        Err(ApiError::PermissionDenied(format!(
            "certificate is for node {cert_name:?} but the report is for node {claimed:?}; a node may report only for itself"
        )))
    }
}

pub type SessionStream = Pin<Box<dyn Stream<Item = Result<v1::HubMessage, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<v1::ImageChunk, Status>> + Send>>;

#[tonic::async_trait]
impl v1::agent_service_server::AgentService for AgentApi {
    type SessionStream = SessionStream;
    type FetchImageStream = ChunkStream;

    async fn fetch_image(
        &self,
        request: Request<v1::FetchImageRequest>,
    ) -> Result<Response<Self::FetchImageStream>, Status> {
        let principal = principal_of(&request)?;
        require(&principal, &[Role::Node], "fetch images")?;
        let req = request.into_inner();
        let path = self.artifacts.path(&req.sha256).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let total = self.artifacts.size(&req.sha256).map_err(|e| match e {
            ArtifactError::Missing(_) => ApiError::NotFound(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        })?;
        if req.offset > total {
            return Err(
                ApiError::InvalidArgument(format!("offset: {} is past the end ({total} bytes)", req.offset)).into()
            );
        }
        let slot = FetchSlot::take(&self.fetches, &principal.name, self.fetches_per_node)?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| ApiError::Internal(format!("opening artifact {}: {e}", req.sha256)))?;
        file.seek(SeekFrom::Start(req.offset))
            .await
            .map_err(|e| ApiError::Internal(format!("seeking artifact {}: {e}", req.sha256)))?;
        tracing::info!(node = %principal.name, sha256 = %req.sha256, offset = req.offset, total, "serving image");
        // No task and no thread per download: the next chunk is read only when the client has taken the last one,
        // so a client that stops reading holds a file handle and one chunk, not a thread.
        let chunks = futures::stream::unfold(Some((file, req.offset, slot)), move |state| async move {
            let (mut file, offset, slot) = state?;
            let mut buf = vec![0u8; CHUNK_BYTES];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    let chunk = v1::ImageChunk { offset, data: buf, total_size: total };
                    Some((Ok(chunk), Some((file, offset + n as u64, slot))))
                }
                Err(e) => Some((Err(Status::internal(format!("reading artifact: {e}"))), None)),
            }
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn renew_certificate(
        &self,
        request: Request<v1::RenewCertificateRequest>,
    ) -> Result<Response<v1::RenewCertificateResponse>, Status> {
        let principal = principal_of(&request)?;
        require(&principal, &[Role::Node], "renew a node certificate")?;
        let issuer = self.issuer.as_ref().ok_or_else(|| {
            ApiError::FailedPrecondition(
                "this hub signs no certificates: set tls.issuer_cert and tls.issuer_key in hub.toml (issuer.pem and                  issuer.key from `upkeepctl pki init`), or renew the node's certificate by hand"
                    .into(),
            )
        })?;
        let public_key = crate::join::check_csr(&request.get_ref().csr_pem).map_err(ApiError::InvalidArgument)?;
        let chain = issuer.issue_node_for_key(&principal.name, &public_key).map_err(|e| {
            tracing::error!(node = %principal.name, error = %e, "signing a renewed node certificate");
            ApiError::Internal(e.to_string())
        })?;
        // Noted now, so that forgetting the node revokes the new certificate too (even before it is used).
        let serial = CertificateDer::pem_slice_iter(chain.as_bytes())
            .next()
            .and_then(|c| c.ok())
            .and_then(|c| crate::revocation::serial_of_der(c.as_ref()).ok())
            .ok_or_else(|| ApiError::Internal("the renewed certificate cannot be read back".into()))?;
        self.fleet.revocations().note_node_cert(&principal.name, &serial).map_err(ApiError::from)?;
        tracing::info!(node = %principal.name, serial = %serial, "node certificate renewed");
        Ok(Response::new(v1::RenewCertificateResponse { certificate_chain_pem: chain }))
    }

    async fn session(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let principal = principal_of(&request)?;
        require(&principal, &[Role::Node], "open an agent session")?;
        // The door refused revoked certificates at the handshake; a connection made before a revocation is
        // checked again here, and the serial noted so that forgetting the node revokes it.
        if let Some(leaf) = request.peer_certs().as_ref().and_then(|c| c.first().cloned()) {
            let serial = crate::revocation::serial_of_der(leaf.as_ref()).map_err(ApiError::Unauthenticated)?;
            let revocations = self.fleet.revocations();
            if let Some(r) = revocations.revoked(&serial) {
                tracing::warn!(node = %principal.name, serial = %serial, "agent session refused: certificate revoked");
                return Err(ApiError::Unauthenticated(format!(
                    "certificate {serial} of node {} was revoked by {}: {}",
                    principal.name, r.revoked_by, r.reason
                ))
                .into());
            }
            revocations.note_node_cert(&principal.name, &serial).map_err(ApiError::from)?;
        }
        let stream = self.open_session(principal.name.clone(), Box::pin(request.into_inner())).await?;
        Ok(Response::new(stream))
    }
}

/// The inbound half of a session: what the node sends, in order.
pub type Inbound = Pin<Box<dyn Stream<Item = Result<v1::AgentMessage, Status>> + Send>>;

impl AgentApi {
    /// A node's session once its identity is established: the register message, then reports, heartbeats and
    /// results until either side ends it. The gRPC handler calls it with the name from the node's certificate;
    /// the fleet-scale bench calls it for in-process simulated nodes, which need no socket each.
    pub async fn open_session(&self, node: String, mut inbound: Inbound) -> Result<SessionStream, Status> {
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.next())
            .await
            .map(Option::transpose)
            .map_err(|_| ApiError::InvalidArgument("no register message within 10 s of opening the session".into()))??
            .ok_or_else(|| ApiError::InvalidArgument("session closed before its register message".into()))?;
        let report = match first.body {
            Some(Body::Register(r)) => r,
            _ => return Err(ApiError::InvalidArgument("the first message of a session must be register".into()).into()),
        };
        check_report("register", &report).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        claim_matches(&node, &report.node_name)?;
        let member = self.fleet.record_report(&node, &report).await.map_err(ApiError::from)?;

        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let welcome = v1::HubMessage {
            body: Some(v1::hub_message::Body::Welcome(v1::Welcome {
                heartbeat_interval_seconds: self.fleet.timing.heartbeat_interval_seconds,
                hub_version: upkeep_proto::VERSION.to_string(),
            })),
        };
        // The queue is empty and owned here, so these cannot fail for lack of room.
        let _ = tx.try_send(Ok(Box::new(welcome)));
        let _ = tx.try_send(Ok(Box::new(desired_config(&member))));
        let session = self.fleet.open_session(&node, &member.name, tx.clone());
        tracing::info!(node = %node, member = %member.name, session, "agent registered");
        // A node that (re)joins may be behind its channel: let the channel loop look now, not at its next pass.
        self.maintenance.poke();

        let fleet = self.fleet.clone();
        let maintenance = self.maintenance.clone();
        tokio::spawn(async move {
            let outcome = pump(&fleet, &maintenance, &node, session, &mut inbound, &tx).await;
            if let Err(status) = outcome {
                tracing::warn!(node = %node, session, error = %status.message(), "agent session ended with error");
                let _ = tx.send(Err(status)).await;
            } else {
                tracing::info!(node = %node, session, "agent session closed");
            }
            fleet.close_session(&node, session);
        });
        Ok(Box::pin(ReceiverStream::new(rx).map(|item| item.map(|msg| *msg))))
    }
}

/// Reads the rest of a session until the agent closes it or breaks a rule.
async fn pump(
    fleet: &Fleet,
    maintenance: &Arc<Maintenance>,
    node: &str,
    session: u64,
    inbound: &mut Inbound,
    tx: &SessionTx,
) -> Result<(), Status> {
    let mut closing = fleet.closing();
    loop {
        if *closing.borrow() {
            return Err(Status::unavailable("hub shutting down; reconnect"));
        }
        let msg = tokio::select! {
            m = inbound.next() => m.transpose()?,
            _ = tx.closed() => return Ok(()),
            _ = closing.changed() => continue,
        };
        let Some(msg) = msg else { return Ok(()) };
        maintenance.alive(node);
        match msg.body {
            Some(Body::Report(r)) | Some(Body::Register(r)) => {
                check_report("report", &r).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
                claim_matches(node, &r.node_name)?;
                // Boxed: the session's task lives as long as the session, and holding the report's write inline
                // would make every session's task that much larger (hub memory per agent, BENCHMARKS.md).
                let member = Box::pin(fleet.record_report(node, &r)).await.map_err(ApiError::from)?;
                fleet.session_member(node, session, &member.name);
            }
            Some(Body::Heartbeat(_)) => fleet.heartbeat(node),
            Some(Body::Result(res)) => {
                fleet.touch(node);
                tracing::info!(node, op = %res.operation_id, ok = res.ok, error = %res.error, "operation result");
                // A node answers only its own commands; anything else is refused and changes nothing.
                if let Err(refused) = fleet.deliver_result(node, res) {
                    tracing::warn!(node, error = %refused, "result from the wrong node refused");
                    return Err(ApiError::PermissionDenied(refused.to_string()).into());
                }
            }
            Some(Body::LeaseRequest(req)) => {
                fleet.touch(node);
                // The lease desk runs on the leader: a replica that does not lead passes the request on, and the
                // answer comes back on this session.
                if let Some(relay) = fleet.relay().filter(|_| !fleet.leads()) {
                    relay.lease_request(node, session, &req);
                    continue;
                }
                let answer = maintenance.lease_answer(node, &req).map_err(ApiError::from)?;
                let answer = Box::new(v1::HubMessage { body: Some(v1::hub_message::Body::Lease(answer)) });
                if tx.send(Ok(answer)).await.is_err() {
                    return Ok(());
                }
            }
            Some(Body::LeaseRelease(rel)) => {
                fleet.touch(node);
                if let Some(relay) = fleet.relay().filter(|_| !fleet.leads()) {
                    relay.lease_release(node, &rel);
                    continue;
                }
                maintenance.release(node, &rel).map_err(ApiError::from)?;
            }
            None => return Err(ApiError::InvalidArgument("empty agent message (no body set)".into()).into()),
        }
    }
}
