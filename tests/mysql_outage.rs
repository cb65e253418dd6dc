//! SPEC §6 outages on a private mariadbd the test starts, stops, freezes and
//! restarts: nothing is lost, requests never wait.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::mysql::{PrivateServer, TestDb};
use common::{start_with, Client, Req, T0};
use ratelimit_policyd::clock::ManualClock;
use ratelimit_policyd::persist::mysql::MysqlBackend;

const KEY: &str = "load@example.com";
const LIMITS: &str =
    "[limits]\ndefault_quota = 4000000000\ntimezone = \"UTC\"\n[database]\nflush_interval = \"1s\"\n";

/// A client that keeps sending requests until told to stop; counts answers.
fn spawn_load(
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut c = Client::connect(addr).await;
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let a = c.ask(&Req::rcpt(KEY, &format!("i{n}"), "r@x")).await;
            assert_eq!(a, "DUNNO");
            answered.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_database_loses_nothing_under_load() {
    let mut server = PrivateServer::start();
    let db = TestDb::create(&server.admin_url(), "outage").await;
    let backend = Arc::new(MysqlBackend::new(&db.url(), None, "ratelimit").unwrap());
    let mut s = start_with(LIMITS, backend, ManualClock::new(T0)).await;
    let (stop, answered) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let load = spawn_load(s.addr, Arc::clone(&stop), Arc::clone(&answered));

    s.daemon().flush.flush().await.unwrap();
    server.stop();
    let during_outage = answered.load(Ordering::SeqCst);
    assert!(
        s.daemon().flush.flush().await.is_err(),
        "the database is down"
    );
    // Requests go on while it is down (the load task asserts every answer).
    // OUTAGE_SECONDS keeps it down longer under load (.ci/run: a minute).
    let outage: u64 = std::env::var("OUTAGE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    tokio::time::sleep(std::time::Duration::from_secs(outage)).await;
    let down_since = answered.load(Ordering::SeqCst);
    assert!(s.daemon().flush.flush().await.is_err(), "still down");
    server.resume_from_stopped();
    assert!(
        answered.load(Ordering::SeqCst) > down_since,
        "requests were answered while the server was down and restarting"
    );
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    let total = answered.load(Ordering::SeqCst);
    // The backlog drains: the next flush writes everything.
    s.daemon().flush.flush().await.unwrap();
    assert_eq!(
        db.row(KEY).await.map(|r| u64::from(r.1)),
        Some(total),
        "zero counts lost"
    );
    println!(
        "outage: {outage} s of extra down time; {total} requests answered, {} of them after the server stopped; none lost",
        total - during_outage
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_database_does_not_hold_requests() {
    let server = PrivateServer::start();
    let db = TestDb::create(&server.admin_url(), "frozen").await;
    let backend = Arc::new(MysqlBackend::new(&db.url(), None, "ratelimit").unwrap());
    let mut s = start_with(LIMITS, backend, ManualClock::new(T0)).await;
    let mut c = s.client().await;
    c.ask(&Req::rcpt(KEY, "warm", "r@x")).await;
    s.daemon().flush.flush().await.unwrap();

    server.freeze();
    c.ask(&Req::rcpt(KEY, "before", "r@x")).await;
    // A flush now hangs on the frozen server (until its timeout)...
    let flush = s.daemon().flush.clone();
    let stuck = tokio::spawn(async move { flush.flush().await });
    // ...while requests are answered.
    let mut latencies = Vec::new();
    for n in 0..500 {
        let started = Instant::now();
        assert_eq!(
            c.ask(&Req::rcpt(KEY, &format!("f{n}"), "r@x")).await,
            "DUNNO"
        );
        latencies.push(started.elapsed());
    }
    assert!(
        !stuck.is_finished(),
        "the flush was still waiting on the frozen database all along"
    );
    latencies.sort();
    println!(
        "frozen database: 500 requests answered, p50 {:?}, p99 {:?}, max {:?}",
        latencies[250], latencies[495], latencies[499]
    );
    server.thaw();
    let _ = stuck.await.unwrap(); // done or timed out; either way nothing is lost
    s.daemon().flush.flush().await.unwrap();
    assert_eq!(
        db.row(KEY).await.map(|r| r.1),
        Some(502),
        "the backlog drained"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_started_while_the_database_is_down_serves_and_loads_later() {
    let mut server = PrivateServer::start();
    let db = TestDb::create(&server.admin_url(), "late").await;
    db.exec(&format!(
        "INSERT INTO ratelimit (sender, quota, used, expiry, persist) VALUES ('busy@example.com', 3, 3, {}, 1)",
        T0 + 3600
    ))
    .await;
    server.stop();
    let backend = Arc::new(MysqlBackend::new(&db.url(), None, "ratelimit").unwrap());
    let mut s = start_with(
        "[limits]\ndefault_quota = 5\ntimezone = \"UTC\"\n",
        backend,
        ManualClock::new(T0),
    )
    .await;
    let mut c = s.client().await;
    // Not loaded yet: the sender starts from 0 with the default quota.
    assert_eq!(
        c.ask(&Req::rcpt("busy@example.com", "i", "a@x")).await,
        "DUNNO"
    );
    assert!(s.daemon().flush.refresh().await.is_err());
    server.resume_from_stopped();
    // The first refresh that works loads every row and merges what was counted meanwhile.
    assert_eq!(s.daemon().flush.refresh().await, Ok(1));
    let refused = c.ask(&Req::rcpt("busy@example.com", "i", "b@x")).await;
    assert!(
        refused.contains("(5/3)"),
        "3 stored + 1 counted while down + this one: {refused}"
    );
    s.stop().await;
    assert_eq!(
        db.row("busy@example.com").await.map(|r| (r.0, r.1)),
        Some((3, 5))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_refusing_new_connections_is_waited_out() {
    use mysql_async::prelude::Queryable;
    let server = PrivateServer::start();
    let db = TestDb::create(&server.admin_url(), "full").await;
    let admin = mysql_async::Pool::new(server.admin_url().as_str());
    // An ordinary login, as the daemon has in production: administrators
    // (CONNECTION ADMIN) are exempt from max_connections.
    let mut a = admin.get_conn().await.unwrap();
    a.query_drop("CREATE USER 'policyd'@'127.0.0.1' IDENTIFIED BY 'pw'")
        .await
        .unwrap();
    let grant = format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON {}.* TO 'policyd'@'127.0.0.1'",
        db.name
    );
    a.query_drop(grant).await.unwrap();
    a.query_drop("SET GLOBAL max_connections = 4")
        .await
        .unwrap();
    drop(a);
    let url = format!("mysql://policyd:pw@127.0.0.1:{}/{}", server.port, db.name);
    // Take every connection the server will give.
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..10 {
        match mysql_async::Conn::new(mysql_async::Opts::from_url(&url).unwrap()).await {
            Ok(c) => held.push(c),
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    let refused = refused.expect("the server kept accepting");
    assert!(
        refused.contains("1040") || refused.to_lowercase().contains("too many"),
        "{refused}"
    );
    // The daemon starts anyway, answers, and cannot flush.
    let backend = Arc::new(MysqlBackend::new(&url, None, "ratelimit").unwrap());
    let mut s = start_with(LIMITS, backend, ManualClock::new(T0)).await;
    let mut c = s.client().await;
    for n in 0..50 {
        assert_eq!(
            c.ask(&Req::rcpt(KEY, &format!("i{n}"), "r@x")).await,
            "DUNNO"
        );
    }
    let err = s.daemon().flush.flush().await.unwrap_err().to_string();
    assert!(
        err.contains("1040") || err.to_lowercase().contains("too many"),
        "{err}"
    );
    // Connections free up: the start-up load happens and the backlog is written.
    for conn in held {
        let _ = conn.disconnect().await;
    }
    s.daemon().flush.refresh().await.unwrap();
    s.daemon().flush.flush().await.unwrap();
    assert_eq!(db.row(KEY).await.map(|r| r.1), Some(50));
    s.stop().await;
    admin.disconnect().await.unwrap();
}

/// SIGHUP and SIGUSR1 (logrotate sends it whenever it runs) while the
/// start-up load waits on the database must neither kill the daemon nor be
/// forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_during_the_start_up_load_are_handled_after_it() {
    use common::binary::{use_database, write_config, Spawn};
    use common::mysql::admin_url;
    use common::proxy::Proxy;
    let db = TestDb::create(&admin_url(), "sigload").await;
    let proxy = Proxy::start("127.0.0.1:3306");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    use_database(&config, &proxy.url_for(&db.url()));
    proxy.freeze();
    let mut d = Spawn {
        ready: "ratelimit-policyd",
        ..Spawn::default()
    }
    .start(&config);
    // The daemon is inside its start-up load once it has connected.
    for _ in 0..3000 {
        if proxy.connections() > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(proxy.connections() > 0, "the daemon never connected");
    d.signal(libc::SIGHUP);
    d.signal(libc::SIGUSR1);
    proxy.thaw();
    d.wait_listening();
    d.wait_for("reloaded");
    assert!(d.child.try_wait().unwrap().is_none(), "still running");
    assert_eq!(d.terminate(), 0);
}

/// SIGTERM with the database frozen (SIGSTOP: connections stay open, nothing
/// is answered): the whole final flush, closing the connections included, is
/// bounded by the README's 10 s; the daemon says what it could not save and
/// exits 75.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_frozen_database_is_bounded() {
    use common::binary::{use_database, write_config, Spawn};
    let server = PrivateServer::start();
    let db = TestDb::create(&server.admin_url(), "frozenstop").await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    // No periodic flush may write the counts before the freeze.
    let toml = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[database]\n", "[database]\nflush_interval = \"1h\"\n");
    std::fs::write(&config, toml).unwrap();
    use_database(&config, &db.url());
    let d = Spawn::default().start(&config);
    let mut c = Client::connect(d.addr).await;
    for n in 0..5 {
        c.ask(&Req::rcpt(KEY, &format!("i{n}"), "r@x")).await;
    }
    drop(c);
    server.freeze();
    let started = Instant::now();
    let code = d.terminate();
    let took = started.elapsed();
    server.thaw();
    println!("SIGTERM with a frozen database: exit {code} after {took:?}");
    assert_eq!(code, 75, "counts could not be saved");
    assert!(
        took < std::time::Duration::from_secs(12),
        "the final flush gives up after 10 s: took {took:?}"
    );
}

/// Case 9 as an administrator sees it: started against a port where nothing
/// listens, `status` says the database is down since start, with the error,
/// and that the counters are not loaded; a flush with nothing to write does
/// not make the log or `status` claim it came back.
#[tokio::test]
async fn a_database_never_reached_is_reported_down_with_its_error() {
    use common::binary::{cli, stdout, use_database, write_config, Spawn};
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    use_database(
        &config,
        &format!("mysql://root@127.0.0.1:{port}/nothing?prefer_socket=false"),
    );
    let d = Spawn::default().start(&config);
    assert!(
        cli(&config, &["flush"]).status.success(),
        "nothing to write"
    );
    let text = stdout(&cli(&config, &["status"]));
    let first = text.lines().next().unwrap_or_default();
    assert!(first.contains("mysql down since "), "{text}");
    assert!(text.contains("counters not loaded yet"), "{text}");
    assert!(
        text.contains("last database error") && text.contains("reads: "),
        "{text}"
    );
    let json = stdout(&cli(&config, &["status", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["header"]["database_state"], "down");
    assert_eq!(v["header"]["loaded"], false);
    assert_eq!(d.terminate(), 0);
    let log = std::fs::read_to_string(dir.path().join("ratelimit-policyd.log")).unwrap();
    assert!(!log.contains("available again"), "{log}");
}

/// SIGTERM while a flush hangs on a frozen database: the hanging job is cut
/// short, and the final flush gets `database.timeout` — not the hanging job's
/// time plus that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_a_hanging_flush_short() {
    use common::binary::{cli_within, use_database, write_config, Spawn};
    use common::mysql::admin_url;
    use common::proxy::Proxy;
    let db = TestDb::create(&admin_url(), "cutshort").await;
    let proxy = Proxy::start("127.0.0.1:3306");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    let toml = std::fs::read_to_string(&config).unwrap().replace(
        "[database]\n",
        "[database]\ntimeout = \"3s\"\nflush_interval = \"1h\"\n",
    );
    std::fs::write(&config, toml).unwrap();
    use_database(&config, &proxy.url_for(&db.url()));
    let d = Spawn::default().start(&config);
    let mut c = Client::connect(d.addr).await;
    for n in 0..5 {
        c.ask(&Req::rcpt(KEY, &format!("i{n}"), "r@x")).await;
    }
    drop(c);
    proxy.freeze();
    let held = proxy.held();
    let flushing = {
        let config = config.clone();
        std::thread::spawn(move || cli_within(&config, &["flush"], 30))
    };
    // Wait until the flush's first statement is held by the frozen proxy.
    for _ in 0..3000 {
        if proxy.held() > held {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(proxy.held() > held, "the flush never reached the database");
    let started = Instant::now();
    let code = d.terminate();
    let took = started.elapsed();
    proxy.thaw();
    let _ = flushing.join();
    println!("SIGTERM during a hanging flush: exit {code} after {took:?}");
    assert_eq!(code, 75);
    assert!(
        took < std::time::Duration::from_secs(5),
        "database.timeout is 3 s: took {took:?}"
    );
}
