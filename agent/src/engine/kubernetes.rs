//! The Kubernetes version operation (`UpgradeKubernetes`), step by step through the journal:
//!
//! Accepted: the node has a package manager and `[kubernetes]`; the version it runs is read. Already at the
//! ordered version (and no upgrade to it left unfinished) -> done. A downgrade or a skipped minor version is
//! refused (kubeadm supports neither). Otherwise the upgrade is marked pending (persist, then act) -> Act.
//! Act: install the configured packages pinned to the version (apt or dnf; safe to repeat) -> Hook.
//! Hook: run the configured upgrade hook (`kubeadm upgrade apply V` on the first control-plane node,
//! `kubeadm upgrade node` elsewhere; both are safe to run again), check the node now reports the version,
//! clear the pending mark -> done.
//!
//! The pending mark keeps a failed hook from being mistaken for a finished upgrade: after Act the packages are
//! at the new version, so a retry (a new operation id) would otherwise find "already at the version" and skip
//! the hook it still owes.

use super::{Engine, Next};
use crate::channel::OsKind;
use crate::journal::{Entry, Step};
use upkeep_core::version::KubernetesVersion;

/// File in the state directory naming the Kubernetes version whose upgrade started and has not finished.
pub const KUBERNETES_PENDING_FILE: &str = "kubernetes-upgrade-pending";

impl Engine {
    /// Performs one step of an `UpgradeKubernetes` operation.
    pub(super) async fn upgrade_kubernetes_step(
        &self,
        mut e: Entry,
        version: &str,
        first_control_plane: bool,
    ) -> Result<Next, String> {
        let target: KubernetesVersion =
            version.parse().map_err(|err| format!("journal: upgrade_kubernetes.version: {err}"))?;
        match e.step {
            Step::Accepted => Ok(self.kubernetes_checks(e, target).await),
            Step::Act => {
                let kind = self.node_kind().await.map_err(|err| format!("reading os-release: {err}"))?;
                let os = kind.os.clone();
                match self.os(move |n| n.install_kubernetes(&os, &target)).await {
                    Ok(()) => {
                        e.step = Step::Hook;
                        Ok(Next::Go(e))
                    }
                    Err(err) => Ok(Self::fail(e, format!("installing the Kubernetes {target} packages: {err}"))),
                }
            }
            Step::Hook => {
                if let Err(err) = self.os(move |n| n.upgrade_kubernetes_hook(&target, first_control_plane)).await {
                    return Ok(Self::fail(
                        e,
                        format!("Kubernetes {target} packages installed but the upgrade hook failed: {err}"),
                    ));
                }
                match self.os(|n| n.kubernetes_version()).await {
                    Ok(Some(v)) if v == target => {}
                    Ok(got) => {
                        let got = got.map_or_else(|| "no version".to_string(), |v| v.to_string());
                        return Ok(Self::fail(
                            e,
                            format!("after the upgrade hook the node reports Kubernetes {got}, expected {target}"),
                        ));
                    }
                    Err(err) => {
                        return Ok(Self::fail(e, format!("reading the Kubernetes version after the upgrade: {err}")));
                    }
                }
                let pending = self.state_dir.join(KUBERNETES_PENDING_FILE);
                if let Err(err) = crate::state::clear_mark(&pending) {
                    // The upgrade is done; a stale mark only makes a later order for this version run again.
                    tracing::warn!(path = %pending.display(), error = %err, "could not clear the pending Kubernetes upgrade mark");
                }
                tracing::info!(op = %e.operation_id, version = %target, "Kubernetes upgraded");
                Ok(Self::ok(e))
            }
            step => Err(format!("journal: upgrade-kubernetes operation at step {} cannot continue", step.as_str())),
        }
    }

    async fn kubernetes_checks(&self, mut e: Entry, target: KubernetesVersion) -> Next {
        let kind = match self.node_kind().await {
            Ok(k) => k,
            Err(err) => return Self::fail(e, format!("reading os-release: {err}")),
        };
        if let OsKind::WindowsLike { id } | OsKind::Unknown { id } = &kind.os {
            return Self::fail(
                e,
                format!("Kubernetes {target} refused: no package manager known for os-release ID {id:?}"),
            );
        }
        let running = match self.os(|n| n.kubernetes_version()).await {
            Ok(v) => v,
            Err(err) => return Self::fail(e, format!("Kubernetes {target} refused: {err}")),
        };
        let pending_file = self.state_dir.join(KUBERNETES_PENDING_FILE);
        let pending = crate::state::read_mark(&pending_file).and_then(|s| s.trim().parse::<KubernetesVersion>().ok());
        if let Some(cur) = running {
            if cur == target && pending != Some(target) {
                tracing::info!(op = %e.operation_id, version = %target, "already at the ordered Kubernetes version");
                return Self::ok(e);
            }
            if cur > target {
                return Self::fail(
                    e,
                    format!(
                        "downgrade refused: the node runs Kubernetes {cur} and {target} is older; kubeadm does not downgrade"
                    ),
                );
            }
            if target.major != cur.major || target.minor > cur.minor + 1 {
                return Self::fail(
                    e,
                    format!(
                        "Kubernetes {cur} -> {target} refused: kubeadm upgrades one minor version at a time; upgrade to {}.{}.x first",
                        cur.major,
                        cur.minor + 1
                    ),
                );
            }
        }
        // Persist, then act: the mark is on disk before any package changes.
        if let Err(err) = crate::state::write_atomic(&pending_file, format!("{target}\n").as_bytes()) {
            return Self::fail(e, format!("cannot mark the Kubernetes upgrade as started: {err}"));
        }
        e.step = Step::Act;
        Next::Go(e)
    }
}
