//! Test harness: the real daemon on 127.0.0.1:0 with a manual clock, and a
//! client that speaks the policy protocol over a real socket.
#![allow(dead_code)] // each test crate uses a different part of this module

pub mod binary;
pub mod mysql;
pub mod proxy;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use ratelimit_policyd::clock::ManualClock;
use ratelimit_policyd::config::{Config, ListenAddr};
use ratelimit_policyd::daemon::{self, Daemon, Listeners};
use ratelimit_policyd::persist::memory::MemoryBackend;
use ratelimit_policyd::persist::{Backend, FinalFlush};
use ratelimit_policyd::server::Listener;

/// 2026-09-21 14:13:20 UTC, a Monday; 16:13:20 in Zurich.
pub const T0: i64 = 1_790_000_000;

pub struct TestServer<B> {
    pub addr: SocketAddr,
    pub clock: ManualClock,
    pub backend: Arc<B>,
    pub shutdown: CancellationToken,
    pub daemon: Option<Daemon>,
}

/// Starts the daemon with `toml` (listening on 127.0.0.1:0 unless the TOML
/// says otherwise) on an empty memory backend.
pub async fn start(toml: &str) -> TestServer<MemoryBackend> {
    start_with(
        toml,
        Arc::new(MemoryBackend::default()),
        ManualClock::new(T0),
    )
    .await
}

pub fn config(toml: &str) -> Config {
    let toml = if toml.contains("listen") {
        toml.to_string()
    } else {
        format!("listen = \"127.0.0.1:0\"\n{toml}")
    };
    Config::from_toml_str(&toml).unwrap_or_else(|e| panic!("test config: {e}"))
}

pub async fn start_with<B: Backend>(
    toml: &str,
    backend: Arc<B>,
    clock: ManualClock,
) -> TestServer<B> {
    let config = config(toml);
    let listener = Listener::bind(&config.listen).await.expect("bind");
    let shutdown = CancellationToken::new();
    let listeners = Listeners {
        policy: listener,
        control: None,
    };
    let daemon = daemon::start(
        &config,
        None,
        Arc::clone(&backend),
        Arc::new(clock.clone()),
        listeners,
        shutdown.clone(),
    )
    .await
    .expect("daemon starts");
    let addr = match daemon.local_addr {
        ListenAddr::Tcp(a) => a,
        ListenAddr::Unix(_) => "0.0.0.0:0".parse().unwrap(),
    };
    TestServer {
        addr,
        clock,
        backend,
        shutdown,
        daemon: Some(daemon),
    }
}

impl<B> TestServer<B> {
    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon running")
    }

    /// `used` of a key in memory, 0 if unknown.
    pub fn used(&self, key: &str) -> u32 {
        self.daemon().store.get(key).map_or(0, |c| c.used)
    }

    /// Cancels the shutdown token and waits for the final flush.
    pub async fn stop(&mut self) -> FinalFlush {
        self.shutdown.cancel();
        self.daemon
            .take()
            .expect("daemon running")
            .wait()
            .await
            .expect("daemon task")
    }
}

/// A request as Postfix 3.7 sends it: 29 attributes, builder-style.
#[derive(Clone, Debug)]
pub struct Req {
    pub attrs: Vec<(String, String)>,
}

impl Req {
    /// An RCPT request of `user` for `recipient` in transaction `instance`.
    pub fn rcpt(user: &str, instance: &str, recipient: &str) -> Req {
        let attrs = [
            ("request", "smtpd_access_policy"),
            ("protocol_state", "RCPT"),
            ("protocol_name", "ESMTP"),
            ("client_address", "192.0.2.10"),
            ("client_name", "mail.client.example"),
            ("client_port", "50001"),
            ("reverse_client_name", "mail.client.example"),
            ("server_address", "127.0.0.1"),
            ("server_port", "25"),
            ("helo_name", "client.example"),
            ("sender", user),
            ("recipient", recipient),
            ("recipient_count", "0"),
            ("queue_id", ""),
            ("instance", instance),
            ("size", "0"),
            ("etrn_domain", ""),
            ("stress", ""),
            ("sasl_method", "PLAIN"),
            ("sasl_username", user),
            ("sasl_sender", ""),
            ("ccert_subject", ""),
            ("ccert_issuer", ""),
            ("ccert_fingerprint", ""),
            ("ccert_pubkey_fingerprint", ""),
            ("encryption_protocol", "TLSv1.3"),
            ("encryption_cipher", "TLS_AES_256_GCM_SHA384"),
            ("encryption_keysize", "256"),
            ("policy_context", ""),
        ];
        Req {
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Sets (or adds) an attribute.
    pub fn with(mut self, name: &str, value: &str) -> Req {
        match self.attrs.iter_mut().find(|(k, _)| k == name) {
            Some(slot) => slot.1 = value.to_string(),
            None => self.attrs.push((name.to_string(), value.to_string())),
        }
        self
    }

    pub fn state(self, state: &str) -> Req {
        self.with("protocol_state", state)
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in &self.attrs {
            out.extend_from_slice(k.as_bytes());
            out.push(b'=');
            out.extend_from_slice(v.as_bytes());
            out.push(b'\n');
        }
        out.push(b'\n');
        out
    }
}

pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Client {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    pub fn from_stream(stream: TcpStream) -> Client {
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    /// Sends a request and returns the text after `action=`.
    pub async fn ask(&mut self, req: &Req) -> String {
        self.send(&req.bytes()).await;
        self.reply().await.expect("a reply")
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Reads one reply (`action=...\n\n`) and checks its exact shape;
    /// `None` when the server closed the connection first.
    pub async fn reply(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let reply: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8(reply).expect("utf-8 reply");
                let line = text.strip_suffix("\n\n").unwrap();
                assert!(!line.contains('\n'), "one line per reply: {text:?}");
                let action = line
                    .strip_prefix("action=")
                    .unwrap_or_else(|| panic!("not an action: {text:?}"));
                return Some(action.to_string());
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    assert!(
                        self.buf.is_empty(),
                        "partial reply before close: {:?}",
                        self.buf
                    );
                    return None;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Asserts the server closes the connection without sending anything.
    pub async fn expect_closed(&mut self) {
        assert_eq!(
            self.reply().await,
            None,
            "expected the connection to be closed without a reply"
        );
    }
}

pub fn is_dunno(action: &str) -> bool {
    action == "DUNNO"
}

pub fn is_deferred(action: &str) -> bool {
    action.starts_with("DEFER_IF_PERMIT 4.7.1 ")
}

/// Says loudly that a test did not run, and why. With
/// `RATELIMIT_TEST_STRICT=1` (set by .ci/run) a skip is a failure: CI must
/// run everything.
pub fn skip(why: &str) {
    if std::env::var_os("RATELIMIT_TEST_STRICT").is_some_and(|v| v == "1") {
        panic!("not skipped under RATELIMIT_TEST_STRICT=1: {why}");
    }
    eprintln!("SKIPPED: {why}");
}

/// [`start_with`], plus a control socket at `control_socket` (for driving
/// the real CLI against a daemon whose clock the test moves).
pub async fn start_with_control<B: Backend>(
    toml: &str,
    backend: Arc<B>,
    clock: ManualClock,
    control_socket: &std::path::Path,
) -> TestServer<B> {
    let config = config(toml);
    let listener = Listener::bind(&config.listen).await.expect("bind");
    let control = ratelimit_policyd::control::ControlListener::bind(control_socket)
        .await
        .expect("bind the control socket");
    let shutdown = CancellationToken::new();
    let daemon = daemon::start(
        &config,
        None,
        Arc::clone(&backend),
        Arc::new(clock.clone()),
        Listeners {
            policy: listener,
            control: Some(control),
        },
        shutdown.clone(),
    )
    .await
    .expect("daemon starts");
    let addr = match daemon.local_addr {
        ListenAddr::Tcp(a) => a,
        ListenAddr::Unix(_) => "0.0.0.0:0".parse().unwrap(),
    };
    TestServer {
        addr,
        clock,
        backend,
        shutdown,
        daemon: Some(daemon),
    }
}
