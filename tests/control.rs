//! SPEC §7/§8 operations with the built binary: the control commands against
//! a running daemon, signals, syslog and log reopening.

mod common;

use std::os::unix::net::{UnixDatagram, UnixListener};
use std::time::Duration;

use common::binary::{cli, db_row, spawn, stderr, stdout, write_config};
use common::{is_deferred, Client, Req};

#[tokio::test]
async fn status_shows_header_and_sorted_aligned_rows() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    let d = spawn(&config, &[]);
    let mut c = Client::connect(d.addr).await;
    for (user, n) in [
        ("zed@example.com", 1),
        ("amy@example.com", 4),
        ("Bob@Example.com", 2),
    ] {
        for i in 0..n {
            c.ask(&Req::rcpt(user, "i", &format!("{i}@x"))).await;
        }
    }
    let out = cli(&config, &["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("ratelimit-policyd ") && lines[0].contains("sqlite up"),
        "{text}"
    );
    assert!(
        text.contains("requests: 7 (accepted 6,") && text.contains("over_quota 1"),
        "{text}"
    );
    let table: Vec<&str> = lines
        .iter()
        .skip_while(|l| !l.starts_with("KEY"))
        .copied()
        .collect();
    assert_eq!(table.len(), 4, "{text}");
    let keys: Vec<&str> = table[1..]
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["amy@example.com", "bob@example.com", "zed@example.com"]
    );
    // Columns line up: every row's USED ends where the header's does.
    let used_end = table[0].find("USED").unwrap() + 4;
    for row in &table[1..] {
        assert!(row.as_bytes()[used_end - 1].is_ascii_digit(), "{row}");
        assert_eq!(row.as_bytes()[used_end], b' ', "{row}");
    }
    assert!(
        table[1].contains(" 3 ") && table[1].contains(" 4 ") && table[1].contains(" no "),
        "{}",
        table[1]
    );

    // --top by used, and KEY filters.
    let top = stdout(&cli(&config, &["status", "--top", "2"]));
    let top_keys: Vec<&str> = top
        .lines()
        .skip_while(|l| !l.starts_with("KEY"))
        .skip(1)
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(top_keys, ["amy@example.com", "bob@example.com"]);
    let one = stdout(&cli(&config, &["status", "ZED@example.com"]));
    assert_eq!(
        one.lines().skip_while(|l| !l.starts_with("KEY")).count(),
        2,
        "{one}"
    );
    assert_eq!(d.terminate(), 0);
}

#[tokio::test]
async fn status_json_parses() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    let d = spawn(&config, &[]);
    let mut c = Client::connect(d.addr).await;
    c.ask(&Req::rcpt("amy@example.com", "i", "a@x")).await;
    let out = cli(&config, &["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["header"]["requests"], 1);
    assert_eq!(v["header"]["decisions"]["accepted"], 1);
    assert_eq!(v["header"]["database"], "sqlite");
    assert_eq!(v["header"]["connections_open"], 1);
    assert_eq!(v["header"]["pending_rows"], 1);
    let rows = v["counters"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["key"], "amy@example.com");
    assert_eq!(
        (
            rows[0]["used"].as_u64(),
            rows[0]["quota"].as_u64(),
            rows[0]["remaining"].as_u64()
        ),
        (Some(1), Some(3), Some(2))
    );
    assert_eq!(rows[0]["pending"], 1);
    assert!(rows[0]["expiry_local"].as_str().unwrap().ends_with(" UTC"));
    // An empty store is still one valid document.
    drop(c);
    assert_eq!(d.terminate(), 0);
}

#[tokio::test]
async fn set_quota_reset_and_flush_act_at_once_and_reach_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    let db = dir.path().join("ratelimit.db");
    let d = spawn(&config, &[]);
    let mut c = Client::connect(d.addr).await;
    for i in 0..4 {
        c.ask(&Req::rcpt("amy@example.com", "i", &format!("{i}@x")))
            .await;
    }
    // set-quota: immediate in memory.
    let out = cli(
        &config,
        &["set-quota", "Amy@Example.com", "10", "--persist"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("amy@example.com: quota 10, persist yes, used 4"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        c.ask(&Req::rcpt("amy@example.com", "j", "a@x")).await,
        "DUNNO"
    );
    // flush: returns when done, with its result.
    let out = cli(&config, &["flush"]);
    assert!(
        out.status.success() && stdout(&out).contains("flushed 1 row"),
        "{}",
        stdout(&out)
    );
    assert_eq!(db_row(&db, "amy@example.com"), (5, 10, true));
    // reset: used back to 0 now; the database follows at the next flush.
    let out = cli(&config, &["reset", "amy@example.com"]);
    assert!(out.status.success(), "{}", stderr(&out));
    c.ask(&Req::rcpt("amy@example.com", "k", "a@x")).await;
    cli(&config, &["flush"]);
    assert_eq!(db_row(&db, "amy@example.com"), (1, 10, true));
    // A set-quota for a sender never seen creates it.
    assert!(cli(&config, &["set-quota", "new@example.com", "0"])
        .status
        .success());
    assert!(is_deferred(
        &c.ask(&Req::rcpt("new@example.com", "n", "a@x")).await
    ));
    // Unknown key: a clear refusal, exit 1.
    let out = cli(&config, &["reset", "ghost@example.com"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("ghost@example.com: no such counter"));
    assert_eq!(d.terminate(), 0);
    assert_eq!(db_row(&db, "new@example.com"), (1, 0, false));
}

#[tokio::test]
async fn reload_and_sighup_apply_new_limits() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    let mut d = spawn(&config, &[]);
    let mut c = Client::connect(d.addr).await;
    for i in 0..4 {
        c.ask(&Req::rcpt("amy@example.com", "i", &format!("{i}@x")))
            .await;
    }
    let toml = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        toml.replace("default_quota = 3", "default_quota = 5"),
    )
    .unwrap();
    let out = cli(&config, &["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("default_quota 3 -> 5 (1 counters)"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        c.ask(&Req::rcpt("amy@example.com", "j", "a@x")).await,
        "DUNNO",
        "5/5 is within the new quota"
    );
    // SIGHUP reloads too; a new listen address is reported as needing a restart.
    let changed = toml
        .replace("default_quota = 3", "default_quota = 6")
        .replace("127.0.0.1:0", "127.0.0.2:0");
    std::fs::write(&config, changed).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_for("SIGHUP received");
    let line = d.wait_for("reloaded ");
    assert!(line.contains("default_quota 5 -> 6"), "{line}");
    assert!(
        line.contains("listen changed: takes effect after a restart"),
        "{line}"
    );
    assert_eq!(
        c.ask(&Req::rcpt("amy@example.com", "k", "a@x")).await,
        "DUNNO"
    );
    assert!(is_deferred(
        &c.ask(&Req::rcpt("amy@example.com", "k", "b@x")).await
    ));
    // The listen address changed back: nothing needs a restart any more.
    std::fs::write(
        &config,
        toml.replace("default_quota = 3", "default_quota = 6"),
    )
    .unwrap();
    let out = cli(&config, &["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains("restart"), "{}", stdout(&out));
    assert_eq!(d.terminate(), 0);
    let log = std::fs::read_to_string(dir.path().join("ratelimit-policyd.log")).unwrap();
    assert!(log.contains("SIGHUP received; reloading"), "{log}");
}

#[tokio::test]
async fn an_invalid_configuration_is_not_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    let d = spawn(&config, &[]);
    let toml = std::fs::read_to_string(&config).unwrap();
    // The CLI reads the file too (to find the socket), so point it at a
    // valid copy while the daemon's own file is broken.
    let good = dir.path().join("good.toml");
    std::fs::write(&good, &toml).unwrap();
    std::fs::write(
        &config,
        toml.replace("period = ", "x = ")
            .replace("[limits]", "[limits]\nperiod = \"yearly\""),
    )
    .unwrap();
    let out = cli(&good, &["reload"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("configuration not reloaded")
            && stderr(&out).contains("limits.period"),
        "{}",
        stderr(&out)
    );
    let mut c = Client::connect(d.addr).await;
    assert_eq!(
        c.ask(&Req::rcpt("amy@example.com", "i", "a@x")).await,
        "DUNNO",
        "still serving"
    );
    assert_eq!(d.terminate(), 0);
}

#[test]
fn no_daemon_and_stale_socket_say_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    let out = cli(&config, &["status"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains(&format!(
        "daemon not running (no socket at {}/control.sock)",
        dir.path().display()
    )));
    // A socket file nobody listens on (a crashed daemon's).
    drop(UnixListener::bind(dir.path().join("control.sock")).unwrap());
    for cmd in [
        &["status"][..],
        &["flush"],
        &["reload"],
        &["reset", "a"],
        &["set-quota", "a", "1"],
    ] {
        let out = cli(&config, cmd);
        assert_eq!(out.status.code(), Some(3), "{cmd:?}");
        assert!(
            stderr(&out).contains("daemon not running (stale socket at"),
            "{}",
            stderr(&out)
        );
    }
    // The daemon replaces the stale socket and starts.
    let d = spawn(&config, &[]);
    assert!(cli(&config, &["status"]).status.success());
    assert_eq!(d.terminate(), 0);
    assert!(!dir.path().join("control.sock").exists(), "removed at exit");
}

#[test]
fn a_second_daemon_on_the_same_control_socket_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    let d = spawn(&config, &[]);
    let out = std::process::Command::new(common::binary::BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(71));
    assert!(
        stderr(&out).contains("another process is listening on")
            && stderr(&out).contains("control.sock"),
        "{}",
        stderr(&out)
    );
    assert!(
        cli(&config, &["status"]).status.success(),
        "the first daemon is unharmed"
    );
    assert_eq!(d.terminate(), 0);
}

#[tokio::test]
async fn syslog_gets_mail_facility_lines_with_perl_priorities() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("log.sock");
    let syslog = UnixDatagram::bind(&sock_path).unwrap();
    syslog
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let config = write_config(dir.path(), "default_quota = 1", "syslog = true");
    let d = spawn(&config, &["--syslog-socket", sock_path.to_str().unwrap()]);
    let mut c = Client::connect(d.addr).await;
    for i in 0..3 {
        c.ask(&Req::rcpt("amy@example.com", "i", &format!("{i}@x")))
            .await;
    }
    let mut lines = Vec::new();
    let mut buf = [0u8; 4096];
    while lines
        .iter()
        .filter(|l: &&String| l.contains("curr_count="))
        .count()
        < 3
    {
        let n = syslog.recv(&mut buf).expect("a syslog datagram");
        lines.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let charged: Vec<&String> = lines.iter().filter(|l| l.contains("curr_count=")).collect();
    // <PRI> = facility mail (2) * 8 + severity: notice 5, warning 4, info 6.
    assert!(
        charged[0].starts_with("<21>")
            && charged[0].contains("ratelimit-policyd[")
            && charged[0].ends_with("status=INSERT"),
        "{}",
        charged[0]
    );
    assert!(
        charged[1].starts_with("<20>") && charged[1].ends_with("status=OVER_QUOTA"),
        "first refusal: {}",
        charged[1]
    );
    assert!(
        charged[2].starts_with("<22>") && charged[2].ends_with("status=OVER_QUOTA"),
        "later refusals: {}",
        charged[2]
    );
    assert_eq!(d.terminate(), 0);
}

#[tokio::test]
async fn sigusr1_reopens_the_log_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    let log = dir.path().join("ratelimit-policyd.log");
    let rotated = dir.path().join("ratelimit-policyd.log.1");
    let mut d = spawn(&config, &[]);
    let mut c = Client::connect(d.addr).await;
    c.ask(&Req::rcpt("before@example.com", "i", "a@x")).await;
    std::fs::rename(&log, &rotated).unwrap();
    d.signal(libc::SIGUSR1);
    d.wait_for("log file reopened");
    assert!(log.exists());
    c.ask(&Req::rcpt("after@example.com", "i", "a@x")).await;
    assert_eq!(d.terminate(), 0);
    let old = std::fs::read_to_string(&rotated).unwrap();
    let new = std::fs::read_to_string(&log).unwrap();
    assert!(
        old.contains("before@example.com") && !old.contains("after@example.com"),
        "{old}"
    );
    assert!(
        new.contains("log file reopened") && new.contains("after@example.com"),
        "{new}"
    );
}

#[test]
fn tells_systemd_when_it_is_ready_and_when_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let config = write_config(dir.path(), "", "");
    let d = common::binary::spawn_env(
        &config,
        &[],
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).unwrap();
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        ready.starts_with("READY=1\nSTATUS=listening on 127.0.0.1:"),
        "{ready}"
    );
    // READY comes after the control socket is up.
    assert!(cli(&config, &["status"]).status.success());
    assert_eq!(d.terminate(), 0);
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
}

/// `status` as an administrator reads it: finished windows shown as such,
/// "never" before the first flush, singular and plural, keys that are not
/// cached named, `--over` for the senders over quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_as_it_should() {
    use common::{start_with_control, T0};
    use ratelimit_policyd::clock::ManualClock;
    use ratelimit_policyd::persist::memory::MemoryBackend;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "control_socket = \"{}\"\n[limits]\ntimezone = \"UTC\"\n",
            socket.display()
        ),
    )
    .unwrap();
    let toml = "[limits]\ndefault_quota = 2\ntimezone = \"UTC\"\n";
    let mut s = start_with_control(
        toml,
        Arc::new(MemoryBackend::default()),
        ManualClock::new(T0),
        &socket,
    )
    .await;
    let mut c = s.client().await;
    for i in 0..3 {
        c.ask(&Req::rcpt("alice@example.com", &format!("a{i}"), "r@x"))
            .await;
    }
    c.ask(&Req::rcpt("bob@example.com", "b", "r@x")).await;
    let run = |args: &[&str]| {
        let out = cli(&config, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    let text = run(&["status"]);
    assert!(
        text.contains("last flush: never; pending: 2 rows, 4 units"),
        "{text}"
    );
    assert!(
        text.contains("ignored: not a request the daemon limits"),
        "{text}"
    );
    let over = run(&["status", "--over"]);
    let rows: Vec<&str> = over
        .lines()
        .skip_while(|l| !l.starts_with("KEY"))
        .skip(1)
        .collect();
    assert_eq!(rows.len(), 1, "{over}");
    assert!(rows[0].starts_with("alice@example.com"), "{over}");
    let unknown = run(&["status", "Nobody@Example.com", "bob@example.com"]);
    assert!(
        unknown.contains("nobody@example.com: not cached"),
        "{unknown}"
    );
    assert!(unknown.contains("bob@example.com "), "{unknown}");
    assert_eq!(run(&["flush"]).trim(), "flushed 2 rows");
    c.ask(&Req::rcpt("bob@example.com", "b2", "r@x")).await;
    assert_eq!(run(&["flush"]).trim(), "flushed 1 row");
    let text = run(&["status"]);
    assert!(
        text.contains(&format!(
            "last flush: {}, 1 row, ok; pending: 0 rows, 0 units",
            chrono::DateTime::from_timestamp(T0, 0)
                .unwrap()
                .format("%Y-%m-%d %H:%M:%S UTC")
        )),
        "{text}"
    );
    // The day is over: alice's window has finished, before any new request.
    s.clock.advance(86_400);
    let text = run(&["status", "alice@example.com"]);
    let row = text.lines().find(|l| l.starts_with("alice@")).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1..5], ["2", "0", "2", "expired"], "{row}");
    let json: serde_json::Value =
        serde_json::from_str(&run(&["status", "--json", "alice@example.com"])).unwrap();
    assert_eq!(json["counters"][0]["expired"], true);
    assert_eq!(json["counters"][0]["remaining"], 2);
    s.stop().await;
}

/// The control commands are robust for scripts: a wedged daemon gives up
/// after 10 s, a closed pipe ends quietly, errors are said once, invalid
/// input is named, daemon-only flags are refused, a relative socket is the
/// configuration file's neighbour.
#[test]
fn control_commands_behave_for_scripts() {
    let dir = tempfile::tempdir().unwrap();
    // A socket that accepts and never answers: a wedged daemon.
    let socket = dir.path().join("wedged.sock");
    let _wedged = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "control_socket = \"wedged.sock\"\n").unwrap();
    let started = std::time::Instant::now();
    // Run from elsewhere: the relative socket is found next to the file.
    let out = std::process::Command::new(common::binary::BIN)
        .current_dir("/")
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("daemon not answering"),
        "{}",
        stderr(&out)
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));

    let out = cli(&config, &["set-quota", "a@example.com", "-5"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("must be a whole number from 0 to 4294967295"),
        "{}",
        stderr(&out)
    );
    let out = cli(&config, &["status", "--listen", "127.0.0.1:1"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a daemon flag: {}",
        stderr(&out)
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "lisen = 1\nmax_connections = 0\n[database]\nurl = \"mysql://u@h/db\"\npassword_file = \"/nonexistent/pw\"\n",
    )
    .unwrap();
    let out = cli(&bad, &["check-config"]);
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    assert_eq!(
        err.matches("lisen: unknown key").count(),
        1,
        "said once: {err}"
    );
    assert!(
        err.contains("max_connections: must be"),
        "all at once: {err}"
    );
    std::fs::write(
        &bad,
        "[database]\nurl = \"mysql://u@h/db\"\npassword_file = \"/nonexistent/pw\"\n",
    )
    .unwrap();
    let out = cli(&bad, &["check-config"]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("database.password_file: cannot read /nonexistent/pw"),
        "{}",
        stderr(&out)
    );
}

/// `status | head -1` ends quietly when the reader goes away.
#[tokio::test]
async fn status_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    let d = spawn(&config, &[]);
    let mut c = Client::connect(d.addr).await;
    for i in 0..3000 {
        c.ask(&Req::rcpt(&format!("user{i}@example.com"), "i", "r@x"))
            .await;
    }
    let out = std::process::Command::new("bash")
        .args([
            "-c",
            &format!(
                "set -o pipefail; {} status --config {} | head -1",
                common::binary::BIN,
                config.display()
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    assert_eq!(d.terminate(), 0);
}
