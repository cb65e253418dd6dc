//! SPEC §6/§12 faults with the built binary and the SQLite store: a full
//! disk, a database locked by another process, a crash. The daemon keeps
//! answering, loses nothing it had saved, and never dies of it.

mod common;

use std::path::Path;

use common::binary::{cli, spawn, spawn_limited, stderr, stdout, write_config};
use common::{is_deferred, Client, Req};

fn total_used(db: &Path) -> u64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row("SELECT COALESCE(SUM(used), 0) FROM ratelimit", [], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap() as u64
}

/// Requests from `senders` distinct senders, `per_sender` each.
async fn send(c: &mut Client, senders: usize, per_sender: usize, tag: &str) -> u64 {
    let mut n = 0;
    for s in 0..senders {
        for r in 0..per_sender {
            let a = c
                .ask(&Req::rcpt(
                    &format!("user{s}@example.com"),
                    &format!("{tag}{s}"),
                    &format!("{r}@x"),
                ))
                .await;
            assert!(a == "DUNNO" || is_deferred(&a), "{a}");
            n += 1;
        }
    }
    n
}

#[tokio::test]
async fn a_full_disk_loses_nothing_once_space_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "default_quota = 1000000", "level = \"notice\"");
    // The log goes to stderr only: a log file would hit the limit too.
    let toml = std::fs::read_to_string(&config).unwrap();
    let toml = toml
        .lines()
        .filter(|l| !l.starts_with("file = "))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&config, toml).unwrap();
    // 256 KiB: enough to start (the table, WAL index), far too little for 20k senders.
    let d = spawn_limited(&config, &[], &[], Some(256 * 1024));
    let mut c = Client::connect(d.addr).await;
    let sent = send(&mut c, 20_000, 1, "a").await;
    let out = cli(&config, &["flush"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    // SQLite reports EFBIG as a disk I/O error.
    assert!(
        stderr(&out).contains("flush failed") && stderr(&out).contains("kept"),
        "{}",
        stderr(&out)
    );
    // Still answering, and still counting.
    let more = send(&mut c, 100, 1, "b").await;
    let status = stdout(&cli(&config, &["status", "--json", "--top", "1"]));
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["header"]["database_state"], "down");
    assert_eq!(v["header"]["pending_units"].as_u64(), Some(sent + more));
    // Space comes back (the limit is raised); the next flush writes everything.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit(2) on our own child.
    assert_eq!(
        unsafe {
            libc::prlimit(
                d.child.id() as i32,
                libc::RLIMIT_FSIZE,
                &unlimited,
                std::ptr::null_mut(),
            )
        },
        0
    );
    let out = cli(&config, &["flush"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(d.terminate(), 0, "the daemon survived the full disk");
    assert_eq!(
        total_used(&dir.path().join("ratelimit.db")),
        sent + more,
        "no count lost"
    );
}

#[tokio::test]
async fn a_database_locked_by_another_process_only_delays_the_flush() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "default_quota = 1000000", "level = \"notice\"");
    let d = spawn(&config, &[]);
    let mut c = Client::connect(d.addr).await;
    let first = send(&mut c, 50, 2, "a").await;
    // Another process takes the write lock and keeps it.
    let db = dir.path().join("ratelimit.db");
    let locker = rusqlite::Connection::open(&db).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let out = cli(&config, &["flush"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("locked") || stderr(&out).contains("busy"),
        "{}",
        stderr(&out)
    );
    let second = send(&mut c, 50, 1, "b").await;
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);
    assert!(cli(&config, &["flush"]).status.success());
    assert_eq!(d.terminate(), 0);
    assert_eq!(total_used(&db), first + second);
}

/// SIGKILL loses at most what was counted since the last flush.
#[tokio::test]
async fn a_crash_loses_at_most_the_counts_since_the_last_flush() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "default_quota = 1000000", "level = \"notice\"");
    let toml = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[database]\n", "[database]\nflush_interval = \"1s\"\n");
    std::fs::write(&config, toml).unwrap();
    let d = spawn(&config, &[]);
    let mut c = Client::connect(d.addr).await;
    let saved = send(&mut c, 200, 3, "a").await;
    assert!(cli(&config, &["flush"]).status.success());
    let at_risk = send(&mut c, 200, 2, "b").await;
    d.signal(libc::SIGKILL);
    drop(d);
    let db = dir.path().join("ratelimit.db");
    let stored = total_used(&db);
    assert!(
        (saved..=saved + at_risk).contains(&stored),
        "stored {stored}: everything flushed survives ({saved}), at most the rest ({at_risk}) is lost"
    );
    // A restart serves from what was saved.
    let d = spawn(&config, &[]);
    let status = stdout(&cli(&config, &["status", "--json", "--top", "1"]));
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["header"]["counters"], 200);
    assert_eq!(d.terminate(), 0);
    println!(
        "crash: {saved} saved, {at_risk} at risk, {} lost",
        saved + at_risk - stored
    );
}

/// The database's filesystem is read-only when the daemon starts: it serves
/// anyway, and once the filesystem is writable again nothing is lost. Needs
/// root (it mounts a small tmpfs).
#[tokio::test]
async fn a_read_only_filesystem_at_start_is_served_through() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: mounting a tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mount = |args: &[&str]| {
        let out = std::process::Command::new("mount")
            .args(args)
            .arg(&mnt)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    mount(&["-t", "tmpfs", "-o", "size=16m", "tmpfs"]);
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let config = write_config(dir.path(), "default_quota = 1000000", "level = \"notice\"");
    let toml = std::fs::read_to_string(&config).unwrap();
    let db = mnt.join("r.db");
    let toml = toml.replace(
        &format!("sqlite://{}/ratelimit.db", dir.path().display()),
        &format!("sqlite://{}", db.display()),
    );
    std::fs::write(&config, toml).unwrap();

    // A first run stores some counts.
    let d = spawn(&config, &[]);
    let mut c = Client::connect(d.addr).await;
    let before = send(&mut c, 10, 1, "a").await;
    assert_eq!(d.terminate(), 0);
    assert_eq!(total_used(&db), before);

    // The filesystem goes read-only; the daemon starts and answers anyway.
    mount(&["-o", "remount,ro"]);
    let d = spawn(&config, &[]);
    let mut c = Client::connect(d.addr).await;
    let during = send(&mut c, 10, 2, "b").await;
    let out = cli(&config, &["flush"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    // Writable again: the next flush writes everything counted meanwhile.
    mount(&["-o", "remount,rw"]);
    let out = cli(&config, &["flush"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(d.terminate(), 0);
    assert_eq!(total_used(&db), before + during, "nothing lost");
}

/// SPEC §6: a committed flush is on disk. SQLite commits a flush with an
/// fsync of its journal (`synchronous = FULL`): strace counts them.
#[tokio::test]
async fn every_flush_is_synced_to_disk() {
    use common::binary::Spawn;
    if std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_err()
    {
        common::skip("strace is not installed (.ci/run installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "default_quota = 1000000", "level = \"notice\"");
    let trace = dir.path().join("strace.out");
    let trace_arg = trace.display().to_string();
    let d = Spawn {
        wrapper: &[
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=fsync,fdatasync",
            "-o",
            &trace_arg,
        ],
        ..Spawn::default()
    }
    .start(&config);
    let mut c = Client::connect(d.addr).await;
    let syncs = || {
        std::fs::read_to_string(&trace)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("fsync(") || l.contains("fdatasync("))
            .count()
    };
    let mut counts = Vec::new();
    for round in 0..10 {
        send(&mut c, 3, 1, &format!("r{round}-")).await;
        let before = syncs();
        assert!(cli(&config, &["flush"]).status.success());
        counts.push(syncs() - before);
    }
    assert_eq!(d.terminate(), 0);
    assert!(
        counts.iter().all(|&n| n >= 1),
        "fsyncs per flush: {counts:?}"
    );
    println!("fsyncs per flush: {counts:?}");
}

/// Reload with syslog configured but unreachable (no /dev/log: containers,
/// minimal installs) must not freeze the daemon.
#[tokio::test]
async fn a_reload_with_syslog_unreachable_does_not_freeze_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "syslog = true");
    let nowhere = dir.path().join("no-such-log-socket");
    let d = spawn(&config, &["--syslog-socket", nowhere.to_str().unwrap()]);
    d.signal(libc::SIGHUP);
    let mut c = Client::connect(d.addr).await;
    let answered = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        c.ask(&Req::rcpt("a@example.com", "i", "r@x")),
    )
    .await;
    assert!(
        answered.is_ok(),
        "a request after the reload was not answered"
    );
    let status = common::binary::cli_within(&config, &["status"], 10);
    assert_eq!(
        status.map(|o| o.status.code()),
        Some(Some(0)),
        "status answers"
    );
    assert_eq!(d.terminate(), 0);
}
