//! Counters of what the daemon did, shared by the server, the flusher and the
//! status output. Lock-free atomics on the request path.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use parking_lot::Mutex;

use crate::policy::DecisionKind;

/// The result of the last flush, for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushStatus {
    /// Unix seconds of the last attempt; 0 before the first.
    pub at: i64,
    /// Rows in the last attempt.
    pub rows: usize,
    /// `None` on success, the error otherwise.
    pub error: Option<String>,
}

/// Daemon-wide counters.
#[derive(Debug)]
pub struct Stats {
    /// When the daemon started (for uptime).
    pub started: Instant,
    /// Connections being served now.
    pub connections_open: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Connections closed because the peer is not in `allowed_clients`.
    pub clients_refused: AtomicU64,
    /// Connections closed for a malformed or oversized request.
    pub protocol_errors: AtomicU64,
    /// Connections closed by the idle timeout.
    pub idle_timeouts: AtomicU64,
    decisions: [AtomicU64; DecisionKind::ALL.len()],
    /// Flushes that failed.
    pub flush_failures: AtomicU64,
    /// Whether the last database operation worked.
    pub database_up: AtomicBool,
    /// The last flush.
    pub last_flush: Mutex<FlushStatus>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            connections_open: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            clients_refused: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            idle_timeouts: AtomicU64::new(0),
            decisions: Default::default(),
            flush_failures: AtomicU64::new(0),
            database_up: AtomicBool::new(true),
            last_flush: Mutex::new(FlushStatus::default()),
        }
    }
}

impl Stats {
    /// Counts one answered request: one atomic add on the request path.
    pub fn record(&self, kind: DecisionKind) {
        self.decisions[kind.index()].fetch_add(1, Relaxed);
    }

    /// Requests answered (the sum of the decisions).
    pub fn requests(&self) -> u64 {
        self.decisions.iter().map(|d| d.load(Relaxed)).sum()
    }

    /// How many requests got a decision of `kind`.
    pub fn decisions(&self, kind: DecisionKind) -> u64 {
        self.decisions[kind.index()].load(Relaxed)
    }

    /// Reads one counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}
