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

/// The kinds of database operation whose health is tracked apart: working
/// reads must not hide failing writes (UPDATE revoked, a full disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Loading every row, refreshing changed ones.
    Read,
    /// Writing counts (flushes).
    Write,
}

impl Op {
    /// `read` or `write`.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "reads",
            Op::Write => "writes",
        }
    }
}

/// What is known about one kind of operation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpHealth {
    /// Unix seconds of the last success; 0 = never.
    pub last_ok: i64,
    /// Unix seconds since when it keeps failing; 0 = it is not failing.
    pub failing_since: i64,
    /// The last error and its unix time.
    pub last_error: Option<(i64, String)>,
}

/// The database as the daemon knows it. "Up" is only ever said after an
/// operation on it succeeded; an attempt that touched nothing (a flush with
/// nothing to write) changes nothing here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// Every row has been loaded once (false while the start-up load waits
    /// for a database that was away).
    pub loaded: bool,
    /// Loads and refreshes.
    pub reads: OpHealth,
    /// Flushes.
    pub writes: OpHealth,
}

/// The database's state in one word, with the time it began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbState {
    /// No operation has succeeded or failed yet.
    Unknown,
    /// The last operation of every kind succeeded.
    Up,
    /// Some kind of operation keeps failing, since the given unix time.
    Down {
        /// When the failing began.
        since: i64,
    },
}

/// A change of [`DbState`] worth one log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Operations of a kind started failing.
    WentDown {
        /// Which kind.
        op: Op,
        /// The error.
        error: String,
    },
    /// Everything works again after being down for this many seconds.
    CameBack {
        /// Seconds it was down.
        down_secs: i64,
    },
}

impl Health {
    /// The state in one word.
    pub fn state(&self) -> DbState {
        let failing = [&self.reads, &self.writes]
            .iter()
            .map(|o| o.failing_since)
            .filter(|&t| t > 0)
            .min();
        match failing {
            Some(since) => DbState::Down { since },
            None if self.reads.last_ok > 0 || self.writes.last_ok > 0 => DbState::Up,
            None => DbState::Unknown,
        }
    }

    /// The most recent error of any kind, with its operation.
    pub fn last_error(&self) -> Option<(Op, i64, &str)> {
        [(Op::Read, &self.reads), (Op::Write, &self.writes)]
            .into_iter()
            .filter_map(|(op, h)| h.last_error.as_ref().map(|(at, e)| (op, *at, e.as_str())))
            .max_by_key(|(_, at, _)| *at)
    }

    /// Records the outcome of an operation that reached (or tried to reach)
    /// the database at `now`; returns the change to log, if any.
    pub fn record(&mut self, op: Op, outcome: Result<(), &str>, now: i64) -> Option<Transition> {
        let before = self.state();
        let h = match op {
            Op::Read => &mut self.reads,
            Op::Write => &mut self.writes,
        };
        match outcome {
            Ok(()) => {
                h.last_ok = now;
                h.failing_since = 0;
            }
            Err(e) => {
                if h.failing_since == 0 {
                    h.failing_since = now;
                }
                h.last_error = Some((now, e.to_string()));
            }
        }
        match (before, self.state(), outcome) {
            (DbState::Down { .. }, DbState::Down { .. }, _) => None,
            (_, DbState::Down { .. }, Err(e)) => Some(Transition::WentDown {
                op,
                error: e.to_string(),
            }),
            (DbState::Down { since }, DbState::Up, _) => Some(Transition::CameBack {
                down_secs: now - since,
            }),
            _ => None,
        }
    }
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
    /// A request has reached `charge_stage` since start (set once; read to
    /// tell a wiring that never charges anything).
    pub charge_stage_seen: AtomicBool,
    /// Connections closed by the idle timeout.
    pub idle_timeouts: AtomicU64,
    decisions: [AtomicU64; DecisionKind::ALL.len()],
    /// Flushes that failed.
    pub flush_failures: AtomicU64,
    /// Units taken by a flush and not yet confirmed by the database (a
    /// write that failed, or whose outcome is unknown, waiting to be sent
    /// again); besides the counters' own pending units.
    pub unconfirmed_units: AtomicU64,
    /// Rows in those unconfirmed batches.
    pub unconfirmed_rows: AtomicU64,
    /// What is known about the database.
    pub database: Mutex<Health>,
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
            charge_stage_seen: AtomicBool::new(false),
            idle_timeouts: AtomicU64::new(0),
            decisions: Default::default(),
            flush_failures: AtomicU64::new(0),
            unconfirmed_units: AtomicU64::new(0),
            unconfirmed_rows: AtomicU64::new(0),
            database: Mutex::new(Health::default()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_only_after_success_and_down_while_any_kind_fails() {
        let mut h = Health::default();
        assert_eq!(h.state(), DbState::Unknown);
        assert_eq!(
            h.record(Op::Read, Err("refused"), 10),
            Some(Transition::WentDown {
                op: Op::Read,
                error: "refused".into()
            })
        );
        assert_eq!(h.record(Op::Read, Err("refused"), 11), None, "one line");
        assert_eq!(h.state(), DbState::Down { since: 10 });
        assert_eq!(
            h.record(Op::Read, Ok(()), 20),
            Some(Transition::CameBack { down_secs: 10 })
        );
        assert_eq!(h.state(), DbState::Up);
        // Writes denied while reads work: down, and reads do not hide it.
        assert!(h.record(Op::Write, Err("UPDATE denied"), 30).is_some());
        assert_eq!(h.record(Op::Read, Ok(()), 31), None);
        assert_eq!(h.state(), DbState::Down { since: 30 });
        assert_eq!(h.last_error(), Some((Op::Write, 30, "UPDATE denied")));
    }
}
