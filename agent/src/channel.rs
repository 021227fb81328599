//! Pure decisions for the node OS channel (SPEC §2): which OS family the node is, which files the agent owns
//! with which contents, and which timers it switches on or off, per channel. No I/O here: `os::autoupdate`
//! carries a `ChannelPlan` out through `NodeOs`, and `os::apt` / `os::dnf` install security patches.
//!
//! The agent changes the OS only through files it owns (every path in `OWNED_FILES`, all named for upkeep) and
//! through enabling/disabling the OS's own timers; it never edits a file the distribution ships. Applying a plan
//! writes the plan's files and removes every other owned file, so switching channel removes what the previous
//! channel set, even if the agent lost track of the previous channel.
//!
//! Channels on the node: `None`, `SecurityPatch` and `NodeImage` switch the OS's automatic updaters off (the agent
//! or the hub does the patching); `Unmanaged` switches them on, security updates only, daily at 06:00 UTC, with
//! their own automatic reboot off (the agent handles reboots). An unknown or Windows-like OS behaves as `None` and
//! says so; `SecurityPatch` is refused (behaving as `None`) on Windows-like nodes and on Azure-Linux-like GPU pools.

use upkeep_core::channel::NodeOsChannel;

/// apt configuration drop-in owned by the agent (sorts after the distribution's `50unattended-upgrades` and the
/// debconf-generated `20auto-upgrades`, so its scalar values win and its `#clear` empties their origin lists).
pub const APT_CHANNEL_CONF: &str = "etc/apt/apt.conf.d/52upkeep-channel";
/// Timer override for apt's daily package-list refresh.
pub const APT_DAILY_TIMER_DROPIN: &str = "etc/systemd/system/apt-daily.timer.d/50-upkeep.conf";
/// Timer override for apt's daily unattended upgrade.
pub const APT_DAILY_UPGRADE_TIMER_DROPIN: &str = "etc/systemd/system/apt-daily-upgrade.timer.d/50-upkeep.conf";
/// dnf-automatic configuration owned by the agent (the distribution ships `/etc/dnf/automatic.conf`; untouched).
pub const DNF_AUTOMATIC_CONF: &str = "etc/upkeep/dnf-automatic.conf";
/// Timer override for dnf-automatic.
pub const DNF_AUTOMATIC_TIMER_DROPIN: &str = "etc/systemd/system/dnf-automatic.timer.d/50-upkeep.conf";
/// Service override pointing dnf-automatic at the agent's configuration.
pub const DNF_AUTOMATIC_SERVICE_DROPIN: &str = "etc/systemd/system/dnf-automatic.service.d/50-upkeep.conf";

/// Every file the agent may own for the channel, relative to the root. Anything here that a plan does not
/// name is removed when the plan is applied.
pub const OWNED_FILES: [&str; 6] = [
    APT_CHANNEL_CONF,
    APT_DAILY_TIMER_DROPIN,
    APT_DAILY_UPGRADE_TIMER_DROPIN,
    DNF_AUTOMATIC_CONF,
    DNF_AUTOMATIC_TIMER_DROPIN,
    DNF_AUTOMATIC_SERVICE_DROPIN,
];

/// apt's timers, switched together.
pub const APT_TIMERS: [&str; 2] = ["apt-daily.timer", "apt-daily-upgrade.timer"];
/// dnf-automatic's timer used for `Unmanaged` (its service runs the agent's configuration).
pub const DNF_AUTOMATIC_TIMER: &str = "dnf-automatic.timer";
/// dnf-automatic's other timers (each runs the distribution's configuration with fixed options): always off.
pub const DNF_AUTOMATIC_OTHER_TIMERS: [&str; 3] =
    ["dnf-automatic-install.timer", "dnf-automatic-download.timer", "dnf-automatic-notifyonly.timer"];

/// How far systemd may delay the daily run after 06:00 UTC (spreads a fleet's load on the mirrors).
pub const UNMANAGED_RANDOMIZED_DELAY: &str = "20m";

/// The node's operating system as far as the channel is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OsKind {
    /// Debian, Ubuntu and derivatives: apt, unattended-upgrades, the apt-daily timers.
    Debian {
        /// os-release ID (debian, ubuntu, ...), for the security origin.
        id: String,
    },
    /// RPM distributions: dnf, dnf-automatic and its timer.
    Rpm {
        /// os-release ID (fedora, rhel, azurelinux, ...).
        id: String,
    },
    /// Windows-like: nothing the agent can switch.
    WindowsLike {
        /// os-release ID as read.
        id: String,
    },
    /// Anything else (or no os-release at all).
    Unknown {
        /// os-release ID as read, empty if none.
        id: String,
    },
}

impl OsKind {
    /// The os-release ID.
    pub fn id(&self) -> &str {
        match self {
            OsKind::Debian { id } | OsKind::Rpm { id } | OsKind::WindowsLike { id } | OsKind::Unknown { id } => id,
        }
    }

    /// Why nothing can be installed on this OS (no package manager upkeep knows), or None for apt and dnf.
    pub fn no_package_manager(&self) -> Option<String> {
        match self {
            OsKind::Debian { .. } | OsKind::Rpm { .. } => None,
            OsKind::WindowsLike { id } | OsKind::Unknown { id } => {
                Some(format!("no package manager known for os-release ID {id:?}"))
            }
        }
    }
}

/// os-release IDs (or ID_LIKE words) of dnf-based distributions. SUSE (zypper) is not one of them.
const RPM_IDS: [&str; 9] = ["fedora", "rhel", "centos", "rocky", "almalinux", "amzn", "azurelinux", "mariner", "ol"];

/// Classifies os-release `KEY=VALUE` pairs (ID, ID_LIKE).
pub fn classify(os_release: &[(String, String)]) -> OsKind {
    let get = |k: &str| {
        os_release
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.trim().to_ascii_lowercase())
            .unwrap_or_default()
    };
    let id = get("ID");
    let like = get("ID_LIKE");
    let words: Vec<&str> = std::iter::once(id.as_str()).chain(like.split_whitespace()).collect();
    if words.iter().any(|w| w.contains("windows")) {
        OsKind::WindowsLike { id }
    } else if words.iter().any(|w| matches!(*w, "debian" | "ubuntu")) {
        OsKind::Debian { id }
    } else if words.iter().any(|w| RPM_IDS.contains(w)) {
        OsKind::Rpm { id }
    } else {
        OsKind::Unknown { id }
    }
}

/// What the channel decision needs to know about the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeKind {
    /// Its OS.
    pub os: OsKind,
    /// Its node pool (named in refusals).
    pub node_pool: String,
    /// Hardware class of the pool (`gpu`, ...), empty if none.
    pub hardware_class: String,
}

impl NodeKind {
    /// Azure-Linux-like (azurelinux, mariner) GPU pool: SecurityPatch is not offered there.
    pub fn is_azure_linux_gpu(&self) -> bool {
        matches!(&self.os, OsKind::Rpm { id } if id == "azurelinux" || id == "mariner")
            && self.hardware_class.eq_ignore_ascii_case("gpu")
    }

    /// Why the SecurityPatch channel (and so a security patch operation) is refused on this node, if it is.
    pub fn security_patch_refusal(&self) -> Option<String> {
        match &self.os {
            OsKind::WindowsLike { id } => Some(format!(
                "SecurityPatch is not supported on node pool {:?}: Windows-like OS ({id}); use NodeImage",
                self.node_pool
            )),
            _ if self.is_azure_linux_gpu() => Some(format!(
                "SecurityPatch is not supported on node pool {:?}: Azure Linux GPU pools take patches only as node \
                 images; use NodeImage",
                self.node_pool
            )),
            _ => None,
        }
    }
}

/// A file the agent owns, with its full contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedFile {
    /// Path relative to the root; one of `OWNED_FILES`.
    pub path: &'static str,
    /// Contents.
    pub contents: String,
}

/// Whether a timer should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerState {
    /// Enabled (and started where systemd runs).
    On,
    /// Disabled (and stopped where systemd runs).
    Off,
}

/// Everything applying a channel does on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPlan {
    /// The channel the hub asked for.
    pub requested: NodeOsChannel,
    /// The channel in force on the node (None where the requested one cannot be).
    pub effective: NodeOsChannel,
    /// Files the agent owns after applying; every other owned file is removed.
    pub files: Vec<ManagedFile>,
    /// Timers to switch, in order (a timer whose unit is not installed is skipped).
    pub timers: Vec<(&'static str, TimerState)>,
    /// Said to the operator: why the node does not do what was asked, or what is missing. Empty when all is well.
    pub note: String,
}

/// Decides what `channel` means on `node`.
pub fn plan_channel(channel: NodeOsChannel, node: &NodeKind) -> ChannelPlan {
    let mut note = String::new();
    let mut effective = channel;
    if channel == NodeOsChannel::SecurityPatch
        && let Some(why) = node.security_patch_refusal()
    {
        note = format!("{why}; behaving as None");
        effective = NodeOsChannel::None;
    }
    let updaters_on = effective == NodeOsChannel::Unmanaged;
    let (files, timers) = match &node.os {
        OsKind::Debian { id } => debian(updaters_on, id),
        OsKind::Rpm { .. } => rpm(updaters_on),
        OsKind::WindowsLike { id } | OsKind::Unknown { id } => {
            if effective != NodeOsChannel::None && note.is_empty() {
                let what = if matches!(node.os, OsKind::WindowsLike { .. }) { "Windows-like" } else { "unknown" };
                let shown = if id.is_empty() { "no os-release".to_string() } else { format!("os-release ID {id:?}") };
                note = format!(
                    "node OS channel {channel} not applied: {what} OS ({shown}); behaving as None (nothing switched)"
                );
            }
            effective = NodeOsChannel::None;
            (Vec::new(), Vec::new())
        }
    };
    ChannelPlan { requested: channel, effective, files, timers, note }
}

fn header(channel_desc: &str, comment: &str) -> String {
    format!(
        "{comment} Managed by upkeep-agent: node OS channel {channel_desc}.\n{comment} Rewritten or removed when the \
         channel changes; do not edit. Distribution files are left untouched.\n"
    )
}

/// The apt security origins of a Debian-like OS, as unattended-upgrades `Origins-Pattern` entries.
pub fn apt_security_origins(id: &str) -> Vec<String> {
    if id == "ubuntu" {
        vec![
            "origin=Ubuntu,archive=${distro_codename}-security".into(),
            "origin=UbuntuESMApps,archive=${distro_codename}-apps-security".into(),
            "origin=UbuntuESM,archive=${distro_codename}-infra-security".into(),
        ]
    } else {
        vec![
            "origin=Debian,codename=${distro_codename}-security,label=Debian-Security".into(),
            "origin=Debian,codename=${distro_codename},label=Debian-Security".into(),
        ]
    }
}

type Decision = (Vec<ManagedFile>, Vec<(&'static str, TimerState)>);

fn debian(on: bool, id: &str) -> Decision {
    if !on {
        let conf = format!(
            "{}APT::Periodic::Update-Package-Lists \"0\";\nAPT::Periodic::Download-Upgradeable-Packages \"0\";\n\
             APT::Periodic::AutocleanInterval \"0\";\nAPT::Periodic::Unattended-Upgrade \"0\";\n",
            header("updaters off (None, SecurityPatch or NodeImage)", "//")
        );
        let files = vec![ManagedFile { path: APT_CHANNEL_CONF, contents: conf }];
        return (files, APT_TIMERS.iter().map(|t| (*t, TimerState::Off)).collect());
    }
    let origins: String = apt_security_origins(id).iter().map(|o| format!("        \"{o}\";\n")).collect();
    let conf = format!(
        "{}APT::Periodic::Update-Package-Lists \"1\";\nAPT::Periodic::Unattended-Upgrade \"1\";\n\
         // Security origins only: drop whatever origins the distribution's configuration allows.\n\
         #clear Unattended-Upgrade::Allowed-Origins;\n#clear Unattended-Upgrade::Origins-Pattern;\n\
         Unattended-Upgrade::Origins-Pattern {{\n{origins}}};\n\
         // The agent coordinates reboots with the hub (reboot lease, drain).\n\
         Unattended-Upgrade::Automatic-Reboot \"false\";\n",
        header("Unmanaged (unattended-upgrades, security origins, 06:00 UTC)", "//")
    );
    let refresh = format!(
        "{}[Timer]\nOnCalendar=\nOnCalendar=*-*-* 05:30:00 UTC\nRandomizedDelaySec=10m\nPersistent=true\n",
        header("Unmanaged: refresh package lists before the 06:00 UTC upgrade", "#")
    );
    let upgrade = format!(
        "{}[Timer]\nOnCalendar=\nOnCalendar=*-*-* 06:00:00 UTC\nRandomizedDelaySec={UNMANAGED_RANDOMIZED_DELAY}\n\
         Persistent=true\n",
        header("Unmanaged: security upgrades daily at 06:00 UTC", "#")
    );
    let files = vec![
        ManagedFile { path: APT_CHANNEL_CONF, contents: conf },
        ManagedFile { path: APT_DAILY_TIMER_DROPIN, contents: refresh },
        ManagedFile { path: APT_DAILY_UPGRADE_TIMER_DROPIN, contents: upgrade },
    ];
    (files, APT_TIMERS.iter().map(|t| (*t, TimerState::On)).collect())
}

/// The program dnf-automatic's service runs (the override keeps it, with the agent's configuration).
pub const DNF_AUTOMATIC_BIN: &str = "/usr/bin/dnf-automatic";

fn rpm(on: bool) -> Decision {
    let mut timers: Vec<(&'static str, TimerState)> =
        DNF_AUTOMATIC_OTHER_TIMERS.iter().map(|t| (*t, TimerState::Off)).collect();
    if !on {
        timers.insert(0, (DNF_AUTOMATIC_TIMER, TimerState::Off));
        return (Vec::new(), timers);
    }
    timers.insert(0, (DNF_AUTOMATIC_TIMER, TimerState::On));
    let conf = format!(
        "{}[commands]\nupgrade_type = security\nrandom_sleep = 0\nnetwork_online_timeout = 60\n\
         download_updates = yes\napply_updates = yes\n# The agent coordinates reboots with the hub.\nreboot = never\n\n\
         [emitters]\nemit_via = stdio\n\n[base]\ndebuglevel = 1\n",
        header("Unmanaged (dnf-automatic, security updates, 06:00 UTC)", "#")
    );
    let timer = format!(
        "{}[Timer]\nOnCalendar=\nOnCalendar=*-*-* 06:00:00 UTC\nRandomizedDelaySec={UNMANAGED_RANDOMIZED_DELAY}\n\
         Persistent=true\n",
        header("Unmanaged: security updates daily at 06:00 UTC", "#")
    );
    let service = format!(
        "{}[Service]\nExecStart=\nExecStart={DNF_AUTOMATIC_BIN} /{DNF_AUTOMATIC_CONF} --timer\n",
        header("Unmanaged: dnf-automatic runs the agent's configuration", "#")
    );
    let files = vec![
        ManagedFile { path: DNF_AUTOMATIC_CONF, contents: conf },
        ManagedFile { path: DNF_AUTOMATIC_TIMER_DROPIN, contents: timer },
        ManagedFile { path: DNF_AUTOMATIC_SERVICE_DROPIN, contents: service },
    ];
    (files, timers)
}

/// One package of a security patch, pinned to a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackagePin {
    /// Package name.
    pub name: String,
    /// Exact version (Debian: the full version, epoch and revision included; RPM: `version-release`).
    pub version: String,
}

/// Parses the patch's `name=version` entries; Err names the field and the entry.
pub fn parse_package_pins(packages: &[String]) -> Result<Vec<PackagePin>, String> {
    if packages.is_empty() {
        return Err("apply_security_patch.packages: empty; a security patch names at least one package".into());
    }
    packages
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let bad = |why: &str| format!("apply_security_patch.packages[{i}]: {p:?}: {why}");
            let (name, version) = p.split_once('=').ok_or_else(|| bad("expected NAME=VERSION"))?;
            let name_ok = !name.is_empty()
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-._".contains(&b))
                && name.as_bytes()[0].is_ascii_alphanumeric();
            if !name_ok {
                return Err(bad("package name must start with a letter or digit and hold only [A-Za-z0-9+-._]"));
            }
            let version_ok = !version.is_empty()
                && version.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.~:_^".contains(&b))
                && version.as_bytes()[0].is_ascii_alphanumeric();
            if !version_ok {
                return Err(bad("version must start with a letter or digit and hold only [A-Za-z0-9+-.~:_^]"));
            }
            Ok(PackagePin { name: name.to_string(), version: version.to_string() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(text: &str) -> Vec<(String, String)> {
        crate::os::parse_env_file(text)
    }

    fn node(os: OsKind) -> NodeKind {
        NodeKind { os, node_pool: "pool1".into(), hardware_class: String::new() }
    }

    fn deb() -> NodeKind {
        node(OsKind::Debian { id: "debian".into() })
    }

    fn rpm_node() -> NodeKind {
        node(OsKind::Rpm { id: "rocky".into() })
    }

    fn file<'a>(p: &'a ChannelPlan, path: &str) -> &'a str {
        p.files.iter().find(|f| f.path == path).map(|f| f.contents.as_str()).unwrap_or_else(|| panic!("no {path}"))
    }

    #[test]
    fn classifies_os_release() {
        assert_eq!(classify(&kv("ID=debian\n")), OsKind::Debian { id: "debian".into() });
        assert_eq!(classify(&kv("ID=ubuntu\nID_LIKE=debian\n")), OsKind::Debian { id: "ubuntu".into() });
        assert_eq!(
            classify(&kv("ID=linuxmint\nID_LIKE=\"ubuntu debian\"\n")),
            OsKind::Debian { id: "linuxmint".into() }
        );
        assert_eq!(classify(&kv("ID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\n")), OsKind::Rpm { id: "rocky".into() });
        assert_eq!(classify(&kv("ID=azurelinux\n")), OsKind::Rpm { id: "azurelinux".into() });
        assert_eq!(classify(&kv("ID=amzn\nID_LIKE=\"centos rhel fedora\"\n")), OsKind::Rpm { id: "amzn".into() });
        assert_eq!(classify(&kv("ID=myos\nID_LIKE=fedora\n")), OsKind::Rpm { id: "myos".into() });
        assert_eq!(classify(&kv("ID=windows\n")), OsKind::WindowsLike { id: "windows".into() });
        assert_eq!(classify(&kv("ID=arch\n")), OsKind::Unknown { id: "arch".into() });
        assert_eq!(
            classify(&kv("ID=opensuse-leap\nID_LIKE=\"suse opensuse\"\n")),
            OsKind::Unknown { id: "opensuse-leap".into() }
        );
        assert_eq!(classify(&[]), OsKind::Unknown { id: String::new() });
    }

    #[test]
    fn debian_updaters_off_for_none_security_patch_and_node_image() {
        let expected_conf = "// Managed by upkeep-agent: node OS channel updaters off (None, SecurityPatch or NodeImage).\n\
// Rewritten or removed when the channel changes; do not edit. Distribution files are left untouched.\n\
APT::Periodic::Update-Package-Lists \"0\";\n\
APT::Periodic::Download-Upgradeable-Packages \"0\";\n\
APT::Periodic::AutocleanInterval \"0\";\n\
APT::Periodic::Unattended-Upgrade \"0\";\n";
        for ch in [NodeOsChannel::None, NodeOsChannel::SecurityPatch, NodeOsChannel::NodeImage] {
            let p = plan_channel(ch, &deb());
            assert_eq!(p.effective, ch);
            assert_eq!(p.files.len(), 1, "{ch}: only the apt drop-in");
            assert_eq!(file(&p, APT_CHANNEL_CONF), expected_conf, "{ch}");
            assert_eq!(
                p.timers,
                vec![("apt-daily.timer", TimerState::Off), ("apt-daily-upgrade.timer", TimerState::Off)]
            );
            assert_eq!(p.note, "");
        }
    }

    #[test]
    fn debian_unmanaged_is_security_only_at_six_utc_without_reboot() {
        let p = plan_channel(NodeOsChannel::Unmanaged, &deb());
        assert_eq!(p.effective, NodeOsChannel::Unmanaged);
        assert_eq!(
            file(&p, APT_CHANNEL_CONF),
            "// Managed by upkeep-agent: node OS channel Unmanaged (unattended-upgrades, security origins, 06:00 UTC).\n\
// Rewritten or removed when the channel changes; do not edit. Distribution files are left untouched.\n\
APT::Periodic::Update-Package-Lists \"1\";\n\
APT::Periodic::Unattended-Upgrade \"1\";\n\
// Security origins only: drop whatever origins the distribution's configuration allows.\n\
#clear Unattended-Upgrade::Allowed-Origins;\n\
#clear Unattended-Upgrade::Origins-Pattern;\n\
Unattended-Upgrade::Origins-Pattern {\n\
\x20       \"origin=Debian,codename=${distro_codename}-security,label=Debian-Security\";\n\
\x20       \"origin=Debian,codename=${distro_codename},label=Debian-Security\";\n\
};\n\
// The agent coordinates reboots with the hub (reboot lease, drain).\n\
Unattended-Upgrade::Automatic-Reboot \"false\";\n"
        );
        assert_eq!(
            file(&p, APT_DAILY_UPGRADE_TIMER_DROPIN),
            "# Managed by upkeep-agent: node OS channel Unmanaged: security upgrades daily at 06:00 UTC.\n\
# Rewritten or removed when the channel changes; do not edit. Distribution files are left untouched.\n\
[Timer]\nOnCalendar=\nOnCalendar=*-*-* 06:00:00 UTC\nRandomizedDelaySec=20m\nPersistent=true\n"
        );
        let refresh = file(&p, APT_DAILY_TIMER_DROPIN);
        assert!(refresh.contains("OnCalendar=\nOnCalendar=*-*-* 05:30:00 UTC\n"), "{refresh}");
        assert_eq!(p.timers, vec![("apt-daily.timer", TimerState::On), ("apt-daily-upgrade.timer", TimerState::On)]);
        let ubuntu = plan_channel(NodeOsChannel::Unmanaged, &node(OsKind::Debian { id: "ubuntu".into() }));
        let conf = file(&ubuntu, APT_CHANNEL_CONF);
        assert!(conf.contains("\"origin=Ubuntu,archive=${distro_codename}-security\";"), "{conf}");
        assert!(!conf.contains("origin=Debian"), "{conf}");
    }

    #[test]
    fn rpm_channels() {
        for ch in [NodeOsChannel::None, NodeOsChannel::SecurityPatch, NodeOsChannel::NodeImage] {
            let p = plan_channel(ch, &rpm_node());
            assert!(p.files.is_empty(), "{ch}: no owned files");
            assert_eq!(p.timers[0], ("dnf-automatic.timer", TimerState::Off));
            assert!(p.timers.iter().all(|(_, s)| *s == TimerState::Off));
        }
        let p = plan_channel(NodeOsChannel::Unmanaged, &rpm_node());
        assert_eq!(
            file(&p, DNF_AUTOMATIC_CONF),
            "# Managed by upkeep-agent: node OS channel Unmanaged (dnf-automatic, security updates, 06:00 UTC).\n\
# Rewritten or removed when the channel changes; do not edit. Distribution files are left untouched.\n\
[commands]\nupgrade_type = security\nrandom_sleep = 0\nnetwork_online_timeout = 60\ndownload_updates = yes\n\
apply_updates = yes\n# The agent coordinates reboots with the hub.\nreboot = never\n\n[emitters]\nemit_via = stdio\n\n\
[base]\ndebuglevel = 1\n"
        );
        assert!(file(&p, DNF_AUTOMATIC_TIMER_DROPIN).ends_with(
            "[Timer]\nOnCalendar=\nOnCalendar=*-*-* 06:00:00 UTC\nRandomizedDelaySec=20m\nPersistent=true\n"
        ));
        assert!(file(&p, DNF_AUTOMATIC_SERVICE_DROPIN).ends_with(
            "[Service]\nExecStart=\nExecStart=/usr/bin/dnf-automatic /etc/upkeep/dnf-automatic.conf --timer\n"
        ));
        assert_eq!(p.timers[0], ("dnf-automatic.timer", TimerState::On));
        assert!(p.timers[1..].iter().all(|(_, s)| *s == TimerState::Off));
    }

    #[test]
    fn every_planned_file_is_owned() {
        for os in [deb(), rpm_node()] {
            for ch in NodeOsChannel::ALL {
                for f in plan_channel(ch, &os).files {
                    assert!(OWNED_FILES.contains(&f.path), "{}", f.path);
                }
            }
        }
    }

    #[test]
    fn unknown_and_windows_like_behave_as_none_and_say_so() {
        let p = plan_channel(NodeOsChannel::Unmanaged, &node(OsKind::Unknown { id: "arch".into() }));
        assert_eq!(p.effective, NodeOsChannel::None);
        assert!(p.files.is_empty() && p.timers.is_empty());
        assert_eq!(
            p.note,
            "node OS channel Unmanaged not applied: unknown OS (os-release ID \"arch\"); behaving as None (nothing switched)"
        );
        let p = plan_channel(NodeOsChannel::NodeImage, &node(OsKind::Unknown { id: String::new() }));
        assert!(p.note.contains("unknown OS (no os-release)"), "{}", p.note);
        let p = plan_channel(NodeOsChannel::None, &node(OsKind::Unknown { id: String::new() }));
        assert_eq!(p.note, "", "None on an unknown OS is exactly what was asked");
        let p = plan_channel(NodeOsChannel::Unmanaged, &node(OsKind::WindowsLike { id: "windows".into() }));
        assert!(p.note.contains("Windows-like OS"), "{}", p.note);
    }

    #[test]
    fn security_patch_refused_on_windows_like_and_azure_linux_gpu_pools() {
        let mut gpu = node(OsKind::Rpm { id: "azurelinux".into() });
        gpu.node_pool = "gpupool".into();
        gpu.hardware_class = "gpu".into();
        let p = plan_channel(NodeOsChannel::SecurityPatch, &gpu);
        assert_eq!(p.effective, NodeOsChannel::None);
        assert_eq!(
            p.note,
            "SecurityPatch is not supported on node pool \"gpupool\": Azure Linux GPU pools take patches only as node \
             images; use NodeImage; behaving as None"
        );
        assert_eq!(p.timers[0], ("dnf-automatic.timer", TimerState::Off), "still switched off as for None");
        // Not refused: the same pool without GPUs, a Mariner CPU pool, a Debian GPU pool, or another channel.
        let mut cpu = gpu.clone();
        cpu.hardware_class = String::new();
        assert_eq!(plan_channel(NodeOsChannel::SecurityPatch, &cpu).note, "");
        let mut deb_gpu = deb();
        deb_gpu.hardware_class = "gpu".into();
        assert_eq!(plan_channel(NodeOsChannel::SecurityPatch, &deb_gpu).effective, NodeOsChannel::SecurityPatch);
        assert_eq!(plan_channel(NodeOsChannel::Unmanaged, &gpu).effective, NodeOsChannel::Unmanaged);
        let mut mariner = gpu.clone();
        mariner.os = OsKind::Rpm { id: "mariner".into() };
        assert!(mariner.security_patch_refusal().is_some());
        let win = node(OsKind::WindowsLike { id: "windows".into() });
        let p = plan_channel(NodeOsChannel::SecurityPatch, &win);
        assert!(
            p.note.starts_with("SecurityPatch is not supported on node pool \"pool1\": Windows-like OS"),
            "{}",
            p.note
        );
    }

    #[test]
    fn package_pins_parse_and_name_the_field() {
        let p = parse_package_pins(&["openssl=3.0.11-1~deb12u2".into(), "libc6=2.36-9+deb12u4".into()]).expect("ok");
        assert_eq!(p[0], PackagePin { name: "openssl".into(), version: "3.0.11-1~deb12u2".into() });
        assert!(parse_package_pins(&[]).expect_err("empty").starts_with("apply_security_patch.packages: empty"));
        let e = parse_package_pins(&["ok=1".into(), "openssl".into()]).expect_err("no version");
        assert!(e.starts_with("apply_security_patch.packages[1]: \"openssl\": expected NAME=VERSION"), "{e}");
        let e = parse_package_pins(&["-o=1".into()]).expect_err("option injection");
        assert!(e.contains("package name"), "{e}");
        let e = parse_package_pins(&["a=1 2".into()]).expect_err("space");
        assert!(e.contains("version must"), "{e}");
        assert!(parse_package_pins(&["a=".into()]).is_err());
    }
}
