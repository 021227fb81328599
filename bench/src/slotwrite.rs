//! Scenario `slot-write`: the agent's raw slot write + verify against `dd bs=4M conv=fsync` on the same disk.
//!
//! One file of incompressible bytes is made once; then, round after round, the same file is copied by each
//! contender in turn (the order rotates every round), each to a fresh output file in the same directory, and
//! timed from start to fsync. The machine is shared, so a single pair means little: the rounds interleave the
//! contenders so that a noisy minute hits them alike, and the ratio is read from the medians (and, paired, from
//! each round).
//!
//! Contenders: `dd` as a process; `upkeep`, the agent's own `write_raw` (the raw slot backend's whole write:
//! open, copy with the hash on another thread, fsync, digest check; `--chunk-kib`/`--chunks` try other buffers); and with `--inline-hash`, the copy loop the agent had
//! before (1 MiB buffer, SHA-256 inline on the one thread), kept here as the baseline; and with `--executor`,
//! what the privileged executor of a privilege-separated agent does for a slot write: the same raw write, also
//! computing the signature prehash on a third thread and checking the signature on it.
//!
//! Before the rounds, each hash of the copy is timed alone on one core (SHA-256, the BLAKE2b-512 prehash), in
//! CPU seconds per GiB; with each contender's CPU seconds per copy, that says where the executor's time goes.

use crate::report::{Outcome, Row, row};
use crate::scenarios::Ctx;
use anyhow::{Context, bail};
use ring::digest::{Context as Sha, SHA256};
use serde_json::json;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use upkeep_agent::os::Slot;
use upkeep_agent::os::copy::Buffers;
use upkeep_agent::os::image::{hash_image, prehash_check};
use upkeep_agent::os::slots::{Expect, hex, write_raw_with};
use upkeep_core::signature::{Prehasher, PublicKey, SecretKey};

/// The goal of issue 14: the agent writes a slot at ≥ 0.9 × dd's speed on the same disk.
pub const GOAL_RATIO: f64 = 0.9;
/// Buffer of the old inline loop (the agent's `COPY_BUF_BYTES` before the pipelined copy).
const INLINE_BUF_BYTES: usize = 1024 * 1024;
/// Chunk in which the test image is generated.
const GEN_CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Bytes each hash is timed over, per try, when the stages are measured alone.
const STAGE_BYTES: usize = 256 * 1024 * 1024;

/// What the scenario is asked to do.
#[derive(Debug, Clone)]
pub struct SlotWriteArgs {
    /// Image size, MiB.
    pub size_mib: u64,
    /// Rounds (each runs every contender once).
    pub rounds: usize,
    /// Directory for the image and the outputs (must be on the disk under test).
    pub dir: PathBuf,
    /// Also time the old single-threaded inline-hash loop.
    pub inline_hash: bool,
    /// Also time the executor's slot write (verify pass, then the write).
    pub executor: bool,
    /// The copy buffers of the upkeep contender (the agent's own by default).
    pub buffers: Buffers,
}

/// One contender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    Dd,
    Upkeep,
    Inline,
    Executor,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Dd => "dd",
            Contender::Upkeep => "upkeep",
            Contender::Inline => "inline-hash",
            Contender::Executor => "executor",
        }
    }
}

/// One timed copy: wall time and the CPU time it cost (this process, or dd's).
#[derive(Debug, Clone, Copy)]
struct Timing {
    wall: Duration,
    cpu: Duration,
}

/// Runs the scenario.
pub fn slot_write(ctx: &Ctx, args: &SlotWriteArgs) -> anyhow::Result<Outcome> {
    if args.size_mib == 0 || args.rounds == 0 {
        bail!("--size-mib and --rounds must be at least 1");
    }
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let load_at_start = loadavg();
    let stages = stage_cpu(args.buffers.chunk_bytes);
    eprintln!("slot-write: one core hashes a GiB in {:.2} CPU s (SHA-256), {:.2} (BLAKE2b-512)", stages.0, stages.1);
    let image = args.dir.join("image.bin");
    let bytes = args.size_mib * 1024 * 1024;
    eprintln!("slot-write: making {} MiB of random bytes in {}", args.size_mib, image.display());
    let sha = make_image(&image, bytes)?;
    let mut contenders = vec![Contender::Dd, Contender::Upkeep];
    if args.inline_hash {
        contenders.push(Contender::Inline);
    }
    let signed = if args.executor {
        contenders.push(Contender::Executor);
        Some(sign(&image)?)
    } else {
        None
    };
    let mut runs: Vec<(Contender, Vec<Timing>)> = contenders.iter().map(|c| (*c, Vec::new())).collect();
    for round in 0..args.rounds {
        let mut order = contenders.clone();
        order.rotate_left(round % contenders.len());
        for c in order {
            let out = args.dir.join(format!("out-{}.img", c.name()));
            remove_if_there(&out)?;
            let t = match c {
                Contender::Dd => run_dd(&image, &out)?,
                Contender::Upkeep => in_process(|| {
                    write_raw_with(&image, &out, Slot::B, &Expect::digest(&sha), args.buffers)
                        .map(drop)
                        .context("upkeep slot write")
                })?,
                Contender::Inline => in_process(|| inline_hash_write(&image, &out, &sha))?,
                Contender::Executor => {
                    let (key, signature) = signed.as_ref().context("signed image")?;
                    in_process(|| executor_write(&image, &out, &sha, key, signature, args.buffers))?
                }
            };
            let written = std::fs::metadata(&out).with_context(|| format!("reading {}", out.display()))?.len();
            if written != bytes {
                bail!("{} wrote {written} bytes of {bytes}", c.name());
            }
            remove_if_there(&out)?;
            eprintln!(
                "round {}: {:<11} {:>7.0} MB/s  ({:.2} s, cpu {:.2} s)",
                round + 1,
                c.name(),
                mb_per_s(bytes, t.wall),
                t.wall.as_secs_f64(),
                t.cpu.as_secs_f64()
            );
            if let Some((_, v)) = runs.iter_mut().find(|(k, _)| *k == c) {
                v.push(t);
            }
        }
    }
    remove_if_there(&image)?;
    Ok(outcome(ctx, args, bytes, &runs, &load_at_start, stages))
}

/// Builds the table and the JSON figures.
fn outcome(
    ctx: &Ctx,
    args: &SlotWriteArgs,
    bytes: u64,
    runs: &[(Contender, Vec<Timing>)],
    load_at_start: &str,
    stages: (f64, f64),
) -> Outcome {
    let rates = |c: Contender| -> Vec<f64> {
        runs.iter()
            .find(|(k, _)| *k == c)
            .map(|(_, v)| v.iter().map(|t| mb_per_s(bytes, t.wall)).collect())
            .unwrap_or_default()
    };
    let dd = rates(Contender::Dd);
    let dd_median = median(&dd);
    let mut table: Vec<Row> = Vec::new();
    let mut figures = serde_json::Map::new();
    for (c, timings) in runs {
        let r = rates(*c);
        let cpu: Vec<f64> = timings.iter().map(|t| t.cpu.as_secs_f64()).collect();
        let m = median(&r);
        let per_round = r.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(" ");
        table.push(row(format!("{} MB/s per round", c.name()), per_round, ""));
        table.push(row(format!("{} MB/s median", c.name()), format!("{m:.0}"), ""));
        table.push(row(format!("{} CPU s per copy (median)", c.name()), format!("{:.2}", median(&cpu)), ""));
        let mut f = json!({
            "mb_per_s": r,
            "median_mb_per_s": m,
            "cpu_seconds": cpu,
            "median_cpu_seconds": median(&cpu),
        });
        if *c != Contender::Dd {
            // Paired: each round's contender over that round's dd, which ran next to it.
            let paired: Vec<f64> = r.iter().zip(&dd).map(|(x, d)| x / d).collect();
            let ratio = m / dd_median;
            table.push(row(
                format!("{} / dd (medians; per-round median)", c.name()),
                format!("{ratio:.2}; {:.2}", median(&paired)),
                if *c == Contender::Upkeep { format!("≥ {GOAL_RATIO}") } else { String::new() },
            ));
            f["ratio_to_dd"] = json!(ratio);
            f["paired_ratios"] = json!(paired);
            f["median_paired_ratio"] = json!(median(&paired));
        }
        figures.insert(c.name().to_string(), f);
    }
    table.push(row(
        "one core's CPU s per GiB: SHA-256 / BLAKE2b-512 (hot buffer, alone)",
        format!("{:.2} / {:.2}", stages.0, stages.1),
        "",
    ));
    figures.insert("stage_cpu_s_per_gib".into(), json!({"sha256": stages.0, "blake2b_512": stages.1}));
    figures.insert("size_bytes".into(), json!(bytes));
    figures.insert("rounds".into(), json!(args.rounds));
    figures.insert("dir".into(), json!(args.dir.display().to_string()));
    figures.insert("goal_ratio".into(), json!(GOAL_RATIO));
    figures.insert(
        "upkeep_buffers".into(),
        json!({"chunk_bytes": args.buffers.chunk_bytes, "chunks": args.buffers.chunks}),
    );
    figures.insert("loadavg_at_start".into(), json!(load_at_start));
    figures.insert(
        "method".into(),
        json!(
            "same file, fresh output per copy in the same directory, contenders alternate (order rotates per round); \
               MB/s = bytes / (open .. fsync) / 1e6; dd: bs=4M conv=fsync as a process"
        ),
    );
    ctx.outcome("slot-write".into(), table, serde_json::Value::Object(figures))
}

/// Writes `bytes` random bytes to `path` (fsynced), returning their SHA-256.
fn make_image(path: &Path, bytes: u64) -> anyhow::Result<String> {
    let mut f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut sha = Sha::new(&SHA256);
    let mut buf = vec![0u8; GEN_CHUNK_BYTES];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        fastrand::fill(&mut buf[..n]);
        sha.update(&buf[..n]);
        f.write_all(&buf[..n]).with_context(|| format!("writing {}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all().with_context(|| format!("syncing {}", path.display()))?;
    Ok(hex(sha.finish().as_ref()))
}

/// `dd if=image of=out bs=4M conv=fsync`, timed around the process; CPU from the children's rusage.
/// A key and the image's signature by it (the prehashed minisign form the catalog uses).
fn sign(image: &Path) -> anyhow::Result<(PublicKey, String)> {
    let mut f = std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let staged = hash_image(image, &mut f)?;
    let sk = SecretKey::from_seed([42; 32], [7; 8]);
    Ok((sk.public_key(), sk.sign_prehashed(&staged.prehash, "bench image").to_file_text()))
}

/// What `os::executor` does for a slot write, without the socket: the staged file opened and held, streamed
/// into the slot once while SHA-256 and the signature prehash are computed (on two threads beside the copy),
/// and the signature checked on that prehash before the write counts.
fn executor_write(
    image: &Path,
    out: &Path,
    sha256: &str,
    key: &PublicKey,
    signature: &str,
    buffers: Buffers,
) -> anyhow::Result<()> {
    let f = std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let check = prehash_check(signature, 0, vec![key.clone()])?;
    let via = PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f)));
    let expect = Expect { sha256, signed: Some(&check) };
    write_raw_with(&via, out, Slot::B, &expect, buffers).map(drop).context("executor slot write")
}

fn run_dd(image: &Path, out: &Path) -> anyhow::Result<Timing> {
    let cpu_before = cpu_of(nix::sys::resource::UsageWho::RUSAGE_CHILDREN);
    let began = Instant::now();
    let status = std::process::Command::new("dd")
        .arg(format!("if={}", image.display()))
        .arg(format!("of={}", out.display()))
        .args(["bs=4M", "conv=fsync", "status=none"])
        .status()
        .context("running dd")?;
    let wall = began.elapsed();
    if !status.success() {
        bail!("dd {status}");
    }
    Ok(Timing { wall, cpu: cpu_of(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).saturating_sub(cpu_before) })
}

/// Times `f` in this process (CPU of all its threads).
fn in_process(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<Timing> {
    let cpu_before = cpu_of(nix::sys::resource::UsageWho::RUSAGE_SELF);
    let began = Instant::now();
    f()?;
    let wall = began.elapsed();
    Ok(Timing { wall, cpu: cpu_of(nix::sys::resource::UsageWho::RUSAGE_SELF).saturating_sub(cpu_before) })
}

/// The agent's raw slot write as it was before the pipelined copy: one thread reads 1 MiB, hashes it, writes
/// it; then fsync and the digest check. Kept only as the baseline of this benchmark.
fn inline_hash_write(image: &Path, out: &Path, sha256: &str) -> anyhow::Result<()> {
    let mut src = std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let mut dst = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut sha = Sha::new(&SHA256);
    let mut buf = vec![0u8; INLINE_BUF_BYTES];
    loop {
        let n = src.read(&mut buf).with_context(|| format!("reading {}", image.display()))?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        dst.write_all(&buf[..n]).with_context(|| format!("writing {}", out.display()))?;
    }
    dst.sync_all().with_context(|| format!("syncing {}", out.display()))?;
    if hex(sha.finish().as_ref()) != sha256 {
        bail!("inline copy of {} does not hash to its digest", image.display());
    }
    Ok(())
}

/// CPU seconds per GiB of each hash of the executor's copy, run alone on this thread over one buffer of the
/// copy's size (in cache), best of 3: SHA-256, then the BLAKE2b-512 signature prehash. With `dd`'s CPU for
/// the read and write beside them, they say what each stage of the copy costs.
fn stage_cpu(chunk_bytes: usize) -> (f64, f64) {
    let mut buf = vec![0u8; chunk_bytes.max(1)];
    fastrand::fill(&mut buf);
    let rounds = (STAGE_BYTES / buf.len()).max(1);
    let per_gib = |d: Duration| d.as_secs_f64() * (1u64 << 30) as f64 / (rounds * buf.len()) as f64;
    let thread = || cpu_of(nix::sys::resource::UsageWho::RUSAGE_THREAD);
    let mut best = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let began = thread();
        let mut sha = Sha::new(&SHA256);
        for _ in 0..rounds {
            sha.update(&buf);
        }
        std::hint::black_box(sha.finish());
        let between = thread();
        let mut pre = Prehasher::new();
        for _ in 0..rounds {
            pre.update(&buf);
        }
        std::hint::black_box(pre.finish());
        let ended = thread();
        best.0 = best.0.min(per_gib(between.saturating_sub(began)));
        best.1 = best.1.min(per_gib(ended.saturating_sub(between)));
    }
    best
}

fn cpu_of(who: nix::sys::resource::UsageWho) -> Duration {
    let to = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(u64::try_from(t.tv_sec()).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec()).unwrap_or(0))
    };
    nix::sys::resource::getrusage(who).map(|u| to(u.user_time()) + to(u.system_time())).unwrap_or_default()
}

fn remove_if_there(p: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Decimal megabytes per second, as dd reports them.
pub fn mb_per_s(bytes: u64, wall: Duration) -> f64 {
    bytes as f64 / wall.as_secs_f64().max(1e-9) / 1e6
}

/// The median (mean of the middle two for an even count); 0 for none.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_none() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(mb_per_s(2_000_000, Duration::from_secs(2)), 1.0);
    }
}
