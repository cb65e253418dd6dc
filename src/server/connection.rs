//! One policy connection: read bounded requests, decide, answer, repeat.
//!
//! Generic over `AsyncRead + AsyncWrite`, so it runs the same on TCP, unix
//! sockets and `tokio::io::duplex` in tests.
//!
//! - Every complete request in the buffer is answered, in order, and the
//!   answers go out in one write (pipelined requests cost one syscall).
//! - Shutdown is checked only between requests: every request that has
//!   arrived whole by then gets its answer; the connection waits for nothing
//!   more, and a partial request is dropped.
//! - Each request must arrive whole within `idle_timeout` of the previous
//!   answer (or of the connection's start). That closes idle connections and
//!   bounds how long a client trickling bytes can hold a slot.
//! - The buffer holds at most one partial request (bounded by the protocol's
//!   limits) plus one read.

use std::fmt;
use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::policy::{evaluate, Charged, ConnectionMemory, DecisionKind};
use crate::protocol::{encode_action, Escaped, Parser, PolicyRequest, ProtocolError};

/// First size of a connection's read buffer: a Postfix request is about 700
/// bytes, and an idle connection should cost little.
const INITIAL_BUFFER: usize = 1024;
/// The buffer grows (doubling) when less than this is free for a read.
const MIN_READ: usize = 512;

/// Who is on the other end, for logs.
#[derive(Debug, Clone)]
pub enum Peer {
    /// A TCP client.
    Tcp(std::net::SocketAddr),
    /// A client of the unix socket.
    Unix,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "{a}"),
            Peer::Unix => f.write_str("unix-socket client"),
        }
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The client broke the protocol or its bounds; closed without a reply.
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    /// No whole request within `idle_timeout`.
    #[error("idle timeout")]
    IdleTimeout,
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Serves one connection until the client closes it, an error, or shutdown.
///
/// # Errors
///
/// See [`ConnectionError`]; the caller logs it with the peer.
pub async fn serve<S>(
    mut stream: S,
    shared: &Shared,
    shutdown: &CancellationToken,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut parser = Parser::new(shared.bounds);
    let mut memory = ConnectionMemory::default();
    let mut buf: Vec<u8> = Vec::with_capacity(INITIAL_BUFFER);
    let mut out: Vec<u8> = Vec::with_capacity(256);
    let idle_timeout = || shared.settings.load().idle_timeout;
    // One timer and one cancellation waiter per connection, not per read:
    // answering a request only moves `deadline`; the timer checks it when it
    // fires and re-arms itself if the connection was busy meanwhile.
    let mut deadline = Instant::now() + idle_timeout();
    let idle = tokio::time::sleep_until(deadline);
    tokio::pin!(idle);
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    loop {
        let mut start = 0;
        while let Some((req, len)) = parser.parse(&buf[start..])? {
            answer(&req, shared, &mut memory, &mut out);
            start += len;
        }
        buf.drain(..start);
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
            deadline = Instant::now() + idle_timeout();
        }
        if shutdown.is_cancelled() {
            // Answer what has already arrived, but wait for nothing more:
            // `timeout` polls the read once before it looks at the clock.
            match tokio::time::timeout(Duration::ZERO, stream.read_buf(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => continue,
                _ => return Ok(()),
            }
        }
        if buf.capacity() - buf.len() < MIN_READ {
            buf.reserve(buf.len().max(INITIAL_BUFFER));
        }
        let read = tokio::select! {
            r = stream.read_buf(&mut buf) => r,
            () = &mut idle => {
                if Instant::now() >= deadline {
                    return Err(ConnectionError::IdleTimeout);
                }
                idle.as_mut().reset(deadline);
                continue;
            }
            () = &mut cancelled => continue, // answered above, then closed
        };
        match read {
            Err(e) => return Err(e.into()),
            Ok(0) => {
                if !buf.is_empty() {
                    log::debug!(
                        "partial request of {} bytes dropped at end of connection",
                        buf.len()
                    );
                }
                return Ok(());
            }
            Ok(_) => {}
        }
    }
}

/// Decides one request and appends its answer to `out`.
fn answer(
    req: &PolicyRequest<'_>,
    shared: &Shared,
    memory: &mut ConnectionMemory,
    out: &mut Vec<u8>,
) {
    let now = shared.clock.now();
    let settings = shared.settings.load();
    let policy = &settings.policy;
    let decision = evaluate(req, policy, &shared.store, now, memory);
    shared.stats.record(decision.kind);
    if decision.wrong_stage {
        shared.warn_wrong_stage(req.protocol_state, policy.charge_stage, now);
    }
    if matches!(
        decision.kind,
        DecisionKind::KeyTooLong | DecisionKind::CountersFull
    ) {
        shared.warn_uncounted(decision.kind, now);
    }
    if let Some(charged) = &decision.charged {
        // One plain load per request; the store happens once.
        if !shared.stats.charge_stage_seen.load(Ordering::Relaxed) {
            shared
                .stats
                .charge_stage_seen
                .store(true, Ordering::Relaxed);
        }
        if charged.amount > 0 || !charged.outcome.accepted {
            log_charge(req, charged);
        }
    }
    encode_action(decision.action.as_str(policy), out);
}

/// The Perl daemon's line, one per charged request (SPEC §8), with `key=`
/// at the end when the key differs from the login. Every value from the
/// request is written through [`Escaped`]. `OVER_QUOTA` is a warning the
/// first time a sender is refused in a window and info afterwards, so a
/// sender hammering away at its limit makes one warning, not thousands.
fn log_charge(req: &PolicyRequest<'_>, c: &Charged<'_>) {
    let o = &c.outcome;
    let (status, level) = if !o.accepted {
        let level = if o.first_refusal {
            log::Level::Warn
        } else {
            log::Level::Info
        };
        ("OVER_QUOTA", level)
    } else if o.inserted {
        ("INSERT", log::Level::Info)
    } else {
        ("UPDATE", log::Level::Info)
    };
    let target = if status == "INSERT" {
        crate::logging::NOTICE
    } else {
        module_path!()
    };
    let queue_id = if req.queue_id.is_empty() {
        "NOQUEUE"
    } else {
        req.queue_id
    };
    // The login as Postfix sent it, as the Perl daemon logs it; the key it
    // counts under follows only where it differs (domain mode, case).
    let key_differs = *c.key != *req.sasl_username;
    log::log!(
        target: target,
        level,
        "{}: client={}[{}], sasl_method={}, sasl_username={}, recipient_count={}, curr_count={}/{}, status={}{}{}",
        Escaped(queue_id),
        Escaped(req.client_name),
        Escaped(req.client_address),
        Escaped(req.sasl_method),
        Escaped(req.sasl_username),
        c.amount,
        o.used,
        o.quota,
        status,
        if key_differs { ", key=" } else { "" },
        Escaped(if key_differs { &c.key } else { "" })
    );
}

/// Runs [`serve`] and accounts for the connection in the stats and the log.
pub(super) async fn handle<S>(stream: S, peer: Peer, shared: &Shared, shutdown: &CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let stats = &shared.stats;
    stats.connections_open.fetch_add(1, Ordering::Relaxed);
    stats.connections_total.fetch_add(1, Ordering::Relaxed);
    match serve(stream, shared, shutdown).await {
        Ok(()) => {}
        Err(ConnectionError::Protocol(e)) => {
            stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            log::warn!("closing connection from {peer}: {e}");
        }
        Err(ConnectionError::IdleTimeout) => {
            stats.idle_timeouts.fetch_add(1, Ordering::Relaxed);
            log::debug!("closing idle connection from {peer}");
        }
        Err(ConnectionError::Io(e)) => log::debug!("connection from {peer} failed: {e}"),
    }
    stats.connections_open.fetch_sub(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::clock::ManualClock;
    use crate::config::Config;
    use crate::stats::Stats;
    use crate::store::CounterStore;

    fn shared() -> Shared {
        let config = Config::from_toml_str("").unwrap();
        let settings = crate::server::Settings {
            policy: config.policy,
            allowed_clients: Vec::new(),
            idle_timeout: Duration::from_secs(600),
        };
        Shared::new(
            settings,
            Arc::new(CounterStore::new()),
            Arc::new(ManualClock::new(1_790_000_000)),
            Arc::new(Stats::default()),
        )
    }

    fn request(recipient: &str) -> Vec<u8> {
        format!(
            "request=smtpd_access_policy\nprotocol_state=RCPT\nsasl_username=a@b\ninstance=1\nrecipient={recipient}\n\n"
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn requests_that_arrived_before_shutdown_are_answered() {
        let shared = shared();
        let (mut client, server) = tokio::io::duplex(4096);
        // Two whole requests and the start of a third are waiting when
        // shutdown begins.
        client.write_all(&request("x")).await.unwrap();
        client.write_all(&request("y")).await.unwrap();
        client.write_all(b"request=smtpd_acc").await.unwrap();
        let token = CancellationToken::new();
        token.cancel();
        serve(server, &shared, &token).await.unwrap();
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"action=DUNNO\n\naction=DUNNO\n\n");
        assert_eq!(shared.store.get("a@b").unwrap().used, 2);
    }
}
