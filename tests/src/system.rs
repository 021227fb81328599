//! System-test helpers: the real-OS tier (see TEST-INFRA.md). Builds the packages with `scripts/package`, boots
//! a real Debian systemd in a `systemd-nspawn` container from a cached root filesystem, and drives it with
//! `nsenter`. Every prerequisite is checked up front and a missing one fails the test with the command that
//! installs it; nothing here skips silently. A [`Container`] powers itself off (and is killed if it does not)
//! and deletes its root directory when dropped, also when the test panics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

/// Fails the test, naming the fix, unless every tool the system tests need is present and we are root.
pub fn require_prerequisites() {
    let mut missing = Vec::new();
    // /proc/self/status carries the effective uid (second field of `Uid:`).
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().nth(1));
    if euid != Some("0") {
        missing.push("root (systemd-nspawn and dpkg need it)".to_string());
    }
    for (tool, package) in [
        ("systemd-nspawn", "apt-get install systemd-container"),
        ("nsenter", "apt-get install util-linux"),
        ("zstd", "apt-get install zstd"),
        ("debootstrap", "apt-get install debootstrap"),
        ("dnf", "apt-get install dnf"),
        ("rpm", "apt-get install rpm"),
        ("rpmbuild", "apt-get install rpm"),
        ("createrepo_c", "apt-get install createrepo-c"),
        ("systemd-analyze", "apt-get install systemd"),
        ("cargo-deb", "cargo install --locked cargo-deb"),
        ("cargo-generate-rpm", "cargo install --locked cargo-generate-rpm"),
    ] {
        if !on_path(tool) {
            missing.push(format!("{tool} ({package})"));
        }
    }
    assert!(
        missing.is_empty(),
        "system test prerequisites missing: {}. Run scripts/deps (scripts/test does) to install them.",
        missing.join(", ")
    );
}

fn on_path(tool: &str) -> bool {
    let cargo_bin = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"));
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(cargo_bin)
        .any(|d| d.join(tool).is_file())
}

/// Runs `cmd`, failing the test with its argv and output tail unless it exits 0.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        tail(&out.stdout),
        tail(&out.stderr)
    );
    out
}

fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The cached bootable root filesystem (built by `scripts/system-rootfs` when missing).
pub fn rootfs_tarball() -> PathBuf {
    let out = run_ok(Command::new(workspace().join("scripts/system-rootfs")).stderr(Stdio::inherit()));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Builds `package`'s `kind` ("deb" or "rpm") from the debug build (no second compile) into `out`, optionally
/// with an older `version`; returns the files it produced.
pub fn build_packages(package: &str, kind: &str, out: &Path, version: Option<&str>) -> Vec<PathBuf> {
    let mut cmd = Command::new(workspace().join("scripts/package"));
    cmd.args(["--profile", "dev", "--no-build", "--only", kind, "--package", package, "--out"]).arg(out);
    if let Some(v) = version {
        cmd.args(["--version", v]);
    }
    run_ok(&mut cmd);
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(out).expect("read dist dir").map(|e| e.expect("dir entry").path()).collect();
    files.sort();
    files
}

/// The one file in `files` ending in `suffix`.
pub fn pick(files: &[PathBuf], suffix: &str) -> PathBuf {
    let hits: Vec<&PathBuf> = files.iter().filter(|f| f.to_string_lossy().ends_with(suffix)).collect();
    assert_eq!(hits.len(), 1, "expected one *{suffix} among {files:?}");
    hits[0].clone()
}

/// Polls `check` every 100 ms until it returns Some or `within` passes (blocking; for container state).
pub fn poll<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A booted Debian container. Dropping it powers it off and deletes its root.
pub struct Container {
    /// Machine name (also its hostname).
    pub name: String,
    root_dir: TempDir,
    nspawn: Option<Child>,
    leader: u32,
    /// One booted container at a time on this machine: two booting side by side on 2 cores were seen to stall
    /// (systemd never reached `running`). Held until the container is gone.
    _lock: std::fs::File,
}

impl Container {
    /// Unpacks the cached root filesystem and boots it; returns once systemd reports the boot finished.
    pub fn boot(name: &str) -> Container {
        let tarball = rootfs_tarball();
        std::fs::create_dir_all("/var/tmp/upkeep-system").expect("mkdir /var/tmp/upkeep-system");
        let lock = std::fs::File::create("/var/tmp/upkeep-system/boot.lock").expect("lock file");
        lock.lock().expect("lock /var/tmp/upkeep-system/boot.lock");
        // Not /tmp: that may be a small tmpfs, and the root is ~350 MB unpacked.
        let root_dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in("/var/tmp/upkeep-system")
            .expect("container root dir");
        let root = root_dir.path().join("root");
        std::fs::create_dir(&root).expect("mkdir root");
        run_ok(Command::new("sh").arg("-c").arg(format!(
            "zstd -dc '{}' | tar -C '{}' --numeric-owner -xf -",
            tarball.display(),
            root.display()
        )));
        let log = std::fs::File::create(root_dir.path().join("console.log")).expect("console log");
        let child = Command::new("systemd-nspawn")
            .args(["--boot", "--register=no", "--keep-unit", "--console=passive", "--quiet"])
            .arg(format!("--machine={name}"))
            .arg("--directory")
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn systemd-nspawn");
        let mut c = Container { name: name.to_string(), root_dir, nspawn: Some(child), leader: 0, _lock: lock };
        let nspawn_pid = c.nspawn.as_ref().map(Child::id).expect("child");
        c.leader = poll("the container's init process", Duration::from_secs(30), || {
            c.assert_nspawn_alive();
            let children = std::fs::read_to_string(format!("/proc/{nspawn_pid}/task/{nspawn_pid}/children")).ok()?;
            // nspawn's first child is a short-lived set-up process; the container's init is the child that is
            // PID 1 in its own PID namespace (`NSpid: <host pid> 1`).
            children.split_whitespace().find_map(|pid| {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
                let ids: Vec<&str> = nspid.split_whitespace().collect();
                if ids.len() >= 2 && ids.last() == Some(&"1") { pid.parse().ok() } else { None }
            })
        });
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            c.assert_nspawn_alive();
            let out = c.exec(&["systemctl", "is-system-running"]);
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if matches!(state.as_str(), "running" | "degraded") {
                break;
            }
            if Instant::now() > deadline {
                let jobs = c.exec(&["systemctl", "list-jobs", "--no-pager"]);
                panic!(
                    "systemd in {name} did not finish booting within 90 s (state {state:?}); jobs:\n{}{}",
                    String::from_utf8_lossy(&jobs.stdout),
                    String::from_utf8_lossy(&jobs.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn assert_nspawn_alive(&mut self) {
        if let Some(child) = self.nspawn.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            let log = std::fs::read_to_string(self.root_dir.path().join("console.log")).unwrap_or_default();
            panic!("systemd-nspawn exited early ({status}); console:\n{}", tail(log.as_bytes()));
        }
    }

    /// The container's root directory as seen from the host.
    pub fn root(&self) -> PathBuf {
        self.root_dir.path().join("root")
    }

    /// A path inside the container, as seen from the host.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.root().join(inside.trim_start_matches('/'))
    }

    /// Runs `argv` inside the container (all its namespaces) and returns whatever happened.
    pub fn exec(&self, argv: &[&str]) -> Output {
        Command::new("nsenter")
            .arg("--target")
            .arg(self.leader.to_string())
            .args(["--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup", "--root", "--wd=/"])
            .args(argv)
            .env("SYSTEMD_PAGER", "")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("run nsenter")
    }

    /// Runs `argv` inside the container; fails the test unless it exits 0. Returns stdout.
    pub fn ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        assert!(
            out.status.success(),
            "in {}: {argv:?} failed ({}):\nstdout: {}\nstderr: {}",
            self.name,
            out.status,
            tail(&out.stdout),
            tail(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Copies a host file into the container at `/srv/pkgs/<name>` and returns that path.
    pub fn push_package(&self, file: &Path) -> String {
        let dir = self.path("/srv/pkgs");
        std::fs::create_dir_all(&dir).expect("mkdir /srv/pkgs");
        let name = file.file_name().expect("file name").to_string_lossy().into_owned();
        std::fs::copy(file, dir.join(&name)).expect("copy package");
        format!("/srv/pkgs/{name}")
    }

    /// One property of a unit (`systemctl show -p NAME --value`).
    pub fn unit_property(&self, unit: &str, property: &str) -> String {
        self.ok(&["systemctl", "show", unit, "-p", property, "--value"]).trim().to_string()
    }

    /// Waits until `unit` is active (fails early, with its journal, if it fails).
    pub fn wait_active(&self, unit: &str) {
        poll(&format!("{unit} to be active"), Duration::from_secs(60), || {
            let state = self.unit_property(unit, "ActiveState");
            assert!(state != "failed", "{unit} failed:\n{}", self.journal_text(unit));
            (state == "active").then_some(())
        });
    }

    /// The unit's journal as text (for failure messages).
    pub fn journal_text(&self, unit: &str) -> String {
        String::from_utf8_lossy(&self.exec(&["journalctl", "-u", unit, "--no-pager", "-n", "60"]).stdout).into_owned()
    }

    /// The unit's journal entries, one JSON object each (`journalctl -o json`).
    pub fn journal(&self, unit: &str) -> Vec<serde_json::Value> {
        let text = self.ok(&["journalctl", "-u", unit, "-o", "json", "--no-pager"]);
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Waits for a journal entry of `unit` whose MESSAGE is `message`; returns it.
    pub fn wait_journal_message(&self, unit: &str, message: &str) -> serde_json::Value {
        poll(&format!("{unit} to log {message:?}"), Duration::from_secs(60), || {
            self.journal(unit).into_iter().find(|e| e["MESSAGE"].as_str() == Some(message))
        })
    }

    /// `systemd-analyze security` overall exposure of `unit` in the booted container, e.g. "1.2".
    pub fn exposure(&self, unit: &str) -> String {
        let out = self.ok(&["systemd-analyze", "security", "--no-pager", unit]);
        out.lines()
            .find_map(|l| l.split_once("Overall exposure level for")?.1.split_once(':').map(|(_, s)| s.trim()))
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no exposure level in:\n{out}"))
            .to_string()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let Some(mut child) = self.nspawn.take() else { return };
        // Ask the container's systemd to power off; kill it if it does not within the deadline.
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Killing the container's init ends its PID namespace, and with it every process inside.
        if self.leader != 0 {
            let _ = Command::new("kill").arg("-KILL").arg(self.leader.to_string()).status();
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A free TCP port on 127.0.0.1 (the container shares the host's loopback).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}
