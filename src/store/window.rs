//! Quota windows: where the current period ends.
//!
//! Calendar periods (hourly, daily, weekly, monthly) are aligned to local time
//! in the configured IANA time zone, so "daily" resets at local midnight even
//! on the days a DST change makes 23 or 25 hours long. Fixed periods (`"15m"`,
//! `"6h"`, `"2d"`) are aligned to the unix epoch and ignore time zones.
//!
//! Invariant: [`Calendar::window_end`] is always strictly after `now`, so a
//! counter rolled at `now` is current again.

use std::fmt;
use std::num::NonZeroU32;

use chrono::{
    DateTime, Datelike, Days, Duration, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeZone,
    Weekday,
};
use chrono_tz::Tz;

/// How long a quota window lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// Until the next full local hour.
    Hourly,
    /// Until the next local midnight.
    Daily,
    /// Until the next local midnight that starts the week.
    Weekly,
    /// Until local midnight on the first of the next month.
    Monthly,
    /// A fixed number of seconds, aligned to the unix epoch.
    Fixed(NonZeroU32),
}

impl Period {
    /// Parses `hourly`, `daily`, `weekly`, `monthly` or a duration such as
    /// `15m`, `6h`, `2d` (see [`parse_duration_secs`]).
    ///
    /// # Errors
    ///
    /// A message saying what was expected.
    pub fn parse(s: &str) -> Result<Period, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "hourly" => Ok(Period::Hourly),
            "daily" => Ok(Period::Daily),
            "weekly" => Ok(Period::Weekly),
            "monthly" => Ok(Period::Monthly),
            other => {
                let secs = parse_duration_secs(other).map_err(|e| {
                    format!(
                        "expected hourly, daily, weekly, monthly or a duration like \"15m\": {e}"
                    )
                })?;
                let secs = u32::try_from(secs)
                    .ok()
                    .and_then(NonZeroU32::new)
                    .ok_or_else(|| {
                        format!("period {other:?} must be between 1s and {}s", u32::MAX)
                    })?;
                Ok(Period::Fixed(secs))
            }
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Period::Hourly => f.write_str("hourly"),
            Period::Daily => f.write_str("daily"),
            Period::Weekly => f.write_str("weekly"),
            Period::Monthly => f.write_str("monthly"),
            Period::Fixed(secs) => f.write_str(&format_duration_secs(u64::from(secs.get()))),
        }
    }
}

/// Parses a duration: a whole number followed by `ms`, `s`, `m`, `h`, `d` or
/// `w`; a bare number is seconds. Returns whole seconds (`ms` rounds up).
///
/// # Errors
///
/// A message naming what could not be read.
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    Ok(parse_duration_ms(s)?.div_ceil(1000))
}

/// Like [`parse_duration_secs`], in milliseconds.
///
/// # Errors
///
/// A message naming what could not be read.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like \"30s\", \"15m\", \"6h\" or \"2d\""))?;
    let ms_per_unit: u64 = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 604_800_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use ms, s, m, h, d or w)"
            ))
        }
    };
    n.checked_mul(ms_per_unit)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

/// Writes whole seconds the short way: `90` → `90s`, `900` → `15m`, `7200` → `2h`.
pub fn format_duration_secs(secs: u64) -> String {
    for (unit, len) in [("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs >= len && secs % len == 0 {
            return format!("{}{unit}", secs / len);
        }
    }
    format!("{secs}s")
}

/// A period in a time zone: everything needed to compute window ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Calendar {
    /// The period of each window.
    pub period: Period,
    /// The zone whose local time aligns calendar periods.
    pub tz: Tz,
    /// The first day of a week, for [`Period::Weekly`].
    pub week_start: Weekday,
}

impl Calendar {
    /// The end (exclusive) of the window that contains `now`, in unix seconds.
    /// Always `> now`.
    pub fn window_end(&self, now: i64) -> i64 {
        match self.period {
            Period::Fixed(len) => {
                let len = i64::from(len.get());
                (now.div_euclid(len) + 1) * len
            }
            Period::Hourly => {
                // Local hours start where local time is hh:00:00. The offset at
                // `now` holds for the whole hour in every zone whose offset
                // changes on the hour, which is all of them but Lord Howe.
                let offset = i64::from(self.offset_at(now));
                let local = now + offset;
                local - local.rem_euclid(3600) - offset + 3600
            }
            Period::Daily => self.local_midnight_after(now, |d| d.checked_add_days(Days::new(1))),
            Period::Weekly => {
                let start = self.week_start;
                self.local_midnight_after(now, |d| {
                    let into_week = d.weekday().days_since(start);
                    d.checked_add_days(Days::new(u64::from(7 - into_week)))
                })
            }
            Period::Monthly => self.local_midnight_after(now, |d| {
                let (y, m) = if d.month() == 12 {
                    (d.year() + 1, 1)
                } else {
                    (d.year(), d.month() + 1)
                };
                NaiveDate::from_ymd_opt(y, m, 1)
            }),
        }
    }

    /// Formats `unix_secs` as local `YYYY-MM-DD HH:MM TZ`, as used in `{reset}`.
    pub fn format_local(&self, unix_secs: i64) -> String {
        match DateTime::from_timestamp(unix_secs, 0) {
            Some(utc) => utc
                .with_timezone(&self.tz)
                .format("%Y-%m-%d %H:%M %Z")
                .to_string(),
            None => unix_secs.to_string(),
        }
    }

    /// `unix_secs` as local `YYYY-MM-DD HH:MM:SS TZ` (for events such as a
    /// flush, where the second matters).
    pub fn format_local_seconds(&self, unix_secs: i64) -> String {
        match DateTime::from_timestamp(unix_secs, 0) {
            Some(utc) => utc
                .with_timezone(&self.tz)
                .format("%Y-%m-%d %H:%M:%S %Z")
                .to_string(),
            None => unix_secs.to_string(),
        }
    }

    fn offset_at(&self, now: i64) -> i32 {
        let utc = DateTime::from_timestamp(now, 0)
            .unwrap_or_default()
            .naive_utc();
        self.tz
            .offset_from_utc_datetime(&utc)
            .fix()
            .local_minus_utc()
    }

    /// The first instant of local midnight of the day `next(today)`.
    fn local_midnight_after(&self, now: i64, next: impl Fn(NaiveDate) -> Option<NaiveDate>) -> i64 {
        let utc = DateTime::from_timestamp(now, 0).unwrap_or_default();
        let today = utc.with_timezone(&self.tz).date_naive();
        let end = next(today)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|midnight| self.first_instant_at_or_after(midnight));
        match end {
            Some(t) if t > now => t,
            // Out of chrono's range (year ±262143): fall back to a day.
            _ => now + 86_400,
        }
    }

    /// Resolves a local time to unix seconds: the earlier instant when the
    /// local time happens twice, and the end of the gap when it is skipped
    /// (some zones change DST at midnight, so that midnight does not exist).
    fn first_instant_at_or_after(&self, local: NaiveDateTime) -> i64 {
        let mut t = local;
        // Gaps are at most a day long (Samoa skipped 2011-12-30), so search in
        // minutes for at most 25 hours.
        for _ in 0..=25 * 60 {
            match self.tz.from_local_datetime(&t) {
                LocalResult::Single(dt) => return dt.timestamp(),
                LocalResult::Ambiguous(first, _) => return first.timestamp(),
                LocalResult::None => t += Duration::minutes(1),
            }
        }
        local.and_utc().timestamp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn cal(period: &str, tz: &str) -> Calendar {
        Calendar {
            period: Period::parse(period).unwrap(),
            tz: tz.parse().unwrap(),
            week_start: Weekday::Mon,
        }
    }

    /// Unix seconds of a local wall time; panics if it does not exist exactly once.
    fn local(tz: &str, y: i32, m: u32, d: u32, hh: u32, mm: u32) -> i64 {
        let tz: Tz = tz.parse().unwrap();
        let naive = NaiveDate::from_ymd_opt(y, m, d)
            .unwrap()
            .and_hms_opt(hh, mm, 0)
            .unwrap();
        tz.from_local_datetime(&naive).single().unwrap().timestamp()
    }

    #[test]
    fn parses_periods_and_durations() {
        assert_eq!(Period::parse("Daily"), Ok(Period::Daily));
        assert_eq!(Period::parse("15m").unwrap().to_string(), "15m");
        assert_eq!(
            Period::parse("6h").unwrap(),
            Period::Fixed(NonZeroU32::new(21_600).unwrap())
        );
        assert_eq!(Period::parse("2d").unwrap().to_string(), "2d");
        assert!(Period::parse("0s").is_err());
        assert!(Period::parse("fortnightly").is_err());
        assert_eq!(parse_duration_secs("600s"), Ok(600));
        assert_eq!(parse_duration_secs("600"), Ok(600));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_secs("250ms"), Ok(1));
        assert!(parse_duration_secs("5 parsecs").is_err());
        assert!(parse_duration_secs("").is_err());
    }

    #[test]
    fn fixed_periods_align_to_epoch() {
        let c = cal("15m", "Europe/Zurich");
        assert_eq!(c.window_end(0), 900);
        assert_eq!(c.window_end(899), 900);
        assert_eq!(c.window_end(900), 1800);
        assert_eq!(c.window_end(-1), 0);
    }

    #[test]
    fn daily_resets_at_local_midnight() {
        let c = cal("daily", "Europe/Zurich");
        let t = local("Europe/Zurich", 2026, 3, 10, 15, 0);
        assert_eq!(c.window_end(t), local("Europe/Zurich", 2026, 3, 11, 0, 0));
        // One second before midnight still belongs to the day; midnight starts the next.
        let midnight = local("Europe/Zurich", 2026, 3, 11, 0, 0);
        assert_eq!(c.window_end(midnight - 1), midnight);
        assert_eq!(
            c.window_end(midnight),
            local("Europe/Zurich", 2026, 3, 12, 0, 0)
        );
    }

    #[test]
    fn dst_days_are_23_and_25_hours_long() {
        for tz in ["Europe/Zurich", "America/New_York"] {
            let c = cal("daily", tz);
            // Spring forward: Zurich 2026-03-29, New York 2026-03-08.
            let (sm, sd) = if tz == "Europe/Zurich" {
                (3, 29)
            } else {
                (3, 8)
            };
            let start = local(tz, 2026, sm, sd, 0, 0);
            assert_eq!(c.window_end(start) - start, 23 * 3600, "{tz} spring");
            // Fall back: Zurich 2026-10-25, New York 2026-11-01.
            let (fm, fd) = if tz == "Europe/Zurich" {
                (10, 25)
            } else {
                (11, 1)
            };
            let start = local(tz, 2026, fm, fd, 0, 0);
            assert_eq!(c.window_end(start) - start, 25 * 3600, "{tz} fall");
        }
    }

    #[test]
    fn hourly_across_dst_changes() {
        let c = cal("hourly", "Europe/Zurich");
        // 2026-03-29 01:30 CET; 02:00 does not exist, the next hour starts at 03:00 CEST.
        let t = local("Europe/Zurich", 2026, 3, 29, 1, 30);
        assert_eq!(c.window_end(t), local("Europe/Zurich", 2026, 3, 29, 3, 0));
        assert_eq!(c.window_end(t) - t, 1800);
        // 2026-10-25: 02:00-03:00 happens twice; each is its own one-hour window.
        let first_0230 = local("Europe/Zurich", 2026, 10, 25, 1, 30) + 3600;
        let end1 = c.window_end(first_0230);
        assert_eq!(end1 - first_0230, 1800);
        let end2 = c.window_end(end1);
        assert_eq!(end2 - end1, 3600);
        assert_eq!(end2, local("Europe/Zurich", 2026, 10, 25, 3, 0));
        // Half-hour zones align to their local hours.
        let india = cal("hourly", "Asia/Kolkata");
        let t = local("Asia/Kolkata", 2026, 5, 5, 10, 20);
        assert_eq!(
            india.window_end(t),
            local("Asia/Kolkata", 2026, 5, 5, 11, 0)
        );
    }

    #[test]
    fn monthly_handles_month_ends_and_leap_years() {
        let c = cal("monthly", "America/New_York");
        let ny = "America/New_York";
        assert_eq!(
            c.window_end(local(ny, 2026, 1, 31, 23, 59)),
            local(ny, 2026, 2, 1, 0, 0)
        );
        assert_eq!(
            c.window_end(local(ny, 2028, 2, 29, 12, 0)),
            local(ny, 2028, 3, 1, 0, 0)
        );
        assert_eq!(
            c.window_end(local(ny, 2026, 12, 31, 23, 0)),
            local(ny, 2027, 1, 1, 0, 0)
        );
        assert_eq!(
            c.window_end(local(ny, 2026, 2, 1, 0, 0)),
            local(ny, 2026, 3, 1, 0, 0)
        );
        let d = cal("daily", ny);
        assert_eq!(
            d.window_end(local(ny, 2028, 2, 28, 18, 0)),
            local(ny, 2028, 2, 29, 0, 0)
        );
        assert_eq!(
            d.window_end(local(ny, 2028, 2, 29, 18, 0)),
            local(ny, 2028, 3, 1, 0, 0)
        );
    }

    #[test]
    fn weekly_honours_week_start() {
        let zh = "Europe/Zurich";
        let mut c = cal("weekly", zh);
        // 2026-11-22 is a Sunday.
        let sunday = local(zh, 2026, 11, 22, 12, 0);
        assert_eq!(c.window_end(sunday), local(zh, 2026, 11, 23, 0, 0));
        let monday = local(zh, 2026, 11, 23, 0, 0);
        assert_eq!(c.window_end(monday), local(zh, 2026, 11, 30, 0, 0));
        c.week_start = Weekday::Sun;
        assert_eq!(c.window_end(sunday), local(zh, 2026, 11, 29, 0, 0));
        assert_eq!(
            c.window_end(sunday - 13 * 3600),
            local(zh, 2026, 11, 22, 0, 0)
        );
        // A week that contains the fall-back change is 169 hours long.
        let c = cal("weekly", zh);
        let start = local(zh, 2026, 10, 19, 0, 0);
        assert_eq!(c.window_end(start) - start, 7 * 24 * 3600 + 3600);
    }

    #[test]
    fn midnight_inside_a_dst_gap_resolves_to_the_gap_end() {
        // America/Santiago springs forward at 24:00 local: 2026-09-06 00:00
        // does not exist, the day starts at 01:00.
        let c = cal("daily", "America/Santiago");
        let t = local("America/Santiago", 2026, 9, 5, 12, 0);
        let end = c.window_end(t);
        assert_eq!(end, local("America/Santiago", 2026, 9, 6, 1, 0));
    }

    #[test]
    fn formats_reset_in_local_time() {
        let c = cal("daily", "Europe/Zurich");
        assert_eq!(
            c.format_local(local("Europe/Zurich", 2026, 7, 1, 0, 0)),
            "2026-07-01 00:00 CEST"
        );
        assert_eq!(
            c.format_local(local("Europe/Zurich", 2026, 12, 1, 0, 0)),
            "2026-12-01 00:00 CET"
        );
    }
}
