//! SPEC §2/§10 hostile clients over real sockets. Each test prints the
//! process's RSS so RELIABILITY.md can quote it (run them one at a time for
//! clean figures: `cargo test --test hostile -- --test-threads=1 --nocapture`,
//! as tests in one binary share the process); none sleeps.

mod common;

use std::sync::Arc;
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use common::{start_with, Client, Req, T0};
use ratelimit_policyd::clock::ManualClock;
use ratelimit_policyd::persist::sqlite::SqliteBackend;
use ratelimit_policyd::stats::Stats;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

/// Raises this process's open-file limit to `n` (or its hard limit).
fn raise_nofile(n: u64) -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on this process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        // Root may raise the hard limit too; otherwise stay under it.
        let raised = libc::rlimit {
            rlim_cur: n,
            rlim_max: n.max(rl.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            rl = raised;
        } else {
            rl.rlim_cur = n.min(rl.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
    rl.rlim_cur
}

#[tokio::test]
async fn metacharacters_and_nul_bytes_are_stored_verbatim() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(SqliteBackend::open(&dir.path().join("r.db"), "ratelimit").unwrap());
    let mut s = start_with(
        "[limits]\ndefault_quota = 5\n",
        backend,
        ManualClock::new(T0),
    )
    .await;
    let mut c = s.client().await;
    let keys = [
        "o'brien\"; DROP TABLE ratelimit; --@example.com",
        "100%s%n%x@example.com",
        "nul\u{0}byte@example.com",
        "cr\rin\rthe\rmiddle@example.com",
        "tab\tand\\backslash@example.com",
    ];
    for k in keys {
        assert_eq!(c.ask(&Req::rcpt(k, "i", "a@x")).await, "DUNNO", "{k:?}");
    }
    s.stop().await;
    let conn = rusqlite::Connection::open(dir.path().join("r.db")).unwrap();
    for k in keys {
        // Keys are lower-cased (SPEC §4); everything else is kept as it came.
        let k = k.to_lowercase();
        let used: u32 = conn
            .query_row("SELECT used FROM ratelimit WHERE sender = ?1", [&k], |r| {
                r.get(0)
            })
            .unwrap_or_else(|e| panic!("{k:?} not stored verbatim: {e}"));
        assert_eq!(used, 1, "{k:?}");
    }
    let n: u32 = conn
        .query_row("SELECT COUNT(*) FROM ratelimit", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, keys.len() as u32, "the table is intact");
}

#[tokio::test]
async fn a_megabyte_of_random_garbage_closes_only_that_connection() {
    let s = common::start("").await;
    let mut garbage = vec![0u8; 1 << 20];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for b in garbage.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let before = rss_kib();
    let mut bad = s.client().await;
    let _ = bad.stream.write_all(&garbage).await; // the server may close early
    bad.expect_closed().await;
    assert!(s.daemon().store.is_empty());
    assert_eq!(
        s.client()
            .await
            .ask(&Req::rcpt("ok@example.com", "i", "a@x"))
            .await,
        "DUNNO"
    );
    println!(
        "garbage: 1 MiB thrown, connection closed, RSS {before} -> {} KiB",
        rss_kib()
    );
}

/// The daemon runs as its own process (the built binary), so the 10k client
/// sockets here and its 10k server sockets each fit one process's file limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_do_not_slow_a_normal_client() {
    use common::binary::{cli, spawn, stdout, write_config};
    let idle = 10_000usize;
    let limit = raise_nofile(idle as u64 + 1_000);
    assert!(
        limit as usize > idle + 100,
        "open-file limit {limit} too low for this test"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "level = \"notice\"");
    let toml = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[limits]", "max_connections = 20000\n[limits]");
    std::fs::write(&config, toml).unwrap();
    let d = spawn(&config, &[]);
    let pid = d.child.id();
    let daemon_rss = || -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap_or(0)
    };
    let before = daemon_rss();
    let mut conns = Vec::with_capacity(idle);
    for _ in 0..idle {
        conns.push(TcpStream::connect(d.addr).await.unwrap());
    }
    // A normal client arrives after all of them and is served.
    let mut c = Client::connect(d.addr).await;
    let started = Instant::now();
    assert_eq!(
        c.ask(&Req::rcpt("busy@example.com", "i", "a@x")).await,
        "DUNNO"
    );
    let first_answer = started.elapsed();
    for n in 0..100 {
        c.ask(&Req::rcpt("busy@example.com", "i", &format!("{n}@x")))
            .await;
    }
    let hundred = started.elapsed();
    let status: serde_json::Value =
        serde_json::from_str(&stdout(&cli(&config, &["status", "--json", "--top", "0"]))).unwrap();
    assert_eq!(
        status["header"]["connections_open"].as_u64(),
        Some(idle as u64 + 1),
        "every idle connection is held"
    );
    let after = daemon_rss();
    println!(
        "idle: {idle} idle connections held; a normal client's first answer after {first_answer:?}, \
         101 answers in {hundred:?}; daemon RSS {before} -> {after} KiB ({} bytes per idle connection)",
        after.saturating_sub(before) * 1024 / idle as u64
    );
    drop(conns);
    assert_eq!(d.terminate(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_churn_is_counted_exactly() {
    let s = common::start("[limits]\ndefault_quota = 1000000\n").await;
    let before = rss_kib();
    let started = Instant::now();
    let n: u32 = std::env::var("CHURN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    for i in 0..n {
        let mut c = Client::connect(s.addr).await;
        assert_eq!(
            c.ask(&Req::rcpt("churn@example.com", &format!("i{i}"), "a@x"))
                .await,
            "DUNNO"
        );
    }
    assert_eq!(s.used("churn@example.com"), n);
    assert_eq!(
        Stats::get(&s.daemon().stats.connections_total),
        u64::from(n)
    );
    println!(
        "churn: {n} connections opened, used once and closed in {:?}; RSS {before} -> {} KiB",
        started.elapsed(),
        rss_kib()
    );
}

/// The daemon's RSS in KiB.
fn rss_of(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

/// Sends `n` requests for `user(i)`, pipelined 500 at a time, and returns
/// how many answers were `DUNNO`.
async fn flood(
    c: &mut Client,
    range: std::ops::Range<usize>,
    user: impl Fn(usize) -> String,
) -> usize {
    let mut dunno = 0;
    let ids: Vec<usize> = range.collect();
    for chunk in ids.chunks(500) {
        let mut bytes = Vec::new();
        for &i in chunk {
            bytes.extend_from_slice(
                format!(
                    "request=smtpd_access_policy\nprotocol_state=RCPT\nsasl_username={}\ninstance=f{i}\n\n",
                    user(i)
                )
                .as_bytes(),
            );
        }
        c.send(&bytes).await;
        for _ in chunk {
            if c.reply().await.expect("an answer") == "DUNNO" {
                dunno += 1;
            }
        }
    }
    dunno
}

/// Anyone who reaches the policy port can forge `sasl_username`. Logins
/// longer than 255 bytes get `key_too_long_action` and no counter; past
/// `max_counters`, new senders get `counters_full_action` and no counter.
/// Memory and the database stay bounded; the log says what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_logins_cannot_grow_memory_or_the_database() {
    use common::binary::{cli, spawn, stdout, write_config};
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "default_quota = 1000", "level = \"notice\"");
    let toml = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("max_counters = 10000\n{toml}")
            .replace("[database]\n", "[database]\nflush_interval = \"1s\"\n"),
    )
    .unwrap();
    let d = spawn(&config, &[]);
    let mut c = Client::connect(d.addr).await;
    let before = rss_of(d.pid);
    assert_eq!(
        flood(&mut c, 0..10_000, |i| format!("user{i}@example.com")).await,
        10_000
    );
    let at_cap = rss_of(d.pid);
    // 100,000 more distinct senders: answered, but not counted.
    let beyond = flood(&mut c, 10_000..110_000, |i| format!("user{i}@example.com")).await;
    assert_eq!(beyond, 100_000, "counters_full_action is DUNNO by default");
    let after_flood = rss_of(d.pid);
    // 5,000 logins of 8 KB: refused, never a counter.
    // Just under the 8 KiB line bound.
    let long = |i: usize| format!("{i}{}", "x".repeat(8_000));
    assert_eq!(flood(&mut c, 0..5_000, long).await, 0, "all refused");
    let after_long = rss_of(d.pid);
    let status = stdout(&cli(&config, &["status", "--json", "--top", "0"]));
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert!(
        v["header"]["counters"].as_u64().unwrap() <= 10_000,
        "{status}"
    );
    assert_eq!(v["header"]["decisions"]["counters_full"], 100_000);
    assert_eq!(v["header"]["decisions"]["key_too_long"], 5_000);
    // Known senders are still limited at the cap.
    let mut known = Client::connect(d.addr).await;
    assert_eq!(
        known.ask(&Req::rcpt("user7@example.com", "k", "r@x")).await,
        "DUNNO"
    );
    assert_eq!(d.terminate(), 0);
    let db = std::fs::metadata(dir.path().join("ratelimit.db"))
        .unwrap()
        .len()
        + std::fs::metadata(dir.path().join("ratelimit.db-wal")).map_or(0, |m| m.len());
    println!(
        "RSS KiB: start {before}, 10k senders {at_cap}, +100k beyond the cap {after_flood}, \
         +5k logins of 8 KB {after_long}; database {db} bytes"
    );
    assert!(
        after_flood < at_cap + 8 * 1024,
        "100k senders beyond the cap: RSS {at_cap} -> {after_flood} KiB"
    );
    assert!(
        after_long < after_flood + 8 * 1024,
        "40 MB of long logins: RSS {after_flood} -> {after_long} KiB"
    );
    assert!(db < 8 * 1024 * 1024, "database {db} bytes for 10k senders");
    let log = std::fs::read_to_string(dir.path().join("ratelimit-policyd.log")).unwrap();
    assert!(log.contains("max_counters"), "{log}");
    assert!(log.contains("longer than 255 bytes"), "{log}");
}
