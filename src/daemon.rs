//! Wires the parts into a running daemon; used by `main` and by the tests, so
//! the tests exercise the real wiring.
//!
//! [`start`] loads every stored row into the [`CounterStore`], starts the
//! [`Flusher`] and the server, and returns a [`Daemon`] handle at once. When
//! the shutdown token is cancelled the server drains, then the flusher does
//! its final flush, and [`Daemon::wait`] returns what it saved.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::{Config, ListenAddr};
use crate::error::{Error, Result};
use crate::persist::{Backend, FinalFlush, FlushHandle, FlushSettings, Flusher};
use crate::server::{self, Listener, Shared};
use crate::stats::Stats;
use crate::store::CounterStore;

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    /// The counters (tests and `status` read them).
    pub store: Arc<CounterStore>,
    /// What the daemon did.
    pub stats: Arc<Stats>,
    /// Asks the flusher to flush now.
    pub flush: FlushHandle,
    /// Where it listens (the real port when configured with port 0).
    pub local_addr: ListenAddr,
    task: JoinHandle<FinalFlush>,
}

impl Daemon {
    /// Waits until the daemon has stopped (after its shutdown token was
    /// cancelled) and returns the result of the final flush.
    ///
    /// # Errors
    ///
    /// The daemon's task panicked.
    pub async fn wait(self) -> Result<FinalFlush> {
        self.task.await.map_err(|e| Error::Io {
            context: "daemon task failed".into(),
            source: std::io::Error::other(e.to_string()),
        })
    }
}

/// Loads the counters from `backend` and starts serving `listener`.
///
/// # Errors
///
/// The backend cannot be read.
pub async fn start<B: Backend>(
    config: &Config,
    backend: Arc<B>,
    clock: Arc<dyn Clock>,
    listener: Listener,
    shutdown: CancellationToken,
) -> Result<Daemon> {
    let local_addr = listener.local_addr().map_err(|source| Error::Io {
        context: "cannot read the listening address".into(),
        source,
    })?;
    let store = Arc::new(CounterStore::new());
    let loading = Instant::now();
    let rows = backend.load_all().await?;
    let loaded = rows.len();
    for row in rows {
        store.load(row);
    }
    crate::notice!(
        "loaded {loaded} counters from {} in {:.0?}",
        backend.name(),
        loading.elapsed()
    );

    let stats = Arc::new(Stats::default());
    let settings = FlushSettings {
        interval: config.database.flush_interval,
        min_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(60),
        final_timeout: Duration::from_secs(10),
        default_quota: config.policy.limit.rules.default_quota,
    };
    let (flusher, flush) = Flusher::new(
        backend,
        Arc::clone(&store),
        Arc::clone(&clock),
        Arc::clone(&stats),
        settings,
    );
    let shared = Arc::new(Shared::new(
        config.policy.clone(),
        Arc::clone(&store),
        clock,
        Arc::clone(&stats),
        config.idle_timeout,
        config.allowed_clients.clone(),
    ));
    let max_connections = config.max_connections.get();
    let task = tokio::spawn(async move {
        // The flusher outlives the server: it stops only once every
        // connection is done, so the final flush sees every count.
        let stop_flusher = CancellationToken::new();
        let flusher = tokio::spawn(flusher.run(stop_flusher.clone()));
        server::run(listener, shared, max_connections, shutdown).await;
        stop_flusher.cancel();
        match flusher.await {
            Ok(report) => report,
            Err(e) => FinalFlush {
                rows: 0,
                units_lost: 0,
                error: Some(crate::persist::BackendError::Unavailable(format!(
                    "flusher failed: {e}"
                ))),
            },
        }
    });
    Ok(Daemon {
        store,
        stats,
        flush,
        local_addr,
        task,
    })
}
