//! An operator's run or strategy document (YAML or JSON, as upkeepctl reads it): parse, validate, plan a start.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeSet;
use upkeep_core::run::{UpdateRunSpec, validate_run_spec};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // The CLI turns YAML (a superset of JSON) into JSON, the hub parses the JSON.
    let Ok(value) = upkeep_hub::cli::yaml::parse(text) else { return };
    let Ok(json) = serde_json::to_string(&value) else { return };
    let Ok(spec) = serde_json::from_str::<UpdateRunSpec>(&json) else { return };
    let members: BTreeSet<String> = ["m1", "m2", "m3"].iter().map(|s| s.to_string()).collect();
    let _ = validate_run_spec(&spec, &members);
});
