//! Cordon, uncordon and drain, by one of three backends: the Kubernetes API (`[kubernetes] api_server` in
//! agent.toml: `spec.unschedulable` and evictions, see `kube`), the configured hook commands (`[cordon]`), or,
//! without either, a marker file `<root>/var/lib/upkeep/cordoned` (a node with no workload scheduler has
//! nothing to evict). The configuration refuses Kubernetes and hooks together, so at most one applies.

use super::kube::KubeNode;
use super::{OsError, command};
use crate::config::CordonSettings;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Marker file written by cordon without a hook, relative to the root.
pub const CORDONED_FILE: &str = "var/lib/upkeep/cordoned";

/// Cordon control of one node.
#[derive(Debug, Clone)]
pub struct Cordon {
    root: PathBuf,
    settings: CordonSettings,
    kube: Option<Arc<KubeNode>>,
}

impl Cordon {
    /// Over `root` with `settings`.
    pub fn new(root: PathBuf, settings: CordonSettings) -> Cordon {
        Cordon { root, settings, kube: None }
    }

    /// Through the Kubernetes API instead of hooks or the marker file.
    pub fn with_kube(mut self, kube: Arc<KubeNode>) -> Cordon {
        self.kube = Some(kube);
        self
    }

    /// The Kubernetes backend, if in use.
    pub fn kube(&self) -> Option<&KubeNode> {
        self.kube.as_deref()
    }

    /// Marks the node unschedulable.
    pub fn cordon(&self) -> Result<(), OsError> {
        if let Some(k) = &self.kube {
            return k.cordon();
        }
        if !self.settings.cordon.is_empty() {
            return command::run(&self.settings.cordon, &[], None).map(drop);
        }
        let p = self.root.join(CORDONED_FILE);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(OsError::io(dir))?;
        }
        std::fs::write(&p, b"cordoned by upkeep-agent\n").map_err(OsError::io(&p))
    }

    /// Makes the node schedulable again.
    pub fn uncordon(&self) -> Result<(), OsError> {
        if let Some(k) = &self.kube {
            return k.uncordon();
        }
        if !self.settings.uncordon.is_empty() {
            return command::run(&self.settings.uncordon, &[], None).map(drop);
        }
        let p = self.root.join(CORDONED_FILE);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(OsError::Io { path: p, source: e }),
            _ => Ok(()),
        }
    }

    /// Evicts workloads within `timeout`.
    pub fn drain(&self, timeout: Duration, force: bool) -> Result<(), OsError> {
        if let Some(k) = &self.kube {
            return k.drain(timeout, force);
        }
        if self.settings.drain.is_empty() {
            tracing::info!("no drain hook configured: nothing to evict");
            return Ok(());
        }
        let secs = timeout.as_secs().to_string();
        let force_arg = if force { "force" } else { "" };
        let argv = command::substitute(&self.settings.drain, &[("timeout", &secs), ("force", force_arg)]);
        let env: &[(&str, &str)] = if force { &[("UPKEEP_DRAIN_FORCE", "1")] } else { &[] };
        command::run(&argv, env, Some(timeout + Duration::from_secs(5))).map(drop)
    }
}
