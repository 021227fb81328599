//! Reconnect delays: exponential with full jitter, capped near 30 s. Pure: the random draw is a parameter.

use std::time::Duration;

/// First delay before jitter.
pub const BASE: Duration = Duration::from_millis(200);
/// Upper bound of any delay.
pub const CAP: Duration = Duration::from_secs(30);

/// The delay before reconnect attempt `attempt` (0-based), given a uniform draw `u` in [0, 1).
/// The ceiling doubles per attempt up to `CAP`; the delay is drawn between half the ceiling and the ceiling
/// ("equal jitter"), so a fleet that lost its hub at once does not come back at once, yet no node waits
/// much longer than needed.
pub fn delay(attempt: u32, u: f64) -> Duration {
    let ceiling = BASE.saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX)).min(CAP);
    let u = u.clamp(0.0, 1.0);
    ceiling.mul_f64(0.5 + 0.5 * u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps_near_thirty_seconds() {
        assert_eq!(delay(0, 1.0), BASE);
        assert_eq!(delay(0, 0.0), BASE / 2);
        assert!(delay(3, 0.5) > delay(2, 0.5));
        assert_eq!(delay(30, 1.0), CAP);
        assert_eq!(delay(u32::MAX, 1.0), CAP);
        assert!(delay(30, 0.0) >= CAP / 2);
    }
}
