//! The MySQL/MariaDB [`Backend`] (mysql_async), on the Perl daemon's
//! `ratelimit` table (`schema.sql`).
//!
//! - **Bounded waits.** Every operation runs under a timeout, so a database
//!   that stops answering (packets dropped, server frozen) delays a flush or
//!   a refresh by at most that long and never blocks shutdown beyond the
//!   final flush's own deadline. Requests never wait on the database at all.
//! - **Writes are deltas.** Multi-row `INSERT … ON DUPLICATE KEY UPDATE`
//!   statements (at most [`ROWS_PER_STATEMENT`] rows) in transactions of at
//!   most [`super::MAX_BATCH_ROWS`] rows apply [`super::merge_delta`]'s rule.
//!   MySQL evaluates the `UPDATE` assignments left to right, each seeing the
//!   columns already assigned, so `expiry` is assigned last.
//! - **Keys the table cannot hold** (longer than 255 characters, or with
//!   characters outside the 3-byte UTF-8 of the Perl schema's `utf8`
//!   column) are counted in memory but not written, with a warning: one bad
//!   key must not make every flush fail.
//! - **Refresh** reads the rows whose `updated` is at or after the previous
//!   refresh's database time (`schema.sql` adds an index on `updated`).

use std::sync::Arc;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Opts, OptsBuilder, Params, Pool, PoolConstraints, PoolOpts, TxOpts, Value};

use super::{Backend, BackendError, WriteContext, MAX_BATCH_ROWS};
use crate::store::{Delta, StoredRow};

/// Most rows in one `INSERT` statement.
pub const ROWS_PER_STATEMENT: usize = 500;
/// Longest key the Perl schema's `sender VARCHAR(255)` holds.
pub const MAX_KEY_CHARS: usize = 255;
/// Time allowed for one write transaction, or a refresh.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for loading every row.
const LOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// A pool of connections to one database.
#[derive(Debug, Clone)]
pub struct MysqlBackend {
    pool: Pool,
    table: Arc<str>,
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
        })
    }

    /// Closes the pool's connections.
    pub async fn disconnect(self) {
        let _ = tokio::time::timeout(OP_TIMEOUT, self.pool.disconnect()).await;
    }

    async fn write_chunk(&self, chunk: &[Delta], ctx: WriteContext) -> Result<usize, BackendError> {
        let mut skipped = 0;
        let mut groups: [Vec<&Delta>; 4] = Default::default();
        for d in chunk {
            if storable(&d.key) {
                groups[usize::from(d.reset_used) | usize::from(d.set_quota) << 1].push(d);
            } else {
                skipped += 1;
                log::warn!(
                    "key {} cannot be stored in MySQL (over {MAX_KEY_CHARS} characters or 4-byte UTF-8); \
                     it is limited in memory only",
                    crate::protocol::Escaped(&d.key)
                );
            }
        }
        let mut conn = self.pool.get_conn().await.map_err(classify)?;
        let mut tx = conn
            .start_transaction(TxOpts::default())
            .await
            .map_err(classify)?;
        for (flags, rows) in groups.iter().enumerate() {
            let (reset_used, set_quota) = (flags & 1 == 1, flags & 2 == 2);
            for part in rows.chunks(ROWS_PER_STATEMENT) {
                let sql = upsert_sql(&self.table, part.len(), reset_used, set_quota);
                let mut params: Vec<Value> = Vec::with_capacity(part.len() * 5 + 1);
                for d in part {
                    params.push(Value::from(&*d.key));
                    params.push(Value::from(d.quota));
                    params.push(Value::from(d.delta));
                    params.push(Value::from(d.window_expiry.max(0)));
                    params.push(Value::from(d.persist));
                }
                if !set_quota {
                    params.push(Value::from(ctx.default_quota));
                }
                tx.exec_drop(sql, Params::Positional(params))
                    .await
                    .map_err(classify)?;
            }
        }
        tx.commit().await.map_err(classify)?;
        Ok(skipped)
    }

    async fn select_rows(&self, since: Option<i64>) -> Result<Vec<StoredRow>, BackendError> {
        let mut conn = self.pool.get_conn().await.map_err(classify)?;
        let t = &self.table;
        let mut sql = format!("SELECT sender, quota, used, expiry, persist FROM {t}");
        let params = match since {
            Some(at) => {
                sql.push_str(" WHERE updated >= FROM_UNIXTIME(?)");
                Params::Positional(vec![Value::from(at)])
            }
            None => Params::Empty,
        };
        let mut rows = Vec::new();
        let mut bad = 0usize;
        let mut result = conn.exec_iter(sql, params).await.map_err(classify)?;
        result
            .for_each(|row| {
                type Raw = (Vec<u8>, Option<i64>, Option<i64>, Option<i64>, Option<i64>);
                match mysql_async::from_row_opt::<Raw>(row) {
                    Ok((sender, quota, used, expiry, persist)) => rows.push(StoredRow {
                        key: String::from_utf8_lossy(&sender).into_owned(),
                        quota: clamp_u32(quota.unwrap_or(0)),
                        used: clamp_u32(used.unwrap_or(0)),
                        expiry,
                        persist: persist.unwrap_or(0) != 0,
                    }),
                    Err(_) => bad += 1,
                }
            })
            .await
            .map_err(classify)?;
        drop(result);
        if bad > 0 {
            log::warn!("{bad} rows of {t} could not be read and were skipped");
        }
        Ok(rows)
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
}

/// Whether the Perl schema's `sender VARCHAR(255) utf8` can hold `key`.
fn storable(key: &str) -> bool {
    key.chars().count() <= MAX_KEY_CHARS && key.chars().all(|c| c.len_utf8() <= 3)
}

/// The statement for `rows` deltas with the given admin flags; the flags are
/// part of the text, so each combination is its own prepared statement.
fn upsert_sql(table: &str, rows: usize, reset_used: bool, set_quota: bool) -> String {
    let mut sql =
        format!("INSERT INTO {table} (sender, quota, used, expiry, persist, updated) VALUES ");
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?, ?, ?, ?, ?, NOW())");
    }
    let older = "(expiry IS NULL OR expiry < VALUES(expiry))";
    let same_window_used = if reset_used {
        "VALUES(used)"
    } else {
        "LEAST(used + VALUES(used), 4294967295)"
    };
    let (quota, persist) = if set_quota {
        ("VALUES(quota)".to_string(), "VALUES(persist)")
    } else {
        (
            format!("CASE WHEN {older} AND persist = 0 THEN ? ELSE quota END"),
            "persist",
        )
    };
    // Order matters in MySQL: each assignment sees the ones before it, so
    // `used`, `quota` and `persist` are computed from the old `expiry` and
    // `persist`, and `expiry` comes last.
    sql.push_str(&format!(
        " ON DUPLICATE KEY UPDATE \
         used = CASE WHEN {older} THEN VALUES(used) \
                     WHEN expiry = VALUES(expiry) THEN {same_window_used} \
                     ELSE used END, \
         quota = {quota}, \
         persist = {persist}, \
         expiry = CASE WHEN {older} THEN VALUES(expiry) ELSE expiry END, \
         updated = NOW()"
    ));
    sql
}

fn clamp_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
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

async fn bounded<T>(
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

impl Backend for MysqlBackend {
    fn name(&self) -> &'static str {
        "mysql"
    }

    async fn load_all(&self) -> Result<Vec<StoredRow>, BackendError> {
        bounded(LOAD_TIMEOUT, "loading every row", self.select_rows(None)).await
    }

    async fn load_changed(
        &self,
        since: Option<i64>,
    ) -> Result<Option<(Vec<StoredRow>, i64)>, BackendError> {
        bounded(OP_TIMEOUT, "a refresh", async {
            let now = self.db_time().await?;
            let rows = match since {
                Some(at) => self.select_rows(Some(at)).await?,
                None => Vec::new(),
            };
            Ok(Some((rows, now)))
        })
        .await
    }

    async fn write(
        &self,
        deltas: Arc<Vec<Delta>>,
        ctx: WriteContext,
    ) -> Result<(), (usize, BackendError)> {
        let mut done = 0;
        for chunk in deltas.chunks(MAX_BATCH_ROWS) {
            bounded(
                OP_TIMEOUT,
                "a write transaction",
                self.write_chunk(chunk, ctx),
            )
            .await
            .map_err(|e| (done, e))?;
            done += chunk.len();
        }
        Ok(())
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
    fn statements_assign_expiry_last_and_take_flags_as_text() {
        let sql = upsert_sql("ratelimit", 2, false, false);
        assert_eq!(sql.matches("(?, ?, ?, ?, ?, NOW())").count(), 2);
        let update = sql.split("ON DUPLICATE KEY UPDATE").nth(1).unwrap();
        // Assignments are separated by ", "; the first follows "UPDATE ".
        let pos = |col: &str| {
            update
                .find(&format!(", {col} ="))
                .or_else(|| {
                    update
                        .trim_start()
                        .starts_with(&format!("{col} ="))
                        .then_some(0)
                })
                .unwrap_or_else(|| panic!("no assignment to {col}: {update}"))
        };
        assert!(
            pos("used") < pos("quota")
                && pos("quota") < pos("persist")
                && pos("persist") < pos("expiry")
        );
        assert!(
            update.contains("LEAST(used + VALUES(used)") && update.contains("THEN ? ELSE quota")
        );
        let admin = upsert_sql("ratelimit", 1, true, true);
        assert!(admin.contains("THEN VALUES(used)") && admin.contains("quota = VALUES(quota)"));
        assert!(
            !admin.contains("THEN ? ELSE quota"),
            "no default-quota parameter"
        );
    }
}
