//! Wall-clock time, injected.
//!
//! Quota windows are calendar-aligned and persisted, so they are computed from
//! wall-clock unix seconds, never from a monotonic clock. Everything that needs
//! "now" for a window takes a [`Clock`], so tests can use [`ManualClock`] and
//! move time by hours or months without waiting.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of the current wall-clock time in unix seconds.
pub trait Clock: Send + Sync + 'static {
    /// The current time, in seconds since the unix epoch (UTC).
    fn now(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            // A clock set before 1970 is a broken machine; the epoch is the
            // least surprising answer and keeps the daemon running.
            Err(_) => 0,
        }
    }
}

/// A clock that only moves when told to; for tests.
///
/// Clones share the same time, so a test can keep one handle and give the
/// other to the daemon.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<AtomicI64>,
}

impl ManualClock {
    /// A clock standing at `unix_secs`.
    pub fn new(unix_secs: i64) -> Self {
        ManualClock {
            now: Arc::new(AtomicI64::new(unix_secs)),
        }
    }

    /// Moves the clock forward (or back, with a negative value) by `secs`.
    pub fn advance(&self, secs: i64) {
        self.now.fetch_add(secs, Ordering::SeqCst);
    }

    /// Sets the clock to `unix_secs`.
    pub fn set(&self, unix_secs: i64) {
        self.now.store(unix_secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> i64 {
        self.now.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_clones_share_time() {
        let a = ManualClock::new(100);
        let b = a.clone();
        a.advance(50);
        assert_eq!(b.now(), 150);
        b.set(7);
        assert_eq!(a.now(), 7);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now() > 1_577_836_800);
    }
}
