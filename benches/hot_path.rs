//! Hot-path micro-benchmarks: parsing a Postfix request, a decision for a
//! known and for a new sender, and building a flush batch of 100k rows.
//!
//! `cargo bench --bench hot_path`; results and the machine in BENCHMARKS.md.

use std::num::NonZeroU32;

use chrono::Weekday;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};

use ratelimit_policyd::config::Config;
use ratelimit_policyd::policy::{evaluate, ConnectionMemory, Policy};
use ratelimit_policyd::protocol::Parser;
use ratelimit_policyd::store::{Calendar, CounterStore, Limit, Period, Rules};

const NOW: i64 = 1_790_000_000;

/// A request as Postfix 3.7 sends it at RCPT: 29 attributes, ~700 bytes.
fn request(user: u64, seq: u64) -> Vec<u8> {
    format!(
        "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n\
         client_address=192.0.2.17\nclient_name=mail17.client.example\nclient_port=40017\n\
         reverse_client_name=mail17.client.example\nserver_address=127.0.0.1\nserver_port=587\n\
         helo_name=mail17.client.example\nsender=user{user}@example.com\n\
         recipient=rcpt{seq}@destination.example\nrecipient_count=0\nqueue_id=\n\
         instance=11.{seq:x}.0\nsize=2048\netrn_domain=\nstress=\nsasl_method=PLAIN\n\
         sasl_username=user{user}@example.com\nsasl_sender=\nccert_subject=\nccert_issuer=\n\
         ccert_fingerprint=\nccert_pubkey_fingerprint=\nencryption_protocol=TLSv1.3\n\
         encryption_cipher=TLS_AES_256_GCM_SHA384\nencryption_keysize=256\npolicy_context=\n\
         compatibility_level=3.6\n\n"
    )
    .into_bytes()
}

/// The policy as the daemon builds it from its configuration.
fn policy() -> Policy {
    Config::from_toml_str("[limits]\ndefault_quota = 4294967295\ntimezone = \"Europe/Zurich\"\n")
        .unwrap()
        .policy
}

fn parse(c: &mut Criterion) {
    let bytes = request(42, 7);
    assert!((650..800).contains(&bytes.len()), "{} bytes", bytes.len());
    c.bench_function("parse a 700-byte request", |b| {
        let mut parser = Parser::default();
        b.iter(|| {
            let (req, len) = parser.parse(black_box(&bytes)).unwrap().unwrap();
            black_box((req.sasl_username, len))
        })
    });
}

fn decide(c: &mut Criterion) {
    let policy = policy();
    let store = CounterStore::new();
    let bytes: Vec<Vec<u8>> = (0..100_000).map(|u| request(u, u)).collect();
    // Every sender known: the steady state.
    let mut memory = ConnectionMemory::default();
    for b in &bytes {
        let (req, _) = Parser::default().parse(b).unwrap().unwrap();
        evaluate(&req, &policy, &store, NOW, &mut memory);
    }
    let mut i = 0;
    c.bench_function("decide: existing sender (100k cached)", |b| {
        let mut parser = Parser::default();
        b.iter(|| {
            i = (i + 7919) % bytes.len();
            let (req, _) = parser.parse(&bytes[i]).unwrap().unwrap();
            black_box(evaluate(&req, &policy, &store, NOW, &mut memory).kind)
        })
    });
    let mut next = 1_000_000u64;
    c.bench_function("decide: new sender", |b| {
        b.iter_batched(
            || {
                next += 1;
                request(next, next)
            },
            |bytes| {
                let (req, _) = Parser::default().parse(&bytes).unwrap().unwrap();
                black_box(evaluate(&req, &policy, &store, NOW, &mut memory).kind)
            },
            BatchSize::SmallInput,
        )
    });
}

fn flush_batch(c: &mut Criterion) {
    let store = CounterStore::new();
    let limit = Limit {
        calendar: Calendar {
            period: Period::Fixed(NonZeroU32::new(86_400).unwrap()),
            tz: chrono_tz::UTC,
            week_start: Weekday::Mon,
        },
        rules: Rules {
            default_quota: 1000,
            count_rejected: true,
        },
    };
    let keys: Vec<String> = (0..100_000)
        .map(|i| format!("user{i}@example.com"))
        .collect();
    let mut group = c.benchmark_group("flush");
    group.sample_size(20);
    group.bench_function("build a batch of 100k changed rows", |b| {
        b.iter_batched(
            || {
                for k in &keys {
                    store.check_and_increment(k, 1, NOW, &limit).unwrap();
                }
            },
            |()| black_box(store.take_dirty().len()),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, parse, decide, flush_batch);
criterion_main!(benches);
