//! Count-or-percentage limits (SPEC §5 `max_concurrency`; also usable for surge and unavailability settings).
//!
//! A [`Limit`] is written as a plain number (`3`, a count) or a percentage string (`"25%"`). A percentage resolves
//! against a total and rounds **up**, with a minimum of 1, so a limit never stalls progress.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The largest count a limit may give (SPEC §7: every count has bounds); more nodes or members than this are
/// never upgraded at once.
pub const MAX_COUNT: u32 = 100_000;

/// A limit given as a count or as a percentage of some total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// An absolute count (must be at least 1).
    Count(u32),
    /// A percentage of the total (1..=100), rounded up, minimum 1.
    Percent(u32),
}

impl Limit {
    /// The limit as a count for `total` items: percentages round up with a minimum of 1; counts are returned as
    /// they are (a count of 0 resolves to 1: validation refuses it, and a limit must never stall progress).
    pub fn resolve(self, total: u32) -> u32 {
        match self {
            Limit::Count(n) => n.max(1),
            Limit::Percent(p) => {
                let scaled = u64::from(total) * u64::from(p);
                let up = scaled.div_ceil(100);
                u32::try_from(up).unwrap_or(u32::MAX).max(1)
            }
        }
    }

    /// Why the limit is not acceptable, if it is not; the message says what to give instead.
    pub fn problem(self) -> Option<String> {
        match self {
            Limit::Count(0) => Some("a count of 0 would never start anything; give at least 1".to_string()),
            Limit::Count(n) if n > MAX_COUNT => Some(format!("{n} is more than {MAX_COUNT}; give 1 to {MAX_COUNT}")),
            Limit::Percent(0) => Some("0% would never start anything; give 1% to 100%".to_string()),
            Limit::Percent(p) if p > 100 => Some(format!("{p}% is more than 100%; give 1% to 100%")),
            _ => None,
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Count(n) => write!(f, "{n}"),
            Limit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// A limit string that is neither a number nor a percentage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed limit {}: give a count such as 2 or a percentage such as \"25%\"", crate::limits::quoted(.0))]
pub struct BadLimit(pub String);

impl FromStr for Limit {
    type Err = BadLimit;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let (digits, percent) = match t.strip_suffix('%') {
            Some(d) => (d.trim_end(), true),
            None => (t, false),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BadLimit(s.to_string()));
        }
        let n: u32 = digits.parse().map_err(|_| BadLimit(s.to_string()))?;
        Ok(if percent { Limit::Percent(n) } else { Limit::Count(n) })
    }
}

impl Serialize for Limit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Limit::Count(n) => s.serialize_u32(*n),
            Limit::Percent(_) => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Limit;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a count such as 2 or a percentage such as \"25%\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Limit, E> {
                u32::try_from(v).map(Limit::Count).map_err(|_| E::custom(format!("limit {v} is too large")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Limit, E> {
                u32::try_from(v)
                    .map(Limit::Count)
                    .map_err(|_| E::custom(format!("limit {v} is negative or too large; give at least 1")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Limit, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sec5_percentages_round_up_with_minimum_one() {
        let cases = [
            (Limit::Percent(50), 3, 2),
            (Limit::Percent(10), 3, 1),
            (Limit::Percent(1), 1000, 10),
            (Limit::Percent(33), 10, 4),
            (Limit::Percent(100), 7, 7),
            (Limit::Percent(25), 0, 1),
            (Limit::Count(3), 10, 3),
            (Limit::Count(5), 2, 5),
        ];
        for (l, total, want) in cases {
            assert_eq!(l.resolve(total), want, "{l} of {total}");
        }
    }

    #[test]
    fn limits_parse_and_round_trip() {
        assert_eq!("25%".parse(), Ok(Limit::Percent(25)));
        assert_eq!("3".parse(), Ok(Limit::Count(3)));
        assert!("x%".parse::<Limit>().is_err());
        assert!("-1".parse::<Limit>().is_err());
        let l: Vec<Limit> = serde_json::from_str(r#"[2, "50%", "4"]"#).expect("valid");
        assert_eq!(l, vec![Limit::Count(2), Limit::Percent(50), Limit::Count(4)]);
        assert_eq!(serde_json::to_string(&l).expect("serializes"), r#"[2,"50%",4]"#);
        assert!(serde_json::from_str::<Limit>("-3").is_err());
    }

    #[test]
    fn sec7_zero_and_over_100_percent_are_refused() {
        assert!(Limit::Count(0).problem().is_some());
        assert!(Limit::Percent(0).problem().is_some());
        assert!(Limit::Percent(101).problem().expect("refused").contains("1% to 100%"));
        assert_eq!(Limit::Percent(100).problem(), None);
        assert_eq!(Limit::Count(1).problem(), None);
    }
}
