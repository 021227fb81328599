//! The webhook RPCs (`upkeepctl webhook ...`): checks, then the store. The secret never leaves the hub.

use super::ApiError;
use crate::fleet::{Fleet, now_ms};
use crate::store::{StoreError, WebhookRecord, WebhookStatus};
use upkeep_proto::v1;

/// Longest webhook name.
pub const MAX_NAME: usize = 63;

/// Checks a webhook name: 1 to 63 of `a-z 0-9 - _ .`, starting with a letter or digit.
pub fn check_name(label: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!("{label}: {name:?} is not a webhook name; use 1 to {MAX_NAME} of a-z 0-9 - _ ., e.g. pager"))
    }
}

fn to_wire(w: &WebhookStatus) -> v1::Webhook {
    v1::Webhook {
        name: w.hook.name.clone(),
        url: w.hook.url.clone(),
        events: w.hook.events.clone(),
        signed: !w.hook.secret.is_empty(),
        created_unix_ms: w.hook.created_ms,
        pending: w.pending,
        failures: w.failures,
        last_attempt_unix_ms: w.last_attempt_ms,
        last_error: w.last_error.clone(),
        last_delivered_unix_ms: w.last_delivered_ms,
    }
}

/// CreateWebhook: name, URL and patterns checked (each error names the field), then stored.
pub fn create(fleet: &Fleet, r: &v1::CreateWebhookRequest, by: &str) -> Result<v1::Webhook, ApiError> {
    check_name("name", &r.name).map_err(ApiError::InvalidArgument)?;
    crate::webhooks::check_url("url", &r.url).map_err(ApiError::InvalidArgument)?;
    if r.events.is_empty() {
        return Err(ApiError::InvalidArgument("events: give at least one pattern, e.g. run.*".into()));
    }
    for p in &r.events {
        crate::webhooks::check_pattern("events", p).map_err(ApiError::InvalidArgument)?;
    }
    if r.secret.len() > 4096 {
        return Err(ApiError::InvalidArgument("secret: longer than 4096 bytes; give a shorter secret".into()));
    }
    let hook = WebhookRecord {
        name: r.name.clone(),
        url: r.url.clone(),
        events: r.events.clone(),
        secret: r.secret.clone(),
        created_ms: now_ms(),
    };
    fleet.store().create_webhook(&hook).map_err(|e| match e {
        StoreError::Conflict(m) => ApiError::FailedPrecondition(m),
        other => ApiError::from(other),
    })?;
    fleet.set_webhooks_active(true);
    tracing::info!(webhook = %hook.name, url = %hook.url, events = ?hook.events, signed = !hook.secret.is_empty(), by,
        "webhook created");
    let status = WebhookStatus {
        hook,
        pending: 0,
        failures: 0,
        last_attempt_ms: 0,
        last_error: String::new(),
        last_delivered_ms: 0,
    };
    Ok(to_wire(&status))
}

/// ListWebhooks.
pub fn list(fleet: &Fleet) -> Result<v1::ListWebhooksResponse, ApiError> {
    let all = fleet.store().list_webhooks()?;
    Ok(v1::ListWebhooksResponse { webhooks: all.iter().map(to_wire).collect() })
}

/// DeleteWebhook: the webhook and the events still owed to it.
pub fn delete(fleet: &Fleet, name: &str, by: &str) -> Result<v1::DeleteResponse, ApiError> {
    let existed = fleet.store().delete_webhook(name)?;
    if existed {
        tracing::info!(webhook = %name, by, "webhook deleted");
    }
    Ok(v1::DeleteResponse { existed })
}
