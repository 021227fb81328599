//! YAML for upkeepctl: `-o yaml` output and the YAML (or JSON) documents operators hand it. It owns the parser
//! options, so the CLI and the fuzz target read documents the same way; it knows nothing of what they contain.
//!
//! The parser is serde-saphyr (pure Rust). Its options are set to read plain scalars as YAML 1.2 does, as
//! serde_yaml did before it: only `true`/`false` are booleans (`no`, `on` stay strings), `0755` and `1_000` stay
//! strings, and errors are one line without a source excerpt.

use serde::Serialize;

/// Parse options: YAML 1.2 scalars, one-line errors, duplicate keys refused, the parser's default budget.
fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        with_snippet: false,
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
    }
}

/// Parses one YAML document (JSON is YAML) into a JSON value.
pub fn parse(text: &str) -> Result<serde_json::Value, serde_saphyr::Error> {
    serde_saphyr::from_str_with_options(text, options())
}

/// Renders `v` as a YAML document (block style, ending in a newline).
pub fn to_string(v: &impl Serialize) -> Result<String, serde_saphyr::ser::Error> {
    serde_saphyr::to_string(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_read_as_yaml_1_2_and_json_reads_as_json() {
        let v = parse("a: yes\nb: no\nc: 0755\nd: 1_000\ne: true\nf: 60\ng: 50%\nh: ~\ni: [m1, \"02:00\"]\n")
            .expect("parses");
        assert_eq!(
            v,
            serde_json::json!({"a": "yes", "b": "no", "c": "0755", "d": "1_000", "e": true, "f": 60, "g": "50%",
                "h": null, "i": ["m1", "02:00"]})
        );
        let json = r#"{"stages":[{"name":"s","groups":[{"name":"g","members":["m1"]}]}],"w":1.5}"#;
        assert_eq!(parse(json).expect("json"), serde_json::from_str::<serde_json::Value>(json).expect("json"));
    }

    #[test]
    fn bad_documents_are_one_line_errors() {
        for bad in ["a: [", "a: 1\na: 2\n", "- a\nb: c\n"] {
            let e = parse(bad).expect_err(bad).to_string();
            assert!(!e.contains('\n') && e.contains("line"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn output_is_block_yaml_that_reads_back() {
        let v = serde_json::json!({"files": ["ca.pem", "hub.pem"], "n": 1, "s": "22:00", "t": "no", "m": {}});
        let y = to_string(&v).expect("renders");
        assert!(y.contains("files:\n- ca.pem\n- hub.pem\n"), "{y}");
        assert_eq!(parse(&y).expect("reads back"), v);
    }
}
