//! Bounds on what the product reads (SPEC §7; ENGINEERING.md "Bad input stops at the door"): timestamps, the size
//! and nesting depth of documents, and how much of a bad value or of a list of errors a message repeats.
//!
//! Everything an operator or a wire message gives is checked against these at the door, so a value out of bounds
//! is refused with one line naming the field, never carried into arithmetic that could overflow.

use chrono::{DateTime, TimeZone, Utc};
use std::fmt::Display;

/// The earliest timestamp accepted from input: 2000-01-01T00:00:00Z, in Unix milliseconds.
pub const MIN_TIMESTAMP_MS: i64 = 946_684_800_000;

/// The latest timestamp accepted from input: 2200-01-01T00:00:00Z, in Unix milliseconds.
pub const MAX_TIMESTAMP_MS: i64 = 7_258_118_400_000;

/// The largest document (strategy, run, window file) read: 1 MiB.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// The deepest nesting of a document read (a strategy needs 6).
pub const MAX_DOCUMENT_DEPTH: usize = 64;

/// How many characters of a bad value a message repeats.
pub const MAX_SHOWN_CHARS: usize = 64;

/// The longest message (an error line, a status) sent back whole; longer ones are cut.
pub const MAX_MESSAGE_CHARS: usize = 4096;

/// How many errors one message lists; the rest are counted.
pub const MAX_LISTED_ERRORS: usize = 20;

/// A timestamp given in Unix milliseconds, if it lies between [`MIN_TIMESTAMP_MS`] and [`MAX_TIMESTAMP_MS`];
/// otherwise why not, with the fix.
pub fn check_timestamp_ms(ms: i64) -> Result<DateTime<Utc>, String> {
    match time_from_ms(ms) {
        Some(t) => Ok(t),
        None => Err(format!(
            "{ms} ms is outside 2000-01-01T00:00:00Z ..= 2200-01-01T00:00:00Z; give a time in that range in Unix \
             milliseconds, or 0 for now"
        )),
    }
}

/// A stored or received timestamp as a time, when it is within bounds. Out of bounds is `None`: a caller decides
/// what that means for it, and never reads it as "the earliest time".
pub fn time_from_ms(ms: i64) -> Option<DateTime<Utc>> {
    if !(MIN_TIMESTAMP_MS..=MAX_TIMESTAMP_MS).contains(&ms) {
        return None;
    }
    Utc.timestamp_millis_opt(ms).single()
}

/// A value as a message repeats it: at most [`MAX_SHOWN_CHARS`] characters, then "…" and how long it was.
pub fn shorten(s: &str) -> String {
    match s.char_indices().nth(MAX_SHOWN_CHARS) {
        None => s.to_string(),
        Some((cut, _)) => format!("{}… ({} characters)", &s[..cut], s.chars().count()),
    }
}

/// A message cut to [`MAX_MESSAGE_CHARS`] characters (then "…" and how long it was), so it always fits in a
/// status line, whatever a parser chose to repeat.
pub fn cut_message(s: &str) -> String {
    match s.char_indices().nth(MAX_MESSAGE_CHARS) {
        None => s.to_string(),
        Some((cut, _)) => format!("{}… ({} characters)", &s[..cut], s.chars().count()),
    }
}

/// A value quoted as `{:?}` would, cut to [`MAX_SHOWN_CHARS`] characters (then "…" and how long it was).
pub fn quoted(s: &str) -> String {
    match s.char_indices().nth(MAX_SHOWN_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}… ({} characters)", &s[..cut], s.chars().count()),
    }
}

/// Errors joined with `sep`: the first [`MAX_LISTED_ERRORS`], then how many more there are.
pub fn cap_list<T: Display>(items: &[T], sep: &str) -> String {
    let mut out: Vec<String> = items.iter().take(MAX_LISTED_ERRORS).map(ToString::to_string).collect();
    if items.len() > MAX_LISTED_ERRORS {
        out.push(format!("and {} more", items.len() - MAX_LISTED_ERRORS));
    }
    out.join(sep)
}

/// Checks a YAML or JSON document's size and nesting depth before it is parsed, so a hostile file costs no
/// more than a scan. The depth is estimated from the text: flow brackets (`[`, `{`) outside quotes and comments,
/// plus the block levels opened by indentation and by `- ` and `key:` on one line. It never underestimates
/// for the documents the product reads.
pub fn check_document(text: &str) -> Result<(), String> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(format!(
            "{} bytes is more than {MAX_DOCUMENT_BYTES} (1 MiB); a strategy or run file is a few kilobytes, \
             check that this is the right file",
            text.len()
        ));
    }
    let depth = document_depth(text);
    if depth > MAX_DOCUMENT_DEPTH {
        return Err(format!(
            "nested more than {MAX_DOCUMENT_DEPTH} levels deep; a strategy needs 6, check that this is the right file"
        ));
    }
    Ok(())
}

/// The estimated nesting depth of a YAML or JSON text (see [`check_document`]); stops counting past the limit.
fn document_depth(text: &str) -> usize {
    let mut deepest = 0usize;
    let mut flow = 0usize;
    // Indentation of the open block levels.
    let mut indents: Vec<usize> = Vec::new();
    for line in text.lines() {
        let body = line.trim_start_matches(' ');
        let indent = line.len() - body.len();
        if flow == 0 && !body.is_empty() && !body.starts_with('#') {
            while indents.last().is_some_and(|i| *i >= indent) {
                indents.pop();
            }
            indents.push(indent);
        }
        let mut inline = 0usize;
        let mut rest = body;
        while let Some(r) = rest.strip_prefix("- ").or_else(|| rest.strip_prefix("? ")) {
            inline += 1;
            rest = r.trim_start_matches(' ');
        }
        let mut quote: Option<char> = None;
        let mut escaped = false;
        let mut prev = ' ';
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            match quote {
                Some(_) if escaped => escaped = false,
                Some('"') if c == '\\' => escaped = true,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None => match c {
                    '"' | '\'' => quote = Some(c),
                    '#' if prev == ' ' || prev == '\t' => break,
                    '[' | '{' => flow += 1,
                    ']' | '}' => flow = flow.saturating_sub(1),
                    // A block mapping opens a level; inside flow collections the brackets already count.
                    ':' if flow == 0 && chars.peek().is_none_or(|n| *n == ' ') => inline += 1,
                    _ => {}
                },
            }
            prev = c;
            deepest = deepest.max(indents.len() + inline + flow);
            if deepest > MAX_DOCUMENT_DEPTH {
                return deepest;
            }
        }
        deepest = deepest.max(indents.len() + inline + flow);
        if deepest > MAX_DOCUMENT_DEPTH {
            return deepest;
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sec7_timestamps_outside_2000_to_2200_are_refused() {
        assert!(check_timestamp_ms(i64::MAX).expect_err("far future").contains("2200-01-01"));
        assert!(check_timestamp_ms(-1).is_err());
        assert!(check_timestamp_ms(MIN_TIMESTAMP_MS - 1).is_err());
        assert!(check_timestamp_ms(MAX_TIMESTAMP_MS + 1).is_err());
        assert!(check_timestamp_ms(1_800_000_000_000).is_ok());
        assert_eq!(time_from_ms(i64::MAX), None);
        assert_eq!(time_from_ms(i64::MIN), None);
    }

    #[test]
    fn sec7_long_values_are_cut_and_long_lists_counted() {
        let long = "x".repeat(10_000);
        let cut = shorten(&long);
        assert!(cut.len() < 100, "{cut}");
        assert!(cut.ends_with("… (10000 characters)"));
        assert_eq!(shorten("short"), "short");
        assert_eq!(
            cut_message(&"y".repeat(100_000)).chars().count(),
            MAX_MESSAGE_CHARS + "… (100000 characters)".len() - 2
        );
        assert_eq!(quoted("a\"b"), "\"a\\\"b\"");
        assert!(quoted(&long).ends_with("xx\"… (10000 characters)"));
        assert_eq!(shorten(&"é".repeat(64)), "é".repeat(64));
        let errs: Vec<String> = (0..20_000).map(|i| format!("e{i}")).collect();
        let line = cap_list(&errs, "; ");
        assert!(line.starts_with("e0; e1;"));
        assert!(line.ends_with("e19; and 19980 more"), "{line}");
        assert_eq!(cap_list(&["a", "b"], "; "), "a; b");
    }

    #[test]
    fn sec7_documents_too_big_or_too_deep_are_refused_before_parsing() {
        let strategy = "stages:\n  - name: canary\n    after_stage_wait_seconds: 600\n    groups:\n      - name: g1\n        members: [a, b]\n        max_concurrency: \"50%\"\n";
        assert_eq!(check_document(strategy), Ok(()));
        let json = r#"{"stages":[{"name":"s1","groups":[{"name":"g","members":["a"]}]}]}"#;
        assert_eq!(check_document(json), Ok(()));
        let flow = "[".repeat(100_000);
        assert!(check_document(&flow).expect_err("deep").contains("nested more than 64"));
        let dashes = "- ".repeat(100_000);
        assert!(check_document(&dashes).is_err());
        let keys: String = (0..100).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
        assert!(check_document(&keys).is_err());
        let big = format!("# {}\n", "x".repeat(MAX_DOCUMENT_BYTES));
        assert!(check_document(&big).expect_err("big").contains("1 MiB"));
        // A minified JSON document with many keys is shallow.
        let groups: Vec<String> =
            (0..200).map(|i| format!(r#"{{"name":"g{i}","members":["m{i}"],"max_concurrency":1}}"#)).collect();
        let wide = format!(r#"{{"stages":[{{"name":"s","groups":[{}]}}]}}"#, groups.join(","));
        assert_eq!(check_document(&wide), Ok(()));
        let urls = format!("note: {}\n", "a:b".repeat(200));
        assert_eq!(check_document(&urls), Ok(()));
        // Brackets and colons inside quotes or comments do not count.
        let quoted = format!("name: \"{}\" # {}\n", "[".repeat(200), "{".repeat(200));
        assert_eq!(check_document(&quoted), Ok(()));
    }
}
