//! Node OS upgrade channels and cluster auto-upgrade channels (SPEC §2), and the rule that ties them.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The node OS upgrade channel of a member; every node of the member follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum NodeOsChannel {
    /// Nothing applied on the node's own initiative; the OS's automatic updaters are kept off.
    None,
    /// The OS's own automatic patching (unattended-upgrades, dnf-automatic) is switched on.
    Unmanaged,
    /// The hub's tested security patch for the node's image family, weekly, inside the node OS window.
    SecurityPatch,
    /// Reimage to the newest node image of the family, weekly, inside the node OS window. Default for new members.
    #[default]
    NodeImage,
}

impl NodeOsChannel {
    /// All channels, in the order the SPEC lists them.
    pub const ALL: [NodeOsChannel; 4] =
        [NodeOsChannel::None, NodeOsChannel::Unmanaged, NodeOsChannel::SecurityPatch, NodeOsChannel::NodeImage];

    /// The canonical spelling, as on the wire and in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeOsChannel::None => "None",
            NodeOsChannel::Unmanaged => "Unmanaged",
            NodeOsChannel::SecurityPatch => "SecurityPatch",
            NodeOsChannel::NodeImage => "NodeImage",
        }
    }
}

impl fmt::Display for NodeOsChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A channel name that is not one of the four.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {given:?}: expected one of {expected}")]
pub struct UnknownChannel {
    /// Which kind of channel was being parsed.
    pub kind: &'static str,
    /// What was given.
    pub given: String,
    /// The accepted spellings.
    pub expected: &'static str,
}

impl FromStr for NodeOsChannel {
    type Err = UnknownChannel;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeOsChannel::ALL.into_iter().find(|c| c.as_str().eq_ignore_ascii_case(s)).ok_or_else(|| UnknownChannel {
            kind: "node OS channel",
            given: s.to_string(),
            expected: "None, Unmanaged, SecurityPatch, NodeImage",
        })
    }
}

/// The cluster auto-upgrade channel of a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum AutoUpgradeChannel {
    /// No automatic Kubernetes upgrades.
    #[default]
    None,
    /// Latest patch of the current minor version.
    Patch,
    /// The stable minor version.
    Stable,
    /// The newest minor version.
    Rapid,
    /// Node images only; forces the node OS channel to `NodeImage`.
    NodeImage,
}

impl AutoUpgradeChannel {
    /// All channels.
    pub const ALL: [AutoUpgradeChannel; 5] = [
        AutoUpgradeChannel::None,
        AutoUpgradeChannel::Patch,
        AutoUpgradeChannel::Stable,
        AutoUpgradeChannel::Rapid,
        AutoUpgradeChannel::NodeImage,
    ];

    /// Canonical spelling (lower case, as the managed service spells it).
    pub fn as_str(self) -> &'static str {
        match self {
            AutoUpgradeChannel::None => "none",
            AutoUpgradeChannel::Patch => "patch",
            AutoUpgradeChannel::Stable => "stable",
            AutoUpgradeChannel::Rapid => "rapid",
            AutoUpgradeChannel::NodeImage => "node-image",
        }
    }
}

impl fmt::Display for AutoUpgradeChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AutoUpgradeChannel {
    type Err = UnknownChannel;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AutoUpgradeChannel::ALL.into_iter().find(|c| c.as_str().eq_ignore_ascii_case(s)).ok_or_else(|| UnknownChannel {
            kind: "cluster auto-upgrade channel",
            given: s.to_string(),
            expected: "none, patch, stable, rapid, node-image",
        })
    }
}

/// Why a node OS channel change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelChangeError {
    /// SPEC §2: while the cluster auto-upgrade channel is `node-image`, the node OS channel is forced to `NodeImage`.
    #[error(
        "node OS channel of member {member} is forced to NodeImage because its cluster auto-upgrade channel is \
         node-image; change the auto-upgrade channel first (e.g. to none or stable), then set the node OS channel"
    )]
    ForcedByAutoUpgrade {
        /// The member concerned.
        member: String,
    },
}

/// Decides whether a member may move to `wanted` given its auto-upgrade channel (SPEC §2).
pub fn check_channel_change(
    member: &str,
    auto_upgrade: AutoUpgradeChannel,
    wanted: NodeOsChannel,
) -> Result<(), ChannelChangeError> {
    if auto_upgrade == AutoUpgradeChannel::NodeImage && wanted != NodeOsChannel::NodeImage {
        return Err(ChannelChangeError::ForcedByAutoUpgrade { member: member.to_string() });
    }
    Ok(())
}

/// SPEC §2: SecurityPatch is refused for Windows-like nodes and Azure-Linux-like GPU node pools. Given what a
/// node reports (os-release ID, hardware class) and its pool, the refusal naming the pool, if any. The hub applies
/// it when an operator asks for the channel; the agent refuses on its own as well.
pub fn security_patch_refusal(os_family: &str, hardware_class: &str, node_pool: &str) -> Option<String> {
    let os = os_family.to_ascii_lowercase();
    if os.contains("windows") {
        return Some(format!(
            "SecurityPatch is not supported on node pool {node_pool:?}: Windows-like OS ({os_family}); use NodeImage"
        ));
    }
    if (os == "azurelinux" || os == "mariner") && hardware_class.eq_ignore_ascii_case("gpu") {
        return Some(format!(
            "SecurityPatch is not supported on node pool {node_pool:?}: Azure Linux GPU pools take patches only as \
             node images; use NodeImage"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_members_default_to_node_image() {
        assert_eq!(NodeOsChannel::default(), NodeOsChannel::NodeImage);
    }

    #[test]
    fn channels_round_trip_and_unknown_names_list_the_choices() {
        for c in NodeOsChannel::ALL {
            assert_eq!(c.as_str().parse::<NodeOsChannel>(), Ok(c));
        }
        let err = "Weekly".parse::<NodeOsChannel>().expect_err("unknown");
        assert!(err.to_string().contains("None, Unmanaged, SecurityPatch, NodeImage"));
        for c in AutoUpgradeChannel::ALL {
            assert_eq!(c.as_str().parse::<AutoUpgradeChannel>(), Ok(c));
        }
    }

    #[test]
    fn security_patch_is_refused_for_windows_and_azure_linux_gpu_pools() {
        assert!(security_patch_refusal("windows", "", "win").expect("refused").contains("\"win\""));
        assert!(security_patch_refusal("azurelinux", "gpu", "gpu1").expect("refused").contains("\"gpu1\""));
        assert_eq!(security_patch_refusal("azurelinux", "", "cpu"), None);
        assert_eq!(security_patch_refusal("debian", "gpu", "gpu2"), None);
    }

    #[test]
    fn node_image_auto_upgrade_forces_the_node_os_channel() {
        let err = check_channel_change("m1", AutoUpgradeChannel::NodeImage, NodeOsChannel::SecurityPatch)
            .expect_err("refused");
        assert!(err.to_string().contains("change the auto-upgrade channel first"));
        assert!(check_channel_change("m1", AutoUpgradeChannel::NodeImage, NodeOsChannel::NodeImage).is_ok());
        assert!(check_channel_change("m1", AutoUpgradeChannel::Stable, NodeOsChannel::None).is_ok());
    }
}
