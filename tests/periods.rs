//! SPEC §5 windows over a real socket, with a manual clock: a sender over
//! quota stays refused until the exact boundary, and is accepted from it.

mod common;

use std::sync::Arc;

use chrono::{NaiveDate, TimeZone};
use chrono_tz::Tz;
use rusqlite::params;

use common::{is_deferred, start_with, Req};
use ratelimit_policyd::clock::ManualClock;
use ratelimit_policyd::persist::memory::MemoryBackend;
use ratelimit_policyd::persist::sqlite::SqliteBackend;

/// Unix seconds of a local wall time (the earlier one if it happens twice).
fn at(tz: &str, y: i32, m: u32, d: u32, hh: u32, mm: u32) -> i64 {
    let tz: Tz = tz.parse().unwrap();
    let naive = NaiveDate::from_ymd_opt(y, m, d)
        .unwrap()
        .and_hms_opt(hh, mm, 0)
        .unwrap();
    tz.from_local_datetime(&naive)
        .earliest()
        .unwrap()
        .timestamp()
}

struct Case {
    name: &'static str,
    limits: &'static str,
    tz: &'static str,
    /// A moment inside the window.
    inside: i64,
    /// The window's end.
    boundary: i64,
    /// How `{reset}` shows the boundary.
    reset: &'static str,
}

async fn assert_boundary(case: &Case) {
    let toml = format!(
        "[limits]\ndefault_quota = 1\ntimezone = \"{}\"\n{}\n",
        case.tz, case.limits
    );
    let clock = ManualClock::new(case.inside);
    let s = start_with(&toml, Arc::new(MemoryBackend::default()), clock.clone()).await;
    let mut c = s.client().await;
    let user = "alice@example.com";
    assert_eq!(
        c.ask(&Req::rcpt(user, "i1", "a@x")).await,
        "DUNNO",
        "{}",
        case.name
    );
    let refused = c.ask(&Req::rcpt(user, "i1", "b@x")).await;
    assert!(
        refused.ends_with(&format!("resets {}", case.reset)),
        "{}: {refused}",
        case.name
    );
    clock.set(case.boundary - 1);
    assert!(
        is_deferred(&c.ask(&Req::rcpt(user, "i2", "a@x")).await),
        "{}: one second before",
        case.name
    );
    clock.set(case.boundary);
    assert_eq!(
        c.ask(&Req::rcpt(user, "i3", "a@x")).await,
        "DUNNO",
        "{}: at the boundary",
        case.name
    );
    assert_eq!(s.used(user), 1, "{}: a new window starts at 0", case.name);
}

#[tokio::test]
async fn every_period_ends_at_its_boundary() {
    let zh = "Europe/Zurich";
    let ny = "America/New_York";
    let cases = [
        Case {
            name: "hourly",
            limits: "period = \"hourly\"",
            tz: zh,
            inside: at(zh, 2026, 6, 10, 14, 59),
            boundary: at(zh, 2026, 6, 10, 15, 0),
            reset: "2026-06-10 15:00 CEST",
        },
        Case {
            name: "hourly into the skipped hour (Zurich spring forward)",
            limits: "period = \"hourly\"",
            tz: zh,
            inside: at(zh, 2026, 3, 29, 1, 30),
            boundary: at(zh, 2026, 3, 29, 3, 0),
            reset: "2026-03-29 03:00 CEST",
        },
        Case {
            name: "hourly in the first of two 02:00 hours (Zurich fall back)",
            limits: "period = \"hourly\"",
            tz: zh,
            inside: at(zh, 2026, 10, 25, 2, 30),
            boundary: at(zh, 2026, 10, 25, 2, 0) + 3600,
            reset: "2026-10-25 02:00 CET",
        },
        Case {
            name: "daily on Zurich's 23-hour day",
            limits: "period = \"daily\"",
            tz: zh,
            inside: at(zh, 2026, 3, 29, 0, 30),
            boundary: at(zh, 2026, 3, 30, 0, 0),
            reset: "2026-03-30 00:00 CEST",
        },
        Case {
            name: "daily on Zurich's 25-hour day",
            limits: "period = \"daily\"",
            tz: zh,
            inside: at(zh, 2026, 10, 25, 23, 59),
            boundary: at(zh, 2026, 10, 26, 0, 0),
            reset: "2026-10-26 00:00 CET",
        },
        Case {
            name: "daily on New York's 23-hour day",
            limits: "period = \"daily\"",
            tz: ny,
            inside: at(ny, 2026, 3, 8, 1, 59),
            boundary: at(ny, 2026, 3, 9, 0, 0),
            reset: "2026-03-09 00:00 EDT",
        },
        Case {
            name: "daily on New York's 25-hour day",
            limits: "period = \"daily\"",
            tz: ny,
            inside: at(ny, 2026, 11, 1, 1, 30),
            boundary: at(ny, 2026, 11, 2, 0, 0),
            reset: "2026-11-02 00:00 EST",
        },
        Case {
            name: "daily into Feb 29",
            limits: "period = \"daily\"",
            tz: ny,
            inside: at(ny, 2028, 2, 28, 20, 0),
            boundary: at(ny, 2028, 2, 29, 0, 0),
            reset: "2028-02-29 00:00 EST",
        },
        Case {
            name: "weekly, week starts monday",
            limits: "period = \"weekly\"\nweek_start = \"monday\"",
            tz: zh,
            inside: at(zh, 2026, 11, 22, 12, 0), // a Sunday
            boundary: at(zh, 2026, 11, 23, 0, 0),
            reset: "2026-11-23 00:00 CET",
        },
        Case {
            name: "weekly, week starts sunday",
            limits: "period = \"weekly\"\nweek_start = \"sunday\"",
            tz: zh,
            inside: at(zh, 2026, 11, 22, 12, 0),
            boundary: at(zh, 2026, 11, 29, 0, 0),
            reset: "2026-11-29 00:00 CET",
        },
        Case {
            name: "weekly across the fall-back change",
            limits: "period = \"weekly\"",
            tz: zh,
            inside: at(zh, 2026, 10, 20, 9, 0),
            boundary: at(zh, 2026, 10, 26, 0, 0),
            reset: "2026-10-26 00:00 CET",
        },
        Case {
            name: "monthly at the end of January",
            limits: "period = \"monthly\"",
            tz: ny,
            inside: at(ny, 2026, 1, 31, 23, 0),
            boundary: at(ny, 2026, 2, 1, 0, 0),
            reset: "2026-02-01 00:00 EST",
        },
        Case {
            name: "monthly from Feb 29",
            limits: "period = \"monthly\"",
            tz: ny,
            inside: at(ny, 2028, 2, 29, 12, 0),
            boundary: at(ny, 2028, 3, 1, 0, 0),
            reset: "2028-03-01 00:00 EST",
        },
        Case {
            name: "monthly across new year, into a DST month",
            limits: "period = \"monthly\"",
            tz: zh,
            inside: at(zh, 2026, 12, 31, 23, 59),
            boundary: at(zh, 2027, 1, 1, 0, 0),
            reset: "2027-01-01 00:00 CET",
        },
        Case {
            name: "monthly across the spring change",
            limits: "period = \"monthly\"",
            tz: zh,
            inside: at(zh, 2026, 3, 15, 12, 0),
            boundary: at(zh, 2026, 4, 1, 0, 0),
            reset: "2026-04-01 00:00 CEST",
        },
        Case {
            name: "fixed 15 minutes, epoch-aligned",
            limits: "period = \"15m\"",
            tz: "UTC",
            inside: 1_790_000_000,
            boundary: 1_790_000_100, // 1_790_000_100 is a multiple of 900
            reset: "2026-09-21 14:15 UTC",
        },
        Case {
            name: "fixed 6 hours",
            limits: "period = \"6h\"",
            tz: "UTC",
            inside: 1_790_000_000,
            boundary: 1_790_013_600, // 18:00 UTC, a multiple of 21600
            reset: "2026-09-21 18:00 UTC",
        },
    ];
    for case in &cases {
        assert_boundary(case).await;
    }
}

/// After the window ends, `persist` keeps an admin's quota; without it the
/// quota goes back to the default, in memory and in the database.
#[tokio::test]
async fn persist_and_non_persist_reset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ratelimit.db");
    let now = common::T0;
    {
        let db = SqliteBackend::open(&path, "ratelimit").unwrap();
        drop(db);
        let conn = rusqlite::Connection::open(&path).unwrap();
        let insert = "INSERT INTO ratelimit (sender, quota, used, expiry, persist) VALUES (?1, ?2, ?3, ?4, ?5)";
        conn.execute(insert, params!["vip@example.com", 5, 5, now - 10, 1])
            .unwrap();
        conn.execute(insert, params!["normal@example.com", 5, 5, now - 10, 0])
            .unwrap();
        conn.execute(insert, params!["busy@example.com", 5, 5, now + 3600, 0])
            .unwrap();
        conn.execute(
            insert,
            params!["legacy@example.com", 5, 5, Option::<i64>::None, 0],
        )
        .unwrap();
    }
    let backend = Arc::new(SqliteBackend::open(&path, "ratelimit").unwrap());
    let mut s = start_with(
        "[limits]\ndefault_quota = 2\ntimezone = \"UTC\"\n",
        backend,
        ManualClock::new(now),
    )
    .await;
    let mut c = s.client().await;
    // The loaded window that is still running is enforced.
    assert!(is_deferred(
        &c.ask(&Req::rcpt("busy@example.com", "b", "a@x")).await
    ));
    // persist: quota 5 survives the reset.
    for n in 0..5 {
        assert_eq!(
            c.ask(&Req::rcpt("vip@example.com", "v", &format!("{n}@x")))
                .await,
            "DUNNO"
        );
    }
    assert!(is_deferred(
        &c.ask(&Req::rcpt("vip@example.com", "v", "6@x")).await
    ));
    // No persist: back to the default quota of 2, and the cached quota with it.
    for user in ["normal@example.com", "legacy@example.com"] {
        for n in 0..2 {
            assert_eq!(
                c.ask(&Req::rcpt(user, "n", &format!("{n}@x"))).await,
                "DUNNO",
                "{user}"
            );
        }
        let refused = c.ask(&Req::rcpt(user, "n", "3@x")).await;
        assert!(refused.contains("(3/2)"), "{user}: {refused}");
    }
    let report = s.stop().await;
    assert_eq!(report.error, None);

    let conn = rusqlite::Connection::open(&path).unwrap();
    let row = |sender: &str| -> (u32, u32, i64, bool) {
        conn.query_row(
            "SELECT quota, used, expiry, persist FROM ratelimit WHERE sender = ?1",
            [sender],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap()
    };
    let tomorrow = at("UTC", 2026, 9, 22, 0, 0);
    assert_eq!(row("vip@example.com"), (5, 6, tomorrow, true));
    assert_eq!(row("normal@example.com"), (2, 3, tomorrow, false));
    assert_eq!(row("legacy@example.com"), (2, 3, tomorrow, false));
    assert_eq!(row("busy@example.com"), (5, 6, now + 3600, false));
}
