//! SPEC §2 and §10 over real sockets: framing, bounds, timeouts, peers,
//! connection limits, listeners.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UnixStream};

use common::{is_deferred, start, Client, Req};
use ratelimit_policyd::stats::Stats;

const ALICE: &str = "alice@example.com";

#[tokio::test]
async fn crlf_and_equals_in_values() {
    let s = start("[limits]\ndefault_quota = 5\n").await;
    let mut c = s.client().await;
    let crlf = String::from_utf8(Req::rcpt("Bob@Example.com", "i1", "a@x").bytes())
        .unwrap()
        .replace('\n', "\r\n");
    c.send(crlf.as_bytes()).await;
    assert_eq!(c.reply().await.as_deref(), Some("DUNNO"));
    // The CR is not part of the key.
    assert_eq!(s.used("bob@example.com"), 1);
    // Split at the first '=': the key keeps its '=' characters.
    c.ask(&Req::rcpt("a=b==c@example.com", "i1", "a@x")).await;
    assert_eq!(s.used("a=b==c@example.com"), 1);
}

#[tokio::test]
async fn one_reply_per_request_in_order_on_one_connection() {
    let s = start("[limits]\ndefault_quota = 2\n").await;
    let mut c = s.client().await;
    // Four requests in one write: answers come back in order.
    let mut batch = Vec::new();
    for r in ["a@x", "b@x", "c@x", "d@x"] {
        batch.extend(Req::rcpt(ALICE, "i1", r).bytes());
    }
    c.send(&batch).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(c.reply().await.unwrap());
    }
    assert_eq!(&got[..2], ["DUNNO", "DUNNO"]);
    assert!(is_deferred(&got[2]) && is_deferred(&got[3]));
    // The connection stays open for more.
    assert!(is_deferred(&c.ask(&Req::rcpt(ALICE, "i2", "e@x")).await));
}

/// Each bound closes the connection without a reply, charges nothing, and
/// leaves the server answering others.
#[tokio::test]
async fn bounds_close_the_connection_without_a_reply() {
    let s = start("").await;
    let long_line = format!(
        "request=smtpd_access_policy\nsasl_username={}\n\n",
        "a".repeat(8 * 1024)
    );
    let many_attrs: String =
        (0..257).map(|i| format!("x{i}=1\n")).collect::<String>() + "sasl_username=u\n\n";
    // 70 lines of 1000 bytes: each line is fine, the request is over 64 KiB.
    let big_request: String = (0..70)
        .map(|i| format!("x{i}={}\n", "b".repeat(995)))
        .collect::<String>()
        + "\n";
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("line over 8 KiB", long_line.into_bytes()),
        ("over 256 attributes", many_attrs.into_bytes()),
        ("request over 64 KiB", big_request.into_bytes()),
        (
            "invalid UTF-8 in a used value",
            b"request=smtpd_access_policy\nsasl_username=\xff\xfe\n\n".to_vec(),
        ),
        (
            "line without '='",
            b"request=smtpd_access_policy\nHELLO\n\n".to_vec(),
        ),
        ("200 KB without a newline", vec![b'z'; 200_000]),
    ];
    for (what, bytes) in cases {
        let mut c = s.client().await;
        // The server may close before it has read everything: ignore write errors.
        let _ = c.stream.write_all(&bytes).await;
        c.expect_closed().await;
        assert!(s.daemon().store.is_empty(), "{what}: nothing charged");
    }
    assert_eq!(Stats::get(&s.daemon().stats.protocol_errors), 6);
    assert_eq!(
        s.client().await.ask(&Req::rcpt(ALICE, "i", "a@x")).await,
        "DUNNO"
    );
}

#[tokio::test]
async fn limits_are_exact() {
    let s = start("").await;
    let mut c = s.client().await;
    // A line of exactly 8 KiB and 256 attributes are accepted.
    let value = "a".repeat(8 * 1024 - "x=".len());
    let mut req = Req::rcpt(ALICE, "i1", "a@x").with("x", &value);
    while req.attrs.len() < 256 {
        let n = req.attrs.len();
        req = req.with(&format!("pad{n}"), "1");
    }
    assert_eq!(c.ask(&req).await, "DUNNO");
}

#[tokio::test]
async fn a_partial_request_at_eof_is_dropped() {
    let s = start("").await;
    let mut c = s.client().await;
    let full = Req::rcpt(ALICE, "i1", "a@x").bytes();
    c.send(&full[..full.len() - 1]).await; // all but the closing empty line
    c.stream.shutdown().await.unwrap();
    c.expect_closed().await;
    assert!(s.daemon().store.is_empty());
}

#[tokio::test(start_paused = true)]
async fn idle_connections_are_closed_after_idle_timeout() {
    let s = start("idle_timeout = \"600s\"\n").await;
    let mut c = s.client().await;
    assert_eq!(c.ask(&Req::rcpt(ALICE, "i1", "a@x")).await, "DUNNO");
    let answered = tokio::time::Instant::now();
    // Nothing more is sent; tokio's paused clock jumps to the next timer.
    c.expect_closed().await;
    assert!(
        answered.elapsed() >= Duration::from_secs(600),
        "closed after {:?}",
        answered.elapsed()
    );
    assert_eq!(Stats::get(&s.daemon().stats.idle_timeouts), 1);
}

#[tokio::test(start_paused = true)]
async fn a_request_trickling_in_must_complete_within_idle_timeout() {
    let s = start("idle_timeout = \"10s\"\n").await;
    let mut c = s.client().await;
    let started = tokio::time::Instant::now();
    let bytes = Req::rcpt(ALICE, "i1", "a@x").bytes();
    // One byte a second (slowloris): the connection is closed after 10 s,
    // although bytes keep arriving.
    let mut closed = false;
    for b in &bytes {
        if c.stream.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await; // paused clock: instant
        let mut probe = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::ZERO, c.stream.read(&mut probe)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "slowloris was never cut off");
    assert!(
        started.elapsed() <= Duration::from_secs(12),
        "cut off after {:?}",
        started.elapsed()
    );
    assert!(s.daemon().store.is_empty());
}

#[tokio::test]
async fn clients_outside_allowed_clients_are_closed_without_reply() {
    let s = start("allowed_clients = [\"127.0.0.1/32\"]\n").await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut c = Client::from_stream(socket.connect(s.addr).await.unwrap());
    let _ = c
        .stream
        .write_all(&Req::rcpt(ALICE, "i1", "a@x").bytes())
        .await;
    c.expect_closed().await;
    assert!(s.daemon().store.is_empty());
    assert_eq!(Stats::get(&s.daemon().stats.clients_refused), 1);
    // 127.0.0.1 is allowed.
    assert_eq!(
        s.client().await.ask(&Req::rcpt(ALICE, "i1", "a@x")).await,
        "DUNNO"
    );
}

#[tokio::test]
async fn past_max_connections_clients_wait_for_a_free_slot() {
    let s = start("max_connections = 1\n").await;
    let mut first = s.client().await;
    assert_eq!(first.ask(&Req::rcpt(ALICE, "i1", "a@x")).await, "DUNNO");
    // The second client connects (kernel backlog) and sends its request...
    let mut second = s.client().await;
    second.send(&Req::rcpt(ALICE, "i2", "b@x").bytes()).await;
    // ...while the first keeps being served on its slot,
    assert_eq!(first.ask(&Req::rcpt(ALICE, "i3", "c@x")).await, "DUNNO");
    // and the second has not been accepted.
    let stats = &s.daemon().stats;
    assert_eq!(Stats::get(&stats.connections_total), 1);
    assert_eq!(s.used(ALICE), 2);
    // When the first leaves, the second is served.
    drop(first);
    assert_eq!(second.reply().await.as_deref(), Some("DUNNO"));
    assert_eq!(s.used(ALICE), 3);
    assert_eq!(Stats::get(&stats.connections_total), 2);
}

#[tokio::test]
async fn listens_on_ipv6() {
    let s = start("listen = \"[::1]:0\"\n").await;
    assert!(s.addr.is_ipv6());
    assert_eq!(
        s.client().await.ask(&Req::rcpt(ALICE, "i1", "a@x")).await,
        "DUNNO"
    );
}

#[tokio::test]
async fn listens_on_a_unix_socket_with_mode_0660() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.sock");
    // A stale socket file from a crashed daemon is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let mut s = start(&format!("listen = \"unix:{}\"\n", path.display())).await;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let mut stream = UnixStream::connect(&path).await.unwrap();
    stream
        .write_all(&Req::rcpt(ALICE, "i1", "a@x").bytes())
        .await
        .unwrap();
    let mut reply = [0u8; 14];
    stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"action=DUNNO\n\n");
    drop(stream);
    s.stop().await;
    assert!(!path.exists(), "socket removed on shutdown");
}

#[tokio::test]
async fn shutdown_answers_what_was_read_and_closes_idle_connections() {
    let mut s = start("").await;
    let mut idle = s.client().await;
    assert_eq!(idle.ask(&Req::rcpt(ALICE, "i1", "a@x")).await, "DUNNO");
    let report = s.stop().await;
    idle.expect_closed().await;
    assert_eq!(report.rows, 1, "final flush wrote the counter");
    assert_eq!(s.backend.row(ALICE).unwrap().used, 1);
}
