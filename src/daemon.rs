//! Wires the parts into a running daemon; used by `main` and by the tests, so
//! the tests exercise the real wiring.
//!
//! [`start`] loads every stored row into the [`CounterStore`], starts the
//! [`Flusher`], the policy server, the control server and the reload task,
//! and returns a [`Daemon`] handle at once. When the shutdown token is
//! cancelled the servers drain, then the flusher does its final flush, and
//! [`Daemon::wait`] returns what it saved.
//!
//! Reload (SIGHUP or `ratelimit-policyd reload`) re-reads the configuration
//! from its [`ConfigSource`], swaps the settings connections read (limits,
//! actions, `allowed_clients`, `idle_timeout`), applies the log settings and
//! asks the flusher — the one task that merges database rows into memory —
//! for a full re-read. A changed `default_quota` applies at once to
//! non-persistent counters that had the old default (and is written to their
//! rows at the next flush, so other daemons and refreshes see it). Settings
//! bound at start (`listen`, `control_socket`, `max_connections`,
//! `[database]`) are reported as needing a restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::ask::{Asker, Request};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::{Config, ConfigSource, ListenAddr};
use crate::control::{self, ControlContext, ControlListener};
use crate::error::{Error, Result};
use crate::persist::flusher::DefaultQuota;
use crate::persist::{Backend, BackendError, FinalFlush, FlushHandle, FlushSettings, Flusher};
use crate::server::{self, Listener, Settings, Shared};
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
    /// Asks for a reload.
    pub reload: ReloadHandle,
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

/// Asks the daemon to reload its configuration.
#[derive(Debug, Clone)]
pub struct ReloadHandle {
    asker: Asker<(), Result<String, String>>,
}

impl ReloadHandle {
    /// Reloads and returns what was done.
    ///
    /// # Errors
    ///
    /// A message saying why nothing was changed (invalid configuration, no
    /// configuration file) or what could not be done.
    pub async fn reload(&self) -> Result<String, String> {
        self.asker
            .ask(())
            .await
            .unwrap_or_else(|| Err("the daemon is stopping".into()))
    }
}

/// The sockets a daemon serves, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// The policy service.
    pub policy: Listener,
    /// The control socket, if any.
    pub control: Option<ControlListener>,
}

/// Loads the counters from `backend` and starts serving.
///
/// `source` is where a reload reads the configuration again; without it a
/// reload is refused.
///
/// # Errors
///
/// The backend cannot be read.
pub async fn start<B: Backend>(
    config: &Config,
    source: Option<ConfigSource>,
    backend: Arc<B>,
    clock: Arc<dyn Clock>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<Daemon> {
    let local_addr = listeners.policy.local_addr().map_err(|source| Error::Io {
        context: "cannot read the listening address".into(),
        source,
    })?;
    let store = Arc::new(CounterStore::new());
    store.set_max_counters(config.max_counters.get());
    let stats = Arc::new(Stats::default());
    let shared = Arc::new(Shared::new(
        Settings {
            policy: config.policy.clone(),
            allowed_clients: config.allowed_clients.clone(),
            idle_timeout: config.idle_timeout,
        },
        Arc::clone(&store),
        Arc::clone(&clock),
        Arc::clone(&stats),
    ));
    // The flusher reads the default quota where connections read it, so a
    // reload changes it for both at once.
    let default_quota: DefaultQuota = {
        let shared = Arc::clone(&shared);
        Arc::new(move || shared.settings.load().policy.limit.rules.default_quota)
    };
    let settings = FlushSettings {
        interval: config.database.flush_interval,
        refresh_interval: config.database.refresh_interval,
        reconcile_interval: config.database.reconcile_interval,
        min_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(60),
        final_timeout: config.database.timeout,
        refresh_overlap: config.database.timeout,
    };
    let (mut flusher, flush) = Flusher::new(
        Arc::clone(&backend),
        Arc::clone(&store),
        clock,
        Arc::clone(&stats),
        settings,
        default_quota,
    );
    crate::notice!("loading counters from {}", backend.name());
    let loading = Instant::now();
    let loaded = tokio::select! {
        loaded = flusher.load() => Some(loaded),
        // SIGTERM while the load waits for a slow database: stop now.
        () = shutdown.cancelled() => None,
    };
    match loaded {
        Some(Ok(n)) => crate::notice!(
            "loaded {n} counters from {} in {:.0?}",
            backend.name(),
            loading.elapsed()
        ),
        // A database that is down must not keep mail from being limited:
        // serve from memory, load at the first refresh that works.
        Some(Err(BackendError::Unavailable(e))) => {
            log::error!(
                "database unavailable at start ({e}); serving anyway: until the counters are loaded every \
                 sender starts from 0 with the default quota; retrying at each refresh"
            );
        }
        Some(Err(e)) => return Err(e.into()),
        None => crate::notice!("stopped before the counters were loaded"),
    }

    let policy = &config.policy;
    crate::notice!(
        "charging {} at protocol_state {} (check_policy_service in {}); other stages are checked, not charged",
        match policy.count {
            crate::policy::CountMode::Recipients => "recipients",
            crate::policy::CountMode::Messages => "messages",
        },
        policy.charge_stage,
        policy.charge_stage.restriction_list()
    );

    let (asker, reload_rx) = crate::ask::channel(4);
    let reload = ReloadHandle { asker };
    let reloader = Reloader {
        source,
        started: config.clone(),
        current: config.clone(),
        shared: Arc::clone(&shared),
        flush: flush.clone(),
    };
    tokio::spawn(reloader.run(reload_rx));

    let control = listeners.control.map(|listener| {
        let ctx = Arc::new(ControlContext {
            shared: Arc::clone(&shared),
            flush: flush.clone(),
            reload: reload.clone(),
            backend: backend.name(),
        });
        tokio::spawn(control::serve(listener, ctx, shutdown.clone()))
    });

    let max_connections = config.max_connections.get();
    let policy_listener = listeners.policy;
    let task = tokio::spawn(async move {
        // The flusher outlives the servers: it stops only once every
        // connection is done, so the final flush sees every count.
        let stop_flusher = CancellationToken::new();
        let flusher = tokio::spawn(flusher.run(stop_flusher.clone()));
        server::run(policy_listener, shared, max_connections, shutdown).await;
        if let Some(control) = control {
            let _ = control.await;
        }
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
        reload,
        local_addr,
        task,
    })
}

/// Owns what a reload changes; runs one reload at a time.
struct Reloader {
    source: Option<ConfigSource>,
    /// What the daemon started with: settings bound at start (sockets,
    /// database) are compared with it, so a change that was reverted needs
    /// no restart.
    started: Config,
    /// What is in force now.
    current: Config,
    shared: Arc<Shared>,
    flush: FlushHandle,
}

impl Reloader {
    async fn run(mut self, mut requests: mpsc::Receiver<Request<(), Result<String, String>>>) {
        while let Some(((), reply)) = requests.recv().await {
            let result = self.reload().await;
            match &result {
                Ok(msg) => crate::notice!("{msg}"),
                Err(msg) => log::error!("{msg}"),
            }
            let _ = reply.send(result);
        }
    }

    async fn reload(&mut self) -> Result<String, String> {
        let source = self
            .source
            .as_ref()
            .ok_or("reload: this daemon was started without a configuration file")?;
        let (_, new) = source
            .load()
            .map_err(|e| format!("configuration not reloaded, the old one stays in force:\n{e}"))?;
        let old = &self.current;
        let started = &self.started;
        let mut restart = Vec::new();
        if new.listen != started.listen {
            restart.push("listen");
        }
        if new.control_socket != started.control_socket {
            restart.push("control_socket");
        }
        if new.max_connections != started.max_connections {
            restart.push("max_connections");
        }
        if new.database != started.database {
            restart.push("[database]");
        }
        for w in &new.warnings {
            log::warn!("{w}");
        }
        self.shared.settings.store(Arc::new(Settings {
            policy: new.policy.clone(),
            allowed_clients: new.allowed_clients.clone(),
            idle_timeout: new.idle_timeout,
        }));
        let mut notes = Vec::new();
        if let Err(e) = crate::logging::reconfigure(&new.log) {
            notes.push(format!("log settings not applied: {e}"));
        }
        let (old_default, new_default) = (
            old.policy.limit.rules.default_quota,
            new.policy.limit.rules.default_quota,
        );
        self.shared.store.set_max_counters(new.max_counters.get());
        let changed = self
            .shared
            .store
            .apply_default_quota(old_default, new_default);
        if old_default != new_default {
            notes.push(format!(
                "default_quota {old_default} -> {new_default} ({changed} counters)"
            ));
        }
        // The re-read is the flusher's: it never merges rows while a flush
        // of its own is in flight.
        match self.flush.reconcile().await {
            Ok(n) => notes.push(format!("{n} rows re-read from the database")),
            Err(e) => notes.push(format!("quotas not re-read: {e}")),
        }
        if !restart.is_empty() {
            notes.push(format!(
                "{} changed: takes effect after a restart",
                restart.join(", ")
            ));
        }
        let path = source.path.display().to_string();
        self.current = new;
        Ok(format!("reloaded {path}: {}", notes.join("; ")))
    }
}
