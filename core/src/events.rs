//! Event types of the hub's CloudEvents (`upkeep.<area>.<what>`) and the patterns webhooks subscribe with
//! (`run.*`, `node.ready`): pure string rules shared by the store (which enqueues only what some webhook wants)
//! and the webhook deliveries (docs/webhooks.md).

/// Every event type starts with this.
pub const TYPE_PREFIX: &str = "upkeep.";

/// `NotStarted` -> `not_started`: a status or kind as a segment of an event type.
pub fn snake(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if c.is_ascii_alphanumeric() || c == '_' {
            out.push(c);
        } else {
            out.push('_');
        }
    }
    out
}

/// Checks an event pattern: dot-separated segments of `[a-z0-9_]`, or `*`; the `upkeep.` prefix may be left out.
/// `label` names the field or flag in the error.
pub fn check_pattern(label: &str, p: &str) -> Result<(), String> {
    let bare = p.strip_prefix(TYPE_PREFIX).unwrap_or(p);
    let ok = !bare.is_empty()
        && bare.split('.').all(|seg| {
            seg == "*"
                || (!seg.is_empty() && seg.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{label}: {p:?} is not an event pattern; give dot-separated names or *, e.g. run.*,node.ready,lease.* \
             (docs/webhooks.md lists the types)"
        ))
    }
}

/// Whether `event_type` (`upkeep.run.member.completed`) matches one of `patterns`. A pattern is matched against
/// the type without its `upkeep.` prefix (given with it, the prefix is dropped first), segment by segment: `*`
/// matches any one segment, and a last `*` any number of remaining segments (at least one). `*` alone matches
/// everything.
pub fn type_matches(patterns: &[String], event_type: &str) -> bool {
    let t = event_type.strip_prefix(TYPE_PREFIX).unwrap_or(event_type);
    let segs: Vec<&str> = t.split('.').collect();
    patterns.iter().any(|p| {
        let p = p.strip_prefix(TYPE_PREFIX).unwrap_or(p);
        let ps: Vec<&str> = p.split('.').collect();
        for (i, pat) in ps.iter().enumerate() {
            let last = i + 1 == ps.len();
            if last && *pat == "*" {
                return segs.len() > i;
            }
            match segs.get(i) {
                Some(s) if *pat == "*" || pat == s => {}
                _ => return false,
            }
        }
        ps.len() == segs.len()
    })
}
