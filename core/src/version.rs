//! Versions as the SPEC defines them: image and patch versions `YYYYMM.DD.N` (ordered numerically by
//! component), node-image-versions `<family>-<version>`, and Kubernetes versions `MAJOR.MINOR.PATCH`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Why a version string was refused. Each variant names what was wrong and what a good one looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// Not three dot-separated numeric components of the right widths.
    #[error("malformed version {}: expected YYYYMM.DD.N, e.g. 202311.07.0", crate::limits::quoted(.0))]
    Malformed(String),
    /// The month part of `YYYYMM` is not 01..=12.
    #[error("malformed version {}: month must be 01..12 (YYYYMM.DD.N)", crate::limits::quoted(.0))]
    BadMonth(String),
    /// The day part is not 01..=31.
    #[error("malformed version {}: day must be 01..31 (YYYYMM.DD.N)", crate::limits::quoted(.0))]
    BadDay(String),
    /// The year part of `YYYYMM` is before 1970 (a leading zero would also print differently than it parsed).
    #[error("malformed version {0:?}: the year must be 1970 or later (YYYYMM.DD.N)")]
    BadYear(String),
    /// A node-image-version without a `-<version>` suffix or with an empty family.
    #[error("malformed node-image-version {}: expected <family>-<YYYYMM.DD.N>, e.g. Ubuntu-2204gen2-202311.07.0", crate::limits::quoted(.0))]
    MalformedNodeImage(String),
    /// An image family with characters outside `[A-Za-z0-9._-]` or empty.
    #[error("malformed image family {}: use letters, digits, '.', '_' and '-' only", crate::limits::quoted(.0))]
    BadFamily(String),
    /// A Kubernetes version not of the form `MAJOR.MINOR.PATCH` (an optional leading `v` is accepted).
    #[error("malformed Kubernetes version {}: expected MAJOR.MINOR.PATCH, e.g. 1.29.4", crate::limits::quoted(.0))]
    BadKubernetes(String),
}

/// An image or security-patch version `YYYYMM.DD.N`. Ordered numerically by component, so
/// `202311.07.10 > 202311.07.9`. Displayed with a zero-padded day as it was published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageVersion {
    /// Year and month, e.g. 202311.
    pub year_month: u32,
    /// Day of month, 1..=31.
    pub day: u32,
    /// Build number on that day.
    pub build: u32,
}

impl FromStr for ImageVersion {
    type Err = VersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || VersionError::Malformed(s.to_string());
        let mut it = s.split('.');
        let (ym, d, n) = match (it.next(), it.next(), it.next(), it.next()) {
            (Some(a), Some(b), Some(c), None) => (a, b, c),
            _ => return Err(bad()),
        };
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if ym.len() != 6 || !digits(ym) || d.is_empty() || d.len() > 2 || !digits(d) || !digits(n) || n.len() > 9 {
            return Err(bad());
        }
        let year_month: u32 = ym.parse().map_err(|_| bad())?;
        let day: u32 = d.parse().map_err(|_| bad())?;
        let build: u32 = n.parse().map_err(|_| bad())?;
        let month = year_month % 100;
        if !(1..=12).contains(&month) {
            return Err(VersionError::BadMonth(s.to_string()));
        }
        // Found by fuzzing (fuzz/fuzz_targets/versions.rs): "002311.07.0" parsed, then printed as "2311.07.0",
        // which does not parse back; no image was built before 1970.
        if year_month / 100 < 1970 {
            return Err(VersionError::BadYear(s.to_string()));
        }
        if !(1..=31).contains(&day) {
            return Err(VersionError::BadDay(s.to_string()));
        }
        Ok(ImageVersion { year_month, day, build })
    }
}

impl fmt::Display for ImageVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}.{}", self.year_month, self.day, self.build)
    }
}

impl Serialize for ImageVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ImageVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks an image family name such as `AKSUbuntu-2204gen2containerd`.
pub fn validate_family(family: &str) -> Result<(), VersionError> {
    let ok = !family.is_empty()
        && family.len() <= 128
        && family.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok { Ok(()) } else { Err(VersionError::BadFamily(family.to_string())) }
}

/// What a node reports as its node-image-version: `<family>-<version>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeImageVersion {
    /// Image family, e.g. `AKSUbuntu-2204gen2containerd`.
    pub family: String,
    /// Version within the family.
    pub version: ImageVersion,
}

impl NodeImageVersion {
    /// Builds one from parts, checking the family.
    pub fn new(family: &str, version: ImageVersion) -> Result<Self, VersionError> {
        validate_family(family)?;
        Ok(NodeImageVersion { family: family.to_string(), version })
    }

    /// The node label value shown as `upkeep.io/node-image-version=<this>`.
    pub fn label(&self) -> String {
        self.to_string()
    }

    /// What a node running this (booted) image with security patch `patch` applied reports as its one
    /// node-image-version (SPEC §1): the same family at the newer of the image's version and the patch's, as the
    /// managed service's label follows the patch date. A patch older than the image (one applied before the node
    /// was reimaged to a newer image) changes nothing.
    ///
    /// The result is for people and labels only. Decisions never compare it: NodeImage compares the booted
    /// image (`self`) with the catalog, SecurityPatch the patch version with the patch catalog.
    pub fn folded_with_patch(&self, patch: Option<ImageVersion>) -> NodeImageVersion {
        let version = patch.map_or(self.version, |p| p.max(self.version));
        NodeImageVersion { family: self.family.clone(), version }
    }
}

impl FromStr for NodeImageVersion {
    type Err = VersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The family itself contains dashes; the version is everything after the last one.
        let (family, version) = s.rsplit_once('-').ok_or_else(|| VersionError::MalformedNodeImage(s.to_string()))?;
        if family.is_empty() {
            return Err(VersionError::MalformedNodeImage(s.to_string()));
        }
        let version: ImageVersion = version.parse()?;
        NodeImageVersion::new(family, version)
    }
}

impl Serialize for NodeImageVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NodeImageVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for NodeImageVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.family, self.version)
    }
}

/// A Kubernetes version `MAJOR.MINOR.PATCH`, ordered numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KubernetesVersion {
    /// Major version (1).
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch version.
    pub patch: u32,
}

impl FromStr for KubernetesVersion {
    type Err = VersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || VersionError::BadKubernetes(s.to_string());
        let t = s.strip_prefix('v').unwrap_or(s);
        let parts: Vec<&str> = t.split('.').collect();
        if parts.len() != 3
            || parts.iter().any(|p| p.is_empty() || p.len() > 6 || !p.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(bad());
        }
        let n = |p: &str| p.parse::<u32>().map_err(|_| bad());
        Ok(KubernetesVersion { major: n(parts[0])?, minor: n(parts[1])?, patch: n(parts[2])? })
    }
}

impl fmt::Display for KubernetesVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl Serialize for KubernetesVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KubernetesVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> ImageVersion {
        s.parse().expect("valid version")
    }

    #[test]
    fn image_versions_order_numerically_by_component() {
        assert!(v("202311.07.10") > v("202311.07.9"));
        assert!(v("202312.01.0") > v("202311.30.5"));
        assert!(v("202311.10.0") > v("202311.9.0"));
        assert_eq!(v("202311.07.0").to_string(), "202311.07.0");
    }

    #[test]
    fn what_parses_prints_back_the_same() {
        // The fuzz target's property (fuzz/fuzz_targets/versions.rs), on the input it found.
        assert!("Fam-002311.07.0".parse::<NodeImageVersion>().is_err());
        for ok in ["202311.07.0", "197001.01.0", "202311.7.007"] {
            let v: ImageVersion = ok.parse().expect(ok);
            assert_eq!(v.to_string().parse::<ImageVersion>().expect("prints back"), v);
        }
    }

    #[test]
    fn malformed_image_versions_are_refused_with_the_expected_form() {
        for bad in [
            "",
            "2023.07.0",
            "202311.07",
            "202311.07.0.1",
            "202313.01.0",
            "202311.32.0",
            "202311.0x.1",
            "a.b.c",
            "002311.07.0",
        ] {
            let err = bad.parse::<ImageVersion>().expect_err(bad);
            assert!(err.to_string().contains("YYYYMM.DD.N"), "{bad}: {err}");
        }
    }

    #[test]
    fn node_image_version_splits_on_the_last_dash() {
        let n: NodeImageVersion = "AKSUbuntu-2204gen2containerd-202311.07.0".parse().expect("valid");
        assert_eq!(n.family, "AKSUbuntu-2204gen2containerd");
        assert_eq!(n.version, v("202311.07.0"));
        assert_eq!(n.label(), "AKSUbuntu-2204gen2containerd-202311.07.0");
        assert!("-202311.07.0".parse::<NodeImageVersion>().is_err());
        assert!("Ubuntu".parse::<NodeImageVersion>().is_err());
        assert!("Ub untu-202311.07.0".parse::<NodeImageVersion>().is_err());
    }

    #[test]
    fn sec1_a_patch_newer_than_the_image_is_folded_into_the_reported_version() {
        let booted: NodeImageVersion = "AKSUbuntu-2204gen2containerd-202311.07.0".parse().expect("valid");
        let reported = booted.folded_with_patch(Some(v("202312.05.1")));
        assert_eq!(reported.label(), "AKSUbuntu-2204gen2containerd-202312.05.1");
        assert_eq!(reported.family, booted.family, "the family is the booted image's");
        assert_eq!(booted.label(), "AKSUbuntu-2204gen2containerd-202311.07.0", "the booted image is left as it is");
    }

    #[test]
    fn sec1_an_older_or_missing_patch_leaves_the_image_version() {
        let booted: NodeImageVersion = "Debian-12-202312.01.0".parse().expect("valid");
        assert_eq!(booted.folded_with_patch(None), booted);
        assert_eq!(booted.folded_with_patch(Some(v("202311.20.3"))), booted, "a patch from before a reimage");
        assert_eq!(booted.folded_with_patch(Some(v("202312.01.0"))), booted, "the same version");
        // Ordered by component, not as text: 202312.01.10 is newer than 202312.01.9.
        let nine: NodeImageVersion = "Debian-12-202312.01.9".parse().expect("valid");
        assert_eq!(nine.folded_with_patch(Some(v("202312.01.10"))).label(), "Debian-12-202312.01.10");
    }

    #[test]
    fn kubernetes_versions_parse_and_order() {
        let a: KubernetesVersion = "1.29.4".parse().expect("valid");
        let b: KubernetesVersion = "v1.30.0".parse().expect("valid");
        assert!(b > a);
        assert_eq!(b.to_string(), "1.30.0");
        assert!("1.29".parse::<KubernetesVersion>().is_err());
        assert!("1.x.0".parse::<KubernetesVersion>().is_err());
    }
}
