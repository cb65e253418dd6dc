//! The MySQL/MariaDB [`Backend`] (mysql_async), on the Perl daemon's
//! `ratelimit` table (`schema.sql`).
//!
//! - **Bounded waits.** Every operation runs under a deadline
//!   (`database.timeout`), so a database that stops answering (packets
//!   dropped, server frozen) delays a flush or a refresh by at most that
//!   long. Requests never wait on the database at all.
//! - **Writes, exactly once.** One transaction per batch: the batch id goes
//!   into `<table>_batches` first (a duplicate means an earlier attempt was
//!   committed: nothing more is done); then, per [`ROWS_PER_STATEMENT`]
//!   deltas, the existing rows are read and locked (`SELECT … FOR UPDATE`),
//!   merged with [`merge_delta`] in Rust, and written back by their `id`
//!   (`INSERT … ON DUPLICATE KEY UPDATE` with explicit ids, which uses up no
//!   AUTO_INCREMENT values: the Perl table's `id` is an `INT`); only senders
//!   without a row are inserted. Deadlocks and lock wait timeouts (another
//!   daemon, a Galera certification failure) are retried.
//! - **Keys the table cannot hold** (longer than 255 characters, or with
//!   characters outside the 3-byte UTF-8 of the Perl schema's `utf8`
//!   column) are counted in memory but not written, with a warning: one bad
//!   key must not make every flush fail.
//! - **Refresh** reads the rows whose `updated` is at or after the previous
//!   refresh's database time; `schema.sql` gives `updated` an `ON UPDATE
//!   CURRENT_TIMESTAMP` so that edits made by hand are seen too, and
//!   [`Backend::inspect`] warns when a table lacks it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{
    Opts, OptsBuilder, Params, Pool, PoolConstraints, PoolOpts, Transaction, TxOpts, Value,
};

use tokio::sync::mpsc;

use super::{
    merge_delta, Backend, BackendError, Batch, Inspection, WriteContext, Written, SCAN_CHUNK,
};
use crate::store::{Delta, StoredRow};

/// Most rows in one statement.
pub const ROWS_PER_STATEMENT: usize = 500;
/// Longest key the Perl schema's `sender VARCHAR(255)` holds.
pub const MAX_KEY_CHARS: usize = 255;
/// Deadline of one operation unless [`MysqlBackend::with_timeout`] says
/// otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for loading every row (a million rows take about a second).
const LOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// Attempts of one transaction that hits a deadlock or a lock wait timeout.
const ATTEMPTS: usize = 3;

/// The batch table's definition (also in `schema.sql`).
fn batches_ddl(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS `{table}_batches` (\
           `daemon` BIGINT UNSIGNED NOT NULL, \
           `seq` BIGINT UNSIGNED NOT NULL, \
           `applied` TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, \
           PRIMARY KEY (`daemon`, `seq`), \
           KEY `idx_applied` (`applied`)\
         ) ENGINE = InnoDB"
    )
}

/// A pool of connections to one database.
#[derive(Debug, Clone)]
pub struct MysqlBackend {
    pool: Pool,
    table: Arc<str>,
    timeout: Duration,
    /// Whether `<table>_batches` can be used. Without it a flush whose
    /// outcome is unknown may be applied twice (a warning says so).
    batches: Arc<AtomicBool>,
}

impl MysqlBackend {
    /// A backend for `url` (`mysql://user[:password]@host[:port]/database`;
    /// `mariadb://` is accepted too). `password`, if given, replaces the
    /// URL's. Connects lazily: a database that is down now is not an error
    /// here.
    ///
    /// # Errors
    ///
    /// [`BackendError::Fatal`] for a URL that cannot be parsed.
    pub fn new(url: &str, password: Option<String>, table: &str) -> Result<Self, BackendError> {
        let url = match url.strip_prefix("mariadb://") {
            Some(rest) => format!("mysql://{rest}"),
            None => url.to_owned(),
        };
        let opts =
            Opts::from_url(&url).map_err(|e| BackendError::Fatal(format!("database.url: {e}")))?;
        let pool_opts = PoolOpts::default()
            .with_constraints(PoolConstraints::new(0, 4).expect("0 <= 4"))
            .with_inactive_connection_ttl(Duration::from_secs(60));
        let mut builder = OptsBuilder::from_opts(opts)
            .pool_opts(pool_opts)
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .stmt_cache_size(32);
        if let Some(pw) = password {
            builder = builder.pass(Some(pw));
        }
        Ok(MysqlBackend {
            pool: Pool::new(builder),
            table: Arc::from(table),
            timeout: DEFAULT_TIMEOUT,
            batches: Arc::new(AtomicBool::new(true)),
        })
    }

    /// Sets the deadline of each operation (`database.timeout`).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn bounded<T>(
        &self,
        limit: Duration,
        what: &str,
        op: impl std::future::Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        match tokio::time::timeout(limit, op).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::Unavailable(format!(
                "mysql: {what} took longer than {limit:?}"
            ))),
        }
    }

    /// One attempt at writing a batch.
    async fn write_once(
        &self,
        batch: &Batch,
        ctx: WriteContext,
        storable: &[&Delta],
    ) -> Result<Written, mysql_async::Error> {
        let t = &self.table;
        let mut conn = self.pool.get_conn().await?;
        let mut tx = conn.start_transaction(TxOpts::default()).await?;
        if self.batches.load(Ordering::Relaxed) {
            let recorded = tx
                .exec_drop(
                    format!("INSERT INTO `{t}_batches` (daemon, seq) VALUES (?, ?)"),
                    (batch.id.daemon, batch.id.seq),
                )
                .await;
            match recorded {
                Ok(()) => {}
                // Applied by an earlier attempt whose answer was lost.
                Err(mysql_async::Error::Server(e)) if e.code == 1062 => {
                    tx.rollback().await?;
                    return Ok(Written {
                        replayed: true,
                        skipped: Vec::new(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        for part in storable.chunks(ROWS_PER_STATEMENT) {
            self.write_part(&mut tx, part, ctx).await?;
        }
        tx.commit().await?;
        Ok(Written::default())
    }

    /// Locks, merges and writes up to [`ROWS_PER_STATEMENT`] deltas.
    async fn write_part(
        &self,
        tx: &mut Transaction<'_>,
        part: &[&Delta],
        ctx: WriteContext,
    ) -> Result<(), mysql_async::Error> {
        let t = &self.table;
        let placeholders = vec!["?"; part.len()].join(",");
        let keys: Vec<Value> = part.iter().map(|d| Value::from(&*d.key)).collect();
        type Raw = (
            i64,
            Vec<u8>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
        );
        let found: Vec<Raw> = tx
            .exec(
                format!(
                    "SELECT id, sender, quota, used, expiry, persist FROM `{t}` \
                     WHERE sender IN ({placeholders}) FOR UPDATE"
                ),
                Params::Positional(keys),
            )
            .await?;
        let mut rows: HashMap<String, (i64, StoredRow)> = HashMap::with_capacity(found.len());
        for (id, sender, quota, used, expiry, persist) in found {
            let key = String::from_utf8_lossy(&sender).into_owned();
            let row = StoredRow {
                key: key.clone(),
                quota: clamp_u32(quota.unwrap_or(0)),
                used: clamp_u32(used.unwrap_or(0)),
                expiry,
                persist: persist.unwrap_or(0) != 0,
            };
            // A case-insensitive collation finds `Alice@x` for `alice@x`.
            rows.entry(key.to_lowercase()).or_insert((id, row.clone()));
            rows.insert(key, (id, row));
        }
        let mut updates: Vec<Value> = Vec::new();
        let mut inserts: Vec<Value> = Vec::new();
        let (mut n_updates, mut n_inserts) = (0, 0);
        for d in part {
            match rows.remove(&*d.key) {
                Some((id, row)) => {
                    let merged = merge_delta(Some(row.clone()), d, ctx.default_quota);
                    if merged != row {
                        updates.push(Value::from(id));
                        push_row(&mut updates, &d.key, &merged);
                        n_updates += 1;
                    }
                }
                None => {
                    let new = merge_delta(None, d, ctx.default_quota);
                    push_row(&mut inserts, &d.key, &new);
                    n_inserts += 1;
                }
            }
        }
        if n_updates > 0 {
            let values = vec!["(?, ?, ?, ?, ?, ?, NOW())"; n_updates].join(",");
            tx.exec_drop(
                format!(
                    "INSERT INTO `{t}` (id, sender, quota, used, expiry, persist, updated) \
                     VALUES {values} ON DUPLICATE KEY UPDATE quota = VALUES(quota), \
                     used = VALUES(used), expiry = VALUES(expiry), persist = VALUES(persist), \
                     updated = NOW()"
                ),
                Params::Positional(updates),
            )
            .await?;
        }
        if n_inserts > 0 {
            let values = vec!["(?, ?, ?, ?, ?, NOW())"; n_inserts].join(",");
            tx.exec_drop(
                format!(
                    "INSERT INTO `{t}` (sender, quota, used, expiry, persist, updated) \
                     VALUES {values}"
                ),
                Params::Positional(inserts),
            )
            .await?;
        }
        Ok(())
    }

    /// Rows (all, or those updated at or after `since`), streamed from the
    /// server and handed over in chunks of at most [`SCAN_CHUNK`]; stops
    /// when `rows` is closed.
    async fn select_rows(
        &self,
        since: Option<i64>,
        rows: &mpsc::Sender<Vec<StoredRow>>,
    ) -> Result<usize, BackendError> {
        use futures_util::StreamExt;
        let mut conn = self.pool.get_conn().await.map_err(classify)?;
        let t = &self.table;
        let mut sql = format!("SELECT sender, quota, used, expiry, persist FROM `{t}`");
        let params = match since {
            Some(at) => {
                sql.push_str(" WHERE updated >= FROM_UNIXTIME(?)");
                Params::Positional(vec![Value::from(at)])
            }
            None => Params::Empty,
        };
        let mut n = 0usize;
        let mut bad = 0usize;
        let mut result = conn.exec_iter(sql, params).await.map_err(classify)?;
        let Some(mut stream) = result
            .stream::<mysql_async::Row>()
            .await
            .map_err(classify)?
        else {
            return Ok(0);
        };
        let mut chunk = Vec::with_capacity(SCAN_CHUNK);
        while let Some(row) = stream.next().await {
            type Raw = (Vec<u8>, Option<i64>, Option<i64>, Option<i64>, Option<i64>);
            match mysql_async::from_row_opt::<Raw>(row.map_err(classify)?) {
                Ok((sender, quota, used, expiry, persist)) => chunk.push(StoredRow {
                    key: String::from_utf8_lossy(&sender).into_owned(),
                    quota: clamp_u32(quota.unwrap_or(0)),
                    used: clamp_u32(used.unwrap_or(0)),
                    expiry,
                    persist: persist.unwrap_or(0) != 0,
                }),
                Err(_) => bad += 1,
            }
            if chunk.len() == SCAN_CHUNK {
                n += chunk.len();
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(SCAN_CHUNK));
                if rows.send(full).await.is_err() {
                    break;
                }
            }
        }
        drop(stream);
        drop(result);
        if !chunk.is_empty() {
            n += chunk.len();
            let _ = rows.send(chunk).await;
        }
        if bad > 0 {
            log::warn!("{bad} rows of {t} could not be read and were skipped");
        }
        Ok(n)
    }

    async fn db_time(&self) -> Result<i64, BackendError> {
        let mut conn = self.pool.get_conn().await.map_err(classify)?;
        let now: Option<i64> = conn
            .query_first("SELECT UNIX_TIMESTAMP()")
            .await
            .map_err(classify)?;
        now.ok_or_else(|| {
            BackendError::Unavailable("SELECT UNIX_TIMESTAMP() returned nothing".into())
        })
    }

    async fn inspect_now(&self) -> Result<Inspection, BackendError> {
        let t = &self.table;
        let mut conn = self.pool.get_conn().await.map_err(classify)?;
        // The table and its columns (a missing one is fatal: 1146, 1054).
        conn.query_drop(format!(
            "SELECT id, sender, quota, used, expiry, persist, updated FROM `{t}` LIMIT 0"
        ))
        .await
        .map_err(classify)?;
        let mut warnings = Vec::new();
        let batches_ok = match conn
            .query_drop(format!(
                "SELECT daemon, seq, applied FROM `{t}_batches` LIMIT 0"
            ))
            .await
        {
            Ok(()) => true,
            Err(_) => match conn.query_drop(batches_ddl(t)).await {
                Ok(()) => {
                    crate::notice!("created table {t}_batches (flushes are recorded there, so none is applied twice)");
                    true
                }
                Err(e) => {
                    warnings.push(format!(
                        "table {t}_batches is missing and cannot be created ({e}): a flush whose \
                         outcome is unknown (connection lost during COMMIT) may be counted twice; \
                         create it with schema-migrate.sql"
                    ));
                    false
                }
            },
        };
        self.batches.store(batches_ok, Ordering::Relaxed);
        let extra: Option<String> = conn
            .exec_first(
                "SELECT EXTRA FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = 'updated'",
                (t.as_ref(),),
            )
            .await
            .map_err(classify)?;
        if !extra.is_some_and(|e| e.to_ascii_lowercase().contains("on update")) {
            warnings.push(format!(
                "{t}.updated has no ON UPDATE CURRENT_TIMESTAMP: edits made in the database that \
                 do not set `updated` take effect at the next full re-read \
                 (database.reconcile_interval), not within refresh_interval; schema-migrate.sql \
                 adds it"
            ));
        }
        Ok(Inspection { warnings })
    }
}

fn push_row(params: &mut Vec<Value>, key: &str, row: &StoredRow) {
    params.push(Value::from(key));
    params.push(Value::from(row.quota));
    params.push(Value::from(row.used));
    params.push(Value::from(row.expiry.unwrap_or(0).max(0)));
    params.push(Value::from(row.persist));
}

/// Whether the Perl schema's `sender VARCHAR(255) utf8` can hold `key`.
fn storable(key: &str) -> bool {
    key.chars().count() <= MAX_KEY_CHARS && key.chars().all(|c| c.len_utf8() <= 3)
}

fn clamp_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

/// Deadlock (1213, also a Galera certification failure) and lock wait
/// timeout (1205): the transaction can simply be tried again.
fn retryable(e: &mysql_async::Error) -> bool {
    matches!(e, mysql_async::Error::Server(s) if matches!(s.code, 1205 | 1213))
}

/// Server errors about the schema or the statement are permanent; the rest
/// (connection lost, timeouts, lock waits, server gone) may pass.
fn classify(e: mysql_async::Error) -> BackendError {
    match &e {
        // 1044/1045 access denied, 1046 no database, 1049 unknown database,
        // 1054 unknown column, 1146 no such table.
        mysql_async::Error::Server(s)
            if matches!(s.code, 1044 | 1045 | 1046 | 1049 | 1054 | 1146) =>
        {
            BackendError::Fatal(format!("mysql: {e}"))
        }
        _ => BackendError::Unavailable(format!("mysql: {e}")),
    }
}

impl Backend for MysqlBackend {
    fn name(&self) -> &'static str {
        "mysql"
    }

    async fn inspect(&self) -> Result<Inspection, BackendError> {
        self.bounded(self.timeout, "checking the tables", self.inspect_now())
            .await
    }

    async fn scan(&self, rows: mpsc::Sender<Vec<StoredRow>>) -> Result<usize, BackendError> {
        self.bounded(
            LOAD_TIMEOUT,
            "reading every row",
            self.select_rows(None, &rows),
        )
        .await
    }

    async fn load_changed(
        &self,
        since: Option<i64>,
    ) -> Result<Option<(Vec<StoredRow>, i64)>, BackendError> {
        self.bounded(self.timeout, "a refresh", async {
            let now = self.db_time().await?;
            let mut rows = Vec::new();
            if let Some(at) = since {
                let (tx, mut rx) = mpsc::channel(4);
                let read = async move {
                    // The sender is dropped when the read ends, which ends
                    // the collecting loop.
                    self.select_rows(Some(at), &tx).await
                };
                let collect = async {
                    while let Some(chunk) = rx.recv().await {
                        rows.extend(chunk);
                    }
                };
                let (read, ()) = tokio::join!(read, collect);
                read?;
            }
            Ok(Some((rows, now)))
        })
        .await
    }

    async fn write(&self, batch: Arc<Batch>, ctx: WriteContext) -> Result<Written, BackendError> {
        let mut skipped = Vec::new();
        let mut storable_deltas = Vec::with_capacity(batch.deltas.len());
        for (i, d) in batch.deltas.iter().enumerate() {
            if storable(&d.key) {
                storable_deltas.push(d);
            } else {
                skipped.push(i);
                log::warn!(
                    "key {} cannot be stored in MySQL (over {MAX_KEY_CHARS} characters or 4-byte UTF-8); \
                     it is limited in memory only",
                    crate::protocol::Escaped(&d.key)
                );
            }
        }
        let attempts = async {
            let mut attempt = 1;
            loop {
                match self.write_once(&batch, ctx, &storable_deltas).await {
                    Ok(written) => return Ok(written),
                    Err(e) if retryable(&e) && attempt < ATTEMPTS => {
                        log::debug!("mysql: {e}; trying the transaction again");
                        attempt += 1;
                        let jitter = 50 + u64::from(batch.id.seq as u32 % 250);
                        tokio::time::sleep(Duration::from_millis(jitter)).await;
                    }
                    Err(e) => return Err(classify(e)),
                }
            }
        };
        let mut written = self
            .bounded(self.timeout, "a write transaction", attempts)
            .await?;
        written.skipped = skipped;
        Ok(written)
    }

    async fn prune_batches(&self, max_age_secs: i64) -> Result<(), BackendError> {
        if !self.batches.load(Ordering::Relaxed) {
            return Ok(());
        }
        let t = &self.table;
        self.bounded(self.timeout, "removing old batch ids", async {
            let mut conn = self.pool.get_conn().await.map_err(classify)?;
            conn.exec_drop(
                format!("DELETE FROM `{t}_batches` WHERE applied < NOW() - INTERVAL ? SECOND"),
                (max_age_secs,),
            )
            .await
            .map_err(classify)
        })
        .await
    }

    async fn close(&self) {
        let _ = self.pool.clone().disconnect().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storable_keys_fit_the_perl_column() {
        assert!(storable("alice@example.com"));
        assert!(storable(&"ä".repeat(255)));
        assert!(!storable(&"a".repeat(256)));
        assert!(!storable("emoji😀@example.com"));
    }

    #[test]
    fn only_lock_conflicts_are_retried() {
        let server = |code| {
            mysql_async::Error::Server(mysql_async::ServerError {
                code,
                message: String::new(),
                state: String::new(),
            })
        };
        assert!(retryable(&server(1213)) && retryable(&server(1205)));
        assert!(!retryable(&server(1062)) && !retryable(&server(1142)));
        assert!(matches!(classify(server(1146)), BackendError::Fatal(_)));
        assert!(matches!(
            classify(server(1142)),
            BackendError::Unavailable(_)
        ));
    }
}
