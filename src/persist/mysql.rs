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
    fold_rows, merge_delta, Backend, BackendError, Batch, IdRow, Inspection, Table, WriteContext,
    Written, SCAN_CHUNK,
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

/// Every statement's text, made once from the table's and columns' names
/// (plain identifiers, checked by the configuration), quoted with backticks.
/// Statements with a variable number of rows are a prefix, the row
/// placeholders, and a suffix.
#[derive(Debug)]
struct Statements {
    /// The table's name, unquoted (for `information_schema`).
    table: String,
    /// The `updated` column's name, unquoted.
    updated: String,
    /// `SELECT id, sender, … FROM t WHERE sender IN (` … `) FOR UPDATE`.
    lock_keys: String,
    /// `SELECT id, FIELD(sender, ` … `) FROM t WHERE id IN (` … `)`: for
    /// rows found but not literally a key, the position of the key the
    /// column's collation holds them equal to.
    match_rows: String,
    /// Between the two lists of `match_rows`.
    match_rows_where: String,
    /// `INSERT INTO t (id, sender, …) VALUES ` … (rows by id).
    write_rows: String,
    /// ` ON DUPLICATE KEY UPDATE …` after `write_rows`.
    write_rows_suffix: String,
    /// `INSERT INTO t (sender, …) VALUES ` … (new senders).
    insert_rows: String,
    /// Every row.
    select_all: String,
    /// Rows updated at or after a unix time.
    select_since: String,
    /// `DELETE FROM t WHERE id IN (` … `)`.
    delete_ids: String,
    /// One row, written by id (a fold).
    rewrite_row: String,
    /// Reads every column once (fails on a missing table or column).
    check_table: String,
    /// Records a batch id.
    record_batch: String,
    /// Reads the batch table once.
    check_batches: String,
    /// Creates the batch table (also in `schema.sql`).
    create_batches: String,
    /// Removes old batch ids.
    prune_batches: String,
}

impl Statements {
    fn new(table: &Table) -> Statements {
        let q = |name: &str| format!("`{name}`");
        let c = &table.columns;
        let (t, b) = (q(&table.name), q(&format!("{}_batches", table.name)));
        let (s, qu, u, up, e, p) = (
            q(&c.sender),
            q(&c.quota),
            q(&c.used),
            q(&c.updated),
            q(&c.expiry),
            q(&c.persist),
        );
        let row = format!("{s}, {qu}, {u}, {e}, {p}");
        Statements {
            table: table.name.clone(),
            updated: c.updated.clone(),
            lock_keys: format!("SELECT id, {row} FROM {t} WHERE {s} IN ("),
            match_rows: format!("SELECT id, FIELD({s}, "),
            match_rows_where: format!(") FROM {t} WHERE id IN ("),
            write_rows: format!("INSERT INTO {t} (id, {row}, {up}) VALUES "),
            write_rows_suffix: format!(
                " ON DUPLICATE KEY UPDATE {qu} = VALUES({qu}), {u} = VALUES({u}), \
                 {e} = VALUES({e}), {p} = VALUES({p}), {up} = NOW()"
            ),
            insert_rows: format!("INSERT INTO {t} ({row}, {up}) VALUES "),
            select_all: format!("SELECT {row} FROM {t}"),
            select_since: format!("SELECT {row} FROM {t} WHERE {up} >= FROM_UNIXTIME(?)"),
            delete_ids: format!("DELETE FROM {t} WHERE id IN ("),
            rewrite_row: format!(
                "UPDATE {t} SET {s} = ?, {qu} = ?, {u} = ?, {e} = ?, {p} = ?, {up} = NOW() \
                 WHERE id = ?"
            ),
            check_table: format!("SELECT id, {row}, {up} FROM {t} LIMIT 0"),
            record_batch: format!("INSERT INTO {b} (daemon, seq) VALUES (?, ?)"),
            check_batches: format!("SELECT daemon, seq, applied FROM {b} LIMIT 0"),
            create_batches: format!(
                "CREATE TABLE IF NOT EXISTS {b} (\
                   `daemon` BIGINT UNSIGNED NOT NULL, \
                   `seq` BIGINT UNSIGNED NOT NULL, \
                   `applied` TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, \
                   PRIMARY KEY (`daemon`, `seq`), \
                   KEY `idx_applied` (`applied`)\
                 ) ENGINE = InnoDB"
            ),
            prune_batches: format!("DELETE FROM {b} WHERE applied < NOW() - INTERVAL ? SECOND"),
        }
    }
}

/// `?, ?, …` for `n` values.
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(",")
}

/// A pool of connections to one database.
#[derive(Debug, Clone)]
pub struct MysqlBackend {
    pool: Pool,
    sql: Arc<Statements>,
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
            sql: Arc::new(Statements::new(&Table::named(table))),
            timeout: DEFAULT_TIMEOUT,
            batches: Arc::new(AtomicBool::new(true)),
        })
    }

    /// Uses other column names (`database.columns`).
    pub fn with_table(mut self, table: &Table) -> Self {
        self.sql = Arc::new(Statements::new(table));
        self
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
        storable: &[(usize, &Delta)],
    ) -> Result<Written, mysql_async::Error> {
        let mut conn = self.pool.get_conn().await?;
        let mut tx = conn.start_transaction(TxOpts::default()).await?;
        if self.batches.load(Ordering::Relaxed) {
            let recorded = tx
                .exec_drop(&self.sql.record_batch, (batch.id.daemon, batch.id.seq))
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
        let mut skipped = Vec::new();
        for part in storable.chunks(ROWS_PER_STATEMENT) {
            match self.write_part(&mut tx, part, ctx).await {
                Ok(()) => {}
                // The statement failed on its own (InnoDB undid just it; the
                // transaction and the batch id stand): one delta at a time,
                // to set aside only those the table cannot take.
                Err(e) if one_by_one(&e) => {
                    for &delta in part {
                        match self.write_part(&mut tx, &[delta], ctx).await {
                            Ok(()) => {}
                            Err(e) if data_error(&e) => {
                                log::error!(
                                    "key {} cannot be stored in this table ({e}); it is limited \
                                     in memory only",
                                    crate::protocol::Escaped(&delta.1.key)
                                );
                                skipped.push(delta.0);
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        tx.commit().await?;
        Ok(Written {
            replayed: false,
            skipped,
        })
    }

    /// Locks, merges and writes up to [`ROWS_PER_STATEMENT`] deltas. The
    /// row the unique index sees as a key's is the one written: a row found
    /// whose string is not literally a key (`alice@x ` is `alice@x` under
    /// PAD SPACE, `José` is `jose` under a `_ci` collation) is matched by
    /// the database itself (`FIELD` compares as the column does).
    async fn write_part(
        &self,
        tx: &mut Transaction<'_>,
        part: &[(usize, &Delta)],
        ctx: WriteContext,
    ) -> Result<(), mysql_async::Error> {
        let sql = &self.sql;
        let keys: Vec<Value> = part.iter().map(|(_, d)| Value::from(&*d.key)).collect();
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
                format!("{}{}) FOR UPDATE", sql.lock_keys, placeholders(part.len())),
                Params::Positional(keys.clone()),
            )
            .await?;
        let position: HashMap<&str, usize> = part
            .iter()
            .enumerate()
            .map(|(j, (_, d))| (&*d.key, j))
            .collect();
        // By the delta's position in `part`.
        let mut rows: HashMap<usize, (i64, StoredRow)> = HashMap::with_capacity(found.len());
        let mut unmatched: HashMap<i64, StoredRow> = HashMap::new();
        for (id, sender, quota, used, expiry, persist) in found {
            let row = StoredRow {
                key: String::from_utf8_lossy(&sender).into_owned(),
                quota: clamp_u32(quota.unwrap_or(0)),
                used: clamp_u32(used.unwrap_or(0)),
                expiry,
                persist: persist.unwrap_or(0) != 0,
            };
            match position.get(row.key.as_str()) {
                Some(&j) => {
                    rows.insert(j, (id, row));
                }
                None => {
                    unmatched.insert(id, row);
                }
            }
        }
        if !unmatched.is_empty() {
            // Rows the collation holds equal to a key without being the same
            // string (rare): the database says whose they are.
            let mut params = keys;
            params.extend(unmatched.keys().map(|&id| Value::from(id)));
            let owners: Vec<(i64, usize)> = tx
                .exec(
                    format!(
                        "{}{}{}{})",
                        sql.match_rows,
                        placeholders(part.len()),
                        sql.match_rows_where,
                        placeholders(unmatched.len())
                    ),
                    Params::Positional(params),
                )
                .await?;
            for (id, k) in owners {
                if let (Some(row), true) = (unmatched.remove(&id), k > 0) {
                    rows.entry(k - 1).or_insert((id, row));
                }
            }
        }
        let mut updates: Vec<Value> = Vec::new();
        let mut inserts: Vec<Value> = Vec::new();
        let (mut n_updates, mut n_inserts) = (0, 0);
        for (j, (_, d)) in part.iter().enumerate() {
            match rows.remove(&j) {
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
                format!("{}{values}{}", sql.write_rows, sql.write_rows_suffix),
                Params::Positional(updates),
            )
            .await?;
        }
        if n_inserts > 0 {
            let values = vec!["(?, ?, ?, ?, ?, NOW())"; n_inserts].join(",");
            tx.exec_drop(
                format!("{}{values}", sql.insert_rows),
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
        let (sql, params) = match since {
            Some(at) => (
                &self.sql.select_since,
                Params::Positional(vec![Value::from(at)]),
            ),
            None => (&self.sql.select_all, Params::Empty),
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
            log::warn!(
                "{bad} rows of {} could not be read and were skipped",
                self.sql.table
            );
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

    async fn fold_now(
        &self,
        key: &str,
        variants: &[String],
    ) -> Result<Option<StoredRow>, mysql_async::Error> {
        let sql = &self.sql;
        let mut conn = self.pool.get_conn().await?;
        let mut tx = conn.start_transaction(TxOpts::default()).await?;
        let mut keys: Vec<Value> = vec![Value::from(key)];
        keys.extend(variants.iter().map(|v| Value::from(v.as_str())));
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
                format!("{}{}) FOR UPDATE", sql.lock_keys, placeholders(keys.len())),
                Params::Positional(keys),
            )
            .await?;
        let rows: Vec<IdRow> = found
            .into_iter()
            .map(|(id, sender, quota, used, expiry, persist)| IdRow {
                id,
                row: StoredRow {
                    key: String::from_utf8_lossy(&sender).into_owned(),
                    quota: clamp_u32(quota.unwrap_or(0)),
                    used: clamp_u32(used.unwrap_or(0)),
                    expiry,
                    persist: persist.unwrap_or(0) != 0,
                },
            })
            .collect();
        let Some(fold) = fold_rows(key, &rows) else {
            tx.rollback().await?;
            return Ok(None);
        };
        if !fold.delete.is_empty() {
            tx.exec_drop(
                format!("{}{})", sql.delete_ids, placeholders(fold.delete.len())),
                Params::Positional(fold.delete.iter().map(|&id| Value::from(id)).collect()),
            )
            .await?;
        }
        let mut params = Vec::new();
        push_row(&mut params, key, &fold.row);
        params.push(Value::from(fold.keep));
        tx.exec_drop(&sql.rewrite_row, Params::Positional(params))
            .await?;
        tx.commit().await?;
        Ok(Some(fold.row))
    }

    async fn inspect_now(&self) -> Result<Inspection, BackendError> {
        let sql = &self.sql;
        let t = &sql.table;
        let mut conn = self.pool.get_conn().await.map_err(classify)?;
        // The table and its columns (a missing one is fatal: 1146, 1054).
        conn.query_drop(&sql.check_table).await.map_err(classify)?;
        let mut warnings = Vec::new();
        let batches_ok = match conn.query_drop(&sql.check_batches).await {
            Ok(()) => true,
            Err(_) => match conn.query_drop(&sql.create_batches).await {
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
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = ?",
                (t.as_str(), sql.updated.as_str()),
            )
            .await
            .map_err(classify)?;
        if !extra.is_some_and(|e| e.to_ascii_lowercase().contains("on update")) {
            warnings.push(format!(
                "{t}.{} has no ON UPDATE CURRENT_TIMESTAMP: edits made in the database that \
                 do not set `updated` take effect at the next full re-read \
                 (database.reconcile_interval), not within refresh_interval; schema-migrate.sql \
                 adds it",
                sql.updated
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

/// Deadlock (1213, also a Galera certification failure), lock wait timeout
/// (1205), and a duplicate key on a new sender's row (1062: another daemon
/// inserted it meanwhile, or did so under a collation that holds it equal):
/// the transaction can simply be tried again.
fn retryable(e: &mysql_async::Error) -> bool {
    matches!(e, mysql_async::Error::Server(s) if matches!(s.code, 1062 | 1205 | 1213))
}

/// A value the table cannot take: a string not in the column's character
/// set (1267, 1270, 1271, 1366), too long (1406), a number out of range
/// (1264), truncated (1265, 1292). Only the statement failed.
fn data_error(e: &mysql_async::Error) -> bool {
    matches!(e, mysql_async::Error::Server(s)
        if matches!(s.code, 1264 | 1265 | 1267 | 1270 | 1271 | 1292 | 1366 | 1406))
}

/// A statement error worth going one delta at a time for: a data error, or
/// a duplicate key (two of our keys the collation holds equal).
fn one_by_one(e: &mysql_async::Error) -> bool {
    data_error(e) || matches!(e, mysql_async::Error::Server(s) if s.code == 1062)
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
                storable_deltas.push((i, d));
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
                        // Different daemons (and attempts) wait different times.
                        let jitter = 50 + (batch.id.daemon ^ batch.id.seq) % 250;
                        tokio::time::sleep(Duration::from_millis(jitter)).await;
                    }
                    Err(e) => return Err(classify(e)),
                }
            }
        };
        let mut written = self
            .bounded(self.timeout, "a write transaction", attempts)
            .await?;
        written.skipped.extend(skipped);
        Ok(written)
    }

    async fn fold(
        &self,
        key: &str,
        variants: Vec<String>,
    ) -> Result<Option<StoredRow>, BackendError> {
        self.bounded(self.timeout, "folding rows", async {
            self.fold_now(key, &variants).await.map_err(classify)
        })
        .await
    }

    async fn prune_batches(&self, max_age_secs: i64) -> Result<(), BackendError> {
        if !self.batches.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.bounded(self.timeout, "removing old batch ids", async {
            let mut conn = self.pool.get_conn().await.map_err(classify)?;
            conn.exec_drop(&self.sql.prune_batches, (max_age_secs,))
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
        assert!(retryable(&server(1213)) && retryable(&server(1205)) && retryable(&server(1062)));
        assert!(!retryable(&server(1142)) && !retryable(&server(1366)));
        assert!(
            data_error(&server(1366)) && data_error(&server(1267)) && !data_error(&server(1062))
        );
        assert!(one_by_one(&server(1062)) && !one_by_one(&server(1213)));
        assert!(matches!(classify(server(1146)), BackendError::Fatal(_)));
        assert!(matches!(
            classify(server(1142)),
            BackendError::Unavailable(_)
        ));
    }
}
