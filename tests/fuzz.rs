//! Fuzzing on stable Rust: proptest-driven harnesses for the protocol codec
//! and the configuration parser, and properties of the window arithmetic.
//!
//! Each harness replays the committed corpus (`tests/corpus/`) first, then
//! runs generated cases: a few hundred in a normal `cargo test`, or for
//! `FUZZ_SECONDS` seconds each when that is set (`.ci/run` does so).
//! proptest shrinks any failure and records it in
//! `tests/corpus/proptest-regressions.txt`, which is committed and replayed.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestCaseError, TestRunner};

use ratelimit_policyd::config::Config;
use ratelimit_policyd::protocol::{Bounds, Parser, ProtocolError};
use ratelimit_policyd::store::window::{Calendar, Period};

/// Runs `test` on `strategy` for FUZZ_SECONDS (or `cases` cases).
fn fuzz<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let budget = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    let started = Instant::now();
    let mut total = 0u64;
    loop {
        let mut runner = TestRunner::new(PropConfig {
            cases: if budget.is_some() { 2000 } else { cases },
            failure_persistence: Some(Box::new(
                proptest::test_runner::FileFailurePersistence::Direct(
                    "tests/corpus/proptest-regressions.txt",
                ),
            )),
            ..PropConfig::default()
        });
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("{name}: {e}");
        }
        total += u64::from(runner.config().cases);
        match budget {
            Some(secs) if started.elapsed() < Duration::from_secs(secs) => continue,
            _ => break,
        }
    }
    println!("{name}: {total} cases in {:.1?}", started.elapsed());
}

fn corpus(dir: &str) -> Vec<(String, Vec<u8>)> {
    let path = format!("{}/tests/corpus/{dir}", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {path}");
    files
}

/// What a whole buffer parses to, one request after another, until an
/// error or the need for more bytes. Requests are reduced to the fields that
/// matter for comparison.
fn parse_all(
    parser: &mut Parser,
    buf: &[u8],
) -> (Vec<(String, String, usize)>, Option<ProtocolError>, usize) {
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        match parser.parse(&buf[start..]) {
            Ok(Some((req, len))) => {
                assert!(
                    len > 0 && start + len <= buf.len(),
                    "length {len} out of the buffer"
                );
                out.push((req.sasl_username.to_string(), req.instance.to_string(), len));
                start += len;
            }
            Ok(None) => return (out, None, start),
            Err(e) => return (out, Some(e), start),
        }
    }
}

/// The codec's invariants for any bytes, fed whole or in pieces.
fn check_codec(bytes: &[u8], cuts: &[usize]) -> Result<(), TestCaseError> {
    let bounds = Bounds::default();
    let (whole, whole_err, _) = parse_all(&mut Parser::default(), bytes);
    for (_, _, len) in &whole {
        prop_assert!(
            *len <= bounds.max_request_len,
            "a request over the bound was accepted"
        );
    }
    // The same bytes arriving in pieces give the same requests and error.
    let mut parser = Parser::default();
    let mut buf = Vec::new();
    let mut pieces = Vec::new();
    let mut last = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.push(bytes.len());
    let mut error = None;
    for cut in cuts {
        buf.extend_from_slice(&bytes[last..cut]);
        last = cut;
        let (got, err, consumed) = parse_all(&mut parser, &buf);
        pieces.extend(got);
        buf.drain(..consumed);
        if err.is_some() {
            error = err;
            break;
        }
    }
    prop_assert_eq!(&pieces, &whole);
    prop_assert_eq!(error.is_some(), whole_err.is_some());
    Ok(())
}

#[test]
fn fuzz_protocol_codec() {
    for (name, bytes) in corpus("protocol") {
        check_codec(&bytes, &[1, 7, 100, 701]).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // Random bytes, biased towards the characters that matter.
    let byte = prop_oneof![4 => any::<u8>(), 2 => Just(b'\n'), 2 => Just(b'='), 1 => Just(b'\r'), 1 => Just(b'a')];
    fuzz(
        "protocol/bytes",
        256,
        (
            prop::collection::vec(byte, 0..1500),
            prop::collection::vec(any::<usize>(), 0..8),
        ),
        |(bytes, cuts)| check_codec(&bytes, &cuts),
    );
    // Well-formed requests with random attributes: the parser agrees with a
    // model (split at the first '=', CR stripped, last repeat wins).
    let name = prop_oneof![
        Just("sasl_username".to_string()),
        Just("instance".to_string()),
        Just("recipient".to_string()),
        "[a-z_]{1,20}",
    ];
    let value = "[^\n\r]{0,40}";
    let attr = (name, value, any::<bool>());
    fuzz(
        "protocol/requests",
        256,
        prop::collection::vec(attr, 0..40),
        |attrs| {
            let mut bytes = Vec::new();
            let mut want_user = String::new();
            let mut want_instance = String::new();
            for (n, v, crlf) in &attrs {
                bytes.extend_from_slice(
                    format!("{n}={v}{}\n", if *crlf { "\r" } else { "" }).as_bytes(),
                );
                match n.as_str() {
                    "sasl_username" => want_user = v.clone(),
                    "instance" => want_instance = v.clone(),
                    _ => {}
                }
            }
            bytes.push(b'\n');
            let (got, err, _) = parse_all(&mut Parser::default(), &bytes);
            prop_assert!(err.is_none(), "{err:?}");
            prop_assert_eq!(got.len(), 1);
            prop_assert_eq!(&got[0].0, &want_user);
            prop_assert_eq!(&got[0].1, &want_instance);
            prop_assert_eq!(got[0].2, bytes.len());
            Ok(())
        },
    );
}

#[test]
fn fuzz_config_parser() {
    for (name, bytes) in corpus("config") {
        let text = String::from_utf8_lossy(&bytes);
        let _ = Config::from_toml_str(&text); // must not panic
        println!("{name}: ok");
    }
    let keys = prop_oneof![
        Just("listen"),
        Just("max_connections"),
        Just("idle_timeout"),
        Just("limits.period"),
        Just("limits.timezone"),
        Just("limits.default_quota"),
        Just("limits.over_quota_action"),
        Just("limits.charge_stage"),
        Just("database.url"),
        Just("database.flush_interval"),
        Just("log.level"),
        Just("nonsense"),
    ];
    let value = prop_oneof![
        "\"[ -~]{0,30}\"",
        "-?[0-9]{1,12}",
        Just("true".to_string()),
        Just("[1, \"x\"]".to_string()),
        Just("\"{used}/{quota} {reset} {{\"".to_string()),
    ];
    fuzz(
        "config/keys",
        256,
        prop::collection::vec((keys, value), 0..12),
        |pairs| {
            let mut top = String::new();
            let mut sections: std::collections::BTreeMap<&str, String> = Default::default();
            for (k, v) in &pairs {
                match k.split_once('.') {
                    Some((section, key)) => sections
                        .entry(section)
                        .or_default()
                        .push_str(&format!("{key} = {v}\n")),
                    None => top.push_str(&format!("{k} = {v}\n")),
                }
            }
            for (section, body) in sections {
                top.push_str(&format!("[{section}]\n{body}"));
            }
            match Config::from_toml_str(&top) {
                Ok(_) => {}
                Err(e) => prop_assert!(
                    !e.errors.is_empty(),
                    "an error without a message for:\n{top}"
                ),
            }
            Ok(())
        },
    );
    fuzz("config/text", 256, "[ -~\n]{0,300}", |text| {
        let _ = Config::from_toml_str(&text);
        Ok(())
    });
}

#[test]
fn window_arithmetic_properties() {
    let zones = prop_oneof![
        Just("UTC"),
        Just("Europe/Zurich"),
        Just("America/New_York"),
        Just("America/Santiago"),
        Just("Asia/Kolkata"),
        Just("Australia/Lord_Howe"),
        Just("Pacific/Apia"),
    ];
    let periods = prop_oneof![
        Just("hourly"),
        Just("daily"),
        Just("weekly"),
        Just("monthly"),
        Just("15m"),
        Just("6h"),
        Just("2d"),
    ];
    let days = prop_oneof![
        Just(chrono::Weekday::Mon),
        Just(chrono::Weekday::Sun),
        Just(chrono::Weekday::Wed)
    ];
    // 1970 to 2100.
    fuzz(
        "window",
        512,
        (zones, periods, days, 0i64..4_102_444_800, any::<u64>()),
        |(tz, period, week_start, now, pick)| {
            let cal = Calendar {
                period: Period::parse(period).unwrap(),
                tz: tz.parse().unwrap(),
                week_start,
            };
            let end = cal.window_end(now);
            prop_assert!(end > now, "the window containing now ends after now");
            prop_assert!(
                end - now <= 32 * 86_400,
                "no window is longer than a month and a day"
            );
            // Every moment of the window has the same end...
            let inside = now + (pick % (end - now) as u64) as i64;
            prop_assert_eq!(cal.window_end(inside), end);
            prop_assert_eq!(cal.window_end(end - 1), end);
            // ...and the next window starts exactly there.
            prop_assert!(cal.window_end(end) > end);
            Ok(())
        },
    );
}
