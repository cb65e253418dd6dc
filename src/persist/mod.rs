//! Write-behind persistence: the [`Backend`] trait and the [`Flusher`] task.
//!
//! The request path never touches a backend. At start every row is loaded into
//! the [`CounterStore`]; afterwards the flusher, every `flush_interval`, takes
//! the usage added since the last flush as [`Delta`]s and hands them to the
//! backend in batches. Deltas, not absolute values: a stored row is changed by
//! [`merge_delta`], so several daemons sharing one database add up and never
//! clobber each other.
//!
//! A failed write gives its deltas back to the store and is retried with
//! capped exponential backoff; while the database is away the daemon goes on
//! deciding from memory, and one log line says when it went and one when it
//! came back. On shutdown the flusher writes what is left.

pub mod memory;
pub mod sqlite;

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::ask::{Asker, Reply};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::stats::{FlushStatus, Stats};
use crate::store::{CounterStore, Delta, StoredRow};

/// Most rows written in one transaction.
pub const MAX_BATCH_ROWS: usize = 10_000;

/// A failed backend operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The database cannot be used right now (down, locked, disk full, ...);
    /// the operation may work later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database is unusable as it is (corrupt file, wrong schema, ...).
    #[error("database unusable: {0}")]
    Fatal(String),
}

/// What the flusher writes, besides the deltas themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteContext {
    /// The quota a non-persistent row gets when its window is reset.
    pub default_quota: u32,
    /// Unix seconds, for the `updated` column.
    pub now: i64,
}

/// A place counters are stored. Implementations must be cheap to call from
/// async code: blocking work belongs in `spawn_blocking`.
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs (`sqlite`, `mysql`, ...).
    fn name(&self) -> &'static str;

    /// Reads every row.
    fn load_all(&self) -> impl Future<Output = Result<Vec<StoredRow>, BackendError>> + Send;

    /// Applies the deltas with [`merge_delta`]'s rule, at most
    /// [`MAX_BATCH_ROWS`] per transaction. On error no delta of the failed
    /// transaction was applied; earlier transactions of the call were, and
    /// `Err` reports how many deltas were written before it.
    fn write(
        &self,
        deltas: Arc<Vec<Delta>>,
        ctx: WriteContext,
    ) -> impl Future<Output = Result<(), (usize, BackendError)>> + Send;
}

/// How a stored row changes by one delta; every backend implements exactly
/// this, and [`memory::MemoryBackend`] implements it by calling it.
///
/// - No row: insert one with the delta as `used` and the delta's window.
/// - Stored `expiry` older than the delta's window (or NULL): the window was
///   reset: `used` = delta, `expiry` = the delta's, and `quota` back to the
///   default unless `persist`.
/// - Same window: `used += delta` (saturating), or `used = delta` after an
///   administrator's reset (`reset_used`).
/// - Stored window newer: the delta belongs to a finished window and is
///   ignored.
/// - Then, if an administrator set the quota (`set_quota`), `quota` and
///   `persist` are stored as given, whatever the window.
pub fn merge_delta(row: Option<StoredRow>, d: &Delta, default_quota: u32) -> StoredRow {
    let mut row = match row {
        None => {
            return StoredRow {
                key: d.key.to_string(),
                quota: d.quota,
                used: d.delta,
                expiry: Some(d.window_expiry),
                persist: d.persist,
            }
        }
        Some(row) => row,
    };
    match row.expiry {
        Some(e) if e == d.window_expiry => {
            row.used = if d.reset_used {
                d.delta
            } else {
                row.used.saturating_add(d.delta)
            };
        }
        Some(e) if e > d.window_expiry => {}
        _ => {
            row.used = d.delta;
            row.expiry = Some(d.window_expiry);
            if !row.persist {
                row.quota = default_quota;
            }
        }
    }
    if d.set_quota {
        row.quota = d.quota;
        row.persist = d.persist;
    }
    row
}

/// Asks a running [`Flusher`] to flush now.
#[derive(Debug, Clone)]
pub struct FlushHandle {
    asker: Asker<Result<usize, BackendError>>,
}

impl FlushHandle {
    /// Flushes now and returns how many rows were written.
    ///
    /// # Errors
    ///
    /// The backend failed (the deltas are kept for the next try), or the
    /// flusher has stopped.
    pub async fn flush(&self) -> Result<usize, BackendError> {
        self.asker
            .ask()
            .await
            .unwrap_or_else(|| Err(BackendError::Unavailable("the flusher has stopped".into())))
    }
}

/// What the flusher left behind when it stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalFlush {
    /// Rows written by the final flush.
    pub rows: usize,
    /// Units that could not be written (0 when all went well).
    pub units_lost: u64,
    /// The last error, if the final flush failed.
    pub error: Option<BackendError>,
}

/// Settings of the flusher.
#[derive(Debug, Clone)]
pub struct FlushSettings {
    /// Time between flushes.
    pub interval: Duration,
    /// First retry delay after a failure; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// How long the final flush may keep retrying at shutdown.
    pub final_timeout: Duration,
    /// Quota of reset non-persistent rows; shared so a reload can change it.
    pub default_quota: Arc<AtomicU32>,
}

/// The background task that writes counters behind.
pub struct Flusher<B> {
    backend: Arc<B>,
    store: Arc<CounterStore>,
    clock: Arc<dyn Clock>,
    stats: Arc<Stats>,
    settings: FlushSettings,
    requests: mpsc::Receiver<Reply<Result<usize, BackendError>>>,
}

impl<B: Backend> Flusher<B> {
    /// A flusher and the handle to ask it for a flush.
    pub fn new(
        backend: Arc<B>,
        store: Arc<CounterStore>,
        clock: Arc<dyn Clock>,
        stats: Arc<Stats>,
        settings: FlushSettings,
    ) -> (Self, FlushHandle) {
        let (asker, requests) = crate::ask::channel(16);
        let flusher = Flusher {
            backend,
            store,
            clock,
            stats,
            settings,
            requests,
        };
        (flusher, FlushHandle { asker })
    }

    /// Flushes every `interval` until `shutdown`, then does the final flush.
    pub async fn run(mut self, shutdown: CancellationToken) -> FinalFlush {
        let mut backoff: Option<Duration> = None;
        let mut next = Instant::now() + self.settings.interval;
        loop {
            let reply = tokio::select! {
                () = shutdown.cancelled() => break,
                () = sleep_until(next) => None,
                Some(reply) = self.requests.recv() => Some(reply),
            };
            let result = self.flush_once().await;
            backoff = match &result {
                Ok(_) => None,
                Err(_) => Some(backoff.map_or(self.settings.min_backoff, |b| {
                    (b * 2).min(self.settings.max_backoff)
                })),
            };
            next = Instant::now() + backoff.unwrap_or(self.settings.interval);
            if let Some(reply) = reply {
                let _ = reply.send(result);
            }
            let evicted = self.store.evict_idle(self.clock.now());
            if evicted > 0 {
                log::debug!("evicted {evicted} idle counters");
            }
        }
        self.final_flush().await
    }

    async fn final_flush(&self) -> FinalFlush {
        let deadline = Instant::now() + self.settings.final_timeout;
        let mut rows = 0;
        let mut delay = self.settings.min_backoff;
        loop {
            match self.flush_once().await {
                Ok(n) => {
                    rows += n;
                    return FinalFlush {
                        rows,
                        units_lost: 0,
                        error: None,
                    };
                }
                Err(e) if Instant::now() + delay >= deadline => {
                    let (units_lost, _) = self.store.pending();
                    log::error!("final flush failed, {units_lost} counted units not saved: {e}");
                    return FinalFlush {
                        rows,
                        units_lost,
                        error: Some(e),
                    };
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.settings.max_backoff);
                }
            }
        }
    }

    /// Writes every pending delta once. On failure the unwritten deltas go
    /// back to the store.
    ///
    /// # Errors
    ///
    /// The backend's error.
    pub async fn flush_once(&self) -> Result<usize, BackendError> {
        let deltas = self.store.take_dirty();
        let rows = deltas.len();
        let now = self.clock.now();
        let result = if deltas.is_empty() {
            Ok(())
        } else {
            let deltas = Arc::new(deltas);
            let ctx = WriteContext {
                default_quota: self.settings.default_quota.load(Ordering::Relaxed),
                now,
            };
            let started = Instant::now();
            let written = self.backend.write(Arc::clone(&deltas), ctx).await;
            if let Err((done, _)) = &written {
                let unwritten = Arc::try_unwrap(deltas).unwrap_or_else(|shared| (*shared).clone());
                self.store
                    .restore(unwritten.into_iter().skip(*done).collect());
            } else {
                log::debug!("flushed {rows} rows in {:?}", started.elapsed());
            }
            written.map_err(|(_, e)| e)
        };
        *self.stats.last_flush.lock() = FlushStatus {
            at: now,
            rows,
            error: result.as_ref().err().map(ToString::to_string),
        };
        let was_up = self
            .stats
            .database_up
            .swap(result.is_ok(), Ordering::Relaxed);
        match (&result, was_up) {
            (Err(e), true) => {
                self.stats.flush_failures.fetch_add(1, Ordering::Relaxed);
                log::error!(
                    "{} {e}; counting goes on in memory and unsaved usage is kept",
                    self.backend.name()
                );
            }
            (Err(_), false) => {
                self.stats.flush_failures.fetch_add(1, Ordering::Relaxed);
            }
            (Ok(()), false) => crate::notice!(
                "{} database available again; {rows} rows written",
                self.backend.name()
            ),
            (Ok(()), true) => {}
        }
        result.map(|()| rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(delta: u32, window_expiry: i64) -> Delta {
        Delta {
            key: "k".into(),
            delta,
            window_expiry,
            quota: 10,
            persist: false,
            set_quota: false,
            reset_used: false,
        }
    }

    fn row(quota: u32, used: u32, expiry: Option<i64>, persist: bool) -> StoredRow {
        StoredRow {
            key: "k".into(),
            quota,
            used,
            expiry,
            persist,
        }
    }

    #[test]
    fn merge_rule() {
        assert_eq!(
            merge_delta(None, &delta(3, 100), 50),
            row(10, 3, Some(100), false)
        );
        assert_eq!(
            merge_delta(Some(row(7, 2, Some(100), false)), &delta(3, 100), 50),
            row(7, 5, Some(100), false)
        );
        // Older stored window: reset, default quota unless persist.
        assert_eq!(
            merge_delta(Some(row(7, 2, Some(90), false)), &delta(3, 100), 50),
            row(50, 3, Some(100), false)
        );
        assert_eq!(
            merge_delta(Some(row(7, 2, Some(90), true)), &delta(3, 100), 50),
            row(7, 3, Some(100), true)
        );
        assert_eq!(
            merge_delta(Some(row(7, 2, None, false)), &delta(3, 100), 50),
            row(50, 3, Some(100), false)
        );
        // A delta of a finished window does not touch the newer one.
        assert_eq!(
            merge_delta(Some(row(7, 2, Some(200), false)), &delta(3, 100), 50),
            row(7, 2, Some(200), false)
        );
        assert_eq!(
            merge_delta(Some(row(7, u32::MAX, Some(100), false)), &delta(3, 100), 50).used,
            u32::MAX
        );
    }
}
