//! The systemd watchdog of the agent, served without a wakeup of its own while the heartbeat comes often enough.
//!
//! The unit sets `WatchdogSec=`; systemd restarts the agent when `WATCHDOG=1` does not come within it. The
//! session loop pings at every heartbeat tick (`ping`), which also pushes the watchdog's own timer one ping
//! interval back; that timer (a `Ticker`, so no timer-wheel wakeups either) fires only when no heartbeat came for
//! a whole ping interval: between sessions, while connecting, or when the hub's heartbeat interval is longer
//! than half the watchdog timeout. With the packaged unit (`WatchdogSec=30s`, ping every 15 s) and a 10 s
//! heartbeat, an idle connected agent wakes for the heartbeat only.
//!
//! Pings come from tasks of the agent's single runtime thread, so a stalled runtime still stops them. Outside
//! systemd (`WATCHDOG_USEC` unset) there is no watchdog and nothing here runs.

use crate::ticker::Ticker;
use std::time::Duration;

/// A watchdog pinged by the heartbeat and, failing that, by its own timer.
pub struct Watchdog {
    every: Duration,
    ticker: Ticker,
}

impl Watchdog {
    /// The watchdog systemd asked for (`WATCHDOG_USEC` for this process), pinged at half its timeout; `None`
    /// when there is none. Needs the runtime (the timer is registered with its reactor).
    pub fn from_env() -> std::io::Result<Option<Watchdog>> {
        match sd_notify::watchdog_enabled() {
            Some(timeout) => Watchdog::new(upkeep_proto::service::ping_interval(timeout)).map(Some),
            None => Ok(None),
        }
    }

    /// A watchdog pinged at least every `every`.
    pub fn new(every: Duration) -> std::io::Result<Watchdog> {
        Ok(Watchdog { every, ticker: Ticker::new(every, every)? })
    }

    /// How often it must be pinged.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// Pings now (from periodic work that wakes anyway) and moves the watchdog's own next ping `every` later.
    pub fn ping(&self) {
        notify();
        if let Err(e) = self.ticker.reset(self.every, self.every) {
            // The old schedule stays: pings come a little more often than needed, never less.
            tracing::warn!(error = %e, "re-arming the watchdog timer");
        }
    }

    /// Pings whenever `every` passed without `ping`; runs until dropped. `pinged` is called after each of its own
    /// pings (tests count them).
    pub async fn serve(&self, mut pinged: impl FnMut()) {
        tracing::info!(ping_ms = self.every.as_millis() as u64, "systemd watchdog on");
        loop {
            if let Err(e) = self.ticker.tick().await {
                // Without the timer the heartbeat alone pings; if the session stops, systemd restarts us.
                tracing::error!(error = %e, "watchdog timer failed; pinging at heartbeats only");
                return std::future::pending().await;
            }
            notify();
            pinged();
        }
    }
}

fn notify() {
    // Outside systemd a no-op; a failure is worth a line, never worth stopping for.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]) {
        tracing::warn!(error = %e, "cannot ping the systemd watchdog");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn pings_from_the_heartbeat_keep_its_own_timer_quiet_and_without_them_it_pings_itself() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let every = Duration::from_millis(300);
            let dog = Arc::new(Watchdog::new(every).expect("timer"));
            let own = Arc::new(AtomicU32::new(0));
            let serving = {
                let (dog, own) = (dog.clone(), own.clone());
                tokio::spawn(async move {
                    dog.serve(|| {
                        own.fetch_add(1, Ordering::Relaxed);
                    })
                    .await
                })
            };
            // A heartbeat every 100 ms: the watchdog never needs its own ping.
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                dog.ping();
            }
            assert_eq!(own.load(Ordering::Relaxed), 0, "pushed back by every heartbeat");
            // No heartbeat: it pings every 300 ms on its own.
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let n = own.load(Ordering::Relaxed);
            assert!((2..=4).contains(&n), "{n} own pings in 1 s at 300 ms");
            serving.abort();
        });
    }
}
