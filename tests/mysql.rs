//! SPEC §6 against the real MariaDB of the machine: the Perl daemon's table,
//! write-behind, several daemons, refresh. Each test has its own database.

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::mysql::{admin_url, TestDb};
use common::{is_deferred, start_with, Req, T0};
use ratelimit_policyd::clock::ManualClock;
use ratelimit_policyd::persist::mysql::MysqlBackend;
use ratelimit_policyd::persist::{Backend, Batch, BatchId, WriteContext, MAX_BATCH_ROWS};
use ratelimit_policyd::store::Delta;

/// T0 is 2026-09-21 14:13:20 UTC; the daily UTC window ends at midnight.
const TOMORROW: i64 = 1_790_035_200;

fn backend(db: &TestDb) -> Arc<MysqlBackend> {
    Arc::new(MysqlBackend::new(&db.url(), None, "ratelimit").unwrap())
}

const LIMITS: &str = "[limits]\ndefault_quota = 5\ntimezone = \"UTC\"\n";

#[tokio::test]
async fn rows_written_by_the_perl_daemon_load_and_enforce() {
    let db = TestDb::create(&admin_url(), "perl").await;
    // As the Perl daemon writes them: INSERT (sender, quota, used, expiry),
    // then UPDATE ... SET used = used + ?, updated = NOW(), expiry = ?.
    for (sender, quota, used, expiry) in [
        ("busy@example.com", 3, 0, T0 + 3600),
        ("old@example.com", 3, 3, T0 - 60),
        ("blocked@example.com", 0, 0, 0),
        ("vip@example.com", 10, 12, T0 - 60),
    ] {
        db.exec(&format!(
            "INSERT INTO ratelimit (sender, quota, used, expiry) VALUES ('{sender}', {quota}, 0, {expiry})"
        ))
        .await;
        db.exec(&format!(
            "UPDATE ratelimit SET used = used + {used}, updated = NOW(), expiry = {expiry} WHERE sender = '{sender}'"
        ))
        .await;
    }
    db.exec("UPDATE ratelimit SET used = 3 WHERE sender = 'busy@example.com'")
        .await;
    // A blocked account: quota 0 that survives window resets.
    db.exec("UPDATE ratelimit SET persist = 1 WHERE sender IN ('vip@example.com', 'blocked@example.com')").await;

    let mut s = start_with(LIMITS, backend(&db), ManualClock::new(T0)).await;
    let mut c = s.client().await;
    let refused = c.ask(&Req::rcpt("busy@example.com", "b", "a@x")).await;
    assert!(
        refused.contains("(4/3)"),
        "the loaded window is enforced: {refused}"
    );
    // The Perl daemon never loaded quota-0 rows; here they block.
    assert!(is_deferred(
        &c.ask(&Req::rcpt("blocked@example.com", "x", "a@x")).await
    ));
    // An expired row starts a new window with the default quota...
    for n in 0..5 {
        assert_eq!(
            c.ask(&Req::rcpt("old@example.com", "o", &format!("{n}@x")))
                .await,
            "DUNNO"
        );
    }
    assert!(is_deferred(
        &c.ask(&Req::rcpt("old@example.com", "o", "6@x")).await
    ));
    // ...unless it is persistent.
    for n in 0..10 {
        assert_eq!(
            c.ask(&Req::rcpt("vip@example.com", "v", &format!("{n}@x")))
                .await,
            "DUNNO"
        );
    }
    assert!(s.stop().await.error.is_none());
    assert_eq!(
        db.row("busy@example.com").await,
        Some((3, 4, T0 + 3600, false))
    );
    assert_eq!(
        db.row("blocked@example.com").await,
        Some((0, 1, TOMORROW, true))
    );
    assert_eq!(
        db.row("old@example.com").await,
        Some((5, 6, TOMORROW, false))
    );
    assert_eq!(
        db.row("vip@example.com").await,
        Some((10, 10, TOMORROW, true))
    );
}

#[tokio::test]
async fn new_senders_are_inserted_and_admin_changes_land() {
    let db = TestDb::create(&admin_url(), "insert").await;
    let mut s = start_with(LIMITS, backend(&db), ManualClock::new(T0)).await;
    let mut c = s.client().await;
    for n in 0..3 {
        c.ask(&Req::rcpt("new@example.com", "i", &format!("{n}@x")))
            .await;
    }
    assert_eq!(s.daemon().flush.flush().await, Ok(1));
    assert_eq!(
        db.row("new@example.com").await,
        Some((5, 3, TOMORROW, false))
    );
    // An admin's quota and reset go in as given, not as deltas.
    let store = &s.daemon().store;
    let limit = common::config(LIMITS).policy.limit;
    store.set_quota("new@example.com", 50, true, T0, &limit);
    store.reset("new@example.com");
    c.ask(&Req::rcpt("new@example.com", "j", "a@x")).await;
    s.daemon().flush.flush().await.unwrap();
    assert_eq!(
        db.row("new@example.com").await,
        Some((50, 1, TOMORROW, true))
    );
    // A key the Perl column cannot hold (4-byte UTF-8 in a `utf8` column)
    // is limited in memory and does not stop the others from being written.
    c.ask(&Req::rcpt("emoji😀@example.com", "k", "a@x")).await;
    c.ask(&Req::rcpt("other@example.com", "k", "a@x")).await;
    assert_eq!(s.daemon().flush.flush().await, Ok(2));
    assert_eq!(s.used("emoji😀@example.com"), 1);
    {
        use mysql_async::prelude::Queryable;
        let pool = mysql_async::Pool::new(db.url().as_str());
        let rows: Option<u64> = pool
            .get_conn()
            .await
            .unwrap()
            .query_first("SELECT COUNT(*) FROM ratelimit WHERE sender LIKE 'emoji%'")
            .await
            .unwrap();
        pool.disconnect().await.unwrap();
        assert_eq!(rows, Some(0), "not stored");
    }
    // A key longer than any column holds gets no counter at all.
    let long = format!("{}@example.com", "x".repeat(300));
    assert!(c
        .ask(&Req::rcpt(&long, "k", "a@x"))
        .await
        .starts_with("DEFER_IF_PERMIT 4.7.1 sender login too long"));
    assert!(s.daemon().store.get(&long).is_none());
    assert_eq!(
        db.row("other@example.com").await,
        Some((5, 1, TOMORROW, false))
    );
    s.stop().await;
}

#[tokio::test]
async fn two_daemons_on_one_database_converge_to_the_exact_sum() {
    let db = TestDb::create(&admin_url(), "two").await;
    let toml = "[limits]\ndefault_quota = 1000\ntimezone = \"UTC\"\n";
    let mut a = start_with(toml, backend(&db), ManualClock::new(T0)).await;
    let mut b = start_with(toml, backend(&db), ManualClock::new(T0)).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let key = "shared@example.com";
    for round in 0..3 {
        for n in 0..7 {
            ca.ask(&Req::rcpt(key, &format!("a{round}"), &format!("{n}@x")))
                .await;
        }
        for n in 0..4 {
            cb.ask(&Req::rcpt(key, &format!("b{round}"), &format!("{n}@x")))
                .await;
        }
        a.daemon().flush.flush().await.unwrap();
        b.daemon().flush.flush().await.unwrap();
    }
    assert_eq!(db.row(key).await.map(|r| r.1), Some(33));
    // A refresh brings each daemon the other's counts, plus its own unflushed ones.
    ca.ask(&Req::rcpt(key, "a9", "z@x")).await;
    a.daemon().flush.refresh().await.unwrap();
    b.daemon().flush.refresh().await.unwrap();
    assert_eq!(a.used(key), 34, "33 stored + 1 pending");
    assert_eq!(b.used(key), 33);
    a.stop().await;
    b.stop().await;
    assert_eq!(db.row(key).await.map(|r| r.1), Some(34));
}

#[tokio::test]
async fn an_admin_update_takes_effect_after_a_refresh() {
    let db = TestDb::create(&admin_url(), "admin").await;
    let mut s = start_with(LIMITS, backend(&db), ManualClock::new(T0)).await;
    let mut c = s.client().await;
    c.ask(&Req::rcpt("alice@example.com", "i", "a@x")).await;
    s.daemon().flush.flush().await.unwrap();
    db.exec("UPDATE ratelimit SET quota = 2, persist = 1, updated = NOW() WHERE sender = 'alice@example.com'")
        .await;
    assert!(s.daemon().flush.refresh().await.unwrap() >= 1);
    assert_eq!(
        c.ask(&Req::rcpt("alice@example.com", "i", "b@x")).await,
        "DUNNO"
    );
    let refused = c.ask(&Req::rcpt("alice@example.com", "i", "c@x")).await;
    assert!(refused.contains("(3/2)"), "{refused}");
    // Usage another daemon added shows up too.
    db.exec(
        "UPDATE ratelimit SET used = used + 10, updated = NOW() WHERE sender = 'alice@example.com'",
    )
    .await;
    s.daemon().flush.refresh().await.unwrap();
    assert_eq!(
        s.used("alice@example.com"),
        13,
        "2 flushed + 10 elsewhere + 1 pending"
    );
    s.stop().await;
}

/// Load and flush times for 100k rows; printed, not asserted (shared, noisy
/// machines). Run with `--nocapture` to see them.
#[tokio::test]
async fn load_and_flush_times_for_100k_rows() {
    let db = TestDb::create(&admin_url(), "bulk").await;
    let backend = backend(&db);
    let n = 100_000;
    let deltas: Vec<Delta> = (0..n)
        .map(|i| Delta {
            key: format!("user{i}@example.com").into(),
            delta: 1 + (i % 7) as u32,
            window_expiry: TOMORROW,
            quota: 1000,
            persist: false,
            set_quota: false,
            reset_used: false,
            had_row: false,
        })
        .collect();
    let ctx = WriteContext {
        default_quota: 1000,
        now: T0,
    };
    // As the flusher writes them: batches of MAX_BATCH_ROWS, one after the other.
    let mut id = BatchId::first();
    let mut flush = || {
        let batches: Vec<Arc<Batch>> = deltas
            .chunks(MAX_BATCH_ROWS)
            .map(|chunk| {
                id = id.next();
                Arc::new(Batch {
                    id,
                    deltas: chunk.to_vec(),
                })
            })
            .collect();
        let backend = Arc::clone(&backend);
        async move {
            for batch in batches {
                backend.write(batch, ctx).await.unwrap();
            }
        }
    };
    let started = Instant::now();
    flush().await;
    let insert = started.elapsed();
    let started = Instant::now();
    flush().await;
    let update = started.elapsed();
    let started = Instant::now();
    let rows = backend.load_all().await.unwrap();
    let load = started.elapsed();
    assert_eq!(rows.len(), n);
    let total: u64 = rows.iter().map(|r| u64::from(r.used)).sum();
    let expected: u64 = deltas.iter().map(|d| 2 * u64::from(d.delta)).sum();
    assert_eq!(total, expected, "every delta applied twice, none lost");
    println!(
        "mysql 100k rows: flush (insert) {insert:?}, flush (update) {update:?}, load {load:?}"
    );
}

/// The built binary on MySQL, with the password in `database.password_file`:
/// counts survive SIGTERM and a restart enforces them.
#[tokio::test]
async fn the_binary_runs_on_mysql_with_a_password_file() {
    use common::binary::{spawn, write_config};
    let db = TestDb::create(&admin_url(), "bin").await;
    let user = db.name.clone(); // dropped with the database (see TestDb)
    db.exec(&format!(
        "CREATE USER IF NOT EXISTS '{user}'@'127.0.0.1' IDENTIFIED BY 's3cret'"
    ))
    .await;
    db.exec(&format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON {}.* TO '{user}'@'127.0.0.1'",
        db.name
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    std::fs::write(dir.path().join("db-password"), "s3cret\n").unwrap();
    let toml = std::fs::read_to_string(&config).unwrap();
    let sqlite_line = toml
        .lines()
        .find(|l| l.starts_with("url = "))
        .unwrap()
        .to_string();
    let host = admin_url()
        .split_once('@')
        .unwrap()
        .1
        .split_once('/')
        .unwrap()
        .0
        .to_string();
    let mysql = format!(
        "url = \"mysql://{user}@{host}/{}\"\npassword_file = \"{}\"",
        db.name,
        dir.path().join("db-password").display()
    );
    std::fs::write(&config, toml.replace(&sqlite_line, &mysql)).unwrap();

    let d = spawn(&config, &[]);
    let mut c = common::Client::connect(d.addr).await;
    for n in 0..4 {
        c.ask(&Req::rcpt("bin@example.com", "i", &format!("{n}@x")))
            .await;
    }
    assert_eq!(d.terminate(), 0);
    assert_eq!(
        db.row("bin@example.com").await.map(|r| (r.0, r.1)),
        Some((3, 4))
    );
    let d = spawn(&config, &[]);
    let mut c = common::Client::connect(d.addr).await;
    assert!(is_deferred(
        &c.ask(&Req::rcpt("bin@example.com", "j", "a@x")).await
    ));
    assert_eq!(d.terminate(), 0);
    // TestDb's Drop removes the database and the login named after it.
}
