//! `upkeepctl webhook ...`: CloudEvents webhooks (docs/webhooks.md). Flags are checked here, before the hub is
//! called, so that a bad one is refused naming it and nothing is created; the secret is read from a file and
//! never printed.

use super::output::{emit, table, time_text};
use super::{Format, status_line};
use anyhow::anyhow;
use clap::Subcommand;
use std::io::Write;
use std::path::PathBuf;
use tonic::transport::Channel;
use upkeep_proto::v1;
use upkeep_proto::v1::operator_service_client::OperatorServiceClient;

type Client = OperatorServiceClient<Channel>;

/// `upkeepctl webhook ...`
#[derive(Debug, Subcommand)]
pub enum WebhookCommand {
    /// Send matching events to URL as CloudEvents (POST, application/cloudevents+json), signed with the secret.
    Create {
        /// Webhook name (a-z 0-9 - _ .).
        name: String,
        /// Receiver: https://host[:port]/path (http:// only to 127.0.0.0/8 or [::1]).
        #[arg(long)]
        url: String,
        /// Event type patterns, comma-separated, e.g. run.*,node.*,lease.expired.
        #[arg(long, value_delimiter = ',', required = true)]
        events: Vec<String>,
        /// File holding the shared secret of the `upkeep-signature` header (HMAC-SHA256); without it deliveries
        /// are not signed.
        #[arg(long)]
        secret_file: Option<PathBuf>,
    },
    /// List webhooks with their last delivery, pending events and failures.
    List,
    /// Delete a webhook and the events still owed to it.
    Delete {
        /// Webhook name.
        name: String,
    },
}

/// The secret in `path`: its text without the trailing newline; unreadable or empty is an error naming the flag.
pub fn read_secret(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow!(
            "--secret-file {}: cannot read it ({e}); give a file holding the webhook's shared secret",
            path.display()
        )
    })?;
    let secret = text.trim_end_matches(['\n', '\r']).to_string();
    if secret.trim().is_empty() {
        return Err(anyhow!(
            "--secret-file {}: the file is empty; put the webhook's shared secret in it",
            path.display()
        ));
    }
    Ok(secret)
}

/// RFC 3339 (UTC, seconds) of a Unix-ms time; None for 0 (never).
fn rfc3339(ms: i64) -> Option<String> {
    if ms == 0 {
        return None;
    }
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

fn webhook_json(w: &v1::Webhook) -> serde_json::Value {
    let last_result = if w.last_attempt_unix_ms == 0 {
        "none"
    } else if w.last_error.is_empty() {
        "ok"
    } else {
        "failed"
    };
    serde_json::json!({
        "name": w.name,
        "url": w.url,
        "events": w.events,
        "signed": w.signed,
        "created": rfc3339(w.created_unix_ms),
        "pending": w.pending,
        "failures": w.failures,
        "last_attempt": rfc3339(w.last_attempt_unix_ms),
        "last_result": last_result,
        "last_error": w.last_error,
        "last_delivered": rfc3339(w.last_delivered_unix_ms),
    })
}

/// Runs a webhook command. `connect` is called only once the flags are good.
pub async fn webhook<F, Fut>(
    connect: F,
    cmd: &WebhookCommand,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Client>>,
{
    match cmd {
        WebhookCommand::Create { name, url, events, secret_file } => {
            crate::grpc::webhooks::check_name("NAME", name).map_err(|e| anyhow!(e))?;
            crate::webhooks::check_url("--url", url).map_err(|e| anyhow!(e))?;
            let events: Vec<String> = events.iter().map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
            if events.is_empty() {
                return Err(anyhow!("--events: give at least one pattern, e.g. --events run.*,node.*"));
            }
            for e in &events {
                crate::webhooks::check_pattern("--events", e).map_err(|e| anyhow!(e))?;
            }
            let secret = match secret_file {
                Some(p) => read_secret(p)?,
                None => String::new(),
            };
            let req = v1::CreateWebhookRequest { name: name.clone(), url: url.clone(), events, secret };
            let w = connect().await?.create_webhook(req).await.map_err(status_line)?.into_inner();
            if format.is_structured() {
                return emit(format, out, &webhook_json(&w));
            }
            let signed = if w.signed { "signed" } else { "unsigned: no --secret-file" };
            writeln!(out, "webhook {} created: {} -> {} ({signed})", w.name, w.events.join(","), w.url)?;
        }
        WebhookCommand::List => {
            let all = connect().await?.list_webhooks(v1::ListWebhooksRequest {}).await.map_err(status_line)?;
            let all = all.into_inner().webhooks;
            if format.is_structured() {
                let rows: Vec<serde_json::Value> = all.iter().map(webhook_json).collect();
                return emit(format, out, &serde_json::json!({ "webhooks": rows }));
            }
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|w| {
                    let last = match (w.last_attempt_unix_ms, w.last_error.is_empty()) {
                        (0, _) => "-".to_string(),
                        (t, true) => format!("ok {}", time_text(t)),
                        (t, false) => format!("failed {}: {}", time_text(t), w.last_error),
                    };
                    vec![
                        w.name.clone(),
                        w.url.clone(),
                        w.events.join(","),
                        w.pending.to_string(),
                        w.failures.to_string(),
                        last,
                    ]
                })
                .collect();
            table(out, &["NAME", "URL", "EVENTS", "PENDING", "FAILURES", "LAST DELIVERY"], &rows)?;
        }
        WebhookCommand::Delete { name } => {
            let req = v1::DeleteWebhookRequest { name: name.clone() };
            let r = connect().await?.delete_webhook(req).await.map_err(status_line)?.into_inner();
            if !r.existed {
                return Err(anyhow!("webhook {name:?} not found; see `upkeepctl webhook list`"));
            }
            writeln!(out, "webhook {name} deleted")?;
        }
    }
    Ok(())
}
