//! The events the hub raises for webhooks besides run events (node, lease, rollout), and `emit`, which puts
//! them in the store's outbox. Building and enqueueing an event needs only the store; the deliveries
//! (`crate::webhooks`) read the outbox.

use crate::store::{LeaseRecord, NodeFacts, OutboxEvent, Store};
use upkeep_core::events::{TYPE_PREFIX, snake};

/// One event of `event_type` (without the `upkeep.` prefix) about `subject`.
pub(crate) fn event(event_type: &str, subject: String, time_ms: i64, data: serde_json::Value) -> OutboxEvent {
    OutboxEvent { event_type: format!("{TYPE_PREFIX}{event_type}"), subject, time_ms, data: data.to_string() }
}

/// Node events of a report: `node.registered` for a node the hub did not know, `node.image_changed` when its
/// node-image-version label changed.
pub fn report_events(node: &str, old: Option<&NodeFacts>, new: &NodeFacts, now: i64) -> Vec<OutboxEvent> {
    let subject = format!("nodes/{node}");
    match old {
        None => vec![event(
            "node.registered",
            subject,
            now,
            serde_json::json!({"node": node, "member": new.member, "node_pool": new.node_pool,
                "region": new.region, "node_image_version": new.node_image_version}),
        )],
        Some(o) if o.node_image_version != new.node_image_version => vec![event(
            "node.image_changed",
            subject,
            now,
            serde_json::json!({"node": node, "member": new.member, "from": o.node_image_version,
                "to": new.node_image_version, "security_patch_version": new.security_patch_version}),
        )],
        Some(_) => Vec::new(),
    }
}

/// `lease.granted`, `lease.released`, `lease.expired` (subject: the node).
pub fn lease_event(what: &str, l: &LeaseRecord, now: i64) -> OutboxEvent {
    event(
        &format!("lease.{what}"),
        format!("nodes/{}", l.node),
        now,
        serde_json::json!({"node": l.node, "lease_id": l.lease_id, "member": l.member, "holder": l.holder,
            "purpose": l.purpose, "forced": l.forced, "expires_ms": l.expires_ms}),
    )
}

/// `rollout.started`, `rollout.completed`, `rollout.failed` (subject: the member).
pub fn rollout_event(
    member: &str,
    rollout: &str,
    status: &str,
    nodes: usize,
    failed: Vec<String>,
    now: i64,
) -> OutboxEvent {
    let what = if status == "Running" { "started".to_string() } else { snake(status) };
    event(
        &format!("rollout.{what}"),
        format!("members/{member}"),
        now,
        serde_json::json!({"member": member, "rollout": rollout, "status": status, "nodes": nodes,
            "failed": failed}),
    )
}

/// Puts events in the outbox (for the webhooks that want them). A store failure is logged: the state change that
/// caused them is already committed.
pub fn emit(store: &dyn Store, events: &[OutboxEvent]) {
    if events.is_empty() {
        return;
    }
    if let Err(e) = store.enqueue_events(events) {
        tracing::error!(error = %e, first = %events[0].event_type, "enqueueing webhook events");
    }
}
