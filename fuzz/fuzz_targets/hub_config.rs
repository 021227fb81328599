//! hub.toml: parse and validate (errors name the file and key; nothing panics).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let overrides = upkeep_hub::config::Overrides::default();
    let _ = upkeep_hub::config::parse(std::path::Path::new("/nonexistent/hub.toml"), text, &overrides);
});
