//! The operator service: reads for viewers and operators, writes for operators only.

use super::runview::event_to_wire;
use super::{ApiError, principal_of, require, runs};
use crate::artifacts::Artifacts;
use crate::engine::Engine;
use crate::fleet::{Fleet, member_to_wire, now_ms};
use crate::maintenance::{LeaseError, Maintenance};
use crate::peers::{ASK_WITHIN, OperatorAsk};
use crate::store::EventRecord;
use crate::store::{LeaseRecord, SecurityPatchRecord};
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use upkeep_core::channel::{AutoUpgradeChannel, NodeOsChannel, check_channel_change, security_patch_refusal};
use upkeep_core::ids::Role;
use upkeep_core::run::{self, RunState};
use upkeep_core::signature::PublicKey;
use upkeep_proto::v1;

const READERS: &[Role] = &[Role::Operator, Role::Viewer];
const WRITERS: &[Role] = &[Role::Operator];

/// The OperatorService implementation.
pub struct OperatorApi {
    fleet: Arc<Fleet>,
    engine: Arc<Engine>,
    maintenance: Arc<Maintenance>,
    artifacts: Artifacts,
    trusted_image_keys: Arc<Vec<PublicKey>>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::RunEvent, Status>> + Send>>;

fn token_to_wire(t: &crate::store::JoinTokenRecord) -> v1::JoinToken {
    v1::JoinToken {
        id: t.id.clone(),
        member: t.member.clone(),
        pool: t.node_pool.clone(),
        expires_unix_ms: t.expires_ms,
        uses_left: t.uses_left,
        created_by: t.created_by.clone(),
        created_unix_ms: t.created_ms,
    }
}

/// A run status after which `watch` ends: nothing more happens unless an operator acts.
fn watch_ends(status: &str) -> bool {
    matches!(status, "Completed" | "Skipped" | "Failed" | "Stopped")
}

impl OperatorApi {
    /// Over the given fleet, engine and artifact store.
    pub fn new(
        fleet: Arc<Fleet>,
        engine: Arc<Engine>,
        maintenance: Arc<Maintenance>,
        artifacts: Artifacts,
        trusted_image_keys: Vec<PublicKey>,
    ) -> Self {
        OperatorApi { fleet, engine, maintenance, artifacts, trusted_image_keys: Arc::new(trusted_image_keys) }
    }

    async fn run_op<F>(&self, name: &str, f: F) -> Result<v1::Run, ApiError>
    where
        F: Fn(
            &RunState,
            &run::Fleet,
            &run::Catalog,
            chrono::DateTime<chrono::Utc>,
        ) -> Result<run::Plan, run::RunOpError>,
    {
        self.engine.transact(name, f).await?;
        self.engine.poke();
        runs::run_with_progress(&runs::get_run(self.fleet.store(), name)?, self.engine.executor())
    }

    fn member(&self, name: &str) -> Result<crate::store::MemberRecord, ApiError> {
        self.fleet.store().get_member(name)?.ok_or_else(|| {
            ApiError::NotFound(format!(
                "member {name:?} not found; see `upkeepctl member list` (a member appears when its first node registers)"
            ))
        })
    }
}

#[tonic::async_trait]
impl v1::operator_service_server::OperatorService for OperatorApi {
    async fn who_am_i(&self, req: Request<v1::WhoAmIRequest>) -> Result<Response<v1::WhoAmIResponse>, Status> {
        let p = principal_of(&req)?;
        require(&p, &[Role::Operator, Role::Viewer, Role::Node], "call WhoAmI")?;
        Ok(Response::new(v1::WhoAmIResponse { role: p.role.as_str().into(), name: p.name }))
    }

    async fn list_nodes(&self, req: Request<v1::ListNodesRequest>) -> Result<Response<v1::ListNodesResponse>, Status> {
        require(&principal_of(&req)?, READERS, "list nodes")?;
        let member = req.get_ref().member.as_str();
        let nodes = self.fleet.store().list_nodes((!member.is_empty()).then_some(member)).map_err(ApiError::from)?;
        let now = now_ms();
        Ok(Response::new(v1::ListNodesResponse { nodes: nodes.iter().map(|n| self.node_wire(n, now)).collect() }))
    }

    async fn get_node(&self, req: Request<v1::GetNodeRequest>) -> Result<Response<v1::Node>, Status> {
        require(&principal_of(&req)?, READERS, "read nodes")?;
        let name = &req.get_ref().name;
        let node = self
            .fleet
            .store()
            .get_node(name)
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(format!("node {name:?} not found; see `upkeepctl node list`")))?;
        let mut wire = self.node_wire(&node, now_ms());
        wire.history = crate::executor::node_history(self.fleet.store(), name, 20)
            .map_err(ApiError::from)?
            .into_iter()
            .map(|h| v1::NodeHistoryEntry {
                work_id: h.work_id,
                purpose: h.purpose,
                outcome: h.outcome,
                detail: h.detail,
                started_unix_ms: h.started_ms,
                finished_unix_ms: h.finished_ms.unwrap_or(0),
            })
            .collect();
        Ok(Response::new(wire))
    }

    async fn list_members(
        &self,
        req: Request<v1::ListMembersRequest>,
    ) -> Result<Response<v1::ListMembersResponse>, Status> {
        require(&principal_of(&req)?, READERS, "list members")?;
        let members = self.fleet.store().list_members().map_err(ApiError::from)?;
        Ok(Response::new(v1::ListMembersResponse { members: members.iter().map(member_to_wire).collect() }))
    }

    async fn get_member(&self, req: Request<v1::GetMemberRequest>) -> Result<Response<v1::Member>, Status> {
        require(&principal_of(&req)?, READERS, "read members")?;
        let mut m = member_to_wire(&self.member(&req.get_ref().name)?);
        m.auto_upgrade_status = self.maintenance.member_status(&m.name);
        Ok(Response::new(m))
    }

    async fn set_member_channel(
        &self,
        req: Request<v1::SetMemberChannelRequest>,
    ) -> Result<Response<v1::Member>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "change a member's node OS channel")?;
        let r = req.get_ref();
        let channel: NodeOsChannel =
            r.channel.parse().map_err(|e| ApiError::InvalidArgument(format!("channel: {e}")))?;
        let current = self.member(&r.member)?;
        check_channel_change(&current.name, current.auto_upgrade_channel, channel)
            .map_err(|e| ApiError::FailedPrecondition(e.to_string()))?;
        if channel == NodeOsChannel::SecurityPatch {
            let nodes = self.fleet.store().list_nodes(Some(&current.name)).map_err(ApiError::from)?;
            if let Some(why) = nodes
                .iter()
                .find_map(|n| security_patch_refusal(&n.facts.os_family, &n.facts.hardware_class, &n.facts.node_pool))
            {
                return Err(ApiError::FailedPrecondition(format!("member {}: {why}", current.name)).into());
            }
        }
        if current.node_os_channel == channel {
            return Ok(Response::new(member_to_wire(&current)));
        }
        // Persist, then act: the store commits the new generation before any agent hears of it.
        let updated = self.fleet.store().set_node_os_channel(&r.member, channel).map_err(ApiError::from)?;
        tracing::info!(operator = %p.name, member = %updated.name, channel = %channel, generation = updated.generation, "node OS channel changed");
        self.fleet.push_member_config(&updated);
        self.maintenance.channel_switched(&updated.name, updated.generation, current.node_os_channel, channel);
        Ok(Response::new(member_to_wire(&updated)))
    }

    async fn set_auto_upgrade_channel(
        &self,
        req: Request<v1::SetAutoUpgradeChannelRequest>,
    ) -> Result<Response<v1::Member>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "change a member's cluster auto-upgrade channel")?;
        let r = req.get_ref();
        let channel: AutoUpgradeChannel =
            r.channel.parse().map_err(|e| ApiError::InvalidArgument(format!("channel: {e}")))?;
        let current = self.member(&r.member)?;
        let mut updated = self.fleet.store().set_auto_upgrade_channel(&r.member, channel).map_err(ApiError::from)?;
        // SPEC §2: node-image forces the node OS channel to NodeImage.
        if channel == AutoUpgradeChannel::NodeImage && current.node_os_channel != NodeOsChannel::NodeImage {
            updated =
                self.fleet.store().set_node_os_channel(&r.member, NodeOsChannel::NodeImage).map_err(ApiError::from)?;
            self.maintenance.channel_switched(
                &updated.name,
                updated.generation,
                current.node_os_channel,
                NodeOsChannel::NodeImage,
            );
        }
        tracing::info!(operator = %p.name, member = %updated.name, channel = %channel, "auto-upgrade channel changed");
        self.fleet.push_member_config(&updated);
        Ok(Response::new(member_to_wire(&updated)))
    }

    async fn forget_node(
        &self,
        req: Request<v1::ForgetNodeRequest>,
    ) -> Result<Response<v1::ForgetNodeResponse>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "forget nodes")?;
        let node = &req.get_ref().name;
        // Revoke first, then end the session, then forget: a session still open could report the node back.
        let revoked = self.fleet.revocations().revoke_node(node, "node forgotten", &p.uri()).map_err(ApiError::from)?;
        self.fleet.end_session(node, "this node was forgotten by the hub and its certificate revoked");
        let existed = self.fleet.store().forget_node(node).map_err(ApiError::from)?;
        tracing::info!(operator = %p.name, node = %node, existed, revoked = revoked.len(), "node forgotten");
        Ok(Response::new(v1::ForgetNodeResponse { existed, revoked: revoked.iter().map(revoked_to_wire).collect() }))
    }

    async fn revoke_certificate(
        &self,
        req: Request<v1::RevokeCertificateRequest>,
    ) -> Result<Response<v1::RevokedCertificate>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "revoke certificates")?;
        let r = req.get_ref();
        let serial = crate::revocation::normalise_serial(&r.serial).map_err(ApiError::InvalidArgument)?;
        let reason = if r.reason.trim().is_empty() { "revoked by an operator" } else { r.reason.trim() };
        let revoked = self.fleet.revocations().revoke(&serial, reason, &p.uri()).map_err(ApiError::from)?;
        // A node still connected with it loses its session now (the door refuses its next connection).
        if let Some(node) = revoked.subject.strip_prefix("node ") {
            self.fleet.end_session(node, "this node's certificate was revoked");
        }
        Ok(Response::new(revoked_to_wire(&revoked)))
    }

    async fn create_join_token(
        &self,
        req: Request<v1::CreateJoinTokenRequest>,
    ) -> Result<Response<v1::CreateJoinTokenResponse>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "create join tokens")?;
        let r = req.get_ref();
        let t = crate::join::new_token(&r.member, &r.pool, r.ttl_seconds, r.uses, &p.uri(), now_ms())
            .map_err(ApiError::InvalidArgument)?;
        self.fleet.store().create_join_token(&t.record).map_err(ApiError::from)?;
        tracing::info!(token = %t.record.id, member = %t.record.member, pool = %t.record.node_pool,
            uses = t.record.uses_left, by = %p.uri(), "join token created");
        Ok(Response::new(v1::CreateJoinTokenResponse { token: Some(token_to_wire(&t.record)), secret_token: t.text }))
    }

    async fn list_join_tokens(
        &self,
        req: Request<v1::ListJoinTokensRequest>,
    ) -> Result<Response<v1::ListJoinTokensResponse>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "list join tokens")?;
        let tokens = self.fleet.store().list_join_tokens().map_err(ApiError::from)?;
        Ok(Response::new(v1::ListJoinTokensResponse { tokens: tokens.iter().map(token_to_wire).collect() }))
    }

    async fn revoke_join_token(
        &self,
        req: Request<v1::RevokeJoinTokenRequest>,
    ) -> Result<Response<v1::RevokeJoinTokenResponse>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "revoke join tokens")?;
        let id = req.get_ref().id.trim().to_ascii_lowercase();
        let existed = self.fleet.store().revoke_join_token(&id).map_err(ApiError::from)?;
        if existed {
            tracing::info!(token = %id, by = %p.uri(), "join token revoked");
        }
        Ok(Response::new(v1::RevokeJoinTokenResponse { existed }))
    }

    async fn list_revoked_certificates(
        &self,
        req: Request<v1::ListRevokedCertificatesRequest>,
    ) -> Result<Response<v1::ListRevokedCertificatesResponse>, Status> {
        require(&principal_of(&req)?, READERS, "list revoked certificates")?;
        let certificates = self.fleet.revocations().list().iter().map(revoked_to_wire).collect();
        Ok(Response::new(v1::ListRevokedCertificatesResponse { certificates }))
    }

    async fn get_member_settings(
        &self,
        req: Request<v1::GetMemberRequest>,
    ) -> Result<Response<v1::MemberSettings>, Status> {
        require(&principal_of(&req)?, READERS, "read member settings")?;
        let s = self.fleet.store().member_settings(&req.get_ref().name).map_err(ApiError::from)?;
        Ok(Response::new(runs::settings_to_wire(&s, Vec::new())))
    }

    async fn set_member_window(
        &self,
        req: Request<v1::SetMemberWindowRequest>,
    ) -> Result<Response<v1::MemberSettings>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "change maintenance windows")?;
        let out = runs::set_window(self.fleet.store(), req.get_ref())?;
        tracing::info!(operator = %p.name, member = %out.member, kind = %req.get_ref().kind, "maintenance window changed");
        self.engine.poke();
        self.maintenance.poke();
        Ok(Response::new(out))
    }

    async fn set_member_disruption(
        &self,
        req: Request<v1::SetMemberDisruptionRequest>,
    ) -> Result<Response<v1::MemberSettings>, Status> {
        require(&principal_of(&req)?, WRITERS, "change disruption settings")?;
        let out = runs::set_disruption(self.fleet.store(), req.get_ref())?;
        self.maintenance.poke();
        Ok(Response::new(out))
    }

    async fn upload_artifact(
        &self,
        req: Request<tonic::Streaming<v1::ArtifactChunk>>,
    ) -> Result<Response<v1::UploadArtifactResponse>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "upload artifacts")?;
        let out = runs::upload(&self.artifacts, req.into_inner()).await?;
        tracing::info!(operator = %p.name, sha256 = %out.sha256, size = out.size_bytes, "artifact uploaded");
        Ok(Response::new(out))
    }

    async fn publish_image(&self, req: Request<v1::PublishImageRequest>) -> Result<Response<v1::Image>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "publish images")?;
        // Verifying reads the whole artifact: off the async threads.
        let (fleet, artifacts, keys) = (self.fleet.clone(), self.artifacts.clone(), self.trusted_image_keys.clone());
        let r = req.into_inner();
        let out = tokio::task::spawn_blocking(move || runs::publish(fleet.store(), &artifacts, &keys, &r))
            .await
            .map_err(|e| Status::internal(format!("publishing: {e}")))??;
        tracing::info!(operator = %p.name, family = %out.family, version = %out.version, "image published");
        self.engine.poke();
        self.maintenance.poke();
        Ok(Response::new(out))
    }

    async fn withdraw_image(&self, req: Request<v1::WithdrawImageRequest>) -> Result<Response<v1::Image>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "withdraw images")?;
        let r = req.get_ref();
        let out = runs::withdraw(self.fleet.store(), r)?;
        tracing::info!(operator = %p.name, family = %out.family, version = %out.version, region = %r.region,
            "image withdrawn from a region");
        // The catalog changed: runs and channel rollouts re-plan against it.
        self.engine.poke();
        self.maintenance.poke();
        Ok(Response::new(out))
    }

    async fn list_images(
        &self,
        req: Request<v1::ListImagesRequest>,
    ) -> Result<Response<v1::ListImagesResponse>, Status> {
        require(&principal_of(&req)?, READERS, "list images")?;
        Ok(Response::new(runs::list_images(self.fleet.store(), &req.get_ref().family)?))
    }

    async fn publish_kubernetes(
        &self,
        req: Request<v1::PublishKubernetesRequest>,
    ) -> Result<Response<v1::KubernetesRelease>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "publish Kubernetes releases")?;
        let out = runs::publish_kubernetes(self.fleet.store(), req.get_ref())?;
        tracing::info!(operator = %p.name, version = %out.version, "Kubernetes release published");
        self.engine.poke();
        Ok(Response::new(out))
    }

    async fn list_kubernetes(
        &self,
        req: Request<v1::ListKubernetesRequest>,
    ) -> Result<Response<v1::ListKubernetesResponse>, Status> {
        require(&principal_of(&req)?, READERS, "list Kubernetes releases")?;
        Ok(Response::new(runs::list_kubernetes(self.fleet.store())?))
    }

    async fn put_strategy(&self, req: Request<v1::PutStrategyRequest>) -> Result<Response<v1::Strategy>, Status> {
        require(&principal_of(&req)?, WRITERS, "change strategies")?;
        Ok(Response::new(runs::put_strategy(self.fleet.store(), req.get_ref())?))
    }

    async fn get_strategy(&self, req: Request<v1::GetStrategyRequest>) -> Result<Response<v1::Strategy>, Status> {
        require(&principal_of(&req)?, READERS, "read strategies")?;
        let name = &req.get_ref().name;
        let spec =
            self.fleet.store().get_strategy(name).map_err(ApiError::from)?.ok_or_else(|| {
                ApiError::NotFound(format!("strategy {name:?} not found; see `upkeepctl strategy list`"))
            })?;
        Ok(Response::new(v1::Strategy { name: name.clone(), spec_json: spec }))
    }

    async fn list_strategies(
        &self,
        req: Request<v1::ListStrategiesRequest>,
    ) -> Result<Response<v1::ListStrategiesResponse>, Status> {
        require(&principal_of(&req)?, READERS, "list strategies")?;
        let all = self.fleet.store().list_strategies().map_err(ApiError::from)?;
        Ok(Response::new(v1::ListStrategiesResponse {
            strategies: all.into_iter().map(|(name, spec_json)| v1::Strategy { name, spec_json }).collect(),
        }))
    }

    async fn delete_strategy(
        &self,
        req: Request<v1::GetStrategyRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        require(&principal_of(&req)?, WRITERS, "delete strategies")?;
        let existed = self.fleet.store().delete_strategy(&req.get_ref().name).map_err(ApiError::from)?;
        Ok(Response::new(v1::DeleteResponse { existed }))
    }

    async fn create_run(&self, req: Request<v1::CreateRunRequest>) -> Result<Response<v1::Run>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "create update runs")?;
        let out = runs::create_run(self.fleet.store(), req.get_ref())?;
        tracing::info!(operator = %p.name, run = %out.name, "update run created");
        Ok(Response::new(out))
    }

    async fn update_run(&self, req: Request<v1::CreateRunRequest>) -> Result<Response<v1::Run>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "edit update runs")?;
        let out = runs::update_run(self.fleet.store(), req.get_ref())?;
        tracing::info!(operator = %p.name, run = %out.name, "update run edited");
        Ok(Response::new(out))
    }

    async fn get_run(&self, req: Request<v1::RunNameRequest>) -> Result<Response<v1::Run>, Status> {
        require(&principal_of(&req)?, READERS, "read update runs")?;
        let rec = runs::get_run(self.fleet.store(), &req.get_ref().name)?;
        Ok(Response::new(runs::run_with_progress(&rec, self.engine.executor())?))
    }

    async fn list_runs(&self, req: Request<v1::ListRunsRequest>) -> Result<Response<v1::ListRunsResponse>, Status> {
        require(&principal_of(&req)?, READERS, "list update runs")?;
        let all = self.fleet.store().list_runs().map_err(ApiError::from)?;
        let runs = all.iter().map(runs::run_to_wire).collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(v1::ListRunsResponse { runs }))
    }

    async fn start_run(&self, req: Request<v1::RunNameRequest>) -> Result<Response<v1::Run>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "start update runs")?;
        let name = req.get_ref().name.clone();
        let out = self.run_op(&name, run::start).await?;
        tracing::info!(operator = %p.name, run = %name, "update run started");
        Ok(Response::new(out))
    }

    async fn stop_run(&self, req: Request<v1::RunNameRequest>) -> Result<Response<v1::Run>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "stop update runs")?;
        let name = req.get_ref().name.clone();
        let out = self.run_op(&name, |s, _, _, now| run::stop(s, now)).await?;
        tracing::info!(operator = %p.name, run = %name, "update run stopped");
        Ok(Response::new(out))
    }

    async fn skip_run(&self, req: Request<v1::SkipRunRequest>) -> Result<Response<v1::Run>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "skip parts of update runs")?;
        let target = runs::skip_target(req.get_ref())?;
        let name = req.get_ref().name.clone();
        let out = self.run_op(&name, |s, f, c, now| run::skip(s, &target, f, c, now)).await?;
        tracing::info!(operator = %p.name, run = %name, "update run skip");
        Ok(Response::new(out))
    }

    async fn delete_run(&self, req: Request<v1::RunNameRequest>) -> Result<Response<v1::DeleteResponse>, Status> {
        require(&principal_of(&req)?, WRITERS, "delete update runs")?;
        Ok(Response::new(runs::delete_run(self.fleet.store(), &req.get_ref().name)?))
    }

    async fn plan_run(&self, req: Request<v1::PlanRunRequest>) -> Result<Response<v1::RunPlan>, Status> {
        require(&principal_of(&req)?, READERS, "read update runs")?;
        Ok(Response::new(runs::plan_run(&self.engine, self.fleet.store(), req.get_ref())?))
    }

    async fn get_schedule(&self, req: Request<v1::GetScheduleRequest>) -> Result<Response<v1::Schedule>, Status> {
        require(&principal_of(&req)?, READERS, "read the schedule")?;
        let ask =
            crate::schedule::Ask::from_request(req.get_ref(), chrono::Utc::now()).map_err(Status::invalid_argument)?;
        let s = crate::schedule::forecast(&self.engine, &self.maintenance, self.fleet.store(), &ask)
            .map_err(ApiError::from)?;
        Ok(Response::new(s))
    }

    type WatchRunStream = EventStream;

    async fn watch_run(&self, req: Request<v1::WatchRunRequest>) -> Result<Response<Self::WatchRunStream>, Status> {
        require(&principal_of(&req)?, READERS, "watch update runs")?;
        let r = req.into_inner();
        // Subscribe before reading the run and replaying its events, so nothing committed in between is missed
        // (duplicates are dropped by seq): a run that ended before the subscription reads as ended, one that ends
        // after it is seen ending on the live feed.
        let mut live = self.engine.subscribe();
        let rec = runs::get_run(self.fleet.store(), &r.name)?;
        let stored = self.fleet.store().events_since(&r.name, r.from_seq).map_err(ApiError::from)?;
        let status_now =
            crate::engine::parse_state(&rec).map(|s| s.run.status.as_str().to_string()).map_err(ApiError::from)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<v1::RunEvent, Status>>(256);
        let store_fleet = self.fleet.clone();
        let name = r.name.clone();
        tokio::spawn(async move {
            // Events are numbered when stored but published by the task that stored them, so the live feed may
            // deliver them out of order: dedupe by seq, and before ending re-read the store for any not yet seen.
            let mut seen: std::collections::HashSet<u64> = std::collections::HashSet::new();
            let from = r.from_seq;
            for e in &stored {
                seen.insert(e.seq);
                if tx.send(Ok(event_to_wire(e))).await.is_err() {
                    return;
                }
            }
            if watch_ends(&status_now) {
                return;
            }
            let catch_up = |seen: &mut std::collections::HashSet<u64>| -> Option<(Vec<EventRecord>, bool)> {
                let more = store_fleet.store().events_since(&name, from).ok()?;
                let mut end = false;
                let fresh: Vec<EventRecord> = more.into_iter().filter(|e| seen.insert(e.seq)).collect();
                for e in &fresh {
                    end |= e.event.kind == "run" && watch_ends(&e.event.to);
                }
                Some((fresh, end))
            };
            loop {
                let (batch, end) = match live.recv().await {
                    Ok(e) if e.run == name && !seen.contains(&e.seq) => {
                        let end = e.event.kind == "run" && watch_ends(&e.event.to);
                        if end {
                            // The run is final: everything before it is stored; send what the feed has not.
                            let Some((fresh, _)) = catch_up(&mut seen) else { return };
                            (fresh, true)
                        } else {
                            seen.insert(e.seq);
                            (vec![e], false)
                        }
                    }
                    Ok(_) => continue,
                    // Too slow for the live feed: catch up from the store.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let Some(b) = catch_up(&mut seen) else { return };
                        b
                    }
                    Err(_) => return,
                };
                for e in &batch {
                    if tx.send(Ok(event_to_wire(e))).await.is_err() {
                        return;
                    }
                }
                if end {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn publish_security_patch(
        &self,
        req: Request<v1::PublishSecurityPatchRequest>,
    ) -> Result<Response<v1::SecurityPatch>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "publish security patches")?;
        let r = req.get_ref();
        upkeep_core::version::validate_family(&r.family)
            .map_err(|e| ApiError::InvalidArgument(format!("family: {e}")))?;
        let version: upkeep_core::version::ImageVersion =
            r.version.parse().map_err(|e| ApiError::InvalidArgument(format!("version: {e}")))?;
        if r.packages.is_empty() {
            return Err(ApiError::InvalidArgument(
                "packages: empty; a security patch names the exact packages it installs, as name=version".into(),
            )
            .into());
        }
        for (i, pin) in r.packages.iter().enumerate() {
            let ok = pin.split_once('=').is_some_and(|(n, v)| {
                !n.is_empty()
                    && !v.is_empty()
                    && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-._:".contains(&b))
                    && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-._:~".contains(&b))
            });
            if !ok {
                return Err(ApiError::InvalidArgument(format!(
                    "packages[{i}]: {pin:?} is not name=version (e.g. openssl=3.0.11-1~deb12u2)"
                ))
                .into());
            }
        }
        let rec = SecurityPatchRecord {
            family: r.family.clone(),
            version: version.to_string(),
            packages: r.packages.clone(),
            published_ms: now_ms(),
        };
        self.fleet.store().put_security_patch(&rec).map_err(ApiError::from)?;
        tracing::info!(operator = %p.name, family = %rec.family, version = %rec.version, packages = rec.packages.len(), "security patch published");
        self.maintenance.poke();
        Ok(Response::new(patch_to_wire(&rec)))
    }

    async fn list_security_patches(
        &self,
        req: Request<v1::ListSecurityPatchesRequest>,
    ) -> Result<Response<v1::ListSecurityPatchesResponse>, Status> {
        require(&principal_of(&req)?, READERS, "list security patches")?;
        let family = req.get_ref().family.as_str();
        let patches =
            self.fleet.store().list_security_patches((!family.is_empty()).then_some(family)).map_err(ApiError::from)?;
        Ok(Response::new(v1::ListSecurityPatchesResponse { patches: patches.iter().map(patch_to_wire).collect() }))
    }

    async fn list_leases(
        &self,
        req: Request<v1::ListLeasesRequest>,
    ) -> Result<Response<v1::ListLeasesResponse>, Status> {
        require(&principal_of(&req)?, READERS, "list leases")?;
        let member = req.get_ref().member.as_str();
        let now = now_ms();
        let leases = self
            .fleet
            .store()
            .list_leases()
            .map_err(ApiError::from)?
            .into_iter()
            .filter(|l| (member.is_empty() || l.member == member) && l.expires_ms > now)
            .map(|l| lease_to_wire(&l))
            .collect();
        Ok(Response::new(v1::ListLeasesResponse { leases }))
    }

    async fn reboot_node(&self, req: Request<v1::RebootNodeRequest>) -> Result<Response<v1::Lease>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "reboot nodes")?;
        let r = req.get_ref();
        let lease_id = match self.fleet.relay().filter(|_| !self.fleet.leads()) {
            // Node work is the leader's: a replica that does not lead passes the request on and waits.
            Some(relay) => {
                let ask = OperatorAsk::Reboot { node: r.node.clone(), force: r.force, operator: p.name.clone() };
                relay.ask_leader(ask, ASK_WITHIN).await.map_err(LeaseError::from)
            }
            None => self.maintenance.operator_reboot(&r.node, r.force, &p.name),
        }
        .map_err(lease_error)?;
        tracing::info!(operator = %p.name, node = %r.node, force = r.force, lease = %lease_id, "reboot ordered");
        self.lease_of(&r.node, &lease_id)
    }

    async fn uncordon_node(
        &self,
        req: Request<v1::UncordonNodeRequest>,
    ) -> Result<Response<v1::UncordonNodeResponse>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "uncordon nodes")?;
        let node = &req.get_ref().node;
        let released = self.maintenance.out_of_service(node);
        let work = match self.fleet.relay().filter(|_| !self.fleet.leads()) {
            Some(relay) => {
                let ask = OperatorAsk::Uncordon { node: node.clone(), operator: p.name.clone() };
                relay.ask_leader(ask, ASK_WITHIN).await.map_err(LeaseError::from)
            }
            None => self.maintenance.operator_uncordon(node, &p.name).await,
        }
        .map_err(lease_error)?;
        tracing::info!(operator = %p.name, node = %node, work = %work, "uncordon ordered");
        Ok(Response::new(v1::UncordonNodeResponse { work, out_of_service: released }))
    }

    async fn create_webhook(&self, req: Request<v1::CreateWebhookRequest>) -> Result<Response<v1::Webhook>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "create webhooks")?;
        Ok(Response::new(super::webhooks::create(&self.fleet, req.get_ref(), &p.uri())?))
    }

    async fn list_webhooks(
        &self,
        req: Request<v1::ListWebhooksRequest>,
    ) -> Result<Response<v1::ListWebhooksResponse>, Status> {
        require(&principal_of(&req)?, READERS, "list webhooks")?;
        Ok(Response::new(super::webhooks::list(&self.fleet)?))
    }

    async fn delete_webhook(
        &self,
        req: Request<v1::DeleteWebhookRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        let p = principal_of(&req)?;
        require(&p, WRITERS, "delete webhooks")?;
        Ok(Response::new(super::webhooks::delete(&self.fleet, &req.get_ref().name, &p.uri())?))
    }
}

fn lease_error(e: LeaseError) -> ApiError {
    match e {
        LeaseError::Store(e) => ApiError::from(e),
        LeaseError::NoSuchNode(_) => ApiError::NotFound(e.to_string()),
        LeaseError::NotConnected(_) | LeaseError::Denied(_) => ApiError::FailedPrecondition(e.to_string()),
    }
}

impl OperatorApi {
    /// The wire view of a node with why not now (what it waits for, when it is next eligible, what its channel
    /// wants that it lacks, the lease that keeps it out of service).
    fn node_wire(&self, n: &crate::store::NodeRecord, now: i64) -> v1::Node {
        let mut w = self.fleet.node_to_wire(n, now);
        let why = self.maintenance.node_why(&n.name);
        w.waiting = why.waiting;
        w.next_eligible_unix_ms = why.next_eligible_ms;
        w.behind = why.behind;
        w.out_of_service = self.maintenance.out_of_service(&n.name);
        w
    }

    fn lease_of(&self, node: &str, lease_id: &str) -> Result<Response<v1::Lease>, Status> {
        let lease = self
            .fleet
            .store()
            .list_leases()
            .map_err(ApiError::from)?
            .into_iter()
            .find(|l| l.node == node && l.lease_id == lease_id)
            .ok_or_else(|| ApiError::Internal("the granted lease is not in the store".into()))?;
        Ok(Response::new(lease_to_wire(&lease)))
    }
}

fn patch_to_wire(p: &SecurityPatchRecord) -> v1::SecurityPatch {
    v1::SecurityPatch {
        family: p.family.clone(),
        version: p.version.clone(),
        packages: p.packages.clone(),
        published_unix_ms: p.published_ms,
    }
}

fn lease_to_wire(l: &LeaseRecord) -> v1::Lease {
    v1::Lease {
        node: l.node.clone(),
        lease_id: l.lease_id.clone(),
        member: l.member.clone(),
        holder: l.holder.clone(),
        purpose: l.purpose.clone(),
        granted_unix_ms: l.granted_ms,
        expires_unix_ms: l.expires_ms,
        forced: l.forced,
    }
}

fn revoked_to_wire(r: &crate::store::RevokedCert) -> v1::RevokedCertificate {
    v1::RevokedCertificate {
        serial: r.serial.clone(),
        subject: r.subject.clone(),
        reason: r.reason.clone(),
        revoked_by: r.revoked_by.clone(),
        revoked_unix_ms: r.revoked_ms,
    }
}
