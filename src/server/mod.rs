//! The policy listener: accept, check the peer, serve each connection in its
//! own task.
//!
//! - At most `max_connections` connections are served at once. A permit is
//!   taken *before* accepting, so past the limit new clients wait in the
//!   kernel's backlog until a slot frees; nothing crashes and nobody is
//!   dropped.
//! - TCP peers outside `allowed_clients` are closed without a reply and logged.
//! - Accept errors (for example running out of file descriptors) are logged
//!   and retried after a short, growing pause.
//! - On shutdown the listener stops accepting, each connection finishes the
//!   request it is answering, and [`run`] returns when all have closed (or
//!   after [`SHUTDOWN_GRACE`]).

pub mod connection;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::config::ListenAddr;
use crate::policy::{DecisionKind, Policy};
use crate::protocol::Bounds;
use crate::stats::Stats;
use crate::store::CounterStore;
use connection::{handle, Peer};

/// How long shutdown waits for open connections to finish their request.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The settings a reload (SIGHUP) can change while connections are open.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The limits and answers.
    pub policy: Policy,
    /// TCP peers allowed to connect.
    pub allowed_clients: Vec<IpNet>,
    /// See [`connection`]: time allowed for each whole request.
    pub idle_timeout: Duration,
}

/// What every connection task shares.
pub struct Shared {
    /// Swapped whole on reload; each request reads it once (wait-free).
    pub settings: ArcSwap<Settings>,
    /// The counters.
    pub store: Arc<CounterStore>,
    /// Wall-clock time for windows.
    pub clock: Arc<dyn Clock>,
    /// Counters for `status`.
    pub stats: Arc<Stats>,
    /// Protocol bounds.
    pub bounds: Bounds,
    /// The "wrong stage" warning, at most once a minute.
    stage_warning: EveryMinute,
    /// The "login too long" warning, at most once a minute.
    long_key_warning: EveryMinute,
    /// The "max_counters reached" warning, at most once a minute.
    full_warning: EveryMinute,
}

/// Lets a warning through at most once a minute, whichever thread asks.
#[derive(Debug)]
struct EveryMinute(AtomicI64);

impl EveryMinute {
    fn new() -> Self {
        EveryMinute(AtomicI64::new(i64::MIN))
    }

    /// True for the first call of each minute (`now` in unix seconds).
    fn due(&self, now: i64) -> bool {
        let last = self.0.load(Ordering::Relaxed);
        now.saturating_sub(last) >= 60
            && self
                .0
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

impl Shared {
    /// Bundles the parts a connection needs.
    pub fn new(
        settings: Settings,
        store: Arc<CounterStore>,
        clock: Arc<dyn Clock>,
        stats: Arc<Stats>,
    ) -> Self {
        Shared {
            settings: ArcSwap::from_pointee(settings),
            store,
            clock,
            stats,
            bounds: Bounds::default(),
            stage_warning: EveryMinute::new(),
            long_key_warning: EveryMinute::new(),
            full_warning: EveryMinute::new(),
        }
    }

    /// Whether a TCP peer may connect. IPv4-mapped IPv6 addresses count as IPv4.
    pub fn is_allowed(&self, addr: &SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        self.settings
            .load()
            .allowed_clients
            .iter()
            .any(|net| net.contains(&ip))
    }

    /// Warns, at most once a minute, that requests arrive at a stage that is
    /// not `charge_stage` — as an error, naming the setting, while nothing at
    /// all has been charged since start (a wiring that counts nothing, such
    /// as the Perl daemon's `smtpd_data_restrictions` with the default
    /// `charge_stage = "RCPT"`).
    fn warn_wrong_stage(&self, state: &str, charge_stage: crate::policy::Stage, now: i64) {
        if !self.stage_warning.due(now) {
            return;
        }
        let state = crate::protocol::Escaped(state);
        if self.stats.charge_stage_seen.load(Ordering::Relaxed) {
            log::warn!(
                "requests arrive at protocol_state={state} but charge_stage={charge_stage}: they are \
                 checked, not charged; is check_policy_service in the restriction list you meant?"
            );
        } else {
            log::error!(
                "NOTHING IS BEING CHARGED: requests arrive at protocol_state={state}, none at \
                 charge_stage={charge_stage} since the start; if check_policy_service is where you \
                 want it, set charge_stage = \"{state}\" (README: \"Migrating from the Perl daemon\")"
            );
        }
    }
}

impl Shared {
    /// Warns, at most once a minute, about requests answered without a
    /// counter: logins longer than the store holds, or new senders while it
    /// is at `max_counters`. Both are signs of forged requests on the policy
    /// port (or of a `max_counters` too small for the site).
    fn warn_uncounted(&self, kind: DecisionKind, now: i64) {
        let stats = &self.stats;
        match kind {
            DecisionKind::KeyTooLong if self.long_key_warning.due(now) => log::warn!(
                "{} requests with a login longer than {} bytes since the start, answered \
                 key_too_long_action without a counter (forged? the policy port should be \
                 reachable by Postfix only)",
                stats.decisions(kind),
                crate::store::MAX_KEY_BYTES
            ),
            DecisionKind::CountersFull if self.full_warning.due(now) => log::warn!(
                "max_counters ({}) reached: {} requests from senders without a counter since the \
                 start were answered counters_full_action, uncounted; idle counters are evicted at \
                 every flush. Raise max_counters, or look for forged logins",
                self.store.max_counters(),
                stats.decisions(kind)
            ),
            _ => {}
        }
    }
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP, IPv4 or IPv6.
    Tcp(TcpListener),
    /// A unix stream socket; the file is removed when the server stops.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr`. A unix socket gets mode 0660; a stale socket file left by
    /// a crashed daemon is replaced, a live one is an error.
    ///
    /// # Errors
    ///
    /// The address cannot be bound, or another process listens on the socket.
    pub async fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a).await?)),
            ListenAddr::Unix(path) => {
                let l = crate::socket::bind_unix(path).await?;
                Ok(Listener::Unix(l, path.clone()))
            }
        }
    }

    /// The address actually bound (the port chosen for port 0).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(ListenAddr::Tcp),
            Listener::Unix(_, p) => Ok(ListenAddr::Unix(p.clone())),
        }
    }
}

/// Serves `listener` until `shutdown` is cancelled and every connection closed.
pub async fn run(
    listener: Listener,
    shared: Arc<Shared>,
    max_connections: usize,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    let tracker = TaskTracker::new();
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => p.expect("the semaphore is never closed"),
            () = shutdown.cancelled() => break,
        };
        let accepted = tokio::select! {
            a = accept(&listener) => a,
            () = shutdown.cancelled() => break,
        };
        match accepted {
            Ok(conn) => {
                backoff = Duration::from_millis(10);
                spawn_connection(conn, &shared, &tracker, &shutdown, permit);
            }
            Err(e) => {
                log::error!("accept failed, retrying in {backoff:?}: {e}");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        log::warn!(
            "{} connections still open after {SHUTDOWN_GRACE:?}; closing them",
            tracker.len()
        );
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream, SocketAddr),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> io::Result<Accepted> {
    match listener {
        Listener::Tcp(l) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
        Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

fn spawn_connection(
    conn: Accepted,
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let shared = Arc::clone(shared);
    let shutdown = shutdown.clone();
    match conn {
        Accepted::Tcp(stream, addr) => {
            if !shared.is_allowed(&addr) {
                shared.stats.clients_refused.fetch_add(1, Ordering::Relaxed);
                log::warn!("refused connection from {addr}: not in allowed_clients");
                return; // dropping the stream closes it; the permit frees
            }
            let _ = stream.set_nodelay(true);
            tracker.spawn(async move {
                handle(stream, Peer::Tcp(addr), &shared, &shutdown).await;
                drop(permit);
            });
        }
        Accepted::Unix(stream) => {
            tracker.spawn(async move {
                handle(stream, Peer::Unix, &shared, &shutdown).await;
                drop(permit);
            });
        }
    }
}
