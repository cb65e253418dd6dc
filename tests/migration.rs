//! Migrating from the Perl ratelimit-policyd (README, "Migrating from the
//! Perl daemon"): a table made by the Perl daemon's schema and filled by its
//! own statements, `schema-migrate.sql` run on it, the built binary started
//! with the README's settings for the Perl daemon's DATA wiring, and every
//! row checked afterwards.

mod common;

use mysql_async::prelude::Queryable;

use common::binary::{cli, spawn, stdout, use_database, write_config};
use common::mysql::{admin_url, schema_statements, TestDb};
use common::{is_deferred, Client, Req};

/// The Perl daemon's `mysql-schema.sql` (onlime, 2018), table and view.
const PERL_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS `ratelimit` (
	`id` INT(11) NOT NULL AUTO_INCREMENT,
	`sender` VARCHAR(255) CHARACTER SET 'utf8' COLLATE 'utf8_bin' NOT NULL COMMENT 'sender address (SASL username)',
	`persist` TINYINT(1) NOT NULL DEFAULT '0' COMMENT 'Do not reset the given quota to the default value after expiry reached.',
	`quota` INT(10) UNSIGNED NOT NULL DEFAULT '0' COMMENT 'hourly|daily|weekly|monthly recipient quota limit',
	`used` INT(10) UNSIGNED NOT NULL DEFAULT '0' COMMENT 'current recipient counter',
	`updated` TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP COMMENT 'when used counter was last updated',
	`expiry` INT(10) UNSIGNED DEFAULT '0' COMMENT 'expiry (Unix-timestamp) after which the counter gets reset',
	PRIMARY KEY (`id`),
	UNIQUE INDEX `idx_sender` (`sender` ASC))
ENGINE = InnoDB
DEFAULT CHARACTER SET = utf8
COLLATE = utf8_general_ci;
CREATE OR REPLACE VIEW `view_ratelimit` AS SELECT *, FROM_UNIXTIME(`expiry`) AS `expirytime` FROM `ratelimit`;
";

/// The Perl daemon's statements (`$sql_insertquota`, `$sql_updatequota`).
const PERL_INSERT: &str =
    "INSERT INTO `ratelimit` (`sender`, `quota`, `used`, `expiry`) VALUES (?, ?, ?, ?)";
const PERL_UPDATE: &str = "UPDATE `ratelimit` SET `used` = `used` + ?, `updated` = NOW(), `expiry` = ? WHERE `sender` = ?";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A DATA request as Postfix sends it from `smtpd_data_restrictions`.
fn data(user: &str, instance: &str, recipients: u32) -> Req {
    Req::rcpt(user, instance, "")
        .state("DATA")
        .with("recipient_count", &recipients.to_string())
}

#[tokio::test]
async fn a_perl_database_migrates_without_surprises() {
    let db = TestDb::create_empty(&admin_url(), "perlmig").await;
    let pool = mysql_async::Pool::new(db.url().as_str());
    let mut conn = pool.get_conn().await.unwrap();
    for statement in schema_statements(PERL_SCHEMA) {
        conn.query_drop(statement).await.unwrap();
    }
    // Today's window ends at the next midnight (UTC here, as configured).
    let midnight = (now() / 86_400 + 1) * 86_400;
    let yesterday = midnight - 86_400 - 3600;
    // As the Perl daemon wrote them: the key as the client typed it.
    let rows: [(&str, u32, u32, Option<i64>); 7] = [
        ("MiXed@Example.com", 1000, 1, Some(midnight)),
        ("Bob@Example.com", 1000, 2, Some(midnight)),
        ("bob@example.com", 1000, 3, Some(midnight)),
        ("vip@example.com", 50, 50, Some(yesterday)),
        ("old@example.com", 1000, 7, Some(yesterday)),
        ("blocked@example.com", 0, 0, Some(midnight)),
        ("null@example.com", 3, 0, None),
    ];
    for (sender, quota, used, expiry) in rows {
        conn.exec_drop(PERL_INSERT, (sender, quota, used, expiry))
            .await
            .unwrap();
    }
    // Its periodic commit, and an administrator's edits through a panel.
    conn.exec_drop(PERL_UPDATE, (3, midnight, "MiXed@Example.com"))
        .await
        .unwrap();
    for edit in [
        "UPDATE ratelimit SET quota = 10, persist = 1 WHERE sender = 'MiXed@Example.com'",
        "UPDATE ratelimit SET persist = 1 WHERE sender IN ('vip@example.com', 'blocked@example.com', 'null@example.com')",
        "UPDATE ratelimit SET expiry = NULL WHERE sender = 'null@example.com'",
    ] {
        conn.query_drop(edit).await.unwrap();
    }
    let mixed_id: i64 = conn
        .query_first("SELECT id FROM ratelimit WHERE sender = 'MiXed@Example.com'")
        .await
        .unwrap()
        .unwrap();

    // README: run schema-migrate.sql (twice: it only adds what is missing).
    let migrate =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schema-migrate.sql"))
            .unwrap();
    for _ in 0..2 {
        for statement in schema_statements(&migrate) {
            conn.query_drop(statement)
                .await
                .unwrap_or_else(|e| panic!("schema-migrate.sql: {e}"));
        }
    }
    let next_id = || async {
        let pool = mysql_async::Pool::new(db.url().as_str());
        let v: Option<u64> = pool
            .get_conn()
            .await
            .unwrap()
            .exec_first(
                "SELECT AUTO_INCREMENT FROM information_schema.TABLES \
                 WHERE TABLE_SCHEMA = ? AND TABLE_NAME = 'ratelimit'",
                (db.name.as_str(),),
            )
            .await
            .unwrap();
        pool.disconnect().await.unwrap();
        v.unwrap()
    };
    let ids_before = next_id().await;

    // The README's settings for the Perl daemon in smtpd_data_restrictions.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "default_quota = 1000\ncharge_stage = \"DATA\"\nweek_start = \"sunday\"",
        "file_format = \"perl\"",
    );
    use_database(&config, &db.url());
    let d = spawn(&config, &[]);
    let mut c = Client::connect(d.addr).await;
    // The login as the client types it; 4 used + 6 = 10 = the quota kept.
    assert_eq!(c.ask(&data("MiXed@Example.com", "m1", 6)).await, "DUNNO");
    assert!(is_deferred(
        &c.ask(&data("MiXed@Example.com", "m2", 1)).await
    ));
    // Bob's two rows add up: 2 + 3 + 1.
    assert_eq!(c.ask(&data("BOB@example.com", "b1", 1)).await, "DUNNO");
    // A persistent quota survives the reset of an old window.
    assert_eq!(c.ask(&data("vip@example.com", "v1", 50)).await, "DUNNO");
    assert!(is_deferred(&c.ask(&data("vip@example.com", "v2", 1)).await));
    // An old window: the default quota again.
    assert_eq!(c.ask(&data("old@example.com", "o1", 1)).await, "DUNNO");
    // quota 0 blocks (the Perl daemon let such senders through unlimited).
    assert!(is_deferred(
        &c.ask(&data("blocked@example.com", "x1", 1)).await
    ));
    // NULL expiry: a new window, the persistent quota 3.
    assert_eq!(c.ask(&data("null@example.com", "n1", 3)).await, "DUNNO");
    assert!(is_deferred(
        &c.ask(&data("null@example.com", "n2", 1)).await
    ));
    assert_eq!(c.ask(&data("new@example.com", "w1", 2)).await, "DUNNO");
    // RCPT requests (another restriction list) are answered, not charged.
    assert_eq!(
        c.ask(&Req::rcpt("new@example.com", "w2", "r@x")).await,
        "DUNNO"
    );
    let status = stdout(&cli(&config, &["status", "MiXed@Example.com"]));
    assert!(status.contains("mixed@example.com"), "{status}");
    assert_eq!(d.terminate(), 0);

    // Every row afterwards.
    let mut rows: Vec<(String, u32, u32, Option<i64>, bool)> = conn
        .query("SELECT sender, quota, used, expiry, persist FROM ratelimit ORDER BY sender")
        .await
        .unwrap();
    rows.sort();
    let m = Some(midnight);
    assert_eq!(
        rows,
        [
            ("blocked@example.com".into(), 0, 1, m, true),
            ("bob@example.com".into(), 1000, 6, m, false),
            ("mixed@example.com".into(), 10, 11, m, true),
            ("new@example.com".into(), 1000, 2, m, false),
            ("null@example.com".into(), 3, 4, m, true),
            ("old@example.com".into(), 1000, 1, m, false),
            ("vip@example.com".into(), 50, 51, m, true),
        ]
    );
    let kept: Option<i64> = conn
        .query_first("SELECT id FROM ratelimit WHERE sender = 'mixed@example.com'")
        .await
        .unwrap();
    assert_eq!(kept, Some(mixed_id), "the folded row keeps its id");
    assert_eq!(
        next_id().await,
        ids_before + 1,
        "one id, for the one new sender"
    );
    // The view has the Perl columns: expiry numeric, expirytime a date.
    let view: Option<(i64, String)> = conn
        .query_first(
            "SELECT expiry, DATE_FORMAT(expirytime, '%Y-%m-%d') FROM view_ratelimit \
             WHERE sender = 'mixed@example.com'",
        )
        .await
        .unwrap();
    let (expiry, date) = view.unwrap();
    assert_eq!(expiry, midnight);
    assert_eq!(date.len(), 10);
    let from_unixtime: Option<String> = conn
        .query_first("SELECT FROM_UNIXTIME(expiry) FROM view_ratelimit LIMIT 1")
        .await
        .unwrap();
    assert!(
        from_unixtime.is_some(),
        "FROM_UNIXTIME(expiry) works on the view"
    );
    drop(conn);
    pool.disconnect().await.unwrap();

    // The log: the Perl file prefix, the logins as typed, one warning per
    // folded key, INSERT only for the sender without a row.
    let log = std::fs::read_to_string(dir.path().join("ratelimit-policyd.log")).unwrap();
    let first = log.lines().next().unwrap();
    let perl_prefix = chrono::NaiveDateTime::parse_from_str(
        &first
            .split_whitespace()
            .take(5)
            .collect::<Vec<_>>()
            .join(" "),
        "%a %b %e %H:%M:%S %Y",
    );
    assert!(perl_prefix.is_ok(), "Perl's localtime prefix: {first}");
    let line = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{log}"))
            .to_string()
    };
    assert!(
        line("folded 1 rows (MiXed@Example.com) into the key mixed@example.com")
            .contains("quota 10, persistent")
    );
    assert!(
        line("folded 1 rows (Bob@Example.com) into the key bob@example.com").contains("used 5")
    );
    assert!(
        line("sasl_username=MiXed@Example.com, recipient_count=6, curr_count=10/10")
            .ends_with("status=UPDATE, key=mixed@example.com")
    );
    assert!(line("sasl_username=old@example.com").ends_with("status=UPDATE"));
    assert!(line("sasl_username=new@example.com").ends_with("status=INSERT"));
    assert!(line("charging recipients at protocol_state DATA").contains("smtpd_data_restrictions"));
}

/// The Perl daemon let every column be renamed (`$db_wherecol`,
/// `$db_quotacol`, `$db_tallycol`, `$db_updatedcol`, `$db_expirycol`,
/// `$db_persistcol`); `[database.columns]` names them, and everything works
/// on such a table: load, flush, refresh, full re-read, folding.
#[tokio::test]
async fn a_table_with_renamed_columns_works_as_it_is() {
    use common::{start_with, T0};
    use ratelimit_policyd::clock::ManualClock;
    use ratelimit_policyd::persist::mysql::MysqlBackend;
    use std::sync::Arc;
    let db = TestDb::create_empty(&admin_url(), "renamed").await;
    db.exec(
        "CREATE TABLE limits (
           id INT(11) NOT NULL AUTO_INCREMENT,
           email VARCHAR(255) CHARACTER SET utf8 COLLATE utf8_bin NOT NULL,
           keep TINYINT(1) NOT NULL DEFAULT '0',
           max INT(10) UNSIGNED NOT NULL DEFAULT '0',
           tally INT(10) UNSIGNED NOT NULL DEFAULT '0',
           changed TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
           resets INT(10) UNSIGNED DEFAULT '0',
           PRIMARY KEY (id), UNIQUE KEY (email)) ENGINE = InnoDB",
    )
    .await;
    let midnight = T0 / 86_400 * 86_400 + 86_400;
    db.exec(&format!(
        "INSERT INTO limits (email, keep, max, tally, resets) VALUES
           ('Alice@Example.com', 1, 5, 2, {midnight}), ('bob@example.com', 0, 1000, 3, {midnight})"
    ))
    .await;
    let toml = "[limits]\ndefault_quota = 1000\ntimezone = \"UTC\"\n\
                [database]\ntable = \"limits\"\n\
                [database.columns]\nsender = \"email\"\nquota = \"max\"\nused = \"tally\"\n\
                updated = \"changed\"\nexpiry = \"resets\"\npersist = \"keep\"\n";
    let config = common::config(toml);
    let backend = Arc::new(
        MysqlBackend::new(&db.url(), None, "limits")
            .unwrap()
            .with_table(&config.database.table),
    );
    let mut s = start_with(toml, backend, ManualClock::new(T0)).await;
    let mut c = s.client().await;
    for n in 0..3 {
        assert_eq!(
            c.ask(&Req::rcpt("alice@example.com", &format!("a{n}"), "r@x"))
                .await,
            "DUNNO",
            "2 stored + {n} of the quota of 5 kept from the folded row"
        );
    }
    assert!(is_deferred(
        &c.ask(&Req::rcpt("alice@example.com", "a9", "r@x")).await
    ));
    c.ask(&Req::rcpt("bob@example.com", "b", "r@x")).await;
    s.daemon().flush.flush().await.unwrap();
    db.exec("UPDATE limits SET max = 10 WHERE email = 'bob@example.com'")
        .await;
    s.daemon().flush.refresh().await.unwrap();
    s.daemon().flush.reconcile().await.unwrap();
    for n in 0..6 {
        assert_eq!(
            c.ask(&Req::rcpt("bob@example.com", &format!("c{n}"), "r@x"))
                .await,
            "DUNNO"
        );
    }
    assert!(is_deferred(
        &c.ask(&Req::rcpt("bob@example.com", "c9", "r@x")).await
    ));
    s.stop().await;
    let pool = mysql_async::Pool::new(db.url().as_str());
    let rows: Vec<(String, u32, u32, bool)> = pool
        .get_conn()
        .await
        .unwrap()
        .query("SELECT email, max, tally, keep FROM limits ORDER BY email")
        .await
        .unwrap();
    pool.disconnect().await.unwrap();
    assert_eq!(
        rows,
        [
            ("alice@example.com".into(), 5, 6, true),
            ("bob@example.com".into(), 10, 11, false)
        ]
    );
}
