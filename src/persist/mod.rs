//! Write-behind persistence: the [`Backend`] trait, the batch a flush
//! writes, and the rule that merges a delta into a stored row.
//!
//! The request path never touches a backend. At start every row is loaded
//! into the [`crate::store::CounterStore`]; afterwards the [`Flusher`] (in
//! [`flusher`]), every `flush_interval`, takes the usage added since the
//! last flush as [`Delta`]s and writes them in [`Batch`]es. Deltas, not
//! absolute values: each backend reads the stored row inside its
//! transaction, applies [`merge_delta`] and writes the result, so several
//! daemons sharing one database add up and never clobber each other.
//!
//! **Exactly once.** Every batch carries a [`BatchId`], recorded in the same
//! transaction in a small side table (`<table>_batches`). A write whose
//! outcome is unknown (connection lost after COMMIT was sent, a deadline
//! that fired while the server was committing) is sent again with the same
//! id; the backend finds the id and knows the batch is already applied. The
//! flusher keeps a failed batch, unchanged, until the backend confirms it,
//! and writes nothing newer before it.

pub mod flusher;
pub mod memory;
pub mod mysql;
pub mod sqlite;

use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;

pub use flusher::{FinalFlush, FlushHandle, FlushSettings, Flusher};

use crate::store::{Delta, StoredRow};

/// The names of the table's columns. The Perl daemon let each be renamed
/// (`$db_wherecol`, `$db_quotacol`, `$db_tallycol`, `$db_updatedcol`,
/// `$db_expirycol`, `$db_persistcol`); a table renamed so works as it is.
/// `id` keeps its name (the Perl daemon had no setting for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    /// The key (`sender`).
    pub sender: String,
    /// `quota`.
    pub quota: String,
    /// The units used (`used`; the Perl daemon's "tally").
    pub used: String,
    /// `updated`.
    pub updated: String,
    /// `expiry`.
    pub expiry: String,
    /// `persist`.
    pub persist: String,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            sender: "sender".into(),
            quota: "quota".into(),
            used: "used".into(),
            updated: "updated".into(),
            expiry: "expiry".into(),
            persist: "persist".into(),
        }
    }
}

/// A table and its column names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// The table's name (`ratelimit`); the batch ids go to `<name>_batches`.
    pub name: String,
    /// Its columns.
    pub columns: Columns,
}

impl Table {
    /// A table with the default column names.
    pub fn named(name: &str) -> Table {
        Table {
            name: name.to_owned(),
            columns: Columns::default(),
        }
    }
}

/// Most rows written in one transaction.
pub const MAX_BATCH_ROWS: usize = 10_000;

/// Most rows handed over at once by [`Backend::scan`].
pub const SCAN_CHUNK: usize = 1024;

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

/// Identifies one batch across daemons and restarts: a random number drawn
/// when the daemon starts, and a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchId {
    /// Random per daemon start.
    pub daemon: u64,
    /// Counts the batches of this daemon start.
    pub seq: u64,
}

impl BatchId {
    /// The first id of a new daemon start.
    pub fn first() -> BatchId {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS's random source; the pid and the
        // time make two daemons of one process (tests) differ as well.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(d.as_nanos());
        }
        BatchId {
            // Kept below 2^63 so that databases without unsigned integers
            // store it as it is.
            daemon: h.finish() >> 1,
            seq: 0,
        }
    }

    /// The id after this one.
    pub fn next(self) -> BatchId {
        BatchId {
            seq: self.seq + 1,
            ..self
        }
    }
}

/// Deltas written in one transaction, under one id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Recorded with the batch, so that sending it again is harmless.
    pub id: BatchId,
    /// At most [`MAX_BATCH_ROWS`].
    pub deltas: Vec<Delta>,
}

impl Batch {
    /// Units in the batch.
    pub fn units(&self) -> u64 {
        self.deltas.iter().map(|d| u64::from(d.delta)).sum()
    }
}

/// What the flusher writes, besides the deltas themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteContext {
    /// The quota a non-persistent row gets when its window is reset.
    pub default_quota: u32,
    /// Unix seconds, for the `updated` column.
    pub now: i64,
}

/// What a backend did with a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    /// The batch had been applied before (an earlier attempt whose outcome
    /// was unknown); nothing was written now.
    pub replayed: bool,
    /// Indexes of deltas whose key the backend cannot hold (counted in
    /// memory only; the backend logs why).
    pub skipped: Vec<usize>,
}

/// What a backend found when it first looked at its database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inspection {
    /// Problems an administrator should fix, each a sentence for the log.
    pub warnings: Vec<String>,
}

/// A place counters are stored. Implementations must be cheap to call from
/// async code: blocking work belongs in `spawn_blocking`.
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs (`sqlite`, `mysql`, ...).
    fn name(&self) -> &'static str;

    /// Checks the database before the first load: creates what the daemon
    /// may create (the batch table), and reports what it cannot fix.
    fn inspect(&self) -> impl Future<Output = Result<Inspection, BackendError>> + Send {
        async { Ok(Inspection::default()) }
    }

    /// Reads every row, handing the rows to `rows` in chunks of at most
    /// [`SCAN_CHUNK`] as they arrive, so that a million rows never sit in
    /// memory at once. Returns how many rows were read. Stops early (with
    /// `Ok`) if the receiver goes away.
    fn scan(
        &self,
        rows: mpsc::Sender<Vec<StoredRow>>,
    ) -> impl Future<Output = Result<usize, BackendError>> + Send;

    /// Every row at once (for tools and tests; the daemon uses
    /// [`Backend::scan`]).
    fn load_all(&self) -> impl Future<Output = Result<Vec<StoredRow>, BackendError>> + Send {
        async {
            let (tx, mut rx) = mpsc::channel(4);
            let collect = async {
                let mut all = Vec::new();
                while let Some(chunk) = rx.recv().await {
                    all.extend(chunk);
                }
                all
            };
            let (read, all) = tokio::join!(self.scan(tx), collect);
            read.map(|_| all)
        }
    }

    /// Rows whose `updated` time is at or after `since` (the database's
    /// unix time of the previous call), and the database's time now, for the
    /// next call. `since = None` returns no rows, only the time. `Ok(None)`:
    /// the backend cannot tell, so there is nothing to refresh.
    fn load_changed(
        &self,
        since: Option<i64>,
    ) -> impl Future<Output = Result<Option<(Vec<StoredRow>, i64)>, BackendError>> + Send {
        let _ = since;
        async { Ok(None) }
    }

    /// Applies a batch in one transaction: each delta by [`merge_delta`] on
    /// the row as it is inside the transaction, and the batch's id recorded.
    /// A batch whose id is already recorded is not applied again
    /// ([`Written::replayed`]).
    ///
    /// On error nothing of the batch was applied, or the outcome is unknown
    /// (the caller sends the same batch again).
    fn write(
        &self,
        batch: Arc<Batch>,
        ctx: WriteContext,
    ) -> impl Future<Output = Result<Written, BackendError>> + Send;

    /// Folds the rows of `variants` (keys that differ from `key` only by
    /// case or surrounding blanks, as the Perl daemon stored logins as
    /// typed) into one row for `key`, by [`fold_rows`], in one transaction:
    /// the rows are locked, the kept row is written (renamed if needed), the
    /// others deleted. Returns the folded row, or `None` if there was
    /// nothing to fold any more.
    fn fold(
        &self,
        key: &str,
        variants: Vec<String>,
    ) -> impl Future<Output = Result<Option<StoredRow>, BackendError>> + Send {
        let _ = (key, variants);
        async { Ok(None) }
    }

    /// Forgets recorded batch ids older than `max_age_secs` (they can no
    /// longer be sent again).
    fn prune_batches(
        &self,
        max_age_secs: i64,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        let _ = max_age_secs;
        async { Ok(()) }
    }

    /// Closes connections (at shutdown; the caller bounds the wait).
    fn close(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// How a stored row changes by one delta. Every backend applies exactly
/// this, in Rust, to the row it read (and locked) inside its transaction.
///
/// - No row: insert one with the delta as `used` and the delta's window (and
///   if the key had a row when the delta was taken, an administrator
///   deleted it: the default quota, not persistent, unless the delta itself
///   sets the quota).
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
            let deleted = d.had_row && !d.set_quota;
            return StoredRow {
                key: d.key.to_string(),
                quota: if deleted { default_quota } else { d.quota },
                used: d.delta,
                expiry: Some(d.window_expiry),
                persist: d.persist && !deleted,
            };
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

/// A stored row with its table id, for [`fold_rows`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdRow {
    /// The row's `id`.
    pub id: i64,
    /// The row.
    pub row: StoredRow,
}

/// How several rows of one sender become one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fold {
    /// The id of the row that stays (written with `row`).
    pub keep: i64,
    /// The folded row, under the normalised key.
    pub row: StoredRow,
    /// The ids of the rows that go.
    pub delete: Vec<i64>,
}

/// The rule for folding rows that differ only by case (`MiXed@Example.com`,
/// `mixed@example.com`) into the one the daemon uses, `key`:
///
/// - the window is the latest one among the rows (NULL counts as over);
/// - `used` is the sum of `used` over the rows of that window (rows of
///   earlier windows are finished and limit nothing);
/// - if any row is persistent, the result is persistent, with the smallest
///   of the persistent quotas (a blocked account, quota 0, stays blocked);
///   otherwise the smallest quota among the rows of the latest window;
/// - the row already named `key` stays if there is one (else the one with
///   the lowest id, renamed), the others are deleted.
///
/// `None` for no rows.
pub fn fold_rows(key: &str, rows: &[IdRow]) -> Option<Fold> {
    let latest = rows.iter().map(|r| r.row.expiry.unwrap_or(0)).max()?;
    let current = || rows.iter().filter(|r| r.row.expiry.unwrap_or(0) == latest);
    let used = current().fold(0u32, |sum, r| sum.saturating_add(r.row.used));
    let persistent = rows
        .iter()
        .filter(|r| r.row.persist)
        .map(|r| r.row.quota)
        .min();
    let quota = persistent.or_else(|| current().map(|r| r.row.quota).min())?;
    let keep = rows
        .iter()
        .find(|r| r.row.key == key)
        .or_else(|| rows.iter().min_by_key(|r| r.id))?
        .id;
    Some(Fold {
        keep,
        row: StoredRow {
            key: key.to_owned(),
            quota,
            used,
            expiry: rows
                .iter()
                .find(|r| r.row.expiry.unwrap_or(0) == latest)
                .and_then(|r| r.row.expiry),
            persist: persistent.is_some(),
        },
        delete: rows.iter().map(|r| r.id).filter(|&id| id != keep).collect(),
    })
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
            had_row: false,
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
        // The row was deleted since the delta was taken: a new sender.
        let gone = Delta {
            had_row: true,
            quota: 0,
            persist: true,
            ..delta(3, 100)
        };
        assert_eq!(merge_delta(None, &gone, 50), row(50, 3, Some(100), false));
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

    #[test]
    fn fold_rule() {
        let r = |id, key: &str, quota, used, expiry, persist| IdRow {
            id,
            row: StoredRow {
                key: key.into(),
                quota,
                used,
                expiry,
                persist,
            },
        };
        // Same window: used adds up; the persistent quota is kept.
        let f = fold_rows(
            "a@x",
            &[
                r(7, "A@x", 10, 3, Some(100), true),
                r(9, "a@X", 1000, 4, Some(100), false),
            ],
        )
        .unwrap();
        assert_eq!(
            (f.keep, f.delete.clone()),
            (7, vec![9]),
            "lowest id renamed"
        );
        assert_eq!(f.row, row(10, 7, Some(100), true).keyed("a@x"));
        // The exact key's row stays; an earlier window adds nothing; the
        // smallest persistent quota (a block) wins.
        let f = fold_rows(
            "a@x",
            &[
                r(3, "A@X", 0, 50, Some(90), true),
                r(5, "a@x", 1000, 2, Some(100), false),
                r(6, "a@X ", 20, 1, None, true),
            ],
        )
        .unwrap();
        assert_eq!((f.keep, f.delete.clone()), (5, vec![3, 6]));
        assert_eq!(f.row, row(0, 2, Some(100), true).keyed("a@x"));
        // No persistent row: the smallest quota of the current window.
        let f = fold_rows(
            "a@x",
            &[
                r(1, "A@x", 5, 1, Some(100), false),
                r(2, "a@X", 9, 1, Some(100), false),
            ],
        )
        .unwrap();
        assert_eq!((f.row.quota, f.row.used, f.row.persist), (5, 2, false));
        assert_eq!(fold_rows("a@x", &[]), None);
    }

    impl StoredRow {
        fn keyed(mut self, key: &str) -> StoredRow {
            self.key = key.into();
            self
        }
    }

    #[test]
    fn batch_ids_are_distinct_and_ordered() {
        let a = BatchId::first();
        let b = BatchId::first();
        assert_ne!(a.daemon, b.daemon);
        assert!(a.daemon < 1 << 63);
        assert_eq!(a.next().seq, a.seq + 1);
    }
}
