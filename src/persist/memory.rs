//! An in-memory [`Backend`] that applies [`merge_delta`] and records what it
//! was given. For tests and dry runs; it can be told to fail, to exercise the
//! flusher's retry path.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{merge_delta, Backend, BackendError, WriteContext};
use crate::store::{Delta, StoredRow};

/// Rows in a map, plus a switch that makes every call fail.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    rows: Mutex<BTreeMap<String, StoredRow>>,
    failing: AtomicBool,
    writes: Mutex<Vec<usize>>,
    attempts: AtomicUsize,
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

    /// Calls of `write`, failed ones included.
    pub fn attempts(&self) -> usize {
        self.attempts.load(Ordering::SeqCst)
    }

    /// The sizes of the successful writes, in order.
    pub fn writes(&self) -> Vec<usize> {
        self.writes.lock().clone()
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

    async fn load_all(&self) -> Result<Vec<StoredRow>, BackendError> {
        self.check()?;
        Ok(self.rows.lock().values().cloned().collect())
    }

    async fn write(
        &self,
        deltas: Arc<Vec<Delta>>,
        ctx: WriteContext,
    ) -> Result<(), (usize, BackendError)> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        self.check().map_err(|e| (0, e))?;
        let mut rows = self.rows.lock();
        for d in deltas.iter() {
            let merged = merge_delta(rows.remove(&*d.key), d, ctx.default_quota);
            rows.insert(merged.key.clone(), merged);
        }
        self.writes.lock().push(deltas.len());
        Ok(())
    }
}
