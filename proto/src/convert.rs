//! Wire <-> core conversions. Every check names the field that failed, as `field: reason`.

use crate::v1;
use upkeep_core::channel::NodeOsChannel;
use upkeep_core::ids::validate_name;
use upkeep_core::version::{ImageVersion, NodeImageVersion};

/// A wire message that does not satisfy the contract, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// The field path, e.g. `register.node_image_version`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub reason: String,
}

impl FieldError {
    /// Builds one.
    pub fn new(field: impl Into<String>, reason: impl ToString) -> Self {
        FieldError { field: field.into(), reason: reason.to_string() }
    }
}

/// Checks a node report as received from an agent. `prefix` names the enclosing field (`register` or `report`).
pub fn check_report(prefix: &str, r: &v1::NodeReport) -> Result<(), FieldError> {
    let f = |name: &str| format!("{prefix}.{name}");
    validate_name("node name", &r.node_name).map_err(|e| FieldError::new(f("node_name"), e))?;
    validate_name("member", &r.member).map_err(|e| FieldError::new(f("member"), e))?;
    validate_name("node pool", &r.node_pool).map_err(|e| FieldError::new(f("node_pool"), e))?;
    validate_name("region", &r.region).map_err(|e| FieldError::new(f("region"), e))?;
    let reported = if r.node_image_version.is_empty() {
        None
    } else {
        Some(
            r.node_image_version
                .parse::<NodeImageVersion>()
                .map_err(|e| FieldError::new(f("node_image_version"), e))?,
        )
    };
    let patch = if r.security_patch_version.is_empty() {
        None
    } else {
        Some(
            r.security_patch_version
                .parse::<ImageVersion>()
                .map_err(|e| FieldError::new(f("security_patch_version"), e))?,
        )
    };
    if !r.booted_image_version.is_empty() {
        let booted = r
            .booted_image_version
            .parse::<NodeImageVersion>()
            .map_err(|e| FieldError::new(f("booted_image_version"), e))?;
        // The reported string is derived from the other two (SPEC §1); one that is not is a confused agent.
        let folded = booted.folded_with_patch(patch);
        if reported.as_ref() != Some(&folded) {
            return Err(FieldError::new(
                f("node_image_version"),
                format!(
                    "{:?} does not match booted_image_version {booted} with security_patch_version {:?}: expected \
                     {folded} (the newer of the image's and the patch's version)",
                    r.node_image_version, r.security_patch_version
                ),
            ));
        }
    }
    if !r.channel.is_empty() {
        r.channel.parse::<NodeOsChannel>().map_err(|e| FieldError::new(f("channel"), e))?;
    }
    for (field, value, max) in [
        ("os_family", &r.os_family, 64),
        ("os_version", &r.os_version, 64),
        ("kernel", &r.kernel, 256),
        ("agent_version", &r.agent_version, 64),
        ("kubernetes_version", &r.kubernetes_version, 64),
        ("hardware_class", &r.hardware_class, 64),
        ("channel_note", &r.channel_note, 512),
    ] {
        if value.len() > max || value.chars().any(char::is_control) {
            return Err(FieldError::new(f(field), format!("must be at most {max} printable characters")));
        }
    }
    if r.operations.len() > 64 {
        return Err(FieldError::new(f("operations"), "at most 64 operations in flight may be reported"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> v1::NodeReport {
        v1::NodeReport {
            node_name: "n1".into(),
            member: "m1".into(),
            node_pool: "pool1".into(),
            region: "eu-west".into(),
            node_image_version: "Ubuntu-2204-202311.07.0".into(),
            channel: "NodeImage".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_good_report_passes() {
        assert_eq!(check_report("register", &good()), Ok(()));
    }

    #[test]
    fn bad_fields_are_named() {
        let mut r = good();
        r.node_image_version = "Ubuntu-2204-2023.1".into();
        assert_eq!(check_report("register", &r).expect_err("bad").field, "register.node_image_version");
        let mut r = good();
        r.member = "".into();
        assert_eq!(check_report("report", &r).expect_err("bad").field, "report.member");
        let mut r = good();
        r.channel = "Weekly".into();
        assert_eq!(check_report("report", &r).expect_err("bad").field, "report.channel");
        let mut r = good();
        r.kernel = "6.1\n".into();
        assert_eq!(check_report("report", &r).expect_err("bad").field, "report.kernel");
        let mut r = good();
        r.booted_image_version = "Ubuntu-2204".into();
        assert_eq!(check_report("report", &r).expect_err("bad").field, "report.booted_image_version");
    }

    #[test]
    fn sec1_booted_image_and_patch_fold_into_the_reported_version() {
        let mut r = good();
        r.booted_image_version = "Ubuntu-2204-202311.07.0".into();
        assert_eq!(check_report("report", &r), Ok(()), "no patch: the booted image itself");
        r.security_patch_version = "202312.05.1".into();
        let err = check_report("report", &r).expect_err("patch not folded in");
        assert_eq!(err.field, "report.node_image_version");
        assert!(err.reason.contains("expected Ubuntu-2204-202312.05.1"), "{err}");
        r.node_image_version = "Ubuntu-2204-202312.05.1".into();
        assert_eq!(check_report("report", &r), Ok(()));
        r.node_image_version = "Debian-12-202312.05.1".into();
        assert_eq!(check_report("report", &r).expect_err("other family").field, "report.node_image_version");
        r.node_image_version = String::new();
        assert_eq!(check_report("report", &r).expect_err("missing").field, "report.node_image_version");
        // Agents older than booted_image_version send only the reported string; it is taken as it is.
        let mut old = good();
        old.security_patch_version = "202312.05.1".into();
        assert_eq!(check_report("report", &old), Ok(()));
    }
}
