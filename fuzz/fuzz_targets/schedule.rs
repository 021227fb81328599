//! A maintenance window (JSON): parse, then ask when it is open and when it opens next.
#![no_main]
use chrono::{TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use upkeep_core::schedule::MaintenanceSchedule;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = serde_json::from_slice::<MaintenanceSchedule>(data) else { return };
    for ms in [0_i64, 1_764_000_000_000, 4_102_444_800_000] {
        let Some(now) = Utc.timestamp_millis_opt(ms).single() else { continue };
        let _ = s.is_open(now);
        let _ = s.next_opening(now);
    }
});
