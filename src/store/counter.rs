//! One sender's counter and its arithmetic: window roll-over and charging.
//!
//! Pure value code: no locking, no I/O, no clock. The store calls it under
//! the map's shard lock.

/// What the store and the backend keep per key (SPEC §5), plus the usage not
/// yet written to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    /// How many units the key may use in the current window.
    pub quota: u32,
    /// Units used in the current window (refused requests included when
    /// `count_rejected`).
    pub used: u32,
    /// End of the current window, unix seconds; at or after it the counter is
    /// reset on its next use.
    pub expiry: i64,
    /// Keep `quota` across window resets (an admin's per-sender quota).
    pub persist: bool,
    /// Units added since the last successful flush. They belong to the window
    /// that ends at `expiry`; the flusher writes them as a delta so that
    /// several daemons add up instead of overwriting each other.
    pub pending: u32,
    /// An administrator set `quota`/`persist`; the backend must store them
    /// as they are at the next flush.
    pub set_quota: bool,
    /// An administrator reset `used`; at the next flush the stored `used`
    /// becomes `pending` instead of growing by it.
    pub reset_used: bool,
    /// The first refusal of this window has been reported (one warning line
    /// per sender and window, however many requests it sends).
    pub refusal_reported: bool,
    /// The backend has a row for this key (it was loaded from it, or a
    /// flush wrote it). A full re-read that does not see the row any more
    /// knows an administrator deleted it.
    pub stored: bool,
    /// The generation of the last full re-read that saw this key's row.
    pub mark: u8,
}

/// The limit parameters counter arithmetic needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Quota of a new key, and of a non-persistent key after its window resets.
    pub default_quota: u32,
    /// Whether refused requests add to `used` (the Perl daemon's behaviour).
    pub count_rejected: bool,
}

/// The result of one [`Counter::charge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    /// False when the key is over its quota: the request is refused.
    pub accepted: bool,
    /// Units actually added to `used` (0 for a refused request when not
    /// counting rejects).
    pub added: u32,
}

impl Counter {
    /// A counter for a key seen for the first time, whose window ends at `expiry`.
    pub fn new(quota: u32, expiry: i64) -> Counter {
        Counter {
            quota,
            used: 0,
            expiry,
            persist: false,
            pending: 0,
            set_quota: false,
            reset_used: false,
            refusal_reported: false,
            stored: false,
            mark: 0,
        }
    }

    /// Starts a new window if `now` is at or after `expiry`: `used` goes to 0,
    /// `expiry` to `next_expiry`, and `quota` to the default unless `persist`.
    /// Usage of the finished window that was never flushed is dropped: it
    /// belongs to a window that no longer limits anything.
    ///
    /// Returns true when it rolled.
    pub fn roll(&mut self, now: i64, next_expiry: impl FnOnce() -> i64, rules: &Rules) -> bool {
        if now < self.expiry {
            return false;
        }
        self.used = 0;
        self.pending = 0;
        self.reset_used = false;
        self.refusal_reported = false;
        self.expiry = next_expiry();
        if !self.persist {
            self.quota = rules.default_quota;
        }
        true
    }

    /// Charges `amount` units, then compares (SPEC §5): the request that brings
    /// `used` to exactly `quota` is accepted, `used > quota` is refused. An
    /// `amount` of 0 only checks: refused when already over quota.
    pub fn charge(&mut self, amount: u32, rules: &Rules) -> Charge {
        let after = self.used.saturating_add(amount);
        let accepted = if amount == 0 {
            self.used <= self.quota
        } else {
            after <= self.quota
        };
        let added = if accepted || rules.count_rejected {
            after - self.used
        } else {
            0
        };
        self.used += added;
        self.pending = self.pending.saturating_add(added);
        Charge { accepted, added }
    }

    /// Units left in this window (0 when over quota).
    pub fn remaining(&self) -> u32 {
        self.quota.saturating_sub(self.used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COUNT: Rules = Rules {
        default_quota: 3,
        count_rejected: true,
    };
    const NO_COUNT: Rules = Rules {
        default_quota: 3,
        count_rejected: false,
    };

    #[test]
    fn exactly_quota_is_accepted() {
        let mut c = Counter::new(3, 100);
        for i in 1..=3 {
            assert_eq!(
                c.charge(1, &COUNT),
                Charge {
                    accepted: true,
                    added: 1
                },
                "request {i}"
            );
        }
        assert_eq!(
            c.charge(1, &COUNT),
            Charge {
                accepted: false,
                added: 1
            }
        );
        assert_eq!((c.used, c.pending), (4, 4));
    }

    #[test]
    fn refused_requests_are_not_counted_without_count_rejected() {
        let mut c = Counter::new(3, 100);
        assert!(c.charge(3, &NO_COUNT).accepted);
        assert_eq!(
            c.charge(1, &NO_COUNT),
            Charge {
                accepted: false,
                added: 0
            }
        );
        assert_eq!((c.used, c.pending), (3, 3));
        // A multi-unit charge that does not fit adds nothing either.
        let mut c = Counter::new(3, 100);
        assert_eq!(
            c.charge(5, &NO_COUNT),
            Charge {
                accepted: false,
                added: 0
            }
        );
        assert_eq!(c.used, 0);
    }

    #[test]
    fn quota_zero_blocks_everything() {
        let mut c = Counter::new(0, 100);
        assert!(!c.charge(1, &COUNT).accepted);
        let mut c = Counter::new(0, 100);
        assert!(!c.charge(1, &NO_COUNT).accepted);
    }

    #[test]
    fn zero_amount_only_checks() {
        let mut c = Counter::new(1, 100);
        assert_eq!(
            c.charge(0, &COUNT),
            Charge {
                accepted: true,
                added: 0
            }
        );
        c.charge(1, &COUNT);
        assert!(c.charge(0, &COUNT).accepted, "at quota is not over quota");
        c.charge(1, &COUNT);
        assert_eq!(
            c.charge(0, &COUNT),
            Charge {
                accepted: false,
                added: 0
            }
        );
    }

    #[test]
    fn saturates_instead_of_wrapping() {
        let mut c = Counter::new(u32::MAX, 100);
        c.used = u32::MAX - 1;
        assert!(c.charge(5, &COUNT).accepted);
        assert_eq!(c.used, u32::MAX);
    }

    #[test]
    fn roll_resets_and_applies_persist() {
        let mut c = Counter {
            used: 60,
            pending: 7,
            refusal_reported: true,
            ..Counter::new(50, 100)
        };
        assert!(!c.roll(99, || unreachable!(), &COUNT));
        assert!(c.roll(100, || 200, &COUNT));
        assert_eq!(c, Counter::new(3, 200));

        let mut p = Counter {
            used: 60,
            persist: true,
            ..Counter::new(50, 100)
        };
        assert!(p.roll(150, || 200, &COUNT));
        assert_eq!((p.quota, p.used, p.expiry), (50, 0, 200));
    }
}
