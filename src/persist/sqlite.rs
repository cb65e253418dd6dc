//! The embedded SQLite [`Backend`]: the default store, needing no server.
//!
//! - The table has the Perl daemon's columns (`sender`, `quota`, `used`,
//!   `updated`, `expiry`, `persist`) and is created if missing, with the
//!   batch table (`<table>_batches`) and a trigger that sets `updated` when
//!   a row is edited by hand without it (`sqlite3 … "UPDATE ratelimit SET
//!   quota = 0 …"`), so a refresh sees such an edit.
//! - **Durable**: WAL with `synchronous = FULL`, so a committed flush is on
//!   disk (one fsync of the WAL per transaction) and survives a power cut.
//! - **Writes**: one `BEGIN IMMEDIATE` transaction per batch: record the
//!   batch id (already there: the batch was applied, nothing else is done),
//!   then per delta read the row, apply [`merge_delta`], write the result.
//! - A lock held by another process delays a flush by at most
//!   `BUSY_TIMEOUT` (2 s), and never a request. After an error the connection is
//!   reopened on the next try, which recovers from a file that was replaced
//!   or a disk that came back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};

use tokio::sync::mpsc;

use super::{
    fold_rows, merge_delta, Backend, BackendError, Batch, IdRow, Table, WriteContext, Written,
    SCAN_CHUNK,
};
use crate::store::StoredRow;

/// How long a statement waits for a lock held by another connection.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// An SQLite file holding the counters.
#[derive(Debug, Clone)]
pub struct SqliteBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    sql: Statements,
    /// `None` after an error: reopened on the next use.
    conn: Mutex<Option<Connection>>,
}

impl SqliteBackend {
    /// Opens (creating if needed) the database at `path` and its table. A
    /// file that cannot be used *now* (read-only or full filesystem, locked)
    /// is not an error: the backend is returned without a connection and
    /// connects at its first use that works.
    ///
    /// # Errors
    ///
    /// [`BackendError::Fatal`] for a file that is not a usable database;
    /// [`BackendError::Unavailable`] when its directory does not exist.
    pub fn open(path: &Path, table: &str) -> Result<Self, BackendError> {
        Self::open_table(path, &Table::named(table))
    }

    /// [`SqliteBackend::open`] with the column names of `table`
    /// (`database.columns`).
    ///
    /// # Errors
    ///
    /// As [`SqliteBackend::open`].
    pub fn open_table(path: &Path, table: &Table) -> Result<Self, BackendError> {
        let inner = Inner {
            path: path.to_owned(),
            sql: Statements::new(table),
            conn: Mutex::new(None),
        };
        match inner.connect() {
            Ok(conn) => *inner.conn.lock() = Some(conn),
            // A directory that does not exist is a mistake to report now.
            Err(e)
                if !path
                    .parent()
                    .is_none_or(|d| d.as_os_str().is_empty() || d.is_dir()) =>
            {
                return Err(e)
            }
            // A file that cannot be written now (read-only or full filesystem,
            // locked) may be writable later: serve from memory meanwhile; the
            // first refresh that can open it loads it.
            Err(BackendError::Unavailable(e)) => {
                log::error!("{e}; serving from memory and retrying");
            }
            Err(e) => return Err(e),
        }
        Ok(SqliteBackend {
            inner: Arc::new(inner),
        })
    }

    /// Runs blocking work on the connection in a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| BackendError::Unavailable(format!("sqlite task failed: {e}")))?
    }
}

/// Every statement's text, made once from the table's and columns' names
/// (plain identifiers, checked by the configuration), quoted.
#[derive(Debug)]
struct Statements {
    /// Creates what is missing: the table, its index, the batch table, the
    /// trigger that keeps `updated` for edits made by hand.
    create: String,
    select_all: String,
    select_since: String,
    record_batch: String,
    /// id, quota, used, expiry, persist of one sender.
    find: String,
    /// Writes one row by id.
    update: String,
    insert: String,
    /// id, sender, quota, used, expiry, persist of one sender (a fold).
    find_with_key: String,
    delete_id: String,
    /// Writes one row by id, its key included (a fold).
    rewrite: String,
    prune: String,
}

impl Statements {
    fn new(table: &Table) -> Statements {
        let q = |name: &str| format!("\"{name}\"");
        let c = &table.columns;
        let t = q(&table.name);
        let b = q(&format!("{}_batches", table.name));
        let (s, qu, u, up, e, p) = (
            q(&c.sender),
            q(&c.quota),
            q(&c.used),
            q(&c.updated),
            q(&c.expiry),
            q(&c.persist),
        );
        let index = q(&format!("{}_updated", table.name));
        let trigger = q(&format!("{}_touch", table.name));
        let row = format!("{s}, {qu}, {u}, {e}, {p}");
        Statements {
            create: format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    {s} TEXT NOT NULL UNIQUE,
                    {qu} INTEGER NOT NULL DEFAULT 0,
                    {u} INTEGER NOT NULL DEFAULT 0,
                    {up} TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
                    {e} INTEGER,
                    {p} INTEGER NOT NULL DEFAULT 0
                );
                CREATE INDEX IF NOT EXISTS {index} ON {t} ({up});
                CREATE TABLE IF NOT EXISTS {b} (
                    daemon INTEGER NOT NULL,
                    seq INTEGER NOT NULL,
                    applied TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
                    PRIMARY KEY (daemon, seq)
                );
                CREATE TRIGGER IF NOT EXISTS {trigger}
                    AFTER UPDATE OF {row} ON {t}
                    WHEN NEW.{up} IS OLD.{up}
                    BEGIN
                        UPDATE {t} SET {up} = CURRENT_TIMESTAMP WHERE id = NEW.id;
                    END;"
            ),
            select_all: format!("SELECT {row} FROM {t}"),
            select_since: format!("SELECT {row} FROM {t} WHERE {up} >= ?1"),
            record_batch: format!("INSERT INTO {b} (daemon, seq) VALUES (?1, ?2)"),
            find: format!("SELECT id, {qu}, {u}, {e}, {p} FROM {t} WHERE {s} = ?1"),
            update: format!(
                "UPDATE {t} SET {qu} = ?2, {u} = ?3, {e} = ?4, {p} = ?5, {up} = ?6 WHERE id = ?1"
            ),
            insert: format!("INSERT INTO {t} ({row}, {up}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"),
            find_with_key: format!("SELECT id, {row} FROM {t} WHERE {s} = ?1"),
            delete_id: format!("DELETE FROM {t} WHERE id = ?1"),
            rewrite: format!(
                "UPDATE {t} SET {s} = ?1, {qu} = ?2, {u} = ?3, {e} = ?4, {p} = ?5 WHERE id = ?6"
            ),
            prune: format!(
                "DELETE FROM {b} WHERE applied < datetime('now', '-' || ?1 || ' seconds')"
            ),
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS` in UTC, SQLite's CURRENT_TIMESTAMP format.
fn timestamp(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .unwrap_or_default()
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

impl Inner {
    fn connect(&self) -> Result<Connection, BackendError> {
        let what = |e: rusqlite::Error| classify(&self.path, e);
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(what)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(what)?;
        // Reading the journal mode is the first access to the file: a corrupt
        // or foreign file fails here, with a clear error.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(what)?;
        // FULL: the WAL is synced at every commit, so a committed flush
        // survives a power cut (NORMAL would sync only at checkpoints).
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(what)?;
        conn.execute_batch(&self.sql.create).map_err(what)?;
        Ok(conn)
    }

    /// Runs `f` on the connection, reopening it first if an earlier error
    /// dropped it, and dropping it if `f` fails.
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let mut guard = self.conn.lock();
        if guard.is_none() {
            *guard = Some(self.connect()?);
        }
        let conn = guard.as_mut().expect("connection was set just above");
        let result = f(conn);
        if result.is_err() {
            *guard = None;
        }
        result
    }

    /// Rows (all, or those updated at or after `since`), handed to `each`
    /// one by one; `each` returns false to stop.
    fn select(
        &self,
        since: Option<&str>,
        mut each: impl FnMut(StoredRow) -> bool,
    ) -> Result<usize, BackendError> {
        self.with_conn(|conn| {
            let what = |e| classify(&self.path, e);
            let sql = if since.is_some() {
                &self.sql.select_since
            } else {
                &self.sql.select_all
            };
            let mut stmt = conn.prepare(sql).map_err(what)?;
            let mut rows = match since {
                Some(at) => stmt.query([at]),
                None => stmt.query([]),
            }
            .map_err(what)?;
            let mut n = 0;
            while let Some(r) = rows.next().map_err(what)? {
                let row = StoredRow {
                    key: r.get(0).map_err(what)?,
                    quota: clamp_u32(r.get::<_, Option<i64>>(1).map_err(what)?.unwrap_or(0)),
                    used: clamp_u32(r.get::<_, Option<i64>>(2).map_err(what)?.unwrap_or(0)),
                    expiry: r.get(3).map_err(what)?,
                    persist: r.get::<_, Option<i64>>(4).map_err(what)?.unwrap_or(0) != 0,
                };
                n += 1;
                if !each(row) {
                    break;
                }
            }
            Ok(n)
        })
    }

    fn now(&self) -> Result<i64, BackendError> {
        self.with_conn(|conn| {
            conn.query_row("SELECT CAST(strftime('%s', 'now') AS INTEGER)", [], |r| {
                r.get(0)
            })
            .map_err(|e| classify(&self.path, e))
        })
    }

    fn write(&self, batch: &Batch, ctx: WriteContext) -> Result<Written, BackendError> {
        let sql = &self.sql;
        let updated = timestamp(ctx.now);
        self.with_conn(|conn| {
            let what = |e| classify(&self.path, e);
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(what)?;
            let recorded = tx.execute(
                &sql.record_batch,
                params![batch.id.daemon as i64, batch.id.seq as i64],
            );
            match recorded {
                Ok(_) => {}
                Err(e) if e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation) => {
                    // Applied by an earlier attempt; dropping `tx` rolls back.
                    return Ok(Written {
                        replayed: true,
                        skipped: Vec::new(),
                    });
                }
                Err(e) => return Err(what(e)),
            }
            {
                let mut find = tx.prepare_cached(&sql.find).map_err(what)?;
                let mut update = tx.prepare_cached(&sql.update).map_err(what)?;
                let mut insert = tx.prepare_cached(&sql.insert).map_err(what)?;
                for d in &batch.deltas {
                    let found = find
                        .query_row([&*d.key], |r| {
                            Ok((
                                r.get::<_, i64>(0)?,
                                StoredRow {
                                    key: d.key.to_string(),
                                    quota: clamp_u32(r.get::<_, Option<i64>>(1)?.unwrap_or(0)),
                                    used: clamp_u32(r.get::<_, Option<i64>>(2)?.unwrap_or(0)),
                                    expiry: r.get(3)?,
                                    persist: r.get::<_, Option<i64>>(4)?.unwrap_or(0) != 0,
                                },
                            ))
                        })
                        .optional()
                        .map_err(what)?;
                    match found {
                        Some((id, row)) => {
                            let merged = merge_delta(Some(row.clone()), d, ctx.default_quota);
                            if merged != row {
                                update
                                    .execute(params![
                                        id,
                                        merged.quota,
                                        merged.used,
                                        merged.expiry,
                                        merged.persist,
                                        updated
                                    ])
                                    .map_err(what)?;
                            }
                        }
                        None => {
                            let new = merge_delta(None, d, ctx.default_quota);
                            insert
                                .execute(params![
                                    new.key,
                                    new.quota,
                                    new.used,
                                    new.expiry,
                                    new.persist,
                                    updated
                                ])
                                .map_err(what)?;
                        }
                    }
                }
            }
            tx.commit().map_err(what)?;
            Ok(Written::default())
        })
    }

    fn fold(&self, key: &str, variants: &[String]) -> Result<Option<StoredRow>, BackendError> {
        let sql = &self.sql;
        self.with_conn(|conn| {
            let what = |e| classify(&self.path, e);
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(what)?;
            let mut rows = Vec::new();
            {
                let mut find = tx.prepare_cached(&sql.find_with_key).map_err(what)?;
                for k in std::iter::once(key).chain(variants.iter().map(String::as_str)) {
                    let found = find
                        .query_row([k], |r| {
                            Ok(IdRow {
                                id: r.get(0)?,
                                row: StoredRow {
                                    key: r.get(1)?,
                                    quota: clamp_u32(r.get::<_, Option<i64>>(2)?.unwrap_or(0)),
                                    used: clamp_u32(r.get::<_, Option<i64>>(3)?.unwrap_or(0)),
                                    expiry: r.get(4)?,
                                    persist: r.get::<_, Option<i64>>(5)?.unwrap_or(0) != 0,
                                },
                            })
                        })
                        .optional()
                        .map_err(what)?;
                    rows.extend(found);
                }
            }
            let Some(fold) = fold_rows(key, &rows) else {
                return Ok(None);
            };
            for id in &fold.delete {
                tx.execute(&sql.delete_id, [id]).map_err(what)?;
            }
            let r = &fold.row;
            tx.execute(
                &sql.rewrite,
                params![key, r.quota, r.used, r.expiry, r.persist, fold.keep],
            )
            .map_err(what)?;
            tx.commit().map_err(what)?;
            Ok(Some(fold.row))
        })
    }

    fn prune_batches(&self, max_age_secs: i64) -> Result<(), BackendError> {
        self.with_conn(|conn| {
            conn.execute(&self.sql.prune, [max_age_secs])
                .map(|_| ())
                .map_err(|e| classify(&self.path, e))
        })
    }
}

fn clamp_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

fn classify(path: &Path, e: rusqlite::Error) -> BackendError {
    let msg = format!("sqlite {}: {e}", path.display());
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => BackendError::Fatal(msg),
        _ => BackendError::Unavailable(msg),
    }
}

impl Backend for SqliteBackend {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn scan(&self, rows: mpsc::Sender<Vec<StoredRow>>) -> Result<usize, BackendError> {
        self.blocking(move |inner| {
            let mut chunk = Vec::with_capacity(SCAN_CHUNK);
            let mut open = true;
            let n = inner.select(None, |row| {
                chunk.push(row);
                if chunk.len() == SCAN_CHUNK {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(SCAN_CHUNK));
                    open = rows.blocking_send(full).is_ok();
                }
                open
            })?;
            if open && !chunk.is_empty() {
                let _ = rows.blocking_send(chunk);
            }
            Ok(n)
        })
        .await
    }

    async fn load_changed(
        &self,
        since: Option<i64>,
    ) -> Result<Option<(Vec<StoredRow>, i64)>, BackendError> {
        self.blocking(move |inner| {
            let now = inner.now()?;
            let mut rows = Vec::new();
            if let Some(at) = since {
                inner.select(Some(&timestamp(at)), |row| {
                    rows.push(row);
                    true
                })?;
            }
            Ok(Some((rows, now)))
        })
        .await
    }

    async fn write(&self, batch: Arc<Batch>, ctx: WriteContext) -> Result<Written, BackendError> {
        self.blocking(move |inner| inner.write(&batch, ctx)).await
    }

    async fn fold(
        &self,
        key: &str,
        variants: Vec<String>,
    ) -> Result<Option<StoredRow>, BackendError> {
        let key = key.to_owned();
        self.blocking(move |inner| inner.fold(&key, &variants))
            .await
    }

    async fn prune_batches(&self, max_age_secs: i64) -> Result<(), BackendError> {
        self.blocking(move |inner| inner.prune_batches(max_age_secs))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::BatchId;
    use crate::store::Delta;

    fn delta(key: &str, delta: u32) -> Delta {
        Delta {
            key: key.into(),
            delta,
            window_expiry: 100,
            quota: 10,
            persist: false,
            set_quota: false,
            reset_used: false,
            had_row: false,
        }
    }

    const CTX: WriteContext = WriteContext {
        default_quota: 50,
        now: 1_700_000_000,
    };

    /// SQLite applies exactly the rule of `merge_delta`: every shape of
    /// stored row (none, same, older, NULL and newer window, with and without
    /// persist) times every kind of delta (plain, admin reset, admin quota,
    /// both).
    #[tokio::test]
    async fn writes_follow_the_merge_rule() {
        let dir = tempfile::tempdir().unwrap();
        let db = SqliteBackend::open(&dir.path().join("t.db"), "ratelimit").unwrap();
        // (name, stored (used, expiry, persist))
        type Shape = (&'static str, Option<(i64, Option<i64>, bool)>);
        let shapes: [Shape; 7] = [
            ("none", None),
            ("same", Some((2, Some(100), false))),
            ("same_p", Some((2, Some(100), true))),
            ("older", Some((2, Some(90), false))),
            ("older_p", Some((2, Some(90), true))),
            ("null", Some((2, None, false))),
            ("newer", Some((2, Some(200), false))),
        ];
        let kinds = [(false, false), (true, false), (false, true), (true, true)];
        let mut start = Vec::new();
        let mut deltas = Vec::new();
        for (shape, stored) in &shapes {
            for (reset_used, set_quota) in kinds {
                let key = format!("{shape}-{reset_used}-{set_quota}");
                if let Some((used, expiry, persist)) = stored {
                    start.push(StoredRow {
                        key: key.clone(),
                        quota: 7,
                        used: *used as u32,
                        expiry: *expiry,
                        persist: *persist,
                    });
                }
                deltas.push(Delta {
                    persist: set_quota,
                    set_quota,
                    reset_used,
                    ..delta(&key, 3)
                });
            }
        }
        {
            let guard = db.inner.conn.lock();
            let conn = guard.as_ref().unwrap();
            for r in &start {
                conn.execute(
                    "INSERT INTO ratelimit (sender, quota, used, expiry, persist) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![r.key, r.quota, r.used, r.expiry, r.persist],
                )
                .unwrap();
            }
        }
        let batch = Batch {
            id: BatchId::first(),
            deltas: deltas.clone(),
        };
        db.write(Arc::new(batch), CTX).await.unwrap();
        let mut got = db.load_all().await.unwrap();
        got.sort_by(|a, b| a.key.cmp(&b.key));
        let mut want: Vec<StoredRow> = deltas
            .iter()
            .map(|d| merge_delta(start.iter().find(|r| *r.key == *d.key).cloned(), d, 50))
            .collect();
        want.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_batch_sent_twice_is_applied_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = SqliteBackend::open(&dir.path().join("t.db"), "ratelimit").unwrap();
        let batch = Arc::new(Batch {
            id: BatchId::first(),
            deltas: vec![delta("a", 3)],
        });
        assert!(!db.write(Arc::clone(&batch), CTX).await.unwrap().replayed);
        assert!(db.write(Arc::clone(&batch), CTX).await.unwrap().replayed);
        assert_eq!(db.load_all().await.unwrap()[0].used, 3);
        let next = Arc::new(Batch {
            id: batch.id.next(),
            ..(*batch).clone()
        });
        assert!(!db.write(next, CTX).await.unwrap().replayed);
        assert_eq!(db.load_all().await.unwrap()[0].used, 6);
        db.prune_batches(0).await.unwrap();
    }

    #[tokio::test]
    async fn hand_edits_without_updated_are_refreshed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let db = SqliteBackend::open(&path, "ratelimit").unwrap();
        let batch = Batch {
            id: BatchId::first(),
            deltas: vec![delta("a", 3)],
        };
        // Written with an old `updated` (the clock of the writer).
        let old = WriteContext {
            now: 1_600_000_000,
            ..CTX
        };
        db.write(Arc::new(batch), old).await.unwrap();
        let (_, at) = db.load_changed(None).await.unwrap().unwrap();
        let (rows, _) = db.load_changed(Some(at)).await.unwrap().unwrap();
        assert!(rows.is_empty(), "nothing changed since");
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute("UPDATE ratelimit SET quota = 0, persist = 1", [])
            .unwrap();
        let (rows, _) = db.load_changed(Some(at)).await.unwrap().unwrap();
        assert_eq!(
            rows.iter()
                .map(|r| (r.quota, r.persist))
                .collect::<Vec<_>>(),
            [(0, true)]
        );
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_database_is_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.db");
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        assert!(matches!(
            SqliteBackend::open(&path, "ratelimit"),
            Err(BackendError::Fatal(_))
        ));
    }
}
