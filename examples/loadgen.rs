//! A small load generator for ratelimit-policyd: C persistent connections,
//! each sending one Postfix-3.7-like RCPT request (29 attributes, ~700 bytes)
//! and waiting for its reply, like smtpd processes do. Senders are drawn
//! uniformly from U users. Every reply is checked to be exactly
//! `action=...\n\n`.
//!
//! ```sh
//! cargo run --release --example loadgen -- 127.0.0.1:10032 [connections] [users] [seconds]
//! ```
//!
//! Only for loopback targets. The benchmark issue grows this into the full
//! tool (Zipf senders, stages, a DUNNO floor responder, JSON output).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn request(user: u64, seq: u64) -> Vec<u8> {
    format!(
        "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n\
         client_address=192.0.2.10\nclient_name=mail.client.example\nclient_port=50001\n\
         reverse_client_name=mail.client.example\nserver_address=127.0.0.1\nserver_port=25\n\
         helo_name=client.example\nsender=user{user}@example.com\nrecipient=rcpt{seq}@example.net\n\
         recipient_count=0\nqueue_id=\ninstance=1a2b.5f3e4d2c.{seq}\nsize=0\netrn_domain=\nstress=\n\
         sasl_method=PLAIN\nsasl_username=user{user}@example.com\nsasl_sender=\nccert_subject=\n\
         ccert_issuer=\nccert_fingerprint=\nccert_pubkey_fingerprint=\nencryption_protocol=TLSv1.3\n\
         encryption_cipher=TLS_AES_256_GCM_SHA384\nencryption_keysize=256\npolicy_context=\n\n"
    )
    .into_bytes()
}

/// A small xorshift generator: enough to spread senders, no dependency.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

async fn worker(addr: SocketAddr, users: u64, until: Instant, seed: u64) -> (Vec<u32>, u64) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut rng = seed | 1;
    let mut buf = vec![0u8; 4096];
    let mut seq = 0;
    while Instant::now() < until {
        seq += 1;
        let req = request(next(&mut rng) % users, seq);
        let started = Instant::now();
        stream.write_all(&req).await.expect("write");
        let mut len = 0;
        loop {
            let n = stream.read(&mut buf[len..]).await.expect("read");
            assert!(n > 0, "server closed the connection");
            len += n;
            if buf[..len].ends_with(b"\n\n") {
                break;
            }
        }
        latencies.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        let reply = &buf[..len];
        if !(reply.starts_with(b"action=") && reply.iter().filter(|&&c| c == b'\n').count() == 2) {
            errors += 1;
        }
    }
    (latencies, errors)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr: SocketAddr = args
        .get(1)
        .map_or("127.0.0.1:10032", String::as_str)
        .parse()
        .expect("ADDR");
    assert!(addr.ip().is_loopback(), "load tests target loopback only");
    let connections: u64 = args.get(2).map_or(64, |s| s.parse().expect("connections"));
    let users: u64 = args.get(3).map_or(100_000, |s| s.parse().expect("users"));
    let seconds: u64 = args.get(4).map_or(10, |s| s.parse().expect("seconds"));
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..connections)
        .map(|i| tokio::spawn(worker(addr, users, until, 0x9E37_79B9_7F4A_7C15 ^ (i + 1))))
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, err) = t.await.expect("worker");
        all.extend(lat);
        errors += err;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "connections={connections} users={users} requests={} errors={errors} req/s={:.0} \
         latency_us p50={} p90={} p99={} p99.9={} max={}",
        all.len(),
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(0.999),
        all.last().copied().unwrap_or(0)
    );
}
