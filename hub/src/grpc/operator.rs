//! The operator service: reads for viewers and operators, writes for operators only.

use super::{ApiError, principal_of, require};
use crate::fleet::{Fleet, member_to_wire, now_ms};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use upkeep_core::channel::{AutoUpgradeChannel, NodeOsChannel, check_channel_change};
use upkeep_core::ids::Role;
use upkeep_proto::v1;

const READERS: &[Role] = &[Role::Operator, Role::Viewer];
const WRITERS: &[Role] = &[Role::Operator];

/// The OperatorService implementation.
pub struct OperatorApi {
    fleet: Arc<Fleet>,
}

impl OperatorApi {
    /// Over the given fleet.
    pub fn new(fleet: Arc<Fleet>) -> Self {
        OperatorApi { fleet }
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
        Ok(Response::new(v1::ListNodesResponse {
            nodes: nodes.iter().map(|n| self.fleet.node_to_wire(n, now)).collect(),
        }))
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
        Ok(Response::new(self.fleet.node_to_wire(&node, now_ms())))
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
        Ok(Response::new(member_to_wire(&self.member(&req.get_ref().name)?)))
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
        if current.node_os_channel == channel {
            return Ok(Response::new(member_to_wire(&current)));
        }
        // Persist, then act: the store commits the new generation before any agent hears of it.
        let updated = self.fleet.store().set_node_os_channel(&r.member, channel).map_err(ApiError::from)?;
        tracing::info!(operator = %p.name, member = %updated.name, channel = %channel, generation = updated.generation, "node OS channel changed");
        self.fleet.push_member_config(&updated);
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
        let existed = self.fleet.store().forget_node(&req.get_ref().name).map_err(ApiError::from)?;
        tracing::info!(operator = %p.name, node = %req.get_ref().name, existed, "node forgotten");
        Ok(Response::new(v1::ForgetNodeResponse { existed }))
    }
}
