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

/// Whether `tool` is on PATH (or in ~/.cargo/bin).
pub fn on_path(tool: &str) -> bool {
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

/// Fails the test, naming the fix, unless every `(tool, how to install it)` is on the PATH.
pub fn require_tools(tools: &[(&str, &str)]) {
    let missing: Vec<String> =
        tools.iter().filter(|(t, _)| !on_path(t)).map(|(t, fix)| format!("{t} ({fix})")).collect();
    assert!(missing.is_empty(), "system test prerequisites missing: {}", missing.join(", "));
}

// ---------------------------------------------------------------------------------------------------------
// Machines that reboot and lose power: booted containers over a persistent root, with a bootloader that the
// harness runs before every boot.

/// The lock [`Container::boot`] holds for the life of its container, taken once by a test that runs several
/// [`Machine`]s: no other test's container runs while it is held. The test boots its machines one after the
/// other (two booting side by side were seen to stall on 2 cores), and a reboot is one machine booting.
pub struct BootLock {
    _file: std::fs::File,
}

impl BootLock {
    /// Waits for the lock.
    pub fn take() -> BootLock {
        std::fs::create_dir_all("/var/tmp/upkeep-system").expect("mkdir /var/tmp/upkeep-system");
        let file = std::fs::File::create("/var/tmp/upkeep-system/boot.lock").expect("lock file");
        file.lock().expect("lock /var/tmp/upkeep-system/boot.lock");
        BootLock { _file: file }
    }
}

/// What a bootloader chose for one boot.
#[derive(Debug, Clone)]
pub struct Boot {
    /// What was booted, recorded in the machine's boot log (e.g. the slot, "a").
    pub label: String,
    /// Extra `systemd-nspawn` arguments for this boot (read-only binds of the kernel command line and of the
    /// booted slot's files).
    pub nspawn_args: Vec<std::ffi::OsString>,
}

/// Chooses what a [`Machine`] boots. Runs on the host with the machine off, before every boot: the first, each
/// reboot the machine asks for, and each power-on after a power cut. Err: nothing bootable; the machine stays
/// off and the test fails with the reason.
pub trait Bootloader: Send + 'static {
    /// Decides this boot. `root` is the machine's root file system, `scratch` a directory of the harness
    /// (outside the root) for files to bind into the machine.
    fn boot(&mut self, root: &Path, scratch: &Path) -> Result<Boot, String>;
}

#[derive(Default)]
struct Power {
    /// The container's init (host pid) while it runs.
    leader: Option<u32>,
    /// The systemd-nspawn process while it runs.
    nspawn: Option<u32>,
    /// One label per boot, in order.
    boots: Vec<String>,
    /// How each systemd-nspawn run ended.
    exits: Vec<String>,
    /// A power cut was made: stay off until `power_on`.
    cut: bool,
    /// The power is back (after a cut).
    on: bool,
    /// Switched off for good (drop).
    shutdown: bool,
    /// Why the machine cannot run (nothing bootable, nspawn failed, powered itself off).
    failure: Option<String>,
}

type Shared = std::sync::Arc<(std::sync::Mutex<Power>, std::sync::Condvar)>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Power> {
    s.0.lock().unwrap_or_else(|e| e.into_inner())
}

/// A Debian machine in a `systemd-nspawn --boot` container whose root persists across boots. A power-supply
/// thread plays the machine's firmware: it runs the [`Bootloader`] and starts systemd-nspawn; when the
/// container's systemd reboots (nspawn with `--keep-unit` exits with 133 then, leaving the restart to whoever
/// started it) it runs the bootloader again and boots the same root; [`Machine::power_cut`] SIGKILLs the
/// container's init, which ends every process of the container at once with no shutdown of any kind, and the
/// machine stays off until [`Machine::power_on`]. The container's files are on the host's file system, so a
/// cut loses nothing that was written but not yet synced: what it tests is where the operation stood, not the
/// fsyncs. Not locked by itself: hold a [`BootLock`]. Dropping it powers it off and deletes the root.
pub struct Machine {
    /// Machine name (also its hostname).
    pub name: String,
    dir: TempDir,
    shared: Shared,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Machine {
    /// Unpacks the cached root file system for a machine that is still off: write into [`Machine::path`],
    /// then [`Machine::start`].
    pub fn new(name: &str) -> Machine {
        let tarball = rootfs_tarball();
        std::fs::create_dir_all("/var/tmp/upkeep-system").expect("mkdir /var/tmp/upkeep-system");
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in("/var/tmp/upkeep-system")
            .expect("machine dir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).expect("mkdir root");
        std::fs::create_dir_all(dir.path().join("boot")).expect("mkdir boot");
        run_ok(Command::new("sh").arg("-c").arg(format!(
            "zstd -dc '{}' | tar -C '{}' --numeric-owner -xf -",
            tarball.display(),
            root.display()
        )));
        Machine {
            name: name.to_string(),
            dir,
            shared: std::sync::Arc::new((std::sync::Mutex::new(Power::default()), std::sync::Condvar::new())),
            thread: None,
        }
    }

    /// The root file system as seen from the host.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// A path inside the machine, as seen from the host.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.root().join(inside.trim_start_matches('/'))
    }

    /// Powers the machine on with `bootloader` as its firmware; returns once systemd inside reports the boot
    /// finished.
    pub fn start(&mut self, bootloader: impl Bootloader) {
        assert!(self.thread.is_none(), "{} is already powered", self.name);
        let (name, root, scratch, shared) =
            (self.name.clone(), self.root(), self.dir.path().to_path_buf(), self.shared.clone());
        let mut bootloader = bootloader;
        self.thread = Some(
            std::thread::Builder::new()
                .name(format!("power-{}", self.name))
                .spawn(move || power_supply(&name, &root, &scratch, &mut bootloader, &shared))
                .expect("spawn the power-supply thread"),
        );
        self.wait_up(1);
    }

    /// Fails the test if the machine cannot run (its bootloader found nothing bootable, systemd-nspawn failed,
    /// or it powered itself off).
    pub fn check(&self) {
        if let Some(why) = lock(&self.shared).failure.clone() {
            panic!("{}: {why}", self.name);
        }
    }

    /// The labels of every boot so far, in order.
    pub fn boots(&self) -> Vec<String> {
        lock(&self.shared).boots.clone()
    }

    /// How each systemd-nspawn run ended so far ("exit status: 133" is a reboot).
    pub fn exits(&self) -> Vec<String> {
        lock(&self.shared).exits.clone()
    }

    /// Waits until the machine is in its `boots`-th boot (or later) and systemd there finished booting.
    pub fn wait_up(&self, boots: usize) {
        poll(&format!("{} to finish boot #{boots}", self.name), Duration::from_secs(120), || {
            self.check();
            let (leader, n) = {
                let p = lock(&self.shared);
                (p.leader, p.boots.len())
            };
            let leader = leader.filter(|_| n >= boots)?;
            let out = self.exec_in(leader, &["systemctl", "is-system-running"]);
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            matches!(state.as_str(), "running" | "degraded").then_some(())
        });
    }

    /// Cuts the power: SIGKILL to the container's init (every process inside dies with it, nothing is shut
    /// down). Returns once the container is gone; the machine stays off until [`Machine::power_on`].
    pub fn power_cut(&self) {
        let leader = {
            let mut p = lock(&self.shared);
            let leader = p.leader.unwrap_or_else(|| panic!("{}: power cut while it is not running", self.name));
            p.cut = true;
            leader
        };
        run_ok(Command::new("kill").arg("-KILL").arg(leader.to_string()));
        poll(&format!("{} to go dark", self.name), Duration::from_secs(30), || {
            let p = lock(&self.shared);
            (p.nspawn.is_none() && p.leader.is_none()).then_some(())
        });
    }

    /// Restores the power after a cut: the firmware boots the machine again (bootloader first); returns once
    /// systemd inside finished booting.
    pub fn power_on(&self) {
        let boots = {
            let mut p = lock(&self.shared);
            assert!(p.cut, "{}: power_on without a power cut", self.name);
            p.on = true;
            p.boots.len() + 1
        };
        self.shared.1.notify_all();
        self.wait_up(boots);
    }

    fn leader(&self) -> u32 {
        self.check();
        lock(&self.shared).leader.unwrap_or_else(|| panic!("{} is not running", self.name))
    }

    fn exec_in(&self, leader: u32, argv: &[&str]) -> Output {
        Command::new("nsenter")
            .arg("--target")
            .arg(leader.to_string())
            .args(["--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup", "--root", "--wd=/"])
            .args(argv)
            .env("SYSTEMD_PAGER", "")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("run nsenter")
    }

    /// Runs `argv` inside the running machine and returns whatever happened.
    pub fn exec(&self, argv: &[&str]) -> Output {
        self.exec_in(self.leader(), argv)
    }

    /// Runs `argv` inside the machine; fails the test unless it exits 0. Returns stdout.
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

    /// Copies a host file into the machine at `/srv/pkgs/<name>` and returns that path.
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
        poll(&format!("{unit} to be active in {}", self.name), Duration::from_secs(60), || {
            let state = self.unit_property(unit, "ActiveState");
            assert!(state != "failed", "{unit} failed:\n{}", self.journal_text(unit));
            (state == "active").then_some(())
        });
    }

    /// The unit's journal of the current boot as text (for failure messages); empty when the machine is off.
    pub fn journal_text(&self, unit: &str) -> String {
        let Some(leader) = lock(&self.shared).leader else { return String::new() };
        let out = self.exec_in(leader, &["journalctl", "-u", unit, "--no-pager", "-n", "60"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The tail of the console of every boot so far (for failure messages).
    pub fn consoles(&self) -> String {
        let n = lock(&self.shared).boots.len();
        (1..=n)
            .map(|i| {
                let text =
                    std::fs::read_to_string(self.dir.path().join(format!("console-{i}.log"))).unwrap_or_default();
                format!("--- boot #{i}\n{}", tail(text.as_bytes()))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The children of `pid` that are PID 1 in their own PID namespace (`NSpid: <host pid> 1`): the container's
/// init, once systemd-nspawn's short-lived set-up child has handed over.
fn container_init(nspawn_pid: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{nspawn_pid}/task/{nspawn_pid}/children")).ok()?;
    children.split_whitespace().find_map(|pid| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
        let ids: Vec<&str> = nspid.split_whitespace().collect();
        if ids.len() >= 2 && ids.last() == Some(&"1") { pid.parse().ok() } else { None }
    })
}

/// The firmware loop of a [`Machine`] (its own thread; never panics: failures go to `Power::failure`).
fn power_supply(name: &str, root: &Path, scratch: &Path, bootloader: &mut dyn Bootloader, shared: &Shared) {
    loop {
        {
            let mut p = lock(shared);
            while p.cut && !p.on && !p.shutdown {
                p = shared.1.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            if p.shutdown {
                return;
            }
            p.cut = false;
            p.on = false;
        }
        let boot = match bootloader.boot(root, &scratch.join("boot")) {
            Ok(b) => b,
            Err(why) => {
                lock(shared).failure = Some(format!("the bootloader found nothing to boot: {why}"));
                return;
            }
        };
        let n = lock(shared).boots.len() + 1;
        let spawned = std::fs::File::create(scratch.join(format!("console-{n}.log"))).and_then(|log| {
            Command::new("systemd-nspawn")
                .args(["--boot", "--register=no", "--keep-unit", "--console=passive", "--quiet"])
                .arg(format!("--machine={name}"))
                .args(&boot.nspawn_args)
                .arg("--directory")
                .arg(root)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
        });
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                lock(shared).failure = Some(format!("cannot start systemd-nspawn: {e}"));
                return;
            }
        };
        {
            let mut p = lock(shared);
            p.nspawn = Some(child.id());
            p.boots.push(boot.label);
        }
        // The container's init, for nsenter and for power cuts.
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Ok(status),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            if lock(shared).leader.is_none()
                && let Some(init) = container_init(child.id())
            {
                lock(shared).leader = Some(init);
                shared.1.notify_all();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut p = lock(shared);
        p.leader = None;
        p.nspawn = None;
        let ended = match &status {
            Ok(s) => s.to_string(),
            Err(e) => format!("wait failed: {e}"),
        };
        p.exits.push(ended.clone());
        shared.1.notify_all();
        if p.shutdown {
            return;
        }
        if p.cut {
            continue; // stays off until power_on
        }
        if matches!(&status, Ok(s) if s.code() == Some(133)) {
            continue; // the machine rebooted itself: bootloader, then the next boot
        }
        p.failure = Some(format!("systemd-nspawn ended ({ended}) without a reboot or a power cut"));
        return;
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        let nspawn = {
            let mut p = lock(&self.shared);
            p.shutdown = true;
            p.nspawn
        };
        self.shared.1.notify_all();
        // SIGTERM to nspawn asks the container's systemd to power off; killed if it does not within 30 s.
        if let Some(pid) = nspawn {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && !thread.is_finished() {
            std::thread::sleep(Duration::from_millis(100));
        }
        if !thread.is_finished()
            && let Some(leader) = lock(&self.shared).leader
        {
            let _ = Command::new("kill").arg("-KILL").arg(leader.to_string()).status();
        }
        let _ = thread.join();
    }
}

// ---------------------------------------------------------------------------------------------------------
// GRUB, as the harness plays it.

/// The packaged GRUB script (`/etc/grub.d/09_upkeep` on a node).
pub fn grub_script() -> PathBuf {
    workspace().join("packaging/grub/09_upkeep")
}

/// Runs the packaged `09_upkeep` as `grub-mkconfig` would, with `defaults` as the text of
/// `/etc/default/upkeep-grub`; returns the grub.cfg text it prints.
pub fn grub_cfg(defaults: &str) -> String {
    let d = tempfile::tempdir().expect("tempdir");
    let file = d.path().join("upkeep-grub");
    std::fs::write(&file, defaults).expect("write defaults");
    let out = run_ok(Command::new("sh").arg(grub_script()).env("UPKEEP_GRUB_DEFAULTS", &file));
    String::from_utf8(out.stdout).expect("grub.cfg is UTF-8")
}

/// The boot decision block of a generated grub.cfg (between its BEGIN and END marker lines, inclusive).
pub fn grub_decision_block(cfg: &str) -> String {
    let lines: Vec<&str> = cfg.lines().collect();
    let begin = lines.iter().position(|l| l.starts_with("### BEGIN upkeep boot decision"));
    let end = lines.iter().position(|l| l.starts_with("### END upkeep boot decision"));
    match (begin, end) {
        (Some(b), Some(e)) if b < e => lines[b..=e].join("\n") + "\n",
        _ => panic!("no upkeep boot decision block in the generated grub.cfg:\n{cfg}"),
    }
}

/// The kernel command line the menu entry `--id <entry>` boots: `BOOT_IMAGE=<kernel> <arguments>` from its
/// `linux` line, as the kernel shows it in /proc/cmdline. None: no such entry, or no `linux` line in it.
pub fn grub_entry_cmdline(cfg: &str, entry: &str) -> Option<String> {
    let mut lines = cfg.lines().skip_while(|l| {
        !(l.starts_with("menuentry ")
            && l.split_whitespace().collect::<Vec<_>>().windows(2).any(|w| w == ["--id", entry]))
    });
    lines.next()?;
    let linux = lines.take_while(|l| l.trim() != "}").find_map(|l| l.trim().strip_prefix("linux "))?;
    let mut words = linux.split_whitespace();
    let kernel = words.next()?;
    Some(std::iter::once(format!("BOOT_IMAGE={kernel}")).chain(words.map(String::from)).collect::<Vec<_>>().join(" "))
}

/// What GRUB would boot: the `default` entry, and the `fallback` entry when the default cannot be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrubChoice {
    /// `${default}` after the decision.
    pub default: String,
    /// `${fallback}` after the decision (empty: none).
    pub fallback: String,
}

/// One boot's decision, made the way GRUB makes it, over the environment block `env_file` (read and written
/// with the host's `grub-editenv`): the stock `00_header` part that loads the block and turns `next_entry` into
/// a one-time default (Debian 12's text, with `GRUB_DEFAULT=0`), then `decision` (the packaged block). The
/// decision block only uses constructs that mean the same in GRUB script and in bash, so bash runs it, with
/// `set NAME=VALUE` and `save_env NAME...` defined as GRUB defines them. Err: the script failed.
pub fn grub_boot_decision(decision: &str, env_file: &Path) -> Result<GrubChoice, String> {
    const PRELUDE: &str = r#"
set() { local a; for a in "$@"; do printf -v "${a%%=*}" '%s' "${a#*=}"; done; }
save_env() {
  local n
  for n in "$@"; do
    grub-editenv "$UPKEEP_GRUBENV" set "$n=${!n}" || { echo "save_env $n failed" >&2; exit 1; }
  done
}
"#;
    // /etc/grub.d/00_header of grub-common 2.06 (Debian 12), lines 68-75, as it lands in grub.cfg.
    const HEADER: &str = r#"
if [ "${next_entry}" ] ; then
   set default="${next_entry}"
   set next_entry=
   save_env next_entry
   set boot_once=true
else
   set default="0"
fi
"#;
    const REPORT: &str = "\nprintf 'default=%s\\nfallback=%s\\n' \"${default}\" \"${fallback}\"\n";
    let listed = Command::new("grub-editenv")
        .arg(env_file)
        .arg("list")
        .output()
        .map_err(|e| format!("grub-editenv {} list: {e}", env_file.display()))?;
    if !listed.status.success() {
        return Err(format!("grub-editenv {} list: {}", env_file.display(), tail(&listed.stderr)));
    }
    let mut cmd = Command::new("bash");
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("UPKEEP_GRUBENV", env_file)
        .args(["--norc", "--noprofile", "-c"])
        .arg(format!("{PRELUDE}{HEADER}{decision}{REPORT}"));
    // load_env: every variable of the block (the names GRUB can hold that are also shell names).
    for line in String::from_utf8_lossy(&listed.stdout).lines() {
        if let Some((k, v)) = line.split_once('=')
            && k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            cmd.env(k, v);
        }
    }
    let out = cmd.output().map_err(|e| format!("bash: {e}"))?;
    if !out.status.success() {
        return Err(format!("the boot decision failed ({}): {}", out.status, tail(&out.stderr)));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).unwrap_or_default().to_string();
    Ok(GrubChoice { default: get("default="), fallback: get("fallback=") })
}

/// The image metadata (`etc/upkeep/node-image`) inside a slot holding a tar image; Err: the slot would not
/// boot (missing, torn, or without valid metadata).
pub fn slot_image_metadata(slot_file: &Path) -> Result<String, String> {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(slot_file)
        .arg("etc/upkeep/node-image")
        .output()
        .map_err(|e| format!("tar: {e}"))?;
    if !out.status.success() {
        return Err(format!("{}: no image in it ({})", slot_file.display(), tail(&out.stderr).trim()));
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    upkeep_agent::os::parse_node_image(&text).map_err(|e| format!("{}: image metadata: {e}", slot_file.display()))?;
    Ok(text)
}

/// Where a [`GrubFirmware`] machine keeps its boot control, inside its root.
#[derive(Debug, Clone)]
pub struct GrubLayout {
    /// The GRUB environment block, e.g. `boot/grub/grubenv`.
    pub env_file: String,
    /// Slot A's and slot B's image files (the "partitions"), e.g. `var/lib/upkeep/slots/slot-a.img`.
    pub slots: [String; 2],
    /// Where the machine sees its kernel command line (agent.toml `grub_cmdline`), e.g.
    /// `/run/upkeep-boot/cmdline`.
    pub cmdline_at: String,
}

/// A machine's firmware and GRUB, played by the harness for containers (which have no kernel of their own to
/// boot). Before every boot it makes the decision the packaged grub.cfg makes ([`grub_boot_decision`] over the
/// machine's real environment block), then "loads" the chosen entry: a slot boots when its image file holds an
/// image with valid metadata, else GRUB's `fallback` entry is tried, else nothing boots (the test fails). The
/// booted slot's image metadata is bound read-only over `/etc/upkeep/node-image` (what a node reports is what
/// the booted slot carries: on a real node the slot is the root file system), and the entry's kernel command
/// line (with `upkeep.slot=a|b`, from its `linux` line) over `cmdline_at`, where the agent's grub backend reads
/// it. Each boot gets a fresh `/proc/sys/kernel/random/boot_id` from systemd-nspawn.
pub struct GrubFirmware {
    layout: GrubLayout,
    cfg: String,
    decision: String,
}

impl GrubFirmware {
    /// Over `layout`, with the grub.cfg the packaged script generates from `defaults`.
    pub fn new(layout: GrubLayout, defaults: &str) -> GrubFirmware {
        let cfg = grub_cfg(defaults);
        let decision = grub_decision_block(&cfg);
        GrubFirmware { layout, cfg, decision }
    }
}

impl Bootloader for GrubFirmware {
    fn boot(&mut self, root: &Path, scratch: &Path) -> Result<Boot, String> {
        let choice = grub_boot_decision(&self.decision, &root.join(&self.layout.env_file))?;
        let mut tried = Vec::new();
        for entry in [&choice.default, &choice.fallback] {
            if entry.is_empty() || tried.iter().any(|(e, _): &(String, String)| e == entry) {
                continue;
            }
            let slot = match entry.as_str() {
                "upkeep-a" => 0,
                "upkeep-b" => 1,
                other => return Err(format!("GRUB would boot entry {other:?}, which is no upkeep slot ({choice:?})")),
            };
            let cmdline = grub_entry_cmdline(&self.cfg, entry)
                .ok_or_else(|| format!("no menu entry --id {entry} with a linux line in the generated grub.cfg"))?;
            match slot_image_metadata(&root.join(&self.layout.slots[slot])) {
                Ok(meta) => {
                    std::fs::create_dir_all(scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
                    let (c, m) = (scratch.join("cmdline"), scratch.join("node-image"));
                    std::fs::write(&c, format!("{cmdline}\n")).map_err(|e| format!("{}: {e}", c.display()))?;
                    std::fs::write(&m, meta).map_err(|e| format!("{}: {e}", m.display()))?;
                    let bind = |from: &Path, to: &str| {
                        let mut a = std::ffi::OsString::from("--bind-ro=");
                        a.push(from);
                        a.push(":");
                        a.push(to);
                        a
                    };
                    // A boot through GRUB's fallback is labelled so: the default entry could not be loaded.
                    let label = match tried.first() {
                        None => ["a", "b"][slot].to_string(),
                        Some((failed, why)) => format!("{} (fallback: {failed} did not load: {why})", ["a", "b"][slot]),
                    };
                    return Ok(Boot {
                        label,
                        nspawn_args: vec![bind(&c, &self.layout.cmdline_at), bind(&m, "/etc/upkeep/node-image")],
                    });
                }
                Err(why) => tried.push((entry.clone(), why)),
            }
        }
        Err(format!("{choice:?}: {tried:?}"))
    }
}

/// Starts `upkeep-hub` on a free loopback port with its hub.toml and state under `dir` (heartbeat 1 s, Unknown
/// after `silent_after` missed heartbeats, `extra` TOML appended) and its output in `dir/hub.log`, kept for
/// the test to read. Returns the process and the hub's URL; the caller waits for it to answer.
pub fn spawn_hub_logged(
    pki: &crate::TestPki,
    dir: &Path,
    silent_after: u32,
    extra: &str,
) -> (std::process::Child, String) {
    let config = crate::write_hub_config_silent(pki, dir, silent_after, extra);
    let port = free_port();
    let log = std::fs::File::create(dir.join("hub.log")).expect("hub log");
    let hub = Command::new(crate::bin("upkeep-hub"))
        .arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .expect("spawn upkeep-hub");
    (hub, format!("https://127.0.0.1:{port}"))
}
