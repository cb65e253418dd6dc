//! SPEC §6 write-behind: deltas reach the database, several daemons add up,
//! and an outage loses nothing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{is_deferred, start_with, Req, T0};
use ratelimit_policyd::clock::ManualClock;
use ratelimit_policyd::persist::memory::MemoryBackend;
use ratelimit_policyd::persist::sqlite::SqliteBackend;
use ratelimit_policyd::persist::Backend;
use ratelimit_policyd::stats::DbState;
use ratelimit_policyd::stats::Stats;

const ALICE: &str = "alice@example.com";

async fn stored_used<B: Backend>(backend: &B, key: &str) -> Option<u32> {
    backend
        .load_all()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.key == key)
        .map(|r| r.used)
}

#[tokio::test]
async fn flushes_write_exact_deltas_to_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(SqliteBackend::open(&dir.path().join("r.db"), "ratelimit").unwrap());
    let mut s = start_with(
        "[limits]\ndefault_quota = 100\n",
        Arc::clone(&backend),
        ManualClock::new(T0),
    )
    .await;
    let mut c = s.client().await;
    for n in 0..3 {
        c.ask(&Req::rcpt(ALICE, "i1", &format!("{n}@x"))).await;
    }
    assert_eq!(
        stored_used(&*backend, ALICE).await,
        None,
        "nothing is written on the request path"
    );
    assert_eq!(s.daemon().flush.flush().await, Ok(1));
    assert_eq!(stored_used(&*backend, ALICE).await, Some(3));
    assert_eq!(
        s.daemon().flush.flush().await,
        Ok(0),
        "nothing changed, nothing written"
    );
    for n in 3..5 {
        c.ask(&Req::rcpt(ALICE, "i1", &format!("{n}@x"))).await;
    }
    s.daemon().flush.flush().await.unwrap();
    assert_eq!(stored_used(&*backend, ALICE).await, Some(5));
    c.ask(&Req::rcpt(ALICE, "i2", "z@x")).await;
    assert_eq!(s.stop().await.rows, 1, "the final flush writes the rest");
    assert_eq!(stored_used(&*backend, ALICE).await, Some(6));
}

#[tokio::test]
async fn two_daemons_on_one_database_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let toml = "[limits]\ndefault_quota = 1000\n";
    let mut a = start_with(
        toml,
        Arc::new(SqliteBackend::open(&path, "ratelimit").unwrap()),
        ManualClock::new(T0),
    )
    .await;
    let mut b = start_with(
        toml,
        Arc::new(SqliteBackend::open(&path, "ratelimit").unwrap()),
        ManualClock::new(T0),
    )
    .await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    for n in 0..7 {
        ca.ask(&Req::rcpt(ALICE, "a", &format!("{n}@x"))).await;
        if n < 4 {
            cb.ask(&Req::rcpt(ALICE, "b", &format!("{n}@x"))).await;
        }
        if n == 2 {
            a.daemon().flush.flush().await.unwrap();
            b.daemon().flush.flush().await.unwrap();
        }
    }
    a.stop().await;
    b.stop().await;
    let check = SqliteBackend::open(&path, "ratelimit").unwrap();
    assert_eq!(stored_used(&check, ALICE).await, Some(11));
}

#[tokio::test]
async fn an_outage_loses_nothing_and_requests_go_on() {
    let backend = Arc::new(MemoryBackend::default());
    let mut s = start_with(
        "[limits]\ndefault_quota = 5\n",
        Arc::clone(&backend),
        ManualClock::new(T0),
    )
    .await;
    let mut c = s.client().await;
    c.ask(&Req::rcpt(ALICE, "i1", "a@x")).await;
    s.daemon().flush.flush().await.unwrap();

    backend.set_failing(true);
    // Requests are answered from memory with the same rules, new senders included.
    for n in 0..5 {
        let a = c.ask(&Req::rcpt(ALICE, "i2", &format!("{n}@x"))).await;
        assert_eq!(a == "DUNNO", n < 4, "request {n}: {a}");
    }
    assert_eq!(
        c.ask(&Req::rcpt("new@example.com", "i3", "a@x")).await,
        "DUNNO"
    );
    assert!(s.daemon().flush.flush().await.is_err());
    assert!(
        s.daemon().flush.flush().await.is_err(),
        "deltas survive repeated failures"
    );
    let stats = &s.daemon().stats;
    assert!(matches!(
        stats.database.lock().state(),
        DbState::Down { .. }
    ));
    assert_eq!(Stats::get(&stats.flush_failures), 2);
    assert_eq!(backend.row(ALICE).unwrap().used, 1);
    assert!(is_deferred(&c.ask(&Req::rcpt(ALICE, "i4", "z@x")).await));

    backend.set_failing(false);
    // The batch held back since the first failure (2 rows), then the unit
    // counted after it (1 row).
    assert_eq!(s.daemon().flush.flush().await, Ok(3));
    assert_eq!(backend.row(ALICE).unwrap().used, 7);
    assert_eq!(backend.row("new@example.com").unwrap().used, 1);
    assert!(stats.database.lock().state() == DbState::Up);
    s.stop().await;
}

/// Without being asked, the flusher retries a failed flush after 1 s, 2 s,
/// 4 s, ... (capped at 60 s), and goes back to `flush_interval` once it works.
#[tokio::test(start_paused = true)]
async fn failed_flushes_are_retried_with_capped_backoff() {
    let backend = Arc::new(MemoryBackend::default());
    let mut s = start_with(
        "[limits]\ndefault_quota = 5\n[database]\nflush_interval = \"5s\"\n",
        Arc::clone(&backend),
        ManualClock::new(T0),
    )
    .await;
    s.client().await.ask(&Req::rcpt(ALICE, "i1", "a@x")).await;
    backend.set_failing(true);
    // Attempts at 5 s (the interval), then +1, +2, +4, +8, +16, +32, +60, +60.
    let mut attempts_at = Vec::new();
    let start = tokio::time::Instant::now();
    while attempts_at.len() < 9 {
        assert!(
            start.elapsed() < Duration::from_secs(1000),
            "retries stopped: {attempts_at:?}"
        );
        let seen = backend.attempts();
        tokio::time::sleep(Duration::from_millis(100)).await; // virtual time
        if backend.attempts() > seen {
            attempts_at.push(start.elapsed().as_secs());
        }
    }
    assert_eq!(attempts_at, [5, 6, 8, 12, 20, 36, 68, 128, 188]);
    backend.set_failing(false);
    while backend.row(ALICE).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(1000),
            "the backlog was never written"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        start.elapsed().as_secs(),
        248,
        "the next retry wrote the backlog"
    );
    assert_eq!(backend.row(ALICE).unwrap().used, 1);
    s.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_final_flush_that_cannot_write_reports_the_loss() {
    let backend = Arc::new(MemoryBackend::default());
    let mut s = start_with("", Arc::clone(&backend), ManualClock::new(T0)).await;
    let mut c = s.client().await;
    for n in 0..3 {
        c.ask(&Req::rcpt(ALICE, "i1", &format!("{n}@x"))).await;
    }
    backend.set_failing(true);
    let report = s.stop().await;
    assert_eq!(report.units_lost, 3);
    assert!(report.error.is_some());
    assert!(
        backend.attempts() > 1,
        "the final flush retried: {report:?} {}",
        backend.attempts()
    );
}

/// Every `reconcile_interval` the flusher reads every row again (the
/// backstop for edits that leave `updated` alone); a failed re-read is
/// retried like a refresh.
#[tokio::test(start_paused = true)]
async fn every_row_is_read_again_every_reconcile_interval() {
    let backend = Arc::new(MemoryBackend::default());
    let mut s = start_with(
        "[database]\nrefresh_interval = \"30s\"\nreconcile_interval = \"300s\"\n",
        Arc::clone(&backend),
        ManualClock::new(T0),
    )
    .await;
    assert_eq!(backend.scans(), 1, "the start-up load");
    let start = tokio::time::Instant::now();
    let mut scans_at = Vec::new();
    while scans_at.len() < 3 {
        let seen = backend.scans();
        tokio::time::sleep(Duration::from_millis(100)).await; // virtual time
        if backend.scans() > seen {
            scans_at.push(start.elapsed().as_secs());
        }
    }
    assert_eq!(scans_at, [300, 600, 900]);
    s.stop().await;
}

/// A database that never loads stays down from the first failure on: a
/// retry whose first step touches nothing must not count as a success (the
/// log would say "available again" at every retry, and `status` would move
/// "down since" along).
#[tokio::test]
async fn a_database_failing_at_start_stays_down_since_the_first_failure() {
    let backend = Arc::new(MemoryBackend::default());
    backend.set_failing(true);
    let mut s = start_with("", Arc::clone(&backend), ManualClock::new(T0)).await;
    for _ in 0..3 {
        s.clock.advance(30);
        assert!(s.daemon().flush.refresh().await.is_err());
    }
    let health = s.daemon().stats.database.lock().clone();
    assert_eq!(health.state(), DbState::Down { since: T0 });
    assert!(!health.loaded);
    assert_eq!(health.reads.last_ok, 0, "nothing ever worked");
    backend.set_failing(false);
    s.clock.advance(30);
    s.daemon().flush.refresh().await.unwrap();
    let health = s.daemon().stats.database.lock().clone();
    assert_eq!(health.state(), DbState::Up);
    assert!(health.loaded);
    s.stop().await;
}
