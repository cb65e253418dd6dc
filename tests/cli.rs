//! The built binary, as an administrator runs it.

mod common;

use std::process::Command;

use common::binary::{cli, spawn, stderr, stdout, write_config, BIN};
use common::{is_deferred, Client, Req};

fn used_in_db(db: &std::path::Path, sender: &str) -> (u32, u32) {
    let (used, quota, _) = common::binary::db_row(db, sender);
    (used, quota)
}

#[tokio::test]
async fn sigterm_saves_exact_counts_and_a_restart_enforces_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    let d = spawn(&config, &[]);
    let mut c = Client::connect(d.addr).await;
    let mut answers = Vec::new();
    for n in 0..5 {
        answers.push(
            c.ask(&Req::rcpt("alice@example.com", "i1", &format!("{n}@x")))
                .await,
        );
    }
    assert_eq!(answers[..3], ["DUNNO", "DUNNO", "DUNNO"]);
    assert!(is_deferred(&answers[3]) && is_deferred(&answers[4]));
    for n in 0..2 {
        c.ask(&Req::rcpt("bob@example.com", "i2", &format!("{n}@x")))
            .await;
    }
    assert_eq!(d.terminate(), 0);
    c.expect_closed().await;

    let db = dir.path().join("ratelimit.db");
    assert_eq!(used_in_db(&db, "alice@example.com"), (5, 3));
    assert_eq!(used_in_db(&db, "bob@example.com"), (2, 3));

    let d = spawn(&config, &[]);
    let mut c = Client::connect(d.addr).await;
    let refused = c.ask(&Req::rcpt("alice@example.com", "i3", "a@x")).await;
    assert!(refused.contains("(6/3)"), "{refused}");
    assert_eq!(
        c.ask(&Req::rcpt("bob@example.com", "i4", "a@x")).await,
        "DUNNO"
    );
    assert!(is_deferred(
        &c.ask(&Req::rcpt("bob@example.com", "i4", "b@x")).await
    ));
    assert_eq!(d.terminate(), 0);
    assert_eq!(used_in_db(&db, "alice@example.com"), (6, 3));
    assert_eq!(used_in_db(&db, "bob@example.com"), (4, 3));

    // The Perl daemon's log line, one per charged request, values as data.
    let log = std::fs::read_to_string(dir.path().join("ratelimit-policyd.log")).unwrap();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("curr_count=")).collect();
    assert_eq!(lines.len(), 10, "{log}");
    assert!(lines[0].ends_with(
        "notice: NOQUEUE: client=mail.client.example[192.0.2.10], sasl_method=PLAIN, \
         sasl_username=alice@example.com, recipient_count=1, curr_count=1/3, status=INSERT"
    ));
    assert!(
        lines[1].contains("info: NOQUEUE: ") && lines[1].ends_with("curr_count=2/3, status=UPDATE")
    );
    assert!(
        lines[3].contains("warning: ") && lines[3].ends_with("curr_count=4/3, status=OVER_QUOTA")
    );
}

#[tokio::test]
async fn client_values_cannot_forge_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    let d = spawn(&config, &[]);
    let mut c = Client::connect(d.addr).await;
    let req = Req::rcpt("mallory@example.com", "i1", "a@x")
        .with("client_name", "evil\rfake: status=OK%s%n")
        .with("queue_id", "Q1\u{1b}[31m");
    assert_eq!(c.ask(&req).await, "DUNNO");
    // NEL (U+0085), CSI (U+009B) and U+2028 end a line for some splitters.
    let forged = "eve\u{85}NOQUEUE: client=x[1.2.3.4]\u{9b}2J\u{2028}y@example.com";
    assert_eq!(c.ask(&Req::rcpt(forged, "i2", "a@x")).await, "DUNNO");
    let status = stdout(&cli(&config, &["status"]));
    assert!(
        status.contains("eve\\u{85}noqueue: client=x[1.2.3.4]\\u{9b}2j\\u{2028}y@example.com"),
        "{status}"
    );
    assert!(!status.contains('\u{85}') && !status.contains('\u{2028}'));
    assert_eq!(d.terminate(), 0);
    let log = std::fs::read_to_string(dir.path().join("ratelimit-policyd.log")).unwrap();
    let line = log.lines().find(|l| l.contains("mallory")).unwrap();
    assert!(
        line.contains("Q1\\x1b[31m: client=evil\\rfake: status=OK%s%n[192.0.2.10]"),
        "{line}"
    );
    assert!(
        log.contains(
            "sasl_username=eve\\u{85}NOQUEUE: client=x[1.2.3.4]\\u{9b}2J\\u{2028}y@example.com"
        ),
        "{log}"
    );
    assert!(
        !log.contains('\u{85}') && !log.contains('\u{9b}') && !log.contains('\u{2028}'),
        "no raw separator in the log"
    );
}

#[test]
fn check_config_prints_the_effective_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "count = \"messages\"", "");
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .env("RATELIMIT_POLICYD_LIMITS__DEFAULT_QUOTA", "77")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let printed: toml::Value = toml::from_str(&text).unwrap();
    assert_eq!(
        printed["limits"]["default_quota"].as_integer(),
        Some(77),
        "environment wins over the file"
    );
    assert_eq!(printed["limits"]["count"].as_str(), Some("messages"));
    assert_eq!(
        printed["limits"]["period"].as_str(),
        Some("daily"),
        "defaults are shown"
    );
    assert_eq!(printed["max_connections"].as_integer(), Some(1024));
}

#[test]
fn invalid_configuration_names_every_key_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "listen = \"nowhere\"\n[limits]\nperiod = \"yearly\"\ncolour = \"blue\"\n",
    )
    .unwrap();
    let out = cli(&path, &["check-config"]);
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    assert!(err.contains("limits.colour: unknown key"), "{err}");
    // Unknown keys are reported before values are checked.
    std::fs::write(
        &path,
        "listen = \"nowhere\"\n[limits]\nperiod = \"yearly\"\n",
    )
    .unwrap();
    let out = cli(&path, &["run"]);
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    assert!(
        err.contains("listen: ") && err.contains("limits.period: "),
        "{err}"
    );
    // A --config that does not exist is an error, not the defaults.
    let out = Command::new(BIN)
        .args(["check-config", "--config", "/nonexistent/x.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
}

#[test]
fn a_corrupt_database_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    std::fs::write(dir.path().join("ratelimit.db"), vec![0x5au8; 16384]).unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("database unusable") && err.contains("ratelimit.db"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = write_config(dir.path(), "", "");
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .args(["--listen", &taken.local_addr().unwrap().to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(71));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen on 127.0.0.1:"));
}

#[test]
fn the_example_configuration_is_valid() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/ratelimit-policyd.toml"
    );
    let out = Command::new(BIN)
        .args(["check-config", "--config", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_missing_database_directory_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .args(["--database-url", "sqlite:///nonexistent-dir/ratelimit.db"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent-dir/ratelimit.db"));
}

/// Migrating from the Perl daemon: `printshm` on the policy port gets a
/// pointer to `status` (never a dump of counters); the log names the stage
/// that is charged at start, and says loudly when requests arrive only at
/// another one (the Perl daemon's DATA wiring with the default RCPT).
#[tokio::test]
async fn a_perl_wiring_that_charges_nothing_is_impossible_to_miss() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    let d = spawn(&config, &[]);
    let mut c = Client::connect(d.addr).await;
    let data = Req::rcpt("alice@example.com", "i1", "")
        .state("DATA")
        .with("recipient_count", "2");
    assert_eq!(c.ask(&data).await, "DUNNO");
    let mut shm = Client::connect(d.addr).await;
    shm.send(b"printshm\n").await;
    shm.expect_closed().await;
    assert_eq!(d.terminate(), 0);
    let log = std::fs::read_to_string(dir.path().join("ratelimit-policyd.log")).unwrap();
    assert!(
        log.contains("charging recipients at protocol_state RCPT (check_policy_service in smtpd_sender_restrictions or smtpd_recipient_restrictions)"),
        "{log}"
    );
    assert!(
        log.contains("error: NOTHING IS BEING CHARGED: requests arrive at protocol_state=DATA")
            && log.contains("set charge_stage = \"DATA\""),
        "{log}"
    );
    assert!(
        log.contains("\"printshm\" is the Perl daemon's cache dump")
            && log.contains("`ratelimit-policyd status`"),
        "{log}"
    );
    assert!(!log.contains("curr_count="), "nothing was charged: {log}");
}

/// The log line shows the login as Postfix sent it (as the Perl daemon
/// does); the key it counts under follows only where it differs.
#[tokio::test]
async fn the_log_line_shows_the_login_and_the_key_where_it_differs() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "key_type = \"domain\"", "");
    let d = spawn(&config, &[]);
    let mut c = Client::connect(d.addr).await;
    c.ask(&Req::rcpt("Alice@Dom.Example", "i1", "a@x")).await;
    assert_eq!(d.terminate(), 0);
    let log = std::fs::read_to_string(dir.path().join("ratelimit-policyd.log")).unwrap();
    let line = log.lines().find(|l| l.contains("curr_count=")).unwrap();
    assert!(
        line.ends_with(
            "sasl_method=PLAIN, sasl_username=Alice@Dom.Example, recipient_count=1, curr_count=1/3, status=INSERT, key=dom.example"
        ),
        "{line}"
    );
}

/// The stale-socket cleanup removes sockets only: a socket path that names
/// a regular file (a typo, a config file) is an error naming it, and the
/// file is left alone.
#[test]
fn a_socket_path_naming_a_regular_file_is_never_deleted() {
    use common::binary::cli_within;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    let precious = dir.path().join("control.sock");
    std::fs::write(&precious, "do not delete").unwrap();
    // A daemon that deleted the file would bind and keep running.
    let out = cli_within(&config, &["run"], 10).expect("the daemon stopped");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "do not delete");
    assert_eq!(out.status.code(), Some(71), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "{} exists and is not a socket",
            precious.display()
        )),
        "{}",
        stderr(&out)
    );

    std::fs::remove_file(&precious).unwrap();
    let listen = dir.path().join("policy");
    std::fs::write(&listen, "do not delete either").unwrap();
    let arg = format!("unix:{}", listen.display());
    let out = cli_within(&config, &["run", "--listen", &arg], 10).expect("the daemon stopped");
    assert_eq!(
        std::fs::read_to_string(&listen).unwrap(),
        "do not delete either"
    );
    assert_eq!(out.status.code(), Some(71), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("{} exists and is not a socket", listen.display())),
        "{}",
        stderr(&out)
    );
}
