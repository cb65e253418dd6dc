//! The load generator works: against its own floor and against the daemon,
//! with every reply checked.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::binary::{spawn, write_config};

const LOADGEN: &str = env!("CARGO_BIN_EXE_ratelimit-loadgen");

fn run(target: &str, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(LOADGEN)
        .args([
            "run",
            "--target",
            target,
            "-c",
            "4",
            "-u",
            "50",
            "--requests",
            "2000",
            "--warmup",
            "0",
            "--json",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn measures_the_floor_and_the_daemon() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut floor = Command::new(LOADGEN)
        .args(["floor", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(floor.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("floor listening"), "{line}");
    let r = run(&format!("127.0.0.1:{port}"), &[]);
    let _ = floor.kill();
    let _ = floor.wait();
    assert!(r["requests"].as_u64().unwrap() >= 2000);
    assert_eq!(r["errors"], 0);
    assert_eq!(r["actions"]["dunno"], r["requests"]);

    // Against the daemon, with quota 3 per sender: the refusals are counted.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    let d = spawn(&config, &[]);
    let r = run(&d.addr.to_string(), &["--zipf", "1.1"]);
    assert_eq!(r["errors"], 0);
    let (dunno, defer) = (
        r["actions"]["dunno"].as_u64().unwrap(),
        r["actions"]["defer"].as_u64().unwrap(),
    );
    assert!(dunno <= 50 * 3 && defer > 0, "dunno {dunno}, defer {defer}");
    assert!(r["latency_us"]["p50"].as_u64().unwrap() > 0);
    assert_eq!(d.terminate(), 0);
}
