//! `ratelimit-loadgen`: load for a Postfix policy server, the way Postfix's
//! smtpd processes make it, and the reference it is measured against.
//!
//! - `run`: C persistent connections; each sends one request (29 attributes,
//!   about 700 bytes, as Postfix 3.7 sends them) and waits for the reply.
//!   Senders come from U users, uniformly or by Zipf. Every reply must be
//!   exactly `action=...` and an empty line. Reports req/s, latency
//!   percentiles and answers by kind, as text or JSON.
//! - `floor`: a minimal responder that answers every request `DUNNO` with no
//!   policy work; the daemon's throughput is quoted as a ratio to it,
//!   measured in the same conditions.
//! - `populate-sqlite`: writes N senders into a ratelimit-policyd SQLite file,
//!   for runs with a million cached senders.
//!
//! Targets must be on loopback.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(
    name = "ratelimit-loadgen",
    about = "Load generator for Postfix policy servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send load and report throughput and latency.
    Run(RunArgs),
    /// Answer every request DUNNO, doing nothing else (the reference).
    Floor {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:10033")]
        listen: SocketAddr,
    },
    /// Write N senders (user0@example.com, ...) into an SQLite file.
    PopulateSqlite {
        /// The database file (created if missing).
        #[arg(long)]
        path: std::path::PathBuf,
        /// How many senders.
        #[arg(long)]
        users: u64,
        /// Their quota.
        #[arg(long, default_value_t = 1_000_000_000)]
        quota: u32,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Stage {
    Rcpt,
    Mail,
    Data,
    EndOfMessage,
}

impl Stage {
    fn protocol_state(self) -> &'static str {
        match self {
            Stage::Rcpt => "RCPT",
            Stage::Mail => "MAIL",
            Stage::Data => "DATA",
            Stage::EndOfMessage => "END-OF-MESSAGE",
        }
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// The policy server.
    #[arg(long, default_value = "127.0.0.1:10032")]
    target: SocketAddr,
    /// Persistent connections (smtpd processes).
    #[arg(short, long, default_value_t = 64)]
    connections: usize,
    /// Distinct senders.
    #[arg(short, long, default_value_t = 100_000)]
    users: u64,
    /// Zipf exponent for picking senders; 0 = uniform.
    #[arg(long, default_value_t = 0.0)]
    zipf: f64,
    /// The protocol_state of the requests.
    #[arg(long, value_enum, default_value = "rcpt")]
    stage: Stage,
    /// Seconds of measurement.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Stop after this many measured requests instead.
    #[arg(long)]
    requests: Option<u64>,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Seed for the sender choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Serialize, Default)]
struct Report {
    target: String,
    connections: usize,
    users: u64,
    zipf: f64,
    stage: String,
    seconds: f64,
    requests: u64,
    req_per_sec: f64,
    latency_us: Latency,
    actions: Actions,
    errors: u64,
}

#[derive(Serialize, Default)]
struct Latency {
    p50: u32,
    p90: u32,
    p99: u32,
    p999: u32,
    max: u32,
}

#[derive(Serialize, Default)]
struct Actions {
    dunno: u64,
    defer: u64,
    other: u64,
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// xorshift64*: enough to spread senders, and cheap.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks senders uniformly or by Zipf (a precomputed CDF, binary search).
struct Picker {
    users: u64,
    cdf: Option<Vec<f64>>,
}

impl Picker {
    fn new(users: u64, zipf: f64) -> Picker {
        if zipf <= 0.0 {
            return Picker { users, cdf: None };
        }
        let mut cdf = Vec::with_capacity(users as usize);
        let mut total = 0.0;
        for i in 0..users {
            total += 1.0 / ((i + 1) as f64).powf(zipf);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Picker {
            users,
            cdf: Some(cdf),
        }
    }

    fn pick(&self, rng: &mut Rng) -> u64 {
        match &self.cdf {
            None => rng.next() % self.users,
            Some(cdf) => {
                let u = rng.unit();
                cdf.partition_point(|&c| c < u) as u64
            }
        }
    }
}

/// Writes one Postfix 3.7-like request into `out` (about 700 bytes).
fn build_request(out: &mut Vec<u8>, stage: Stage, user: u64, seq: u64, conn: usize) {
    out.clear();
    let message = seq / 3; // three recipients per message
    let rcpt_count = if matches!(stage, Stage::Data | Stage::EndOfMessage) {
        3
    } else {
        0
    };
    let _ = write!(
        out,
        "request=smtpd_access_policy\nprotocol_state={state}\nprotocol_name=ESMTP\n\
         client_address=192.0.2.{c}\nclient_name=mail{c}.client.example\nclient_port={port}\n\
         reverse_client_name=mail{c}.client.example\nserver_address=127.0.0.1\nserver_port=587\n\
         helo_name=mail{c}.client.example\nsender=user{user}@example.com\n\
         recipient=rcpt{seq}@destination.example\nrecipient_count={rcpt_count}\nqueue_id=\n\
         instance={conn:x}.{message:x}.0\nsize=2048\netrn_domain=\nstress=\nsasl_method=PLAIN\n\
         sasl_username=user{user}@example.com\nsasl_sender=\nccert_subject=\nccert_issuer=\n\
         ccert_fingerprint=\nccert_pubkey_fingerprint=\nencryption_protocol=TLSv1.3\n\
         encryption_cipher=TLS_AES_256_GCM_SHA384\nencryption_keysize=256\npolicy_context=\n\
         compatibility_level=3.6\n\n",
        state = stage.protocol_state(),
        c = conn % 250 + 1,
        port = 40_000 + conn % 20_000,
    );
}

struct Shared {
    phase: AtomicU8,
    measured: AtomicU64,
    limit: Option<u64>,
    picker: Picker,
}

#[derive(Default)]
struct WorkerResult {
    latencies: Vec<u32>,
    actions: Actions,
    errors: u64,
}

async fn worker(
    target: SocketAddr,
    id: usize,
    stage: Stage,
    seed: u64,
    shared: Arc<Shared>,
) -> anyhow::Result<WorkerResult> {
    let mut stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connect {target}"))?;
    stream.set_nodelay(true)?;
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (id as u64 + 1) | 1);
    let mut req = Vec::with_capacity(1024);
    let mut buf = vec![0u8; 4096];
    let mut result = WorkerResult::default();
    let mut seq = 0u64;
    loop {
        let phase = shared.phase.load(Ordering::Relaxed);
        if phase == STOP {
            break;
        }
        seq += 1;
        let user = shared.picker.pick(&mut rng);
        build_request(&mut req, stage, user, seq, id);
        let started = Instant::now();
        stream.write_all(&req).await?;
        let mut len = 0;
        loop {
            if len == buf.len() {
                bail!("reply larger than {} bytes", buf.len());
            }
            let n = stream.read(&mut buf[len..]).await?;
            if n == 0 {
                bail!("the server closed connection {id}");
            }
            len += n;
            if buf[..len].ends_with(b"\n\n") {
                break;
            }
        }
        let elapsed = started.elapsed();
        if phase != MEASURE {
            continue;
        }
        let reply = &buf[..len];
        let valid = reply.starts_with(b"action=") && memchr_count(reply) == 2;
        if !valid {
            result.errors += 1;
        } else if reply.starts_with(b"action=DUNNO\n") {
            result.actions.dunno += 1;
        } else if reply.starts_with(b"action=DEFER") {
            result.actions.defer += 1;
        } else {
            result.actions.other += 1;
        }
        result
            .latencies
            .push(u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX));
        let measured = shared.measured.fetch_add(1, Ordering::Relaxed) + 1;
        if shared.limit.is_some_and(|l| measured >= l) {
            shared.phase.store(STOP, Ordering::Relaxed);
        }
    }
    Ok(result)
}

fn memchr_count(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&c| c == b'\n').count()
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    if !args.target.ip().is_loopback() {
        bail!("the target must be on loopback (127.0.0.0/8 or ::1)");
    }
    let shared = Arc::new(Shared {
        phase: AtomicU8::new(WARMUP),
        measured: AtomicU64::new(0),
        limit: args.requests,
        picker: Picker::new(args.users.max(1), args.zipf),
    });
    let mut tasks = Vec::new();
    for id in 0..args.connections {
        tasks.push(tokio::spawn(worker(
            args.target,
            id,
            args.stage,
            args.seed,
            Arc::clone(&shared),
        )));
    }
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    shared.phase.store(MEASURE, Ordering::Relaxed);
    let started = Instant::now();
    if args.requests.is_none() {
        tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
        shared.phase.store(STOP, Ordering::Relaxed);
    }
    let mut latencies = Vec::new();
    let mut report = Report::default();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await??);
    }
    let seconds = started.elapsed().as_secs_f64();
    for r in results {
        latencies.extend(r.latencies);
        report.actions.dunno += r.actions.dunno;
        report.actions.defer += r.actions.defer;
        report.actions.other += r.actions.other;
        report.errors += r.errors;
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1));
        latencies.get(i).copied().unwrap_or(0)
    };
    report.target = args.target.to_string();
    report.connections = args.connections;
    report.users = args.users;
    report.zipf = args.zipf;
    report.stage = args.stage.protocol_state().to_string();
    report.seconds = seconds;
    report.requests = latencies.len() as u64;
    report.req_per_sec = latencies.len() as f64 / seconds;
    report.latency_us = Latency {
        p50: pct(0.50),
        p90: pct(0.90),
        p99: pct(0.99),
        p999: pct(0.999),
        max: latencies.last().copied().unwrap_or(0),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let l = &report.latency_us;
        println!(
            "{} connections={} users={} zipf={} stage={}: {} requests in {:.1}s = {:.0} req/s; \
             latency us p50={} p90={} p99={} p99.9={} max={}; dunno={} defer={} other={} errors={}",
            report.target,
            report.connections,
            report.users,
            report.zipf,
            report.stage,
            report.requests,
            report.seconds,
            report.req_per_sec,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            report.actions.dunno,
            report.actions.defer,
            report.actions.other,
            report.errors
        );
    }
    if report.errors > 0 {
        bail!(
            "{} replies were not exactly `action=...` and an empty line",
            report.errors
        );
    }
    Ok(())
}

/// The reference: frames requests at the empty line and answers DUNNO.
async fn floor(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!("floor listening on {}", listener.local_addr()?);
    loop {
        let (mut stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut len = 0;
            let mut out = Vec::new();
            loop {
                let Ok(n) = stream.read(&mut buf[len..]).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                len += n;
                let mut start = 0;
                while let Some(end) = buf[start..len].windows(2).position(|w| w == b"\n\n") {
                    out.extend_from_slice(b"action=DUNNO\n\n");
                    start += end + 2;
                }
                buf.copy_within(start..len, 0);
                len -= start;
                if len == buf.len() {
                    return; // not a policy client
                }
                if !out.is_empty() {
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                }
            }
        });
    }
}

fn populate_sqlite(path: &std::path::Path, users: u64, quota: u32) -> anyhow::Result<()> {
    // Let the daemon's own backend create the table, so the layout is its.
    drop(
        ratelimit_policyd::persist::sqlite::SqliteBackend::open(path, "ratelimit")
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let mut conn = rusqlite::Connection::open(path)?;
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare(
            "INSERT OR REPLACE INTO ratelimit (sender, quota, used, expiry, persist) VALUES (?1, ?2, 0, 4102444800, 0)",
        )?;
        for i in 0..users {
            stmt.execute(rusqlite::params![format!("user{i}@example.com"), quota])?;
        }
    }
    tx.commit()?;
    eprintln!("{users} senders written to {}", path.display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::PopulateSqlite { path, users, quota } => populate_sqlite(&path, users, quota),
        Cmd::Floor { listen } => {
            // Same runtime shape as the daemon's: one worker per core.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(floor(listen))
        }
        Cmd::Run(args) => {
            // One thread: the generator takes one core and leaves the rest
            // to the server under test.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run(args))
        }
    }
}
