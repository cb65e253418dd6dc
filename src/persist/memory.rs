//! An in-memory [`Backend`] that applies [`merge_delta`] and records the
//! batch ids it applied. For tests and dry runs; it can be told to fail, to exercise the
//! flusher's retry path.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::{
    fold_rows, merge_delta, Backend, BackendError, Batch, BatchId, IdRow, WriteContext, Written,
};
use crate::store::StoredRow;

/// Rows in a map, plus a switch that makes every call fail.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    rows: Mutex<BTreeMap<String, StoredRow>>,
    failing: AtomicBool,
    batches: Mutex<HashSet<BatchId>>,
    attempts: AtomicUsize,
    scans: AtomicUsize,
}

impl MemoryBackend {
    /// A backend holding `rows`.
    pub fn with_rows(rows: impl IntoIterator<Item = StoredRow>) -> Self {
        let backend = MemoryBackend::default();
        backend
            .rows
            .lock()
            .extend(rows.into_iter().map(|r| (r.key.clone(), r)));
        backend
    }

    /// Makes every following call fail (`true`) or work again (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// A copy of one row.
    pub fn row(&self, key: &str) -> Option<StoredRow> {
        self.rows.lock().get(key).cloned()
    }

    /// Full reads (`scan`), failed ones included.
    pub fn scans(&self) -> usize {
        self.scans.load(Ordering::SeqCst)
    }

    /// Calls of `write`, failed ones included.
    pub fn attempts(&self) -> usize {
        self.attempts.load(Ordering::SeqCst)
    }

    fn check(&self) -> Result<(), BackendError> {
        if self.failing.load(Ordering::SeqCst) {
            Err(BackendError::Unavailable(
                "memory backend set to fail".into(),
            ))
        } else {
            Ok(())
        }
    }
}

impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn scan(&self, rows: mpsc::Sender<Vec<StoredRow>>) -> Result<usize, BackendError> {
        self.scans.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        let all: Vec<StoredRow> = self.rows.lock().values().cloned().collect();
        let n = all.len();
        let _ = rows.send(all).await;
        Ok(n)
    }

    async fn fold(
        &self,
        key: &str,
        variants: Vec<String>,
    ) -> Result<Option<StoredRow>, BackendError> {
        self.check()?;
        let mut rows = self.rows.lock();
        // The map has no ids: its order stands in for them.
        let found: Vec<IdRow> = std::iter::once(key.to_owned())
            .chain(variants)
            .filter_map(|k| rows.get(&k).cloned())
            .enumerate()
            .map(|(id, row)| IdRow { id: id as i64, row })
            .collect();
        let Some(fold) = fold_rows(key, &found) else {
            return Ok(None);
        };
        for r in &found {
            rows.remove(&r.row.key);
        }
        rows.insert(key.to_owned(), fold.row.clone());
        Ok(Some(fold.row))
    }

    async fn write(&self, batch: Arc<Batch>, ctx: WriteContext) -> Result<Written, BackendError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        if !self.batches.lock().insert(batch.id) {
            return Ok(Written {
                replayed: true,
                skipped: Vec::new(),
            });
        }
        let mut rows = self.rows.lock();
        for d in &batch.deltas {
            let merged = merge_delta(rows.remove(&*d.key), d, ctx.default_quota);
            rows.insert(merged.key.clone(), merged);
        }
        Ok(Written::default())
    }
}
