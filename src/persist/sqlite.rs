//! The embedded SQLite [`Backend`]: the default store, needing no server.
//!
//! The table has the Perl daemon's columns (`sender`, `quota`, `used`,
//! `updated`, `expiry`, `persist`) and is created if missing. The file is used
//! in WAL mode with a bounded busy timeout, so a lock held by another process
//! delays a flush by at most that long, and never a request (requests never
//! touch the database). After an error the connection is reopened on the next
//! try, which recovers from a file that was replaced or a disk that came back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{params, Connection, ErrorCode, OpenFlags};

use super::{Backend, BackendError, WriteContext, MAX_BATCH_ROWS};
use crate::store::{Delta, StoredRow};

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
    table: String,
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
        let inner = Inner {
            path: path.to_owned(),
            table: table.to_owned(),
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

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
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
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(what)?;
        let t = &self.table;
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                sender TEXT NOT NULL UNIQUE,
                quota INTEGER NOT NULL DEFAULT 0,
                used INTEGER NOT NULL DEFAULT 0,
                updated TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
                expiry INTEGER,
                persist INTEGER NOT NULL DEFAULT 0
            );
            CREATE INDEX IF NOT EXISTS {t}_updated ON {t} (updated);"
        ))
        .map_err(what)?;
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

    fn load_all(&self) -> Result<Vec<StoredRow>, BackendError> {
        self.with_conn(|conn| {
            let what = |e| classify(&self.path, e);
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT sender, quota, used, expiry, persist FROM {}",
                    self.table
                ))
                .map_err(what)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(StoredRow {
                        key: r.get(0)?,
                        quota: clamp_u32(r.get::<_, Option<i64>>(1)?.unwrap_or(0)),
                        used: clamp_u32(r.get::<_, Option<i64>>(2)?.unwrap_or(0)),
                        expiry: r.get(3)?,
                        persist: r.get::<_, Option<i64>>(4)?.unwrap_or(0) != 0,
                    })
                })
                .map_err(what)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(what)
        })
    }

    fn write(&self, deltas: &[Delta], ctx: WriteContext) -> Result<(), (usize, BackendError)> {
        let mut done = 0;
        let sql = upsert_sql(&self.table);
        let updated = chrono::DateTime::from_timestamp(ctx.now, 0)
            .unwrap_or_default()
            .format("%Y-%m-%d %H:%M:%S")
            .to_string();
        let result = self.with_conn(|conn| {
            let what = |e| classify(&self.path, e);
            for chunk in deltas.chunks(MAX_BATCH_ROWS) {
                let tx = conn.transaction().map_err(what)?;
                {
                    let mut stmt = tx.prepare_cached(&sql).map_err(what)?;
                    for d in chunk {
                        stmt.execute(params![
                            &*d.key,
                            d.quota,
                            d.delta,
                            d.window_expiry,
                            d.persist,
                            updated,
                            ctx.default_quota,
                            d.reset_used,
                            d.set_quota
                        ])
                        .map_err(what)?;
                    }
                }
                tx.commit().map_err(what)?;
                done += chunk.len();
            }
            Ok(())
        });
        result.map_err(|e| (done, e))
    }
}

/// The statement that applies one delta, following
/// [`super::merge_delta`]. In SQLite every SET expression sees the old row.
fn upsert_sql(table: &str) -> String {
    // ?1 sender, ?2 quota, ?3 delta, ?4 window expiry, ?5 persist, ?6 updated,
    // ?7 default quota, ?8 reset_used, ?9 set_quota.
    format!(
        "INSERT INTO {table} (sender, quota, used, expiry, persist, updated) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (sender) DO UPDATE SET
           used = CASE
             WHEN expiry IS NULL OR expiry < excluded.expiry THEN excluded.used
             WHEN expiry = excluded.expiry AND ?8 THEN excluded.used
             WHEN expiry = excluded.expiry THEN MIN(used + excluded.used, 4294967295)
             ELSE used END,
           quota = CASE
             WHEN ?9 THEN excluded.quota
             WHEN (expiry IS NULL OR expiry < excluded.expiry) AND persist = 0 THEN ?7
             ELSE quota END,
           persist = CASE WHEN ?9 THEN excluded.persist ELSE persist END,
           expiry = CASE
             WHEN expiry IS NULL OR expiry < excluded.expiry THEN excluded.expiry
             ELSE expiry END,
           updated = excluded.updated"
    )
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

    async fn load_all(&self) -> Result<Vec<StoredRow>, BackendError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.load_all())
            .await
            .map_err(|e| BackendError::Unavailable(format!("sqlite load task failed: {e}")))?
    }

    async fn write(
        &self,
        deltas: Arc<Vec<Delta>>,
        ctx: WriteContext,
    ) -> Result<(), (usize, BackendError)> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.write(&deltas, ctx))
            .await
            .map_err(|e| {
                (
                    0,
                    BackendError::Unavailable(format!("sqlite write task failed: {e}")),
                )
            })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::merge_delta;

    /// SQLite applies exactly the rule of `merge_delta`: every shape of
    /// stored row (none, same, older, NULL and newer window, with and without
    /// persist) times every kind of delta (plain, admin reset, admin quota,
    /// both).
    #[tokio::test]
    async fn sql_follows_the_merge_rule() {
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
                    key: key.into(),
                    delta: 3,
                    window_expiry: 100,
                    quota: 10,
                    persist: set_quota,
                    set_quota,
                    reset_used,
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
        let ctx = WriteContext {
            default_quota: 50,
            now: 1_700_000_000,
        };
        db.write(Arc::new(deltas.clone()), ctx).await.unwrap();
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
