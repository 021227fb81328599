//! Every version and limit string the product parses: image versions, node-image-versions, Kubernetes versions,
//! concurrency limits; what parses prints back and parses to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use upkeep_core::concurrency::Limit;
use upkeep_core::version::{ImageVersion, KubernetesVersion, NodeImageVersion};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(v) = s.parse::<ImageVersion>() {
        assert_eq!(v.to_string().parse::<ImageVersion>().ok(), Some(v));
    }
    if let Ok(v) = s.parse::<NodeImageVersion>() {
        assert_eq!(v.label().parse::<NodeImageVersion>().ok(), Some(v));
    }
    if let Ok(v) = s.parse::<KubernetesVersion>() {
        assert_eq!(v.to_string().parse::<KubernetesVersion>().ok(), Some(v));
    }
    if let Ok(l) = s.parse::<Limit>() {
        let _ = l.resolve(u32::MAX);
        let _ = l.problem();
    }
});
