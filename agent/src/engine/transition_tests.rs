//! `transition` without I/O: a scripted node answers each effect, and the tests read the effects asked for.

use super::*;
use crate::journal::Entry;
use upkeep_core::signature::{PublicKey, SecretKey};

fn ctx() -> Ctx {
    Ctx { state_dir: PathBuf::from("/state"), now_ms: 1_700_000_000_000, has_url_fetcher: false }
}

fn boot(booted: Slot, id: &str) -> Value {
    Value::Boot(BootState { booted, committed: booted, next_once: None, tries_left: None, boot_id: id.into() })
}

/// Runs `e`'s current step to its end, answering each effect with `answer`; returns the effects and the end.
fn run_step(e: Entry, answer: &mut dyn FnMut(&Effect) -> Result<Value, String>) -> (Vec<Effect>, Transition) {
    let mut effects = Vec::new();
    let mut t = transition(e, 0, Event::Enter, &ctx());
    loop {
        match t {
            Transition::Do { entry, cursor, effect, .. } => {
                let r = answer(&effect);
                effects.push(effect);
                t = transition(entry, cursor, Event::Done(r), &ctx());
            }
            end => return (effects, end),
        }
    }
}

/// Runs `e` through every step to its result.
fn run_all(mut e: Entry, answer: &mut dyn FnMut(&Effect) -> Result<Value, String>) -> (Vec<Effect>, Entry) {
    let mut all = Vec::new();
    for _ in 0..40 {
        let (effects, end) = run_step(e, answer);
        all.extend(effects);
        match end {
            Transition::Next(next) if next.result.is_some() => return (all, next),
            Transition::Next(next) => e = next,
            other => panic!("unexpected end of a step: {other:?}"),
        }
    }
    panic!("no result after 40 steps")
}

fn kinds(effects: &[Effect]) -> Vec<String> {
    effects.iter().map(|e| format!("{e:?}").split(['(', ' ']).next().unwrap_or("").to_string()).collect()
}

fn reimage() -> (Entry, SecretKey) {
    let sk = SecretKey::from_seed([1; 32], [2; 8]);
    let sig = sk.sign_prehashed(&[0; 64], "t").to_file_text();
    let op = Op::Reimage {
        family: "Test-1".into(),
        version: "202302.01.0".into(),
        url: String::new(),
        sha256: "a".repeat(64),
        signature: sig,
        size_bytes: 10,
        allow_downgrade: false,
        reinstall: false,
    };
    (Entry::accepted("op1", 1, op), sk)
}

/// A node booted from slot A (image 202301.01.0) that trusts `sk`; a reboot boots slot B, which then reports
/// `b_reports` as its image. Every other effect succeeds.
fn node(trusted: PublicKey, b_reports: &'static str) -> impl FnMut(&Effect) -> Result<Value, String> {
    let mut booted = Slot::A;
    let mut boot_id = "boot-1".to_string();
    move |eff| match eff {
        Effect::ReadMark(_) => Ok(Value::Mark(None)),
        Effect::Facts => Ok(Value::Facts(OsFacts {
            node_image: Some(target_image("Test-1", if booted == Slot::B { b_reports } else { "202301.01.0" })?),
            ..Default::default()
        })),
        Effect::TrustedKeys => Ok(Value::Keys(vec![trusted.clone()])),
        Effect::BootState => Ok(boot(booted, &boot_id)),
        Effect::Reboot => {
            booted = Slot::B;
            boot_id = "boot-2".into();
            Ok(Value::Rebooted(Rebooted::Done))
        }
        Effect::FallBack(_) => Ok(Value::Rebooted(Rebooted::Done)),
        _ => Ok(Value::Unit),
    }
}

#[test]
fn a_reimage_asks_for_each_effect_in_order_and_commits_the_slot_that_booted() {
    let (e, sk) = reimage();
    let (effects, end) = run_all(e, &mut node(sk.public_key(), "202302.01.0"));
    assert_eq!(
        kinds(&effects),
        [
            "ReadMark",
            "Facts",
            "TrustedKeys", // Accepted
            "CleanLeftovers",
            "Fetch",
            "BootState", // Fetch
            "WriteSlot", // Write
            "DiscardStaged",
            "MarkBootOnce",
            "BootState", // Mark
            "BootState",
            "Reboot", // Reboot
            "BootState",
            "AwaitSession",
            "HealthCheck",
            "Facts", // Health
            "BootState",
            "Commit", // Commit
        ]
    );
    assert!(effects.contains(&Effect::WriteSlot(
        Slot::B,
        SlotImage {
            path: PathBuf::from(format!("/state/images/{}.part", "a".repeat(64))),
            sha256: "a".repeat(64),
            size: 10,
            signature: match &end.op {
                Op::Reimage { signature, .. } => signature.clone(),
                _ => unreachable!(),
            },
            check_signature: false,
        }
    )));
    let r = end.result.expect("result");
    assert!(r.ok, "{r:?}");
    assert_eq!(r.finished_at_unix_ms, ctx().now_ms, "time comes from the context");
}

#[test]
fn a_reimage_that_boots_the_wrong_image_falls_back_remembering_it_first() {
    let (e, sk) = reimage();
    let (effects, end) = run_all(e, &mut node(sk.public_key(), "202301.01.0"));
    let mark = effects
        .iter()
        .position(|e| matches!(e, Effect::WriteMark(p, _) if p.ends_with("rolled-back/Test-1-202302.01.0")));
    let back = effects.iter().position(|e| *e == Effect::FallBack(Slot::A));
    assert!(mark.is_some() && back.is_some() && mark < back, "persist, then act: {effects:?}");
    assert!(!effects.iter().any(|e| matches!(e, Effect::Commit(_))), "nothing committed");
    let r = end.result.expect("result");
    assert!(
        !r.ok && r.error.contains("rolled back to slot a") && r.error.contains("reports Test-1-202301.01.0"),
        "{r:?}"
    );
}

#[test]
fn a_failed_slot_write_ends_the_reimage_before_any_boot_control() {
    let (mut e, _) = reimage();
    e.step = Step::Write;
    e.target = Some(Slot::B);
    e.previous = Some(Slot::A);
    let (effects, end) = run_step(e, &mut |_| Err("disk full".into()));
    assert_eq!(kinds(&effects), ["WriteSlot"]);
    let Transition::Next(end) = end else { panic!("{end:?}") };
    let r = end.result.expect("finished");
    assert_eq!(r.error, "writing slot b: disk full");
}

#[test]
fn the_reboot_is_journalled_first_and_a_boot_id_that_never_changes_stops_the_reboots() {
    let mut e = Entry::accepted("r1", 1, Op::Reboot { force: false });
    e.step = Step::Reboot;
    e.boot_id = Some("same".into());
    let t = transition(e.clone(), 0, Event::Enter, &ctx());
    let Transition::Do { entry, cursor, .. } = t else { panic!("{t:?}") };
    let t = transition(entry, cursor, Event::Done(Ok(boot(Slot::A, "same"))), &ctx());
    assert!(
        matches!(&t, Transition::Do { effect: Effect::Reboot, persist_first: true, entry, .. } if entry.reboots == 1),
        "{t:?}"
    );
    e.reboots = MAX_REBOOTS;
    let (effects, end) = run_step(e, &mut |_| Ok(boot(Slot::A, "same")));
    assert_eq!(kinds(&effects), ["BootState"]);
    let Transition::Next(end) = end else { panic!("{end:?}") };
    assert!(end.result.expect("result").error.contains("the boot id never changed"));
}

#[test]
fn a_leased_reboot_that_cannot_drain_still_uncordons_and_gives_the_lease_back() {
    let e = Entry::accepted("lease/l1", 1, Op::LeasedReboot { lease_id: "l1".into(), forced: false });
    let (effects, end) = run_all(e, &mut |eff| match eff {
        Effect::Drain { .. } => Err("pod shop/web-1 blocked".into()),
        Effect::Uncordon => Err("api down".into()),
        _ => Ok(Value::Unit),
    });
    assert_eq!(kinds(&effects), ["Cordon", "Drain", "Uncordon", "ReleaseLease"]);
    let r = end.result.expect("result");
    assert_eq!(
        r.error,
        "leased reboot under lease l1: drain failed: pod shop/web-1 blocked; uncordon afterwards failed too: api down \
         (node uncordoned, lease given back)"
    );
}

#[test]
fn a_kubernetes_upgrade_left_unfinished_runs_its_hook_again_even_at_the_version() {
    let op = Op::UpgradeKubernetes { version: "1.29.3".into(), first_control_plane: true };
    let at = |pending: Option<&str>| {
        let pending = pending.map(String::from);
        let (effects, end) = run_all(Entry::accepted("k1", 1, op.clone()), &mut |eff| match eff {
            Effect::NodeKind => Ok(Value::Kind(NodeKind {
                os: OsKind::Debian { id: "debian".into() },
                node_pool: "p".into(),
                hardware_class: String::new(),
            })),
            Effect::ReadMark(_) => Ok(Value::Mark(pending.clone())),
            Effect::KubernetesVersion => Ok(Value::Kubernetes(Some("1.29.3".parse().expect("v")))),
            _ => Ok(Value::Unit),
        });
        assert!(end.result.expect("result").ok);
        kinds(&effects)
    };
    assert_eq!(at(None), ["NodeKind", "ReadMark", "KubernetesVersion"], "already there: done");
    assert_eq!(
        at(Some("1.29.3\n")),
        [
            "NodeKind",
            "ReadMark",
            "KubernetesVersion",
            "WriteMark", // Accepted
            "NodeKind",
            "InstallKubernetes", // Act
            "KubernetesHook",
            "KubernetesVersion",
            "ClearMark", // Hook
        ]
    );
}
