//! The session's one periodic timer, kept by the kernel (a `timerfd`) rather than by tokio's timer wheel.
//!
//! Why not `tokio::time::interval`: tokio files a far deadline in a coarse slot of its hierarchical wheel and
//! wakes the thread at the start of that slot to move the entry down a level, then again at the start of the
//! finer slot. A 10 s heartbeat thus cost the idle agent two or three empty wakeups before every real one. A
//! timerfd wakes the runtime once, at the deadline; tokio only waits for it to become readable.
//!
//! This module owns no policy: the session loop decides what a tick means (heartbeat, watchdog ping). It must
//! not be used for short timeouts (tokio's wheel is exact enough below 64 ms and costs no file descriptor).

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Duration;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The timerfd, as tokio's reactor wants it (`AsRawFd`).
struct Fd(TimerFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// A periodic kernel timer that the runtime waits on like a socket.
pub struct Ticker {
    fd: AsyncFd<Fd>,
}

impl Ticker {
    /// A timer that first fires after `first`, then every `every` (both at least 1 ms; a missed period is not
    /// made up for: one wait returns however many periods have passed).
    pub fn new(first: Duration, every: Duration) -> std::io::Result<Ticker> {
        let fd = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC)?;
        // Only readability matters: a timerfd is never written.
        // SAFETY: `Fd` owns the timerfd (an `OwnedFd` inside `TimerFd`) and is moved into the `AsyncFd`, which
        // owns it until both are dropped together; nothing here takes it out (`into_inner`) or swaps it
        // (`get_mut`), so `as_raw_fd` names the same open descriptor for the `AsyncFd`'s whole life.
        #[allow(unsafe_code)]
        let fd =
            unsafe { AsyncFd::register_with_interest(Fd(fd), Interest::READABLE) }.map_err(std::io::Error::from)?;
        let ticker = Ticker { fd };
        ticker.reset(first, every)?;
        Ok(ticker)
    }

    /// Re-arms the timer: next tick after `first`, then every `every`.
    pub fn reset(&self, first: Duration, every: Duration) -> std::io::Result<()> {
        // A zero first expiration would disarm the timer.
        let at_least = Duration::from_millis(1);
        let expiration = Expiration::IntervalDelayed(
            TimeSpec::from_duration(first.max(at_least)),
            TimeSpec::from_duration(every.max(at_least)),
        );
        self.fd.get_ref().0.set(expiration, TimerSetTimeFlags::empty())?;
        Ok(())
    }

    /// Waits for the next tick. Cancel-safe: a tick that arrives while nobody waits is returned by the next wait.
    pub async fn tick(&self) -> std::io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            // Reading the expiration count re-arms readiness; EAGAIN means another wakeup raced us.
            match ready.try_io(|fd| fd.get_ref().0.wait().map_err(std::io::Error::from)) {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Voluntary context switches of the calling thread so far (each is the thread going to sleep).
    fn voluntary_switches_of_this_thread() -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").expect("thread status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("voluntary_ctxt_switches")
    }

    #[test]
    fn ticks_come_at_the_period_and_each_costs_one_wakeup() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let every = Duration::from_millis(300);
            let ticker = Ticker::new(every, every).expect("timerfd");
            let began = std::time::Instant::now();
            let before = voluntary_switches_of_this_thread();
            ticker.tick().await.expect("tick");
            ticker.tick().await.expect("tick");
            let switches = voluntary_switches_of_this_thread() - before;
            let took = began.elapsed();
            assert!(took >= 2 * every - Duration::from_millis(5), "two periods, took {took:?}");
            // tokio's own 300 ms sleep lands in the wheel's 64 ms level and wakes the thread twice per period
            // (slot start, then deadline); the kernel timer wakes it once.
            assert!(switches <= 2, "{switches} wakeups for two ticks");
        });
    }

    #[test]
    fn reset_moves_the_next_tick_and_a_missed_tick_is_not_lost() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let ticker = Ticker::new(Duration::from_secs(3600), Duration::from_secs(3600)).expect("timerfd");
            ticker.reset(Duration::from_millis(20), Duration::from_secs(3600)).expect("reset");
            // Nobody waits while it fires; the next wait returns at once.
            std::thread::sleep(Duration::from_millis(50));
            tokio::time::timeout(Duration::from_millis(100), ticker.tick())
                .await
                .expect("the tick that fired while nobody waited")
                .expect("tick");
            assert!(
                tokio::time::timeout(Duration::from_millis(100), ticker.tick()).await.is_err(),
                "next tick an hour away"
            );
        });
    }
}
