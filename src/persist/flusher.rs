//! The [`Flusher`]: the one task that merges memory and database.
//!
//! Everything that moves counts between the [`CounterStore`] and the
//! [`Backend`] happens here, one job after the other, so no two of them can
//! see each other half done:
//!
//! - **flush** (every `flush_interval`): the pending units become batches;
//!   each batch is written, in order, until the backend confirms it. A batch
//!   that failed — or whose outcome is unknown — is kept exactly as it was
//!   and sent again, with the same [`BatchId`], before anything newer: the
//!   backend recognises an id it already applied. Units counted meanwhile
//!   stay pending in the store. So a flush is applied exactly once, and a
//!   reset or set-quota made while it hangs is written after it, winning.
//! - **refresh** (every `refresh_interval`): rows changed in the database
//!   since the last refresh (by other daemons, by administrators) are merged
//!   in. Never halfway through a write (the same task does both); the units
//!   of a batch still unconfirmed are counted as not stored yet, like
//!   pending ones, so nothing in flight is lost from memory.
//! - **full re-read** (at start, on reload, every `reconcile_interval`):
//!   every row is merged in, and counters whose row has disappeared (an
//!   administrator's `DELETE`) are forgotten. This is what makes edits that
//!   do not touch `updated` take effect.
//!
//! The database's health is recorded from operations that reached it only
//! (see [`crate::stats::Health`]): one log line when it goes away, one when it is back.
//! On shutdown the flusher writes what is left, within `final_timeout` for
//! everything, closing its connections included.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::{Backend, BackendError, Batch, BatchId, WriteContext, MAX_BATCH_ROWS};
use crate::ask::{Asker, Request};
use crate::clock::Clock;
use crate::stats::{FlushStatus, Op, Stats, Transition};
use crate::store::{normalize_key, CounterStore, InFlight, StoredRow};

/// How long recorded batch ids are kept: a batch can only be sent again
/// while its daemon runs, so a week is ample.
const BATCH_ID_RETENTION_SECS: i64 = 7 * 86_400;

/// What a [`FlushHandle`] can ask the flusher to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// Write pending deltas; answers the number of rows.
    Flush,
    /// Pull rows changed in the database; answers the number of rows.
    Refresh,
    /// Read every row and merge it; answers the number of rows.
    Reconcile,
}

/// Asks a running [`Flusher`] to flush, refresh or re-read now.
#[derive(Debug, Clone)]
pub struct FlushHandle {
    asker: Asker<Job, Result<usize, BackendError>>,
}

impl FlushHandle {
    /// Flushes now and returns how many rows were written.
    ///
    /// # Errors
    ///
    /// The backend failed (the counts are kept for the next try), or the
    /// flusher has stopped.
    pub async fn flush(&self) -> Result<usize, BackendError> {
        self.ask(Job::Flush).await
    }

    /// Pulls changed rows now (or does the start-up load, if it has not
    /// happened yet) and returns how many rows were merged.
    ///
    /// # Errors
    ///
    /// The backend failed, or the flusher has stopped.
    pub async fn refresh(&self) -> Result<usize, BackendError> {
        self.ask(Job::Refresh).await
    }

    /// Reads every row now, merges it, forgets counters whose row was
    /// deleted, and returns how many rows were read.
    ///
    /// # Errors
    ///
    /// The backend failed, or the flusher has stopped.
    pub async fn reconcile(&self) -> Result<usize, BackendError> {
        self.ask(Job::Reconcile).await
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
    /// Units the database did not confirm (0 when all went well).
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
    /// Time between full re-reads.
    pub reconcile_interval: Duration,
    /// First retry delay after a failure; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// How long the final flush may take at shutdown, retries and closing
    /// the connections included.
    pub final_timeout: Duration,
    /// How far back each refresh reaches before the previous one's time
    /// (rows committed a little after they were written).
    pub refresh_overlap: Duration,
}

/// Where the flusher reads the current default quota (for rows whose window
/// it resets): the live settings, which a reload swaps.
pub type DefaultQuota = Arc<dyn Fn() -> u32 + Send + Sync>;

/// The background task that writes counters behind and pulls changes in.
pub struct Flusher<B> {
    backend: Arc<B>,
    store: Arc<CounterStore>,
    clock: Arc<dyn Clock>,
    stats: Arc<Stats>,
    settings: FlushSettings,
    default_quota: DefaultQuota,
    requests: mpsc::Receiver<Request<Job, Result<usize, BackendError>>>,
    /// Whether every row has been loaded once. False when the database was
    /// away at start: the next refresh does the whole load.
    loaded: bool,
    /// The database's time of the last refresh, for `load_changed`.
    cursor: Option<i64>,
    /// Batches taken from the store and not yet confirmed by the backend, in
    /// the order they must be applied.
    unconfirmed: VecDeque<Arc<Batch>>,
    /// The id of the next batch.
    next_id: BatchId,
    /// The generation of the last full re-read.
    mark: u8,
    /// Rows were merged while a batch was unconfirmed, counting its units as
    /// not stored.
    merged_in_doubt: bool,
    /// A batch turned out to be applied already after such a merge: memory
    /// counts its units twice until every row is read again, soon.
    reread_soon: bool,
    /// When the last "near max_counters" warning was logged.
    near_cap_warned: Option<Instant>,
}

impl<B> fmt::Debug for Flusher<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flusher")
            .field("loaded", &self.loaded)
            .field("unconfirmed", &self.unconfirmed.len())
            .finish_non_exhaustive()
    }
}

/// A row stored under a key the daemon never uses (mixed case, blanks, as
/// the Perl daemon stored logins) goes to `unfolded`, under the key it must
/// be folded into; other rows come back to be merged. Keys that normalise to
/// nothing are left alone.
fn set_aside_unfolded(
    row: StoredRow,
    unfolded: &mut BTreeMap<String, Vec<String>>,
) -> Option<StoredRow> {
    let normal = normalize_key(&row.key);
    if normal == row.key {
        return Some(row);
    }
    if !normal.is_empty() {
        unfolded
            .entry(normal.into_owned())
            .or_default()
            .push(row.key);
    }
    None
}

/// Capped doubling: the next delay after a failure.
fn next_backoff(previous: Option<Duration>, min: Duration, max: Duration) -> Duration {
    previous.map_or(min, |b| (b * 2).min(max))
}

impl<B: Backend> Flusher<B> {
    /// A flusher and the handle to ask it for a flush, refresh or re-read.
    pub fn new(
        backend: Arc<B>,
        store: Arc<CounterStore>,
        clock: Arc<dyn Clock>,
        stats: Arc<Stats>,
        settings: FlushSettings,
        default_quota: DefaultQuota,
    ) -> (Self, FlushHandle) {
        let (asker, requests) = crate::ask::channel(16);
        let flusher = Flusher {
            backend,
            store,
            clock,
            stats,
            settings,
            default_quota,
            requests,
            loaded: false,
            cursor: None,
            unconfirmed: VecDeque::new(),
            next_id: BatchId::first(),
            mark: 0,
            merged_in_doubt: false,
            reread_soon: false,
            near_cap_warned: None,
        };
        (flusher, FlushHandle { asker })
    }

    /// Checks the database and loads every row into the store (at start).
    /// On failure the daemon can serve anyway: [`Flusher::run`] loads at its
    /// first refresh that works.
    ///
    /// # Errors
    ///
    /// The backend's error.
    pub async fn load(&mut self) -> Result<usize, BackendError> {
        let inspected = self.backend.inspect().await;
        // Only the whole load's success says the database is up (an
        // inspection may not even have touched it).
        if inspected.is_err() {
            self.note(Op::Read, &inspected);
        }
        for w in inspected?.warnings {
            log::warn!("{w}");
        }
        let n = self.read_everything().await?;
        self.loaded = true;
        self.stats.database.lock().loaded = true;
        Ok(n)
    }

    /// Flushes every `interval`, refreshes every `refresh_interval` and
    /// re-reads everything every `reconcile_interval` until `shutdown`, then
    /// does the final flush.
    pub async fn run(mut self, shutdown: CancellationToken) -> FinalFlush {
        let (min, max) = (self.settings.min_backoff, self.settings.max_backoff);
        let mut flush_backoff: Option<Duration> = None;
        let mut refresh_backoff: Option<Duration> = None;
        let mut next_flush = Instant::now() + self.settings.interval;
        let mut next_refresh = Instant::now() + self.settings.refresh_interval;
        let mut next_reconcile = Instant::now() + self.settings.reconcile_interval;
        loop {
            let (job, reply) = tokio::select! {
                () = shutdown.cancelled() => break,
                () = sleep_until(next_flush) => (Job::Flush, None),
                () = sleep_until(next_refresh) => (Job::Refresh, None),
                () = sleep_until(next_reconcile) => (Job::Reconcile, None),
                Some((job, reply)) = self.requests.recv() => (job, Some(reply)),
            };
            // A job never delays shutdown: it is cut short (each is safe to
            // cancel: an unconfirmed batch stays queued, a re-read merged
            // halfway forgets nothing), and the final flush has its own
            // deadline.
            let done = tokio::select! {
                done = self.run_job(job) => done,
                () = shutdown.cancelled() => {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(BackendError::Unavailable(
                            "the daemon is stopping".into(),
                        )));
                    }
                    break;
                }
            };
            let result = match job {
                Job::Flush => {
                    flush_backoff = done.is_err().then(|| next_backoff(flush_backoff, min, max));
                    next_flush = Instant::now() + flush_backoff.unwrap_or(self.settings.interval);
                    let evicted = self.store.evict_idle(self.clock.now());
                    if evicted > 0 {
                        log::debug!("evicted {evicted} idle counters");
                    }
                    self.warn_near_max_counters();
                    done
                }
                Job::Refresh | Job::Reconcile => {
                    refresh_backoff = done
                        .is_err()
                        .then(|| next_backoff(refresh_backoff, min, max));
                    let wait = refresh_backoff.map_or(self.settings.refresh_interval, |b| {
                        b.min(self.settings.refresh_interval)
                    });
                    next_refresh = Instant::now() + wait;
                    if job == Job::Reconcile && done.is_ok() {
                        next_reconcile = Instant::now() + self.settings.reconcile_interval;
                    } else if job == Job::Reconcile {
                        next_reconcile = next_refresh;
                    }
                    done
                }
            };
            if std::mem::take(&mut self.reread_soon) {
                next_reconcile = Instant::now();
            }
            if let Some(reply) = reply {
                let _ = reply.send(result);
            }
        }
        self.final_flush().await
    }

    async fn run_job(&mut self, job: Job) -> Result<usize, BackendError> {
        match job {
            Job::Flush => self.flush_once().await,
            Job::Refresh => self.refresh_once().await,
            Job::Reconcile => self.reconcile_once().await,
        }
    }

    /// Pulls the rows changed since the last refresh (everything, if the
    /// start-up load has not happened yet) and merges them into the store.
    ///
    /// # Errors
    ///
    /// The backend's error.
    pub async fn refresh_once(&mut self) -> Result<usize, BackendError> {
        if !self.loaded {
            let loaded = self.load().await;
            if let Ok(n) = &loaded {
                crate::notice!(
                    "loaded {n} counters from {} (deferred start-up load)",
                    self.backend.name()
                );
            }
            return loaded;
        }
        let changed = self.backend.load_changed(self.cursor).await;
        self.note(Op::Read, &changed);
        let Some((rows, at)) = changed? else {
            return Ok(0);
        };
        let n = rows.len();
        let in_flight = self.in_flight();
        self.merged_in_doubt |= !in_flight.is_empty();
        let now = self.clock.now();
        let mut unfolded = BTreeMap::new();
        for row in rows {
            if let Some(row) = set_aside_unfolded(row, &mut unfolded) {
                let unconfirmed = in_flight.get(row.key.as_str()).copied();
                self.store.merge_stored(row, now, self.mark, unconfirmed);
            }
        }
        for (key, variants) in unfolded {
            self.fold(key, variants, self.mark, &in_flight).await;
        }
        self.cursor = Some(self.overlapped(at));
        Ok(n)
    }

    /// Reads every row, merges it, and forgets counters whose row has been
    /// deleted. Does the start-up load if it has not happened yet.
    ///
    /// # Errors
    ///
    /// The backend's error.
    pub async fn reconcile_once(&mut self) -> Result<usize, BackendError> {
        if !self.loaded {
            return self.refresh_once().await;
        }
        let n = self.read_everything().await?;
        if let Err(e) = self.backend.prune_batches(BATCH_ID_RETENTION_SECS).await {
            log::warn!("cannot remove old batch ids: {e}");
        }
        Ok(n)
    }

    /// The full re-read: every row merged with a new generation mark, then
    /// the counters whose row was not seen are forgotten.
    async fn read_everything(&mut self) -> Result<usize, BackendError> {
        // The database's time first: changes made during the read are
        // pulled again by the next refresh, which is harmless. Its success
        // alone is not recorded: the read of every row says more.
        let at = self.backend.load_changed(None).await;
        if at.is_err() {
            self.note(Op::Read, &at);
        }
        let cursor = at?.map(|(_, at)| self.overlapped(at));
        let mark = self.mark.wrapping_add(1);
        // Rows are merged as they arrive, a chunk at a time: a million rows
        // never sit in memory at once.
        let (tx, mut rx) = mpsc::channel::<Vec<StoredRow>>(2);
        let in_flight = self.in_flight();
        self.merged_in_doubt |= !in_flight.is_empty();
        let now = self.clock.now();
        let store = &self.store;
        // Keys as the Perl daemon stored them (mixed case) are folded into
        // the daemon's keys afterwards.
        let mut unfolded = BTreeMap::new();
        let merge = async {
            while let Some(chunk) = rx.recv().await {
                for row in chunk {
                    if let Some(row) = set_aside_unfolded(row, &mut unfolded) {
                        let unconfirmed = in_flight.get(row.key.as_str()).copied();
                        store.merge_stored(row, now, mark, unconfirmed);
                    }
                }
                // A chunk takes a fraction of a millisecond; let the
                // connections on this worker thread go first.
                tokio::task::yield_now().await;
            }
        };
        let (read, ()) = tokio::join!(self.backend.scan(tx), merge);
        self.note(Op::Read, &read);
        let n = read?;
        for (key, variants) in unfolded {
            self.fold(key, variants, mark, &in_flight).await;
        }
        self.mark = mark;
        self.cursor = cursor;
        let forgotten = self.store.forget_unseen(mark, (self.default_quota)());
        if forgotten > 0 {
            crate::notice!(
                "{forgotten} counters whose row was deleted from the database are forgotten"
            );
        }
        Ok(n)
    }

    /// Folds rows stored under keys that differ from `key` only by case or
    /// blanks into one (see [`super::fold_rows`]), in the database and then
    /// in memory, with one warning. A failure is logged; the next full
    /// re-read tries again.
    async fn fold(
        &self,
        key: String,
        variants: Vec<String>,
        mark: u8,
        in_flight: &HashMap<Box<str>, InFlight>,
    ) {
        let names: Vec<String> = variants
            .iter()
            .map(|v| crate::protocol::Escaped(v).to_string())
            .collect();
        let folded = self.backend.fold(&key, variants).await;
        self.note(Op::Write, &folded);
        match folded {
            Ok(Some(row)) => {
                log::warn!(
                    "folded {} rows ({}) into the key {} (keys are lower-cased): used {}, quota {}{}",
                    names.len(),
                    names.join(", "),
                    crate::protocol::Escaped(&key),
                    row.used,
                    row.quota,
                    if row.persist { ", persistent" } else { "" },
                );
                let unconfirmed = in_flight.get(key.as_str()).copied();
                self.store
                    .merge_stored(row, self.clock.now(), mark, unconfirmed);
            }
            Ok(None) => {}
            Err(e) => log::error!(
                "cannot fold the rows {} into {}: {e}; trying again at the next full re-read",
                names.join(", "),
                crate::protocol::Escaped(&key)
            ),
        }
    }

    /// Warns, at most once an hour, when the counters held pass 90% of
    /// `max_counters` (after idle ones were evicted).
    fn warn_near_max_counters(&mut self) {
        let (count, max) = (self.store.count(), self.store.max_counters());
        if count.saturating_mul(10) < max.saturating_mul(9) {
            return;
        }
        if self
            .near_cap_warned
            .is_some_and(|at| at.elapsed() < Duration::from_secs(3600))
        {
            return;
        }
        self.near_cap_warned = Some(Instant::now());
        log::warn!(
            "{count} counters held, {}% of max_counters ({max}); past it, senders without a \
             counter are answered counters_full_action, uncounted",
            count.saturating_mul(100) / max.max(1)
        );
    }

    /// Per key, what unconfirmed batches carry: the units of the latest
    /// window they belong to, and administrators' changes (empty, and free,
    /// when every batch is confirmed).
    fn in_flight(&self) -> HashMap<Box<str>, InFlight> {
        let mut in_flight: HashMap<Box<str>, InFlight> = HashMap::new();
        for d in self.unconfirmed.iter().flat_map(|b| &b.deltas) {
            let e = in_flight.entry(d.key.clone()).or_insert(InFlight {
                window: d.window_expiry,
                ..InFlight::default()
            });
            if d.window_expiry > e.window {
                *e = InFlight {
                    window: d.window_expiry,
                    set_quota: e.set_quota,
                    ..InFlight::default()
                };
            }
            e.set_quota |= d.set_quota;
            if d.window_expiry == e.window {
                e.units = e.units.saturating_add(d.delta);
                e.reset_used |= d.reset_used;
            }
        }
        in_flight
    }

    /// The refresh cursor for a read made at database time `at`: a little
    /// earlier, because `updated` is set when a row is written, not when its
    /// transaction commits; a row written before `at` and committed after
    /// would otherwise be missed. Reading a row twice is harmless.
    fn overlapped(&self, at: i64) -> i64 {
        at - i64::try_from(self.settings.refresh_overlap.as_secs()).unwrap_or(0)
    }

    async fn final_flush(&mut self) -> FinalFlush {
        let limit = self.settings.final_timeout;
        let deadline = Instant::now() + limit;
        let mut rows = 0;
        let mut delay = self.settings.min_backoff;
        let error = loop {
            match tokio::time::timeout_at(deadline, self.flush_once()).await {
                Ok(Ok(n)) => {
                    rows += n;
                    break None;
                }
                Ok(Err(_)) if Instant::now() + delay < deadline => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.settings.max_backoff);
                }
                Ok(Err(e)) => break Some(e),
                Err(_) => {
                    break Some(BackendError::Unavailable(format!(
                        "the final flush did not finish within {limit:?}"
                    )))
                }
            }
        };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        if tokio::time::timeout(left, self.backend.close())
            .await
            .is_err()
        {
            log::warn!("{}: connections not closed in time", self.backend.name());
        }
        let units_lost = self.store.pending().0 + self.unconfirmed_units();
        if let Some(e) = &error {
            log::error!(
                "final flush failed, {units_lost} counted units not confirmed as saved: {e}"
            );
        }
        FinalFlush {
            rows,
            units_lost,
            error,
        }
    }

    /// Writes every pending delta once: first the batches that are not
    /// confirmed yet, then, if they all went through, the units counted
    /// since. Returns the rows written.
    ///
    /// Cancelling it loses nothing: a batch leaves the queue only once the
    /// backend confirmed it.
    ///
    /// # Errors
    ///
    /// The backend's error; the counts are kept for the next try.
    pub async fn flush_once(&mut self) -> Result<usize, BackendError> {
        let mut result = self.confirm().await;
        if let Ok(rows) = result {
            let mut deltas = self.store.take_dirty();
            if !deltas.is_empty() {
                // In key order, so that daemons sharing a table lock its
                // rows in the same order (no deadlocks between them).
                deltas.sort_unstable_by(|a, b| a.key.cmp(&b.key));
                let mut rest = deltas.into_iter().peekable();
                while rest.peek().is_some() {
                    let deltas: Vec<_> = rest.by_ref().take(MAX_BATCH_ROWS).collect();
                    let id = self.next_id;
                    self.next_id = id.next();
                    self.unconfirmed.push_back(Arc::new(Batch { id, deltas }));
                }
                self.publish_unconfirmed();
                result = self.confirm().await.map(|n| n + rows);
            }
        }
        let rows = match &result {
            Ok(n) => *n,
            Err(_) => self.unconfirmed.iter().map(|b| b.deltas.len()).sum(),
        };
        if rows > 0 || result.is_err() {
            *self.stats.last_flush.lock() = FlushStatus {
                at: self.clock.now(),
                rows,
                error: result.as_ref().err().map(ToString::to_string),
            };
        }
        if result.is_err() {
            self.stats.flush_failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Writes the unconfirmed batches, oldest first, until one fails.
    async fn confirm(&mut self) -> Result<usize, BackendError> {
        let mut rows = 0;
        while let Some(batch) = self.unconfirmed.front().cloned() {
            let ctx = WriteContext {
                default_quota: (self.default_quota)(),
                now: self.clock.now(),
            };
            let started = Instant::now();
            let written = self.backend.write(Arc::clone(&batch), ctx).await;
            self.note(Op::Write, &written);
            let written = written?;
            if written.replayed {
                self.reread_soon |= self.merged_in_doubt;
                crate::notice!(
                    "batch {:x}-{} was already in the database (an earlier attempt's outcome was \
                     unknown); not applied again",
                    batch.id.daemon,
                    batch.id.seq
                );
            }
            let skipped: HashSet<usize> = written.skipped.into_iter().collect();
            self.store.mark_stored(
                batch
                    .deltas
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !skipped.contains(i))
                    .map(|(_, d)| &*d.key),
            );
            log::debug!(
                "flushed {} rows in {:?}",
                batch.deltas.len(),
                started.elapsed()
            );
            rows += batch.deltas.len();
            self.unconfirmed.pop_front();
            self.publish_unconfirmed();
        }
        if self.unconfirmed.is_empty() {
            self.merged_in_doubt = false;
        }
        Ok(rows)
    }

    fn unconfirmed_units(&self) -> u64 {
        self.unconfirmed.iter().map(|b| b.units()).sum()
    }

    /// Tells `status` what waits in unconfirmed batches.
    fn publish_unconfirmed(&self) {
        let rows: usize = self.unconfirmed.iter().map(|b| b.deltas.len()).sum();
        self.stats
            .unconfirmed_units
            .store(self.unconfirmed_units(), Ordering::Relaxed);
        self.stats
            .unconfirmed_rows
            .store(rows as u64, Ordering::Relaxed);
    }

    /// Records the outcome of an operation that reached the database, and
    /// logs one line when it goes away and one when it is back.
    fn note<T>(&self, op: Op, result: &Result<T, BackendError>) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        let transition = self.stats.database.lock().record(
            op,
            outcome.as_ref().map(|_| ()).map_err(String::as_str),
            self.clock.now(),
        );
        let name = self.backend.name();
        match transition {
            Some(Transition::WentDown { op, error }) => log::error!(
                "{name} {} failing: {error}; requests are answered from memory and unsaved counts are kept",
                op.as_str()
            ),
            Some(Transition::CameBack { down_secs }) => {
                crate::notice!("{name} database available again after {down_secs} s")
            }
            None => {}
        }
    }
}
