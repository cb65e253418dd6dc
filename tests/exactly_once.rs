//! SPEC §6 "exactly once": counts are never lost, doubled or resurrected
//! when a flush fails, hangs or ends with an unknown outcome, when a reload,
//! a reset or a set-quota races with it, and admin edits made straight in the
//! database reach the running daemon. Real SQLite files locked by a second
//! connection, real MariaDB behind a proxy that swallows a COMMIT's reply.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::mysql::{admin_url, TestDb};
use common::proxy::Proxy;
use common::{start_with, Req, TestServer, T0};
use ratelimit_policyd::clock::ManualClock;
use ratelimit_policyd::config::ConfigSource;
use ratelimit_policyd::daemon::{self, Listeners};
use ratelimit_policyd::persist::mysql::MysqlBackend;
use ratelimit_policyd::persist::sqlite::SqliteBackend;
use ratelimit_policyd::persist::Backend;
use ratelimit_policyd::server::Listener;
use ratelimit_policyd::stats::DbState;
use tokio_util::sync::CancellationToken;

const ALICE: &str = "alice@example.com";

/// Starts the daemon with a configuration file, so that reload works.
async fn start_with_file<B: Backend>(
    dir: &Path,
    toml: &str,
    backend: Arc<B>,
    clock: ManualClock,
) -> TestServer<B> {
    let path = dir.join("ratelimit-policyd.toml");
    let toml = format!("listen = \"127.0.0.1:0\"\n{toml}");
    std::fs::write(&path, &toml).unwrap();
    let source = ConfigSource {
        path,
        required: true,
        use_env: false,
        overrides: Vec::new(),
    };
    let (_, config) = source.load().unwrap();
    let listener = Listener::bind(&config.listen).await.unwrap();
    let shutdown = CancellationToken::new();
    let daemon = daemon::start(
        &config,
        Some(source),
        Arc::clone(&backend),
        Arc::new(clock.clone()),
        Listeners {
            policy: listener,
            control: None,
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let addr = match daemon.local_addr {
        ratelimit_policyd::config::ListenAddr::Tcp(a) => a,
        _ => unreachable!(),
    };
    TestServer {
        addr,
        clock,
        backend,
        shutdown,
        daemon: Some(daemon),
    }
}

async fn send(s: &TestServer<impl Backend>, key: &str, n: usize, tag: &str) {
    let mut c = s.client().await;
    for i in 0..n {
        c.ask(&Req::rcpt(key, &format!("{tag}{i}"), "r@x")).await;
    }
}

/// Waits until the flusher has taken the pending units of `key` (a flush is
/// in flight): a condition, polled, never a fixed sleep.
async fn until_taken(s: &TestServer<impl Backend>, key: &str) {
    for _ in 0..10_000 {
        if s.daemon().store.get(key).is_some_and(|c| c.pending == 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("the flush never took the pending units");
}

fn sqlite_used(db: &Path, key: &str) -> Option<u32> {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row("SELECT used FROM ratelimit WHERE sender = ?1", [key], |r| {
        r.get(0)
    })
    .ok()
}

/// Case 1: a reload re-reads the rows while a flush is in flight; the units
/// of that flush are neither in the row it reads nor pending any more. The
/// re-read must not lower the count in memory. The flush hangs on a row lock
/// that a second session holds (as an administrator's open transaction
/// would), while plain reads go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_a_flush_loses_nothing_in_memory() {
    use mysql_async::prelude::Queryable;
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(&admin_url(), "reload").await;
    let mut s = start_with_file(
        dir.path(),
        "[limits]\ndefault_quota = 1000\ntimezone = \"UTC\"\n",
        mysql(&db.url()),
        ManualClock::new(T0),
    )
    .await;
    send(&s, ALICE, 50, "a").await;
    s.daemon().flush.flush().await.unwrap();
    send(&s, ALICE, 50, "b").await;

    let pool = mysql_async::Pool::new(db.url().as_str());
    let mut locker = pool.get_conn().await.unwrap();
    locker.query_drop("BEGIN").await.unwrap();
    locker
        .query_drop("SELECT used FROM ratelimit WHERE sender = 'alice@example.com' FOR UPDATE")
        .await
        .unwrap();
    let flush = s.daemon().flush.clone();
    let flushing = tokio::spawn(async move { flush.flush().await });
    until_taken(&s, ALICE).await;
    let reload = s.daemon().reload.clone();
    let mut reloading = tokio::spawn(async move { reload.reload().await });
    // Give a reload that does not wait for the flush every chance to run
    // while the lock is held (a correct one cannot finish meanwhile).
    let early = tokio::time::timeout(Duration::from_millis(500), &mut reloading).await;
    assert!(
        early.is_err(),
        "the re-read finished while the flush was still held by the lock: {early:?}"
    );
    locker.query_drop("ROLLBACK").await.unwrap();
    drop(locker);
    pool.disconnect().await.unwrap();
    let _ = flushing.await.unwrap();
    if early.is_err() {
        let _ = reloading.await;
    }
    s.daemon().flush.flush().await.unwrap();

    assert_eq!(db.row(ALICE).await.map(|r| r.1), Some(100), "stored");
    assert_eq!(s.used(ALICE), 100, "memory after the reload");
    s.stop().await;
}

/// Case 3: a reset while a flush hangs and then fails must win over the
/// units that flush carried, however it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_during_a_failing_flush_is_not_undone() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let backend = Arc::new(SqliteBackend::open(&db, "ratelimit").unwrap());
    let mut s = start_with(
        "[limits]\ndefault_quota = 1000\ntimezone = \"UTC\"\n",
        backend,
        ManualClock::new(T0),
    )
    .await;
    send(&s, ALICE, 30, "a").await;
    let locker = rusqlite::Connection::open(&db).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let flush = s.daemon().flush.clone();
    let flushing = tokio::spawn(async move { flush.flush().await });
    until_taken(&s, ALICE).await;
    assert!(s.daemon().store.reset(ALICE).is_some());
    send(&s, ALICE, 5, "b").await;
    assert!(
        flushing.await.unwrap().is_err(),
        "the flush failed on the lock"
    );
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);
    s.daemon().flush.flush().await.unwrap();
    assert_eq!(sqlite_used(&db, ALICE), Some(5), "stored after the reset");
    assert_eq!(s.used(ALICE), 5, "memory after the reset");
    s.stop().await;
    assert_eq!(sqlite_used(&db, ALICE), Some(5));
}

fn mysql(url: &str) -> Arc<MysqlBackend> {
    Arc::new(MysqlBackend::new(url, None, "ratelimit").unwrap())
}

/// Case 2: the server carries out a COMMIT whose reply never arrives. The
/// retry must not apply the same units a second time.
#[tokio::test]
async fn a_commit_with_an_unknown_outcome_is_not_applied_twice() {
    let db = TestDb::create(&admin_url(), "ambiguous").await;
    let proxy = Proxy::start("127.0.0.1:3306");
    let backend = mysql(&proxy.url_for(&db.url()));
    let mut s = start_with(
        "[limits]\ndefault_quota = 1000\ntimezone = \"UTC\"\n",
        backend,
        ManualClock::new(T0),
    )
    .await;
    send(&s, ALICE, 150, "a").await;
    proxy.swallow_next_commit_reply();
    assert!(
        s.daemon().flush.flush().await.is_err(),
        "the client never heard back"
    );
    assert_eq!(proxy.swallowed(), 1);
    assert_eq!(
        db.row(ALICE).await.map(|r| r.1),
        Some(150),
        "the server did commit"
    );
    s.daemon().flush.flush().await.unwrap();
    assert_eq!(
        db.row(ALICE).await.map(|r| r.1),
        Some(150),
        "applied exactly once"
    );
    send(&s, ALICE, 7, "b").await;
    s.stop().await;
    assert_eq!(db.row(ALICE).await.map(|r| r.1), Some(157));
}

/// Case 4: an administrator's edit that does not touch `updated` (as panels
/// and the Perl daemon's users do) reaches the daemon at its refresh.
#[tokio::test]
async fn an_admin_edit_without_updated_is_seen_by_the_refresh() {
    let db = TestDb::create(&admin_url(), "edit").await;
    let mut s = start_with(
        "[limits]\ndefault_quota = 1000\ntimezone = \"UTC\"\n",
        mysql(&db.url()),
        ManualClock::new(T0),
    )
    .await;
    send(&s, ALICE, 3, "a").await;
    s.daemon().flush.flush().await.unwrap();
    // The row was written a while ago, and a refresh has run since.
    db.exec(
        "UPDATE ratelimit SET updated = NOW() - INTERVAL 1 DAY WHERE sender = 'alice@example.com'",
    )
    .await;
    s.daemon().flush.refresh().await.unwrap();
    // A panel blocks the account, without touching `updated`.
    db.exec("UPDATE ratelimit SET quota = 0, persist = 1 WHERE sender = 'alice@example.com'")
        .await;
    s.daemon().flush.refresh().await.unwrap();
    let mut c = s.client().await;
    let answer = c.ask(&Req::rcpt(ALICE, "b", "r@x")).await;
    assert!(
        common::is_deferred(&answer),
        "a blocked account is refused: {answer}"
    );
    s.stop().await;
}

/// Case 5: flushing rows that exist must not use up AUTO_INCREMENT ids (the
/// Perl table's `id` is INT: a busy site would run out).
#[tokio::test]
async fn updating_existing_rows_consumes_no_ids() {
    use mysql_async::prelude::Queryable;
    let db = TestDb::create(&admin_url(), "ids").await;
    let mut s = start_with(
        "[limits]\ndefault_quota = 1000\ntimezone = \"UTC\"\n",
        mysql(&db.url()),
        ManualClock::new(T0),
    )
    .await;
    let keys: Vec<String> = (0..150).map(|i| format!("user{i}@example.com")).collect();
    let mut c = s.client().await;
    for k in &keys {
        c.ask(&Req::rcpt(k, "a", "r@x")).await;
    }
    s.daemon().flush.flush().await.unwrap();
    let next_id = || async {
        let pool = mysql_async::Pool::new(db.url().as_str());
        let mut conn = pool.get_conn().await.unwrap();
        let v: Option<u64> = conn
            .exec_first(
                "SELECT AUTO_INCREMENT FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = 'ratelimit'",
                (db.name.as_str(),),
            )
            .await
            .unwrap();
        drop(conn);
        pool.disconnect().await.unwrap();
        v.unwrap()
    };
    let before = next_id().await;
    for round in 0..3 {
        for k in &keys {
            c.ask(&Req::rcpt(k, &format!("r{round}"), "r@x")).await;
        }
        s.daemon().flush.flush().await.unwrap();
    }
    assert_eq!(next_id().await, before, "450 updates, no id used");
    c.ask(&Req::rcpt("new@example.com", "n", "r@x")).await;
    s.daemon().flush.flush().await.unwrap();
    assert_eq!(next_id().await, before + 1, "one new sender, one id");
    s.stop().await;
}

/// Case 9: "up" only after an operation on the database worked. A flush
/// with nothing to write proves nothing.
#[tokio::test]
async fn a_database_that_never_answered_is_not_reported_up() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut s = start_with(
        "[limits]\ndefault_quota = 10\ntimezone = \"UTC\"\n",
        mysql(&format!("mysql://root@127.0.0.1:{port}/nothing")),
        ManualClock::new(T0),
    )
    .await;
    assert_eq!(s.daemon().flush.flush().await, Ok(0), "nothing to write");
    let stats = &s.daemon().stats;
    assert!(
        matches!(stats.database.lock().state(), DbState::Down { .. }),
        "never reached, never up"
    );
    s.stop().await;
}

/// Case 9: writes refused (UPDATE revoked) while reads work: the database
/// is not "up".
#[tokio::test]
async fn failing_writes_are_not_hidden_by_working_reads() {
    let db = TestDb::create(&admin_url(), "revoked").await;
    let user = db.name.clone();
    db.exec(&format!(
        "CREATE USER IF NOT EXISTS '{user}'@'127.0.0.1' IDENTIFIED BY 'pw'"
    ))
    .await;
    db.exec(&format!(
        "GRANT SELECT, INSERT ON {}.* TO '{user}'@'127.0.0.1'",
        db.name
    ))
    .await;
    db.exec(&format!(
        "INSERT INTO ratelimit (sender, quota, used, expiry) VALUES ('{ALICE}', 100, 1, {})",
        T0 + 3600
    ))
    .await;
    let url = format!("mysql://{user}:pw@127.0.0.1:3306/{}", db.name);
    let mut s = start_with(
        "[limits]\ndefault_quota = 10\ntimezone = \"UTC\"\n",
        mysql(&url),
        ManualClock::new(T0),
    )
    .await;
    send(&s, ALICE, 2, "a").await;
    assert_eq!(
        s.daemon().stats.database.lock().state(),
        DbState::Up,
        "loaded"
    );
    let err = s.daemon().flush.flush().await.unwrap_err().to_string();
    assert!(err.contains("1142"), "UPDATE is denied: {err}");
    s.daemon().flush.refresh().await.unwrap();
    let health = s.daemon().stats.database.lock().clone();
    assert!(
        matches!(health.state(), DbState::Down { .. }),
        "writes keep failing: not up"
    );
    let (op, _, error) = health.last_error().unwrap();
    assert_eq!(op, ratelimit_policyd::stats::Op::Write);
    assert!(error.contains("1142"), "{error}");
    s.stop().await;
}

/// A full re-read while a failed batch waits to be sent again: its units are
/// not in the database yet, and must not disappear from memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reread_while_a_batch_is_held_back_keeps_its_units() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let backend = Arc::new(SqliteBackend::open(&db, "ratelimit").unwrap());
    let mut s = start_with(
        "[limits]\ndefault_quota = 1000\ntimezone = \"UTC\"\n",
        backend,
        ManualClock::new(T0),
    )
    .await;
    send(&s, ALICE, 10, "a").await;
    s.daemon().flush.flush().await.unwrap();
    send(&s, ALICE, 5, "b").await;
    let locker = rusqlite::Connection::open(&db).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    assert!(s.daemon().flush.flush().await.is_err(), "locked");
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);
    assert_eq!(s.daemon().flush.reconcile().await, Ok(1));
    assert_eq!(s.used(ALICE), 15, "10 stored + 5 held back");
    s.daemon().flush.flush().await.unwrap();
    assert_eq!(sqlite_used(&db, ALICE), Some(15));
    s.daemon().flush.reconcile().await.unwrap();
    assert_eq!(s.used(ALICE), 15);
    s.stop().await;
}

/// Case 4 on a table as the Perl schema made it (no ON UPDATE on
/// `updated`): hand edits that leave `updated` alone — a block, a reset, a
/// DELETE — are invisible to the refresh and take effect at the next full
/// re-read; the daemon warns at start that the column lacks ON UPDATE.
#[tokio::test]
async fn hand_edits_on_a_perl_table_take_effect_at_the_full_reread() {
    let db = TestDb::create(&admin_url(), "perledit").await;
    db.exec("ALTER TABLE ratelimit MODIFY updated TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP")
        .await;
    let backend = mysql(&db.url());
    let warnings = backend.inspect().await.unwrap().warnings;
    assert!(
        warnings.iter().any(|w| w.contains("ON UPDATE")),
        "{warnings:?}"
    );
    let mut s = start_with(
        "[limits]\ndefault_quota = 10\ntimezone = \"UTC\"\n",
        backend,
        ManualClock::new(T0),
    )
    .await;
    for (key, n) in [(ALICE, 3), ("bob@example.com", 4), ("carol@example.com", 2)] {
        send(&s, key, n, "a").await;
    }
    s.daemon().flush.flush().await.unwrap();
    db.exec("UPDATE ratelimit SET updated = NOW() - INTERVAL 1 DAY")
        .await;
    s.daemon().flush.refresh().await.unwrap();
    // A panel blocks alice, resets bob and deletes carol, as the Perl
    // daemon's users do: without touching `updated`.
    db.exec("UPDATE ratelimit SET quota = 0, persist = 1 WHERE sender = 'alice@example.com'")
        .await;
    db.exec("UPDATE ratelimit SET used = 0 WHERE sender = 'bob@example.com'")
        .await;
    db.exec("DELETE FROM ratelimit WHERE sender = 'carol@example.com'")
        .await;
    assert_eq!(s.daemon().flush.refresh().await, Ok(0), "invisible to it");
    assert_eq!(s.used("bob@example.com"), 4);
    assert_eq!(s.daemon().flush.reconcile().await, Ok(2));
    let mut c = s.client().await;
    assert!(common::is_deferred(
        &c.ask(&Req::rcpt(ALICE, "b", "r@x")).await
    ));
    assert_eq!(s.used("bob@example.com"), 0, "reset by hand");
    assert!(
        s.daemon().store.get("carol@example.com").is_none(),
        "deleted by hand: a new sender again"
    );
    c.ask(&Req::rcpt("carol@example.com", "c", "r@x")).await;
    s.stop().await;
    assert_eq!(db.row("carol@example.com").await.map(|r| r.1), Some(1));
    assert_eq!(db.row("bob@example.com").await.map(|r| r.1), Some(0));
}

/// A set-quota and a reset taken into a batch that then fails must not be
/// undone in memory by a refresh or re-read before the batch is written
/// (the database still holds the old quota and usage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_in_a_failed_batch_survive_a_reread() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let backend = Arc::new(SqliteBackend::open(&db, "ratelimit").unwrap());
    let mut s = start_with(
        "[limits]\ndefault_quota = 1000\ntimezone = \"UTC\"\n",
        backend,
        ManualClock::new(T0),
    )
    .await;
    let limit = common::config("[limits]\ndefault_quota = 1000\ntimezone = \"UTC\"\n")
        .policy
        .limit;
    send(&s, ALICE, 10, "a").await;
    send(&s, "bob@example.com", 10, "b").await;
    s.daemon().flush.flush().await.unwrap();
    // Block alice, reset bob; the flush that carries both fails.
    s.daemon().store.set_quota(ALICE, 0, true, T0, &limit);
    s.daemon().store.reset("bob@example.com");
    let locker = rusqlite::Connection::open(&db).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    assert!(s.daemon().flush.flush().await.is_err(), "locked");
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);
    s.daemon().flush.reconcile().await.unwrap();
    s.daemon().flush.refresh().await.unwrap();
    let mut c = s.client().await;
    assert!(
        common::is_deferred(&c.ask(&Req::rcpt(ALICE, "c", "r@x")).await),
        "still blocked"
    );
    assert_eq!(s.used("bob@example.com"), 0, "still reset");
    s.daemon().flush.flush().await.unwrap();
    assert_eq!(sqlite_used(&db, "bob@example.com"), Some(0));
    s.stop().await;
}

/// An administrator deletes a blocked sender's row (to forget it, as with
/// the Perl daemon) while a batch for it waits to be sent again: the batch
/// must not bring the block back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_deleted_while_its_batch_waits_is_not_resurrected() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let backend = Arc::new(SqliteBackend::open(&db, "ratelimit").unwrap());
    let mut s = start_with(
        "[limits]\ndefault_quota = 1000\ntimezone = \"UTC\"\n",
        backend,
        ManualClock::new(T0),
    )
    .await;
    let limit = common::config("[limits]\ndefault_quota = 1000\ntimezone = \"UTC\"\n")
        .policy
        .limit;
    s.daemon().store.set_quota(ALICE, 0, true, T0, &limit);
    s.daemon().flush.flush().await.unwrap();
    send(&s, ALICE, 1, "a").await;
    let locker = rusqlite::Connection::open(&db).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    assert!(s.daemon().flush.flush().await.is_err(), "locked");
    locker.execute_batch("ROLLBACK").unwrap();
    locker
        .execute("DELETE FROM ratelimit WHERE sender = ?1", [ALICE])
        .unwrap();
    drop(locker);
    s.daemon().flush.flush().await.unwrap();
    s.daemon().flush.reconcile().await.unwrap();
    let mut c = s.client().await;
    assert_eq!(
        c.ask(&Req::rcpt(ALICE, "b", "r@x")).await,
        "DUNNO",
        "a deleted row makes a new sender"
    );
    s.stop().await;
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (quota, persist): (u32, bool) = conn
        .query_row(
            "SELECT quota, persist FROM ratelimit WHERE sender = ?1",
            [ALICE],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((quota, persist), (1000, false));
}

/// Rows the table's collation holds equal to a key without being the same
/// string (a trailing space under PAD SPACE, written by another program) are
/// that key's row; a key the column cannot hold (not latin1, on a latin1
/// table) is set aside. Neither may stall the flushes of everyone else.
#[tokio::test]
async fn keys_the_table_sees_differently_never_stall_the_flushes() {
    let db = TestDb::create(&admin_url(), "collation").await;
    let mut s = start_with(
        "[limits]\ndefault_quota = 1000\ntimezone = \"UTC\"\n",
        mysql(&db.url()),
        ManualClock::new(T0),
    )
    .await;
    db.exec(&format!(
        "INSERT INTO ratelimit (sender, quota, used, expiry) VALUES ('alice@example.com ', 1000, 4, {})",
        T0 / 86_400 * 86_400 + 86_400
    ))
    .await;
    send(&s, ALICE, 3, "a").await;
    send(&s, "bob@example.com", 2, "b").await;
    assert_eq!(s.daemon().flush.flush().await, Ok(2));
    assert_eq!(db.row("alice@example.com ").await.map(|r| r.1), Some(7));
    assert_eq!(db.row("bob@example.com").await.map(|r| r.1), Some(2));
    // The refresh sees the row under its odd name and folds it into the key.
    s.daemon().flush.refresh().await.unwrap();
    assert_eq!(s.used(ALICE), 7, "4 written by the other program + 3");
    let names: Vec<String> = {
        use mysql_async::prelude::Queryable;
        let pool = mysql_async::Pool::new(db.url().as_str());
        let v = pool
            .get_conn()
            .await
            .unwrap()
            .query("SELECT CONCAT('[', sender, ']') FROM ratelimit ORDER BY sender")
            .await
            .unwrap();
        pool.disconnect().await.unwrap();
        v
    };
    assert_eq!(names, ["[alice@example.com]", "[bob@example.com]"]);

    // A latin1 column (some Perl sites): a key with 'ś' cannot be stored.
    db.exec("ALTER TABLE ratelimit MODIFY sender VARCHAR(255) CHARACTER SET latin1 COLLATE latin1_bin NOT NULL")
        .await;
    send(&s, "śmiały@example.com", 2, "c").await;
    send(&s, "bob@example.com", 1, "d").await;
    send(&s, "carol@example.com", 1, "e").await;
    assert_eq!(s.daemon().flush.flush().await, Ok(3));
    assert_eq!(db.row("bob@example.com").await.map(|r| r.1), Some(3));
    assert_eq!(db.row("carol@example.com").await.map(|r| r.1), Some(1));
    assert_eq!(s.used("śmiały@example.com"), 2, "limited in memory");
    send(&s, "bob@example.com", 1, "f").await;
    assert_eq!(s.daemon().flush.flush().await, Ok(1), "flushes go on");
    s.stop().await;
}

/// Two daemons charge the same 300 senders at the same time and flush every
/// 50 ms into one table, so their transactions overlap: the stored totals
/// are exactly what both counted (lock conflicts are retried, never lost or
/// doubled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_flushing_at_once_add_up_exactly() {
    let db = TestDb::create(&admin_url(), "concurrent").await;
    let toml = "[limits]\ndefault_quota = 1000000\ntimezone = \"UTC\"\n[database]\nflush_interval = \"50ms\"\n";
    let mut a = start_with(toml, mysql(&db.url()), ManualClock::new(T0)).await;
    let mut b = start_with(toml, mysql(&db.url()), ManualClock::new(T0)).await;
    let load = |addr: std::net::SocketAddr, tag: &'static str| {
        tokio::spawn(async move {
            let mut c = common::Client::connect(addr).await;
            for round in 0..10 {
                for k in 0..300 {
                    c.ask(&Req::rcpt(
                        &format!("user{k}@example.com"),
                        &format!("{tag}{round}-{k}"),
                        "r@x",
                    ))
                    .await;
                }
            }
        })
    };
    let (la, lb) = (load(a.addr, "a"), load(b.addr, "b"));
    la.await.unwrap();
    lb.await.unwrap();
    assert!(a.stop().await.error.is_none());
    assert!(b.stop().await.error.is_none());
    use mysql_async::prelude::Queryable;
    let pool = mysql_async::Pool::new(db.url().as_str());
    let (rows, total): (u64, u64) = pool
        .get_conn()
        .await
        .unwrap()
        .query_first("SELECT COUNT(*), CAST(SUM(used) AS UNSIGNED) FROM ratelimit")
        .await
        .unwrap()
        .unwrap();
    pool.disconnect().await.unwrap();
    assert_eq!((rows, total), (300, 2 * 10 * 300));
}
