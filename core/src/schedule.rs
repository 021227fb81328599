//! Maintenance schedules (SPEC §2): when a member may be disrupted.
//!
//! A [`MaintenanceSchedule`] is a recurring window (weekly, daily, absolute-monthly or relative-monthly) that opens
//! at a local start time, in a fixed UTC offset, for a duration, except on dates that are not allowed. This module
//! answers three questions for a given instant `now` (always a parameter, never read from a clock):
//! is a window open, when does the next one open, and how preferable is a member for an update run right now
//! ([`priority`], SPEC §5).
//!
//! Interpretations written down here:
//! - Occurrences are computed on *local* calendar dates (the schedule's UTC offset applied). A date in
//!   `not_allowed` removes the occurrence that *starts* on that local date; a window that started the day before
//!   and runs into a not-allowed date is kept.
//! - `AbsoluteMonthly` with a `day_of_month` the month does not have (31 in April) opens on the month's last day.
//! - Intervals count from `start_date` when given (the first eligible period is the one containing it), otherwise
//!   from 1970-01-01 (a Thursday; weeks are counted Monday-based from the Monday 1969-12-29).
//! - No schedule means no window: the member may be updated at any time.

use chrono::{DateTime, Datelike, Days, NaiveDate, NaiveTime, TimeDelta, Timelike, Utc, Weekday};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How far ahead [`MaintenanceSchedule::next_opening`] searches, in days.
pub const SEARCH_HORIZON_DAYS: u64 = 400;
/// Windows shorter than this are accepted with a warning (SPEC §2), in minutes.
pub const SHORT_WINDOW_WARNING_MINUTES: u32 = 4 * 60;
/// The shortest window accepted, in minutes.
pub const MIN_DURATION_MINUTES: u32 = 30;
/// The longest window accepted (7 days), in minutes.
pub const MAX_DURATION_MINUTES: u32 = 7 * 24 * 60;
/// A member whose window opens within this many hours is preferred over one without a window (SPEC §5).
pub const OPENS_SOON_HOURS: i64 = 4;

/// A day of the week, spelled in full (`Monday` ... `Sunday`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DayOfWeek {
    /// Monday.
    Monday,
    /// Tuesday.
    Tuesday,
    /// Wednesday.
    Wednesday,
    /// Thursday.
    Thursday,
    /// Friday.
    Friday,
    /// Saturday.
    Saturday,
    /// Sunday.
    Sunday,
}

impl DayOfWeek {
    /// The chrono weekday.
    pub fn weekday(self) -> Weekday {
        match self {
            DayOfWeek::Monday => Weekday::Mon,
            DayOfWeek::Tuesday => Weekday::Tue,
            DayOfWeek::Wednesday => Weekday::Wed,
            DayOfWeek::Thursday => Weekday::Thu,
            DayOfWeek::Friday => Weekday::Fri,
            DayOfWeek::Saturday => Weekday::Sat,
            DayOfWeek::Sunday => Weekday::Sun,
        }
    }
}

/// Which week of the month a relative-monthly window falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WeekIndex {
    /// Days 1-7 of the month.
    First,
    /// Days 8-14.
    Second,
    /// Days 15-21.
    Third,
    /// Days 22-28.
    Fourth,
    /// The last seven days of the month.
    Last,
}

/// How often a window recurs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Frequency {
    /// On one day of the week, every `interval_weeks` weeks.
    Weekly {
        /// 1 = every week, 2 = every other week, ... (1..=8).
        interval_weeks: u32,
        /// The local day the window opens.
        day_of_week: DayOfWeek,
    },
    /// Every `interval_days` days.
    Daily {
        /// 1 = every day (1..=31).
        interval_days: u32,
    },
    /// On a fixed day of the month, every `interval_months` months.
    AbsoluteMonthly {
        /// 1 = every month (1..=12).
        interval_months: u32,
        /// 1..=31; months without that day open on their last day.
        day_of_month: u32,
    },
    /// On e.g. the second Tuesday of the month, every `interval_months` months.
    RelativeMonthly {
        /// 1 = every month (1..=12).
        interval_months: u32,
        /// Which week of the month.
        week_index: WeekIndex,
        /// Which day in that week.
        day_of_week: DayOfWeek,
    },
}

/// A fixed offset from UTC in minutes, written `+HH:MM` or `-HH:MM` (e.g. `+05:30`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct UtcOffset {
    /// Minutes east of UTC (India: 330, US Pacific standard time: -480).
    pub minutes: i32,
}

/// The most negative offset accepted, in minutes (-12:00).
pub const MIN_UTC_OFFSET_MINUTES: i32 = -12 * 60;
/// The most positive offset accepted, in minutes (+14:00).
pub const MAX_UTC_OFFSET_MINUTES: i32 = 14 * 60;

/// A UTC offset that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed utc_offset {}: expected +HH:MM or -HH:MM between -12:00 and +14:00, e.g. +05:30", crate::limits::quoted(.0))]
pub struct BadUtcOffset(pub String);

impl FromStr for UtcOffset {
    type Err = BadUtcOffset;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadUtcOffset(s.to_string());
        let b = s.as_bytes();
        if b.len() != 6 || b[3] != b':' {
            return Err(bad());
        }
        let sign = match b[0] {
            b'+' => 1,
            b'-' => -1,
            _ => return Err(bad()),
        };
        let digits = |p: &str| -> Option<i32> {
            if p.len() == 2 && p.bytes().all(|c| c.is_ascii_digit()) { p.parse().ok() } else { None }
        };
        let hours = digits(&s[1..3]).ok_or_else(bad)?;
        let minutes = digits(&s[4..6]).ok_or_else(bad)?;
        if minutes > 59 {
            return Err(bad());
        }
        let total = sign * (hours * 60 + minutes);
        if !(MIN_UTC_OFFSET_MINUTES..=MAX_UTC_OFFSET_MINUTES).contains(&total) {
            return Err(bad());
        }
        Ok(UtcOffset { minutes: total })
    }
}

impl fmt::Display for UtcOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.minutes < 0 { '-' } else { '+' };
        let abs = self.minutes.unsigned_abs();
        write!(f, "{sign}{:02}:{:02}", abs / 60, abs % 60)
    }
}

impl Serialize for UtcOffset {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for UtcOffset {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `HH:MM` (de)serialization of a local start time.
mod hhmm {
    use chrono::NaiveTime;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &NaiveTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&t.format("%H:%M"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NaiveTime, D::Error> {
        let s = String::deserialize(d)?;
        NaiveTime::parse_from_str(&s, "%H:%M").map_err(|_| {
            serde::de::Error::custom(format!("malformed start_time {s:?}: expected HH:MM (24-hour, local), e.g. 22:30"))
        })
    }
}

/// An inclusive range of local dates on which no window may open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DateSpan {
    /// First not-allowed date (local).
    pub start: NaiveDate,
    /// Last not-allowed date (local), inclusive; equal to `start` for a single day.
    pub end: NaiveDate,
}

impl DateSpan {
    /// Whether `d` falls in the span.
    pub fn contains(&self, d: NaiveDate) -> bool {
        self.start <= d && d <= self.end
    }
}

/// A recurring maintenance window (SPEC §2).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceSchedule {
    /// How the window recurs.
    pub frequency: Frequency,
    /// Local time the window opens, `HH:MM`.
    #[serde(with = "hhmm")]
    pub start_time: NaiveTime,
    /// Whole hours of the window's length (added to `duration_minutes`).
    #[serde(default)]
    pub duration_hours: u32,
    /// Extra minutes of the window's length.
    #[serde(default)]
    pub duration_minutes: u32,
    /// The fixed offset of local time from UTC, `+HH:MM`.
    #[serde(default)]
    pub utc_offset: UtcOffset,
    /// No window opens before this local date; intervals count from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_date: Option<NaiveDate>,
    /// Local dates on which no window opens.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_allowed: Vec<DateSpan>,
}

/// A schedule field that is not acceptable, with the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ScheduleError {
    /// Path of the field, e.g. `frequency.interval_weeks`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Whether a window is open at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowState {
    /// A window is open and closes at the given instant.
    Open {
        /// When the open window closes.
        closes_at: DateTime<Utc>,
    },
    /// No window is open; the next one opens at the given instant, if one does within the search horizon.
    Closed {
        /// When the next window opens; `None` when none opens within [`SEARCH_HORIZON_DAYS`].
        next_opening: Option<DateTime<Utc>>,
    },
}

/// How preferable a member is, by its window, for being updated next (SPEC §5). Lower is preferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum WindowPriority {
    /// (1) Its window is open now.
    OpenNow,
    /// (2) Its window opens within the next 4 hours.
    OpensWithin4h,
    /// (3) It has no window (may be updated any time).
    NoWindow,
    /// (4) Its window is closed (and does not open within 4 hours).
    Closed,
}

/// The priority class of a member with the given schedule at `now` (SPEC §5 member choice order).
pub fn priority(schedule: Option<&MaintenanceSchedule>, now: DateTime<Utc>) -> WindowPriority {
    let Some(s) = schedule else { return WindowPriority::NoWindow };
    match s.window_at(now) {
        WindowState::Open { .. } => WindowPriority::OpenNow,
        WindowState::Closed { next_opening: Some(t) } if t - now <= TimeDelta::hours(OPENS_SOON_HOURS) => {
            WindowPriority::OpensWithin4h
        }
        WindowState::Closed { .. } => WindowPriority::Closed,
    }
}

/// Formats an instant as RFC 3339 in UTC with a `Z`, as used in every message.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let (ny, nm) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
    match (NaiveDate::from_ymd_opt(ny, nm, 1), NaiveDate::from_ymd_opt(year, month, 1)) {
        (Some(next), Some(this)) => (next - this).num_days() as u32,
        _ => 31,
    }
}

fn month_index(d: NaiveDate) -> i64 {
    i64::from(d.year()) * 12 + i64::from(d.month0())
}

fn monday_of(d: NaiveDate) -> NaiveDate {
    d - Days::new(u64::from(d.weekday().num_days_from_monday()))
}

/// The anchor intervals count from when no start date is given.
fn epoch() -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).expect("1970-01-01 is a valid date")
}

impl MaintenanceSchedule {
    /// The window length in minutes.
    pub fn duration_total_minutes(&self) -> u32 {
        self.duration_hours.saturating_mul(60).saturating_add(self.duration_minutes)
    }

    /// Checks the schedule. On success returns warnings (e.g. a window shorter than 4 hours, which is accepted);
    /// otherwise every problem found, each naming the field and the fix.
    pub fn validate(&self) -> Result<Vec<String>, Vec<ScheduleError>> {
        let mut errs = Vec::new();
        let mut warnings = Vec::new();
        let mut err = |field: &str, message: String| errs.push(ScheduleError { field: field.to_string(), message });
        match &self.frequency {
            Frequency::Weekly { interval_weeks, .. } if !(1..=8).contains(interval_weeks) => {
                err("frequency.interval_weeks", format!("{interval_weeks} is out of range; use 1 (every week) to 8"))
            }
            Frequency::Daily { interval_days } if !(1..=31).contains(interval_days) => {
                err("frequency.interval_days", format!("{interval_days} is out of range; use 1 (every day) to 31"))
            }
            Frequency::AbsoluteMonthly { interval_months, day_of_month } => {
                if !(1..=12).contains(interval_months) {
                    err(
                        "frequency.interval_months",
                        format!("{interval_months} is out of range; use 1 (every month) to 12"),
                    );
                }
                if !(1..=31).contains(day_of_month) {
                    err(
                        "frequency.day_of_month",
                        format!("{day_of_month} is out of range; use 1 to 31 (short months open on their last day)"),
                    );
                } else if *day_of_month > 28 {
                    warnings.push(format!(
                        "frequency.day_of_month {day_of_month}: months without day {day_of_month} open on their last day"
                    ));
                }
            }
            Frequency::RelativeMonthly { interval_months, .. } if !(1..=12).contains(interval_months) => err(
                "frequency.interval_months",
                format!("{interval_months} is out of range; use 1 (every month) to 12"),
            ),
            _ => {}
        }
        if self.start_time.second() != 0 || self.start_time.nanosecond() != 0 {
            err("start_time", "must be whole minutes, HH:MM".to_string());
        }
        let total = self.duration_total_minutes();
        if self.duration_minutes >= 60 {
            err(
                "duration_minutes",
                format!("{} is 60 or more; put whole hours in duration_hours", self.duration_minutes),
            );
        }
        if total < MIN_DURATION_MINUTES {
            err(
                "duration_hours",
                format!(
                    "the window lasts {total} minutes; give at least {MIN_DURATION_MINUTES} minutes (4 hours or more recommended)"
                ),
            );
        } else if total > MAX_DURATION_MINUTES {
            err("duration_hours", format!("the window lasts {total} minutes; give at most 168 hours (7 days)"));
        } else if total < SHORT_WINDOW_WARNING_MINUTES {
            warnings.push(format!(
                "duration: the window lasts {}h{:02}m, shorter than 4 hours; upgrades may not finish inside it",
                total / 60,
                total % 60
            ));
        }
        if !(MIN_UTC_OFFSET_MINUTES..=MAX_UTC_OFFSET_MINUTES).contains(&self.utc_offset.minutes) {
            err("utc_offset", format!("{} is out of range; use -12:00 to +14:00", self.utc_offset));
        }
        for (i, span) in self.not_allowed.iter().enumerate() {
            if span.end < span.start {
                err(
                    &format!("not_allowed[{i}]"),
                    format!("end {} is before start {}; swap them", span.end, span.start),
                );
            }
        }
        if errs.is_empty() { Ok(warnings) } else { Err(errs) }
    }

    fn is_not_allowed(&self, d: NaiveDate) -> bool {
        self.not_allowed.iter().any(|s| s.contains(d))
    }

    /// Whether the recurrence (ignoring not-allowed dates) has a window starting on local date `d`.
    fn recurs_on(&self, d: NaiveDate) -> bool {
        if self.start_date.is_some_and(|sd| d < sd) {
            return false;
        }
        let anchor = self.start_date.unwrap_or_else(epoch);
        let every = |n: i64, interval: u32| n.rem_euclid(i64::from(interval.max(1))) == 0;
        match self.frequency {
            Frequency::Daily { interval_days } => every((d - anchor).num_days(), interval_days),
            Frequency::Weekly { interval_weeks, day_of_week } => {
                d.weekday() == day_of_week.weekday()
                    && every((monday_of(d) - monday_of(anchor)).num_days() / 7, interval_weeks)
            }
            Frequency::AbsoluteMonthly { interval_months, day_of_month } => {
                let last = days_in_month(d.year(), d.month());
                every(month_index(d) - month_index(anchor), interval_months) && d.day() == day_of_month.min(last)
            }
            Frequency::RelativeMonthly { interval_months, week_index, day_of_week } => {
                let in_week = match week_index {
                    WeekIndex::First => d.day() <= 7,
                    WeekIndex::Second => (8..=14).contains(&d.day()),
                    WeekIndex::Third => (15..=21).contains(&d.day()),
                    WeekIndex::Fourth => (22..=28).contains(&d.day()),
                    WeekIndex::Last => d.day() + 7 > days_in_month(d.year(), d.month()),
                };
                in_week
                    && d.weekday() == day_of_week.weekday()
                    && every(month_index(d) - month_index(anchor), interval_months)
            }
        }
    }

    /// The window `(opens, closes)` in UTC whose local start date is `d`, if there is one.
    fn occurrence(&self, d: NaiveDate) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        if !self.recurs_on(d) || self.is_not_allowed(d) {
            return None;
        }
        let local = d.and_time(self.start_time);
        // Checked: a date at the calendar's edge has no window rather than a panic.
        let opens = local.checked_sub_signed(TimeDelta::minutes(i64::from(self.utc_offset.minutes)))?.and_utc();
        let closes = opens.checked_add_signed(TimeDelta::minutes(i64::from(self.duration_total_minutes())))?;
        Some((opens, closes))
    }

    fn local_date(&self, now: DateTime<Utc>) -> NaiveDate {
        now.naive_utc()
            .checked_add_signed(TimeDelta::minutes(i64::from(self.utc_offset.minutes)))
            .unwrap_or(now.naive_utc())
            .date()
    }

    /// Whether a window is open at `now`, and if not, when the next one opens.
    pub fn window_at(&self, now: DateTime<Utc>) -> WindowState {
        match self.is_open(now) {
            Some(closes_at) => WindowState::Open { closes_at },
            None => WindowState::Closed { next_opening: self.next_opening(now) },
        }
    }

    /// When a window is open at `now`, the instant it closes; `None` when closed. Windows that opened before
    /// `now` (even on an earlier local date, across midnight) count.
    pub fn is_open(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let today = self.local_date(now);
        // A window can have started up to its duration (at most 7 days) before today.
        let back = u64::from(self.duration_total_minutes().div_ceil(24 * 60)) + 1;
        let mut closes: Option<DateTime<Utc>> = None;
        for k in 0..=back {
            let Some(d) = today.checked_sub_days(Days::new(k)) else { continue };
            if let Some((opens, ends)) = self.occurrence(d)
                && opens <= now
                && now < ends
            {
                closes = Some(closes.map_or(ends, |c| c.max(ends)));
            }
        }
        closes
    }

    /// The first window opening strictly after `now`, within [`SEARCH_HORIZON_DAYS`]; not-allowed dates skipped.
    pub fn next_opening(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let today = self.local_date(now);
        (0..=SEARCH_HORIZON_DAYS)
            .filter_map(|k| today.checked_add_days(Days::new(k)))
            .filter_map(|d| self.occurrence(d))
            .map(|(opens, _)| opens)
            .find(|opens| *opens > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect("valid RFC 3339").with_timezone(&Utc)
    }

    fn date(s: &str) -> NaiveDate {
        s.parse().expect("valid date")
    }

    fn sched(frequency: Frequency, start: &str, hours: u32, offset: &str) -> MaintenanceSchedule {
        MaintenanceSchedule {
            frequency,
            start_time: NaiveTime::parse_from_str(start, "%H:%M").expect("valid time"),
            duration_hours: hours,
            duration_minutes: 0,
            utc_offset: offset.parse().expect("valid offset"),
            start_date: None,
            not_allowed: vec![],
        }
    }

    fn weekly(day: DayOfWeek, start: &str, hours: u32) -> MaintenanceSchedule {
        sched(Frequency::Weekly { interval_weeks: 1, day_of_week: day }, start, hours, "+00:00")
    }

    // 2024-01-01 is a Monday.

    #[test]
    fn sec2_each_frequency_opens_when_expected() {
        struct Case {
            name: &'static str,
            schedule: MaintenanceSchedule,
            now: &'static str,
            open_until: Option<&'static str>,
            next: Option<&'static str>,
        }
        let mut biweekly =
            sched(Frequency::Weekly { interval_weeks: 2, day_of_week: DayOfWeek::Wednesday }, "10:00", 4, "+00:00");
        biweekly.start_date = Some(date("2024-01-01"));
        let cases = vec![
            Case {
                name: "weekly open",
                schedule: weekly(DayOfWeek::Monday, "10:00", 4),
                now: "2024-01-01T11:00:00Z",
                open_until: Some("2024-01-01T14:00:00Z"),
                next: Some("2024-01-08T10:00:00Z"),
            },
            Case {
                name: "weekly before opening",
                schedule: weekly(DayOfWeek::Monday, "10:00", 4),
                now: "2024-01-01T09:00:00Z",
                open_until: None,
                next: Some("2024-01-01T10:00:00Z"),
            },
            Case {
                name: "weekly closes exactly at end",
                schedule: weekly(DayOfWeek::Monday, "10:00", 4),
                now: "2024-01-01T14:00:00Z",
                open_until: None,
                next: Some("2024-01-08T10:00:00Z"),
            },
            Case {
                name: "every other week from start date",
                schedule: biweekly,
                now: "2024-01-04T00:00:00Z",
                open_until: None,
                next: Some("2024-01-17T10:00:00Z"),
            },
            Case {
                name: "daily",
                schedule: sched(Frequency::Daily { interval_days: 1 }, "02:00", 4, "+00:00"),
                now: "2024-03-05T07:00:00Z",
                open_until: None,
                next: Some("2024-03-06T02:00:00Z"),
            },
            Case {
                name: "absolute monthly",
                schedule: sched(
                    Frequency::AbsoluteMonthly { interval_months: 1, day_of_month: 15 },
                    "00:00",
                    6,
                    "+00:00",
                ),
                now: "2024-01-15T05:59:00Z",
                open_until: Some("2024-01-15T06:00:00Z"),
                next: Some("2024-02-15T00:00:00Z"),
            },
            Case {
                name: "absolute monthly day 31 in a short month opens on the last day",
                schedule: sched(
                    Frequency::AbsoluteMonthly { interval_months: 1, day_of_month: 31 },
                    "00:00",
                    6,
                    "+00:00",
                ),
                now: "2024-02-01T00:00:00Z",
                open_until: None,
                next: Some("2024-02-29T00:00:00Z"),
            },
            Case {
                name: "relative monthly second tuesday",
                schedule: sched(
                    Frequency::RelativeMonthly {
                        interval_months: 1,
                        week_index: WeekIndex::Second,
                        day_of_week: DayOfWeek::Tuesday,
                    },
                    "20:00",
                    4,
                    "+00:00",
                ),
                now: "2024-01-01T00:00:00Z",
                open_until: None,
                next: Some("2024-01-09T20:00:00Z"),
            },
            Case {
                name: "relative monthly last friday",
                schedule: sched(
                    Frequency::RelativeMonthly {
                        interval_months: 1,
                        week_index: WeekIndex::Last,
                        day_of_week: DayOfWeek::Friday,
                    },
                    "20:00",
                    4,
                    "+00:00",
                ),
                now: "2024-02-01T00:00:00Z",
                open_until: None,
                next: Some("2024-02-23T20:00:00Z"),
            },
            Case {
                name: "utc offset +05:30 shifts the window",
                schedule: sched(Frequency::Daily { interval_days: 1 }, "02:00", 4, "+05:30"),
                now: "2024-01-01T21:00:00Z",
                open_until: Some("2024-01-02T00:30:00Z"),
                next: Some("2024-01-02T20:30:00Z"),
            },
            Case {
                name: "negative offset moves a Monday window into Tuesday UTC",
                schedule: sched(
                    Frequency::Weekly { interval_weeks: 1, day_of_week: DayOfWeek::Monday },
                    "22:00",
                    4,
                    "-08:00",
                ),
                now: "2024-01-02T07:00:00Z",
                open_until: Some("2024-01-02T10:00:00Z"),
                next: Some("2024-01-09T06:00:00Z"),
            },
            Case {
                name: "window crossing midnight is open after midnight",
                schedule: weekly(DayOfWeek::Sunday, "22:00", 6),
                now: "2024-01-08T02:00:00Z",
                open_until: Some("2024-01-08T04:00:00Z"),
                next: Some("2024-01-14T22:00:00Z"),
            },
        ];
        for c in cases {
            let now = at(c.now);
            assert_eq!(c.schedule.validate().map(|_| ()), Ok(()), "{}", c.name);
            assert_eq!(c.schedule.is_open(now), c.open_until.map(at), "{}: is_open", c.name);
            assert_eq!(c.schedule.next_opening(now), c.next.map(at), "{}: next_opening", c.name);
            let expected_state = match c.open_until {
                Some(t) => WindowState::Open { closes_at: at(t) },
                None => WindowState::Closed { next_opening: c.next.map(at) },
            };
            assert_eq!(c.schedule.window_at(now), expected_state, "{}: window_at", c.name);
        }
    }

    #[test]
    fn sec2_not_allowed_dates_skip_the_occurrence_starting_on_them() {
        let mut s = weekly(DayOfWeek::Monday, "10:00", 4);
        s.not_allowed = vec![DateSpan { start: date("2024-01-08"), end: date("2024-01-16") }];
        assert_eq!(s.is_open(at("2024-01-08T11:00:00Z")), None);
        assert_eq!(s.next_opening(at("2024-01-02T00:00:00Z")), Some(at("2024-01-22T10:00:00Z")));
        // A window that started the day before a not-allowed date is kept.
        let mut n = weekly(DayOfWeek::Sunday, "22:00", 6);
        n.not_allowed = vec![DateSpan { start: date("2024-01-08"), end: date("2024-01-08") }];
        assert_eq!(n.is_open(at("2024-01-08T01:00:00Z")), Some(at("2024-01-08T04:00:00Z")));
    }

    #[test]
    fn sec2_not_allowed_everything_means_no_opening_within_the_horizon() {
        let mut s = sched(Frequency::Daily { interval_days: 1 }, "10:00", 4, "+00:00");
        s.not_allowed = vec![DateSpan { start: date("2024-01-01"), end: date("2026-12-31") }];
        assert_eq!(s.window_at(at("2024-01-01T00:00:00Z")), WindowState::Closed { next_opening: None });
        assert_eq!(priority(Some(&s), at("2024-01-01T00:00:00Z")), WindowPriority::Closed);
    }

    #[test]
    fn sec2_start_date_delays_the_first_window() {
        let mut s = sched(Frequency::Daily { interval_days: 3 }, "10:00", 4, "+00:00");
        s.start_date = Some(date("2024-01-10"));
        assert_eq!(s.next_opening(at("2024-01-01T00:00:00Z")), Some(at("2024-01-10T10:00:00Z")));
        assert_eq!(s.next_opening(at("2024-01-10T10:00:00Z")), Some(at("2024-01-13T10:00:00Z")));
    }

    #[test]
    fn sec2_windows_shorter_than_4_hours_are_accepted_with_a_warning() {
        let mut s = weekly(DayOfWeek::Monday, "10:00", 3);
        let w = s.validate().expect("accepted");
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("shorter than 4 hours"), "{w:?}");
        s.duration_hours = 4;
        assert_eq!(s.validate(), Ok(vec![]));
    }

    #[test]
    fn sec7_bad_schedules_name_the_field_and_the_fix() {
        let cases: Vec<(MaintenanceSchedule, &str, &str)> = vec![
            (sched(Frequency::Daily { interval_days: 0 }, "10:00", 4, "+00:00"), "frequency.interval_days", "use 1"),
            (
                sched(Frequency::Weekly { interval_weeks: 0, day_of_week: DayOfWeek::Monday }, "10:00", 4, "+00:00"),
                "frequency.interval_weeks",
                "use 1",
            ),
            (
                sched(Frequency::AbsoluteMonthly { interval_months: 1, day_of_month: 32 }, "10:00", 4, "+00:00"),
                "frequency.day_of_month",
                "use 1 to 31",
            ),
            (
                sched(Frequency::AbsoluteMonthly { interval_months: 13, day_of_month: 1 }, "10:00", 4, "+00:00"),
                "frequency.interval_months",
                "to 12",
            ),
            (weekly(DayOfWeek::Monday, "10:00", 0), "duration_hours", "at least 30 minutes"),
            (weekly(DayOfWeek::Monday, "10:00", 169), "duration_hours", "at most 168 hours"),
            (
                {
                    let mut s = weekly(DayOfWeek::Monday, "10:00", 4);
                    s.not_allowed = vec![DateSpan { start: date("2024-01-09"), end: date("2024-01-08") }];
                    s
                },
                "not_allowed[0]",
                "swap them",
            ),
            (
                {
                    let mut s = weekly(DayOfWeek::Monday, "10:00", 4);
                    s.utc_offset = UtcOffset { minutes: 15 * 60 };
                    s
                },
                "utc_offset",
                "-12:00 to +14:00",
            ),
        ];
        for (s, field, fix) in cases {
            let errs = s.validate().expect_err(field);
            assert!(errs.iter().any(|e| e.field == field && e.to_string().contains(fix)), "{field}: {errs:?}");
        }
    }

    #[test]
    fn utc_offsets_parse_and_print() {
        for (s, m) in [("+05:30", 330), ("-08:00", -480), ("+00:00", 0), ("+14:00", 840), ("-12:00", -720)] {
            let o: UtcOffset = s.parse().expect(s);
            assert_eq!(o.minutes, m);
            assert_eq!(o.to_string(), s);
        }
        for bad in ["", "05:30", "+5:30", "+05:60", "+15:00", "-12:30", "+05:3x", "UTC"] {
            let e = bad.parse::<UtcOffset>().expect_err(bad);
            assert!(e.to_string().contains("+HH:MM"), "{bad}: {e}");
        }
    }

    #[test]
    fn schedules_round_trip_through_json() {
        let json = r#"{"frequency":{"type":"RelativeMonthly","interval_months":1,"week_index":"Last","day_of_week":"Friday"},
            "start_time":"22:30","duration_hours":4,"utc_offset":"+05:30","not_allowed":[{"start":"2024-12-24","end":"2024-12-26"}]}"#;
        let s: MaintenanceSchedule = serde_json::from_str(json).expect("valid schedule");
        assert_eq!(s.utc_offset.minutes, 330);
        assert_eq!(s.start_time, NaiveTime::from_hms_opt(22, 30, 0).expect("valid"));
        let back: MaintenanceSchedule =
            serde_json::from_str(&serde_json::to_string(&s).expect("serializes")).expect("round trip");
        assert_eq!(back, s);
        let bad = json.replace("22:30", "25:00");
        let e = serde_json::from_str::<MaintenanceSchedule>(&bad).expect_err("bad time");
        assert!(e.to_string().contains("start_time"), "{e}");
        let bad = json.replace("+05:30", "IST");
        let e = serde_json::from_str::<MaintenanceSchedule>(&bad).expect_err("bad offset");
        assert!(e.to_string().contains("utc_offset"), "{e}");
    }

    #[test]
    fn sec7_unknown_window_keys_are_refused_naming_them() {
        let json = r#"{"frequency":{"type":"Weekly","interval_weeks":1,"day_of_week":"Monday"},"start_time":"22:30",
            "duration_hours":4,"not_allowed":[{"start":"2024-12-24","end":"2024-12-26"}]}"#;
        serde_json::from_str::<MaintenanceSchedule>(json).expect("valid schedule");
        for (from, to, key) in [
            ("\"duration_hours\"", "\"duration_hour\"", "duration_hour"),
            ("\"interval_weeks\"", "\"interval_week\"", "interval_week"),
            ("\"end\"", "\"until\"", "until"),
        ] {
            let bad = json.replacen(from, to, 1);
            let e = serde_json::from_str::<MaintenanceSchedule>(&bad).expect_err(key).to_string();
            assert!(e.contains(&format!("unknown field `{key}`")), "{key}: {e}");
        }
    }

    #[test]
    fn sec5_window_priority_classes() {
        let s = weekly(DayOfWeek::Monday, "10:00", 4);
        let cases = [
            (Some(&s), "2024-01-01T10:30:00Z", WindowPriority::OpenNow),
            (Some(&s), "2024-01-01T06:00:00Z", WindowPriority::OpensWithin4h),
            (Some(&s), "2024-01-01T05:59:00Z", WindowPriority::Closed),
            (None, "2024-01-01T05:59:00Z", WindowPriority::NoWindow),
            (Some(&s), "2024-01-02T10:30:00Z", WindowPriority::Closed),
        ];
        for (sc, now, want) in cases {
            assert_eq!(priority(sc, at(now)), want, "{now}");
        }
        assert!(WindowPriority::OpenNow < WindowPriority::OpensWithin4h);
        assert!(WindowPriority::OpensWithin4h < WindowPriority::NoWindow);
        assert!(WindowPriority::NoWindow < WindowPriority::Closed);
    }
}
