//! Running external programs: the only place the agent builds a `std::process::Command`. A failure names the
//! argv, how the program ended and the tail of its stderr.

use super::OsError;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bytes of stderr kept for an error message.
const STDERR_TAIL_BYTES: usize = 2048;
/// How often a running child is checked against its deadline.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// Replaces `{name}` placeholders in each argument.
pub fn substitute(argv: &[String], vars: &[(&str, &str)]) -> Vec<String> {
    argv.iter().map(|a| vars.iter().fold(a.clone(), |acc, (k, v)| acc.replace(&format!("{{{k}}}"), v))).collect()
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(STDERR_TAIL_BYTES);
    String::from_utf8_lossy(&bytes[start..]).trim().replace('\n', " | ")
}

/// Where `program` (an argv's first word) is: itself when it names a path, else the first executable of that
/// name in `$PATH`, as `Command` would find it. None when it is not found.
pub fn program_path(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Some(program.into());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Runs `argv` with extra environment `env`; kills it after `timeout` if given. Returns its stdout.
pub fn run(argv: &[String], env: &[(&str, &str)], timeout: Option<Duration>) -> Result<String, OsError> {
    let (code, stdout, stderr) = run_status(argv, env, timeout)?;
    if code != Some(0) {
        let status =
            code.map_or_else(|| "was killed by a signal".to_string(), |c| format!("exited with exit status: {c}"));
        return Err(OsError::Command { argv: argv.to_vec(), status, stderr_tail: stderr });
    }
    Ok(stdout)
}

/// Runs `argv` like `run` but returns its exit code (None: killed by a signal), its stdout and the tail of its
/// stderr whatever the exit code, for programs that answer with their exit code (`dnf needs-restarting -r`).
pub fn run_status(
    argv: &[String],
    env: &[(&str, &str)],
    timeout: Option<Duration>,
) -> Result<(Option<i32>, String, String), OsError> {
    let fail = |status: String, stderr_tail: String| OsError::Command { argv: argv.to_vec(), status, stderr_tail };
    let (prog, args) = argv.split_first().ok_or_else(|| fail("not run".into(), "empty argv".into()))?;
    let mut cmd = Command::new(prog);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|e| fail("could not start".into(), e.to_string()))?;
    // Read both pipes on threads so that a chatty child cannot block on a full pipe while we wait.
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(p) = out_pipe.as_mut() {
            let _ = p.read_to_end(&mut b);
        }
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(p) = err_pipe.as_mut() {
            let _ = p.read_to_end(&mut b);
        }
        b
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => {}
            Err(e) => return Err(fail("wait failed".into(), e.to_string())),
        }
        if let Some(t) = timeout
            && started.elapsed() > t
        {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_t.join().unwrap_or_default();
            return Err(fail(format!("timed out after {}s", t.as_secs()), tail(&stderr)));
        }
        std::thread::sleep(POLL_EVERY);
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    Ok((status.code(), String::from_utf8_lossy(&stdout).into_owned(), tail(&stderr)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_argv_status_and_stderr() {
        let ok = run(&["sh".into(), "-c".into(), "echo $X".into()], &[("X", "hi")], None).expect("runs");
        assert_eq!(ok.trim(), "hi");
        let e = run(&["sh".into(), "-c".into(), "echo boom >&2; exit 3".into()], &[], None).expect_err("fails");
        let s = e.to_string();
        assert!(s.contains("exit status: 3") && s.contains("boom") && s.contains("\"sh\""), "{s}");
        let (code, _, err) =
            run_status(&["sh".into(), "-c".into(), "echo x >&2; exit 1".into()], &[], None).expect("runs");
        assert_eq!((code, err.as_str()), (Some(1), "x"));
        let e = run(&["sleep".into(), "5".into()], &[], Some(Duration::from_millis(100))).expect_err("timeout");
        assert!(e.to_string().contains("timed out"), "{e}");
        assert_eq!(
            substitute(&["w".into(), "{slot}:{image}".into()], &[("slot", "b"), ("image", "/x")]),
            ["w", "b:/x"]
        );
    }
}
