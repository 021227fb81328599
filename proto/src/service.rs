//! Life as a systemd service, for both daemons: where logs go and what they tell the service manager.
//!
//! Logs go to the journal, with every `tracing` field as a journal field of the same name in upper case
//! (`node = %name` becomes `NODE=...`, `op` becomes `OP`, `run` becomes `RUN`), when systemd connected our
//! stderr to the journal (`JOURNAL_STREAM` names stderr's device and inode); everywhere else (a terminal, the
//! test harness, a container without journald) they go to stderr as text.
//!
//! The sd_notify calls (`READY=1`, `STATUS=`, `STOPPING=1`, `WATCHDOG=1`) do nothing when `NOTIFY_SOCKET`
//! is unset, so the same binary runs unchanged outside systemd. This module must not decide anything about the
//! node or the fleet: it only reports what `main` tells it.
//!
//! It lives in upkeep-proto because this is the one crate both daemons share besides the pure core; it is
//! process plumbing, not wire format, and nothing else in this crate uses it. upkeepctl never calls it.

use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// The systemd journal, with structured fields.
    Journal,
    /// Plain text on stderr.
    Stderr,
}

/// Installs the global `tracing` subscriber (journal or stderr, level from `RUST_LOG`, default `info`).
pub fn init_logging() -> LogTarget {
    let filter = || log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let mut journal_error = None;
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(layer) => {
                // No prefix: `journalctl NODE=node-01` reads better than `F_NODE=node-01`.
                let layer = layer.with_field_prefix(None);
                tracing_subscriber::registry().with(filter()).with(layer).init();
                return LogTarget::Journal;
            }
            Err(e) => journal_error = Some(e),
        }
    }
    // Colours only on a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let text = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    tracing_subscriber::registry().with(filter()).with(text).init();
    if let Some(e) = journal_error {
        tracing::warn!(error = %e, "stderr is the journal but its socket is unusable; logging plain text");
    }
    LogTarget::Stderr
}

/// What `RUST_LOG` lets through: a default level and per-target levels, `warn,upkeep_hub::engine=debug`. Unset,
/// empty or unreadable: `info`. (A plain target list, not `EnvFilter`'s span and regex directives: those cost
/// the daemons a regex engine.)
pub fn log_filter(spec: Option<&str>) -> Targets {
    spec.map(str::trim)
        .filter(|s| !s.is_empty())
        .and_then(|s| s.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO))
}

/// Whether systemd connected our stderr to the journal (see systemd.exec(5), `$JOURNAL_STREAM`).
fn stderr_is_journal() -> bool {
    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM").ok().as_deref().and_then(parse_journal_stream) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(m) => m.dev() == dev && m.ino() == ino,
        Err(_) => false,
    }
}

/// Parses `$JOURNAL_STREAM` (`DEVICE:INODE`, both decimal).
pub fn parse_journal_stream(text: &str) -> Option<(u64, u64)> {
    let (dev, ino) = text.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// Tells the service manager that start-up is complete, with a status line.
pub fn ready(status: &str) {
    send(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(status)]);
}

/// Tells the service manager that a clean shutdown has begun.
pub fn stopping(status: &str) {
    send(&[sd_notify::NotifyState::Stopping, sd_notify::NotifyState::Status(status)]);
}

fn send(states: &[sd_notify::NotifyState<'_>]) {
    // Outside systemd this is a no-op; under systemd a failure is worth a line but never worth stopping for.
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// How often to ping a watchdog of `timeout`: at half of it, as sd_watchdog_enabled(3) advises, never faster
/// than every 100 ms.
pub fn ping_interval(timeout: Duration) -> Duration {
    (timeout / 2).max(Duration::from_millis(100))
}

/// Pings the systemd watchdog forever at `ping_interval` when `WatchdogSec=` is set for us; otherwise never
/// completes and never wakes. Run it as a task on the daemon's own runtime: if that runtime stops making
/// progress, the pings stop and systemd restarts the service.
pub async fn watchdog() {
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return std::future::pending().await;
    };
    let every = ping_interval(timeout);
    tracing::info!(watchdog_ms = timeout.as_millis() as u64, ping_ms = every.as_millis() as u64, "systemd watchdog on");
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        send(&[sd_notify::NotifyState::Watchdog]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_is_device_colon_inode() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream(" 64769:2\n"), Some((64769, 2)));
        assert_eq!(parse_journal_stream("8"), None);
        assert_eq!(parse_journal_stream("x:1"), None);
        assert_eq!(parse_journal_stream(""), None);
    }

    #[test]
    fn rust_log_names_a_default_level_and_levels_per_target() {
        use tracing::Level;
        let f = log_filter(Some("warn,upkeep_hub::engine=debug"));
        assert!(f.would_enable("upkeep_hub::engine", &Level::DEBUG));
        assert!(!f.would_enable("upkeep_hub::fleet", &Level::INFO));
        assert!(f.would_enable("upkeep_hub::fleet", &Level::WARN));
        for unset in [None, Some(""), Some("not a=filter=at all")] {
            let f = log_filter(unset);
            assert!(f.would_enable("upkeep_agent", &Level::INFO), "{unset:?}");
            assert!(!f.would_enable("upkeep_agent", &Level::DEBUG), "{unset:?}");
        }
    }

    #[test]
    fn watchdog_is_pinged_at_half_its_timeout() {
        assert_eq!(ping_interval(Duration::from_secs(30)), Duration::from_secs(15));
        assert_eq!(ping_interval(Duration::from_millis(50)), Duration::from_millis(100));
    }
}
