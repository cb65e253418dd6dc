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
pub mod mysql;
pub mod sqlite;

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::ask::{Asker, Request};
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

    /// Rows whose `updated` time is at or after `since` (the database's
    /// unix time of the previous call), and the database's time now, for the
    /// next call. `since = None` returns no rows, only the time. `Ok(None)`:
    /// the backend cannot tell (a single daemon's embedded file), so there is
    /// nothing to refresh.
    fn load_changed(
        &self,
        since: Option<i64>,
    ) -> impl Future<Output = Result<Option<(Vec<StoredRow>, i64)>, BackendError>> + Send {
        let _ = since;
        async { Ok(None) }
    }

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

/// What a [`FlushHandle`] can ask the flusher to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// Write pending deltas; answers the number of rows.
    Flush,
    /// Pull rows changed in the database; answers the number of rows.
    Refresh,
}

/// Asks a running [`Flusher`] to flush or refresh now.
#[derive(Debug, Clone)]
pub struct FlushHandle {
    asker: Asker<Job, Result<usize, BackendError>>,
}

impl FlushHandle {
    /// Flushes now and returns how many rows were written.
    ///
    /// # Errors
    ///
    /// The backend failed (the deltas are kept for the next try), or the
    /// flusher has stopped.
    pub async fn flush(&self) -> Result<usize, BackendError> {
        self.ask(Job::Flush).await
    }

    /// Pulls changed rows now (or does the initial load, if it has not
    /// happened yet) and returns how many rows were merged.
    ///
    /// # Errors
    ///
    /// The backend failed, or the flusher has stopped.
    pub async fn refresh(&self) -> Result<usize, BackendError> {
        self.ask(Job::Refresh).await
    }

    async fn ask(&self, job: Job) -> Result<usize, BackendError> {
        self.asker
            .ask(job)
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
    /// Time between refreshes (rows changed in the database by an
    /// administrator or by other daemons).
    pub refresh_interval: Duration,
    /// First retry delay after a failure; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// How long the final flush may keep retrying at shutdown.
    pub final_timeout: Duration,
    /// Quota of reset non-persistent rows; shared so a reload can change it.
    pub default_quota: Arc<AtomicU32>,
}

/// The background task that writes counters behind and pulls changes in.
///
/// Flushes and refreshes run one after the other in this one task, so a
/// refresh never sees the database halfway through one of our flushes (it
/// would count the in-flight deltas neither as stored nor as pending).
pub struct Flusher<B> {
    backend: Arc<B>,
    store: Arc<CounterStore>,
    clock: Arc<dyn Clock>,
    stats: Arc<Stats>,
    settings: FlushSettings,
    requests: mpsc::Receiver<Request<Job, Result<usize, BackendError>>>,
    /// Whether every row has been loaded once. False when the database was
    /// away at start: the next refresh does the whole load.
    loaded: bool,
    /// The database's time of the last refresh, for `load_changed`.
    cursor: Option<i64>,
}

/// Capped doubling: the next delay after a failure.
fn next_backoff(previous: Option<Duration>, min: Duration, max: Duration) -> Duration {
    previous.map_or(min, |b| (b * 2).min(max))
}

impl<B: Backend> Flusher<B> {
    /// A flusher and the handle to ask it for a flush or a refresh.
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
            loaded: false,
            cursor: None,
        };
        (flusher, FlushHandle { asker })
    }

    /// Loads every row into the store (at start). On failure the daemon can
    /// serve anyway: [`Flusher::run`] loads at its first successful refresh.
    ///
    /// # Errors
    ///
    /// The backend's error.
    pub async fn load(&mut self) -> Result<usize, BackendError> {
        // Take the database's time first: changes made during the load are
        // pulled again by the first refresh, which is harmless.
        let cursor = self.backend.load_changed(None).await?.map(|(_, at)| at);
        let rows = self.backend.load_all().await?;
        let n = rows.len();
        let now = self.clock.now();
        for row in rows {
            self.store.merge_stored(row, now);
        }
        self.loaded = true;
        self.cursor = cursor;
        Ok(n)
    }

    /// Flushes every `interval` and refreshes every `refresh_interval` until
    /// `shutdown`, then does the final flush.
    pub async fn run(mut self, shutdown: CancellationToken) -> FinalFlush {
        let (min, max) = (self.settings.min_backoff, self.settings.max_backoff);
        let mut flush_backoff: Option<Duration> = None;
        let mut refresh_backoff: Option<Duration> = None;
        let mut next_flush = Instant::now() + self.settings.interval;
        let mut next_refresh = Instant::now() + self.settings.refresh_interval;
        loop {
            let (job, reply) = tokio::select! {
                () = shutdown.cancelled() => break,
                () = sleep_until(next_flush) => (Job::Flush, None),
                () = sleep_until(next_refresh) => (Job::Refresh, None),
                Some((job, reply)) = self.requests.recv() => (job, Some(reply)),
            };
            let result = match job {
                Job::Flush => {
                    let result = self.flush_once().await;
                    flush_backoff = result
                        .is_err()
                        .then(|| next_backoff(flush_backoff, min, max));
                    next_flush = Instant::now() + flush_backoff.unwrap_or(self.settings.interval);
                    let evicted = self.store.evict_idle(self.clock.now());
                    if evicted > 0 {
                        log::debug!("evicted {evicted} idle counters");
                    }
                    result
                }
                Job::Refresh => {
                    let result = self.refresh_once().await;
                    refresh_backoff = result
                        .is_err()
                        .then(|| next_backoff(refresh_backoff, min, max));
                    let wait = refresh_backoff.map_or(self.settings.refresh_interval, |b| {
                        b.min(self.settings.refresh_interval)
                    });
                    next_refresh = Instant::now() + wait;
                    result
                }
            };
            if let Some(reply) = reply {
                let _ = reply.send(result);
            }
        }
        self.final_flush().await
    }

    /// Pulls the rows changed since the last refresh (everything, if the
    /// initial load has not happened yet) and merges them into the store.
    ///
    /// # Errors
    ///
    /// The backend's error.
    pub async fn refresh_once(&mut self) -> Result<usize, BackendError> {
        let result = if self.loaded {
            match self.backend.load_changed(self.cursor).await {
                Ok(Some((rows, at))) => {
                    let n = rows.len();
                    let now = self.clock.now();
                    for row in rows {
                        self.store.merge_stored(row, now);
                    }
                    self.cursor = Some(at);
                    Ok(n)
                }
                Ok(None) => Ok(0),
                Err(e) => Err(e),
            }
        } else {
            let loaded = self.load().await;
            if let Ok(n) = &loaded {
                crate::notice!(
                    "loaded {n} counters from {} (deferred start-up load)",
                    self.backend.name()
                );
            }
            loaded
        };
        self.note_database(&result, "refresh");
        result
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
        if result.is_err() {
            self.stats.flush_failures.fetch_add(1, Ordering::Relaxed);
        }
        let result = result.map(|()| rows);
        self.note_database(&result, "flush");
        result
    }

    /// Keeps `database_up` and logs one line when the database goes away and
    /// one when it is back.
    fn note_database(&self, result: &Result<usize, BackendError>, what: &str) {
        let was_up = self
            .stats
            .database_up
            .swap(result.is_ok(), Ordering::Relaxed);
        let name = self.backend.name();
        match (result, was_up) {
            (Err(e), true) => log::error!(
                "{name} {what} failed: {e}; requests are answered from memory and unsaved usage is kept"
            ),
            (Ok(_), false) => crate::notice!("{name} database available again"),
            _ => {}
        }
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
