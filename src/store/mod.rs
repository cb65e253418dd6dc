//! The in-memory counter map: every decision is made here, without I/O.
//!
//! A [`CounterStore`] holds the counters of one limit (one key kind, one
//! period) in a lock-sharded [`DashMap`]. Several limits per key, or other key
//! kinds (SPEC §4 "later"), are several stores, each with its own [`Limit`].
//!
//! Invariants:
//! - the API is synchronous and never holds a shard guard beyond one call, so
//!   callers cannot hold one across an `.await`;
//! - the time is always passed in; the store never reads a clock;
//! - an owned key is allocated only when a key is new: lookups borrow `&str`;
//! - `Counter::pending` is usage not yet in the backend; [`CounterStore::take_dirty`]
//!   hands it out as deltas, which from then on belong to the flusher until
//!   the backend has confirmed them (it keeps and re-sends a batch that
//!   failed, so nothing is lost or doubled while the backend is away);
//! - everything that merges database rows into the map
//!   ([`CounterStore::merge_stored`], [`CounterStore::forget_unseen`]) is
//!   called by that one task only, never halfway through one of its writes.

pub mod counter;
pub mod window;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use parking_lot::RwLock;

pub use counter::{Charge, Counter, Rules};
pub use window::{Calendar, Period};

/// Everything the store needs to know about one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Where windows end.
    pub calendar: Calendar,
    /// Default quota and whether refused requests count.
    pub rules: Rules,
}

/// The answer of [`CounterStore::check_and_increment`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the request is within quota.
    pub accepted: bool,
    /// Units added to the counter.
    pub added: u32,
    /// `used` after the charge.
    pub used: u32,
    /// The counter's quota.
    pub quota: u32,
    /// End of the counter's window, unix seconds.
    pub expiry: i64,
    /// True for a new sender: this call created the counter and the backend
    /// has no row for the key either (as far as this daemon knows).
    pub inserted: bool,
    /// True for the first refusal of this key in this window.
    pub first_refusal: bool,
}

/// A row as the backend stores it; what start-up loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    /// The key (`sender` column).
    pub key: String,
    /// `quota` column.
    pub quota: u32,
    /// `used` column.
    pub used: u32,
    /// `expiry` column; `None` (NULL in the Perl schema) means expired.
    pub expiry: Option<i64>,
    /// `persist` column.
    pub persist: bool,
}

/// Usage to add to the backend: what one key used in one window since the
/// last flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The key.
    pub key: Box<str>,
    /// Units to add.
    pub delta: u32,
    /// The end of the window the units belong to. A stored row whose expiry is
    /// older is reset before the delta is added; a newer one ignores it.
    pub window_expiry: i64,
    /// The quota, for a row that has to be inserted.
    pub quota: u32,
    /// The persist flag, for a row that has to be inserted.
    pub persist: bool,
    /// An administrator set `quota` and `persist`: store them as they are.
    pub set_quota: bool,
    /// An administrator reset the counter: the stored `used` becomes `delta`
    /// (for the same window) instead of growing by it.
    pub reset_used: bool,
    /// The backend had a row for the key when the delta was taken. If the row
    /// is gone when the delta is written, an administrator deleted it: the
    /// sender starts again as a new one (default quota, not persistent).
    pub had_row: bool,
}

/// What a flush not yet confirmed by the backend carries for one key, for
/// [`CounterStore::merge_stored`]: its units are not in the database yet,
/// and an administrator's change in it is not either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InFlight {
    /// The window the units belong to (the latest, if several).
    pub window: i64,
    /// Units for that window.
    pub units: u32,
    /// It carries a set-quota: memory's quota and persist stand.
    pub set_quota: bool,
    /// It carries a reset of that window: memory's `used` stands.
    pub reset_used: bool,
}

/// A key as the store holds it: trimmed and lower-cased (SPEC §4). Borrowed
/// when it already is.
pub fn normalize_key(key: &str) -> std::borrow::Cow<'_, str> {
    let key = key.trim();
    if key.chars().any(char::is_uppercase) {
        std::borrow::Cow::Owned(key.to_lowercase())
    } else {
        std::borrow::Cow::Borrowed(key)
    }
}

/// The map's hasher: foldhash is several times faster than SipHash on short
/// keys and is seeded randomly per process, so an outsider cannot aim
/// collisions (and keys come from authenticated users anyway).
type Hasher = foldhash::fast::RandomState;

/// The counters of one limit.
#[derive(Debug)]
pub struct CounterStore {
    map: DashMap<Box<str>, Counter, Hasher>,
    /// Keys that have a row in the backend but no counter in memory (the row
    /// carries nothing: its window is over and its quota not persistent),
    /// as hashes, with the generation of the full re-read that saw the row.
    /// A sender found here is a returning one, not a new one (logged
    /// `UPDATE`, not `INSERT`); 16 bytes or so per key instead of a counter.
    resting: RwLock<HashMap<u64, u8, Hasher>>,
    /// Hashes keys for `resting`.
    hasher: Hasher,
    /// Counters held (kept with every insert and removal, so that checking
    /// the cap costs one atomic load).
    count: AtomicUsize,
    /// Most counters held: past it, a key without a counter gets none
    /// ([`Full`]); also the most keys remembered in `resting`.
    max_counters: AtomicUsize,
}

/// The longest key the store holds, in bytes: what the Perl schema's
/// `VARCHAR(255)` can take. No real login is longer (an e-mail address has
/// at most 254), so a longer one is answered without a counter.
pub const MAX_KEY_BYTES: usize = 255;

/// The store holds `max_counters` counters and the key is not one of them:
/// it gets no counter (memory stays bounded under forged logins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

impl Default for CounterStore {
    fn default() -> Self {
        Self::new()
    }
}

/// Shards in the map: more shards mean shorter waits while the flusher scans
/// one of them. 128 keeps a 1M-key scan at ~8k keys per shard lock.
const SHARDS: usize = 128;

impl CounterStore {
    /// An empty store.
    pub fn new() -> Self {
        CounterStore {
            map: DashMap::with_hasher_and_shard_amount(Hasher::default(), SHARDS),
            resting: RwLock::new(HashMap::default()),
            hasher: Hasher::default(),
            count: AtomicUsize::new(0),
            max_counters: AtomicUsize::new(usize::MAX),
        }
    }

    /// Sets the most counters held (`max_counters`; at start and reload).
    pub fn set_max_counters(&self, max: usize) {
        self.max_counters.store(max, Ordering::Relaxed);
    }

    /// The most counters held.
    pub fn max_counters(&self) -> usize {
        self.max_counters.load(Ordering::Relaxed)
    }

    /// Counters held, in O(1) (close to exact while requests race).
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    fn is_full(&self) -> bool {
        self.count() >= self.max_counters()
    }

    fn note_removed(&self, n: usize) {
        if n > 0 {
            self.count.fetch_sub(n, Ordering::Relaxed);
        }
    }

    fn key_hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Rolls the key's window if it has ended, charges `amount` and compares
    /// with the quota. A key seen for the first time is created with the
    /// default quota and checked like any other.
    ///
    /// # Errors
    ///
    /// [`Full`]: the key has no counter and the store holds `max_counters`.
    pub fn check_and_increment(
        &self,
        key: &str,
        amount: u32,
        now: i64,
        limit: &Limit,
    ) -> Result<Outcome, Full> {
        if let Some(mut c) = self.map.get_mut(key) {
            return Ok(Self::charge_counter(&mut c, amount, now, limit, false));
        }
        if self.is_full() {
            return Err(Full);
        }
        // Another request may have inserted the key since `get_mut`.
        Ok(match self.map.entry(Box::from(key)) {
            Entry::Occupied(mut e) => Self::charge_counter(e.get_mut(), amount, now, limit, false),
            Entry::Vacant(e) => {
                // A row that rests in the backend makes this a returning
                // sender, not a new one.
                let returning = self.resting.read().contains_key(&self.key_hash(key));
                let fresh = Counter::new(limit.rules.default_quota, limit.calendar.window_end(now));
                self.count.fetch_add(1, Ordering::Relaxed);
                Self::charge_counter(&mut e.insert(fresh), amount, now, limit, !returning)
            }
        })
    }

    /// Checks an existing key without charging it: `None` for an unknown key
    /// (which cannot be over quota), otherwise the outcome of a zero charge.
    pub fn check(&self, key: &str, now: i64, limit: &Limit) -> Option<Outcome> {
        let mut c = self.map.get_mut(key)?;
        Some(Self::charge_counter(&mut c, 0, now, limit, false))
    }

    fn charge_counter(
        c: &mut Counter,
        amount: u32,
        now: i64,
        limit: &Limit,
        inserted: bool,
    ) -> Outcome {
        c.roll(now, || limit.calendar.window_end(now), &limit.rules);
        let Charge { accepted, added } = c.charge(amount, &limit.rules);
        let first_refusal = !accepted && !c.refusal_reported;
        c.refusal_reported |= first_refusal;
        Outcome {
            accepted,
            added,
            used: c.used,
            quota: c.quota,
            expiry: c.expiry,
            inserted,
            first_refusal,
        }
    }

    /// Puts a row loaded from the backend into the map, replacing what was
    /// there; `mark` is the generation of the full re-read that saw it.
    pub fn load(&self, row: StoredRow, mark: u8) {
        let counter = Counter {
            used: row.used,
            persist: row.persist,
            stored: true,
            mark,
            ..Counter::new(row.quota, row.expiry.unwrap_or(0))
        };
        if self.map.insert(row.key.into_boxed_str(), counter).is_none() {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes the usage of every changed counter, leaving its `pending` at 0.
    /// From then on the deltas belong to the caller (the flusher), which
    /// keeps them until the backend has confirmed them.
    pub fn take_dirty(&self) -> Vec<Delta> {
        let mut out = Vec::new();
        for mut entry in self.map.iter_mut() {
            let (key, c) = entry.pair_mut();
            if c.pending == 0 && !c.set_quota && !c.reset_used {
                continue;
            }
            out.push(Delta {
                key: key.clone(),
                delta: c.pending,
                window_expiry: c.expiry,
                quota: c.quota,
                persist: c.persist,
                set_quota: c.set_quota,
                reset_used: c.reset_used,
                had_row: c.stored,
            });
            c.pending = 0;
            c.set_quota = false;
            c.reset_used = false;
        }
        out
    }

    /// Notes that the backend now has a row for each of `keys` (a flush
    /// wrote them).
    pub fn mark_stored<'k>(&self, keys: impl IntoIterator<Item = &'k str>) {
        for key in keys {
            if let Some(mut c) = self.map.get_mut(key) {
                c.stored = true;
            }
        }
    }

    /// After a full re-read of generation `mark`: a counter whose row the
    /// backend had (`stored`) but that re-read did not see was deleted by an
    /// administrator. With nothing pending it is dropped (its sender is new
    /// again); with units counted since the re-read began it starts over as
    /// a new sender holding just those units. A counter with an
    /// administrator's change waiting to be written is left alone: the next
    /// flush writes its row again. Returns how many were forgotten.
    pub fn forget_unseen(&self, mark: u8, default_quota: u32) -> usize {
        let before = self.map.len();
        let mut reset = 0;
        self.map.retain(|_, c| {
            if !c.stored || c.mark == mark || c.set_quota || c.reset_used {
                return true;
            }
            if c.pending == 0 {
                return false;
            }
            *c = Counter {
                used: c.pending,
                pending: c.pending,
                ..Counter::new(default_quota, c.expiry)
            };
            reset += 1;
            true
        });
        self.resting.write().retain(|_, m| *m == mark);
        let removed = before.saturating_sub(self.map.len());
        self.note_removed(removed);
        removed + reset
    }

    /// How many keys rest in the backend without a counter in memory.
    pub fn resting(&self) -> usize {
        self.resting.read().len()
    }

    /// Removes counters that carry no information: window over, nothing
    /// pending, quota not persistent. Such a key behaves exactly like a new
    /// one. Returns how many were removed.
    pub fn evict_idle(&self, now: i64) -> usize {
        let mut resting = Vec::new();
        let before = self.map.len();
        self.map.retain(|key, c| {
            let idle = Self::is_idle(c, now);
            if idle && c.stored {
                resting.push((self.key_hash(key), c.mark));
            }
            !idle
        });
        let removed = before.saturating_sub(self.map.len());
        self.note_removed(removed);
        self.rest(resting);
        removed
    }

    /// Remembers keys whose rows rest in the backend, up to `max_counters`.
    fn rest(&self, keys: impl IntoIterator<Item = (u64, u8)>) {
        let max = self.max_counters();
        let mut resting = self.resting.write();
        for (h, mark) in keys {
            if resting.len() >= max && !resting.contains_key(&h) {
                break;
            }
            resting.insert(h, mark);
        }
    }

    /// Carries no information: window over, nothing pending, no admin change
    /// waiting, quota not persistent. Such a counter behaves exactly like a
    /// new one.
    fn is_idle(c: &Counter, now: i64) -> bool {
        now >= c.expiry && c.pending == 0 && !c.persist && !c.set_quota && !c.reset_used
    }

    /// Sets a key's quota and persist flag now (creating the key if needed);
    /// the backend gets them at the next flush. Returns the counter.
    pub fn set_quota(
        &self,
        key: &str,
        quota: u32,
        persist: bool,
        now: i64,
        limit: &Limit,
    ) -> Counter {
        // An administrator's counter is made even past max_counters.
        let mut c = match self.map.entry(Box::from(key)) {
            Entry::Occupied(e) => e.into_ref(),
            Entry::Vacant(e) => {
                self.count.fetch_add(1, Ordering::Relaxed);
                e.insert(Counter::new(
                    limit.rules.default_quota,
                    limit.calendar.window_end(now),
                ))
            }
        };
        c.roll(now, || limit.calendar.window_end(now), &limit.rules);
        c.quota = quota;
        c.persist = persist;
        c.set_quota = true;
        c.refusal_reported = false;
        *c
    }

    /// Resets a key's usage to 0 now; the backend's `used` follows at the
    /// next flush. `None` for an unknown key.
    pub fn reset(&self, key: &str) -> Option<Counter> {
        let mut c = self.map.get_mut(key)?;
        c.used = 0;
        c.pending = 0;
        c.reset_used = true;
        c.refusal_reported = false;
        Some(*c)
    }

    /// Gives non-persistent counters at quota `old` the quota `new` (after
    /// `default_quota` changed on reload), and marks them so the new quota
    /// is written to their rows at the next flush. Returns how many changed.
    pub fn apply_default_quota(&self, old: u32, new: u32) -> usize {
        let mut changed = 0;
        if old != new {
            for mut e in self.map.iter_mut() {
                if !e.persist && e.quota == old {
                    e.quota = new;
                    e.set_quota = true;
                    changed += 1;
                }
            }
        }
        changed
    }

    /// Merges a row read from the backend (initial load, refresh, full
    /// re-read).
    /// The database is the authority for `quota` and `persist` — except while
    /// an administrator's change made here waits to be written — and for
    /// `used`, to which the usage not yet written from here is added: the
    /// counter's `pending`, and the units of `unconfirmed`, taken by a flush
    /// the backend has not confirmed yet (counted as not stored: if that
    /// flush did commit, memory counts them twice until the row is read
    /// again, which errs on the side of refusing). An administrator's
    /// set-quota or reset in that flush stands against the row like one still
    /// pending. Which window counts is decided by what has finished at
    /// `now`:
    ///
    /// - key not in memory: the row is taken as it is;
    /// - same window: `used` = stored `used` + `pending` (the stored value
    ///   includes what every daemon has flushed, ours too);
    /// - the stored window is running and ours has finished (another daemon
    ///   rolled over first): the row is taken; our pending usage belonged to
    ///   the finished window;
    /// - both running but ending at different times (counted while the
    ///   database was away, or written with another period): the stored
    ///   window is adopted, with our pending usage added, and our pending
    ///   usage is written into it;
    /// - the stored window has finished: ours is the current one and ours to
    ///   write; only a persistent quota is taken from the row.
    ///
    /// The counter is marked as stored and seen by the re-read `mark`.
    pub fn merge_stored(&self, row: StoredRow, now: i64, mark: u8, unconfirmed: Option<InFlight>) {
        let Some(mut c) = self.map.get_mut(row.key.as_str()) else {
            let counter = Counter {
                used: row.used,
                persist: row.persist,
                ..Counter::new(row.quota, row.expiry.unwrap_or(0))
            };
            // Past max_counters a row rests too: its sender is treated as
            // one without a counter until room is made.
            if Self::is_idle(&counter, now) || self.is_full() {
                self.rest([(self.key_hash(&row.key), mark)]);
            } else {
                self.load(row, mark);
            }
            return;
        };
        c.stored = true;
        c.mark = mark;
        let expiry = row.expiry.unwrap_or(0);
        let flying = unconfirmed.unwrap_or_default();
        let take_quota = !c.set_quota && !flying.set_quota;
        if expiry == c.expiry || (expiry > now && c.expiry > now) {
            let same = flying.window == c.expiry;
            let in_flight = if same { flying.units } else { 0 };
            c.expiry = expiry;
            // A reset, here or in flight, makes memory's `used` stand.
            let reset = c.reset_used || (same && flying.reset_used);
            if !reset {
                c.used = row.used.saturating_add(c.pending).saturating_add(in_flight);
            }
        } else if expiry > now {
            c.used = row.used;
            c.expiry = expiry;
            c.pending = 0;
            c.reset_used = false;
            c.refusal_reported = false;
        } else if !row.persist {
            return;
        }
        if take_quota {
            c.quota = row.quota;
            c.persist = row.persist;
        }
    }

    /// Up to `n` counters with the highest `used`, highest first.
    pub fn top(&self, n: usize) -> Vec<(Box<str>, Counter)> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let mut heap: BinaryHeap<Reverse<(u32, Box<str>)>> = BinaryHeap::with_capacity(n + 1);
        for e in self.map.iter() {
            if n == 0 {
                break;
            }
            if heap.len() < n {
                heap.push(Reverse((e.used, e.key().clone())));
            } else if heap.peek().is_some_and(|Reverse((used, _))| e.used > *used) {
                heap.pop();
                heap.push(Reverse((e.used, e.key().clone())));
            }
        }
        let mut keys: Vec<_> = heap.into_iter().map(|Reverse(x)| x).collect();
        keys.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        keys.into_iter()
            .filter_map(|(_, k)| self.get(&k).map(|c| (k, c)))
            .collect()
    }

    /// A copy of every counter, taken one shard at a time.
    pub fn snapshot(&self) -> Vec<(Box<str>, Counter)> {
        self.select(|_| true)
    }

    /// A copy of the counters `keep` selects, one shard at a time.
    pub fn select(&self, mut keep: impl FnMut(&Counter) -> bool) -> Vec<(Box<str>, Counter)> {
        let mut out = Vec::new();
        for e in self.map.iter() {
            if keep(e.value()) {
                out.push((e.key().clone(), *e.value()));
            }
        }
        out
    }

    /// A copy of one counter.
    pub fn get(&self, key: &str) -> Option<Counter> {
        self.map.get(key).map(|c| *c)
    }

    /// Number of counters held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no counter is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Sum of the usage not yet written to the backend, and how many counters have some.
    pub fn pending(&self) -> (u64, usize) {
        let mut units = 0u64;
        let mut rows = 0usize;
        for e in self.map.iter() {
            if e.pending > 0 {
                units += u64::from(e.pending);
                rows += 1;
            }
        }
        (units, rows)
    }

    /// Calls `f` for every counter, one shard lock at a time.
    pub fn for_each(&self, mut f: impl FnMut(&str, &Counter)) {
        for e in self.map.iter() {
            f(e.key(), e.value());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Weekday;
    use std::num::NonZeroU32;

    fn limit(default_quota: u32) -> Limit {
        Limit {
            calendar: Calendar {
                period: Period::Fixed(NonZeroU32::new(100).unwrap()),
                tz: chrono_tz::UTC,
                week_start: Weekday::Mon,
            },
            rules: Rules {
                default_quota,
                count_rejected: true,
            },
        }
    }

    #[test]
    fn new_keys_get_the_default_and_are_checked() {
        let s = CounterStore::new();
        let l = limit(2);
        let o = s.check_and_increment("a", 1, 10, &l).unwrap();
        assert_eq!(
            o,
            Outcome {
                accepted: true,
                added: 1,
                used: 1,
                quota: 2,
                expiry: 100,
                inserted: true,
                first_refusal: false
            }
        );
        let o = s.check_and_increment("a", 2, 11, &l).unwrap();
        assert!(!o.accepted && !o.inserted);
        assert_eq!(s.check("a", 12, &l).map(|o| o.accepted), Some(false));
        assert_eq!(s.check("nobody", 12, &l), None);
        let l0 = limit(0);
        assert!(
            !s.check_and_increment("blocked", 1, 10, &l0)
                .unwrap()
                .accepted
        );
    }

    #[test]
    fn dirty_deltas_are_taken_once() {
        let s = CounterStore::new();
        let l = limit(10);
        s.check_and_increment("a", 3, 10, &l).unwrap();
        s.check_and_increment("b", 1, 10, &l).unwrap();
        let mut d = s.take_dirty();
        d.sort_by(|x, y| x.key.cmp(&y.key));
        assert_eq!(
            d.iter()
                .map(|d| (&*d.key, d.delta, d.window_expiry))
                .collect::<Vec<_>>(),
            [("a", 3, 100), ("b", 1, 100)]
        );
        assert!(s.take_dirty().is_empty());
        s.check_and_increment("a", 1, 20, &l).unwrap();
        assert_eq!(s.pending(), (1, 1));
        assert_eq!(s.get("a").unwrap().used, 4, "used keeps everything");
    }

    #[test]
    fn rows_deleted_in_the_database_are_forgotten() {
        let s = CounterStore::new();
        let l = limit(10);
        let row = |key: &str| StoredRow {
            key: key.into(),
            quota: 3,
            used: 2,
            expiry: Some(100),
            persist: true,
        };
        for k in ["kept", "gone", "busy", "admin"] {
            s.merge_stored(row(k), 10, 1, None);
        }
        s.check_and_increment("never-stored", 1, 10, &l).unwrap();
        s.check_and_increment("busy", 4, 10, &l).unwrap();
        s.set_quota("admin", 7, true, 10, &l);
        // The next full re-read (generation 2) sees only "kept".
        s.merge_stored(row("kept"), 10, 2, None);
        assert_eq!(s.forget_unseen(2, 10), 2);
        assert!(s.get("gone").is_none(), "deleted, nothing pending");
        let busy = s.get("busy").unwrap();
        assert_eq!(
            (
                busy.quota,
                busy.used,
                busy.pending,
                busy.persist,
                busy.stored
            ),
            (10, 4, 4, false, false),
            "a new sender with what it sent since"
        );
        assert!(s.get("admin").is_some_and(|c| c.quota == 7));
        assert!(s.get("never-stored").is_some() && s.get("kept").is_some());
        s.mark_stored(["never-stored"]);
        assert!(s.get("never-stored").unwrap().stored);
    }

    #[test]
    fn loaded_rows_keep_persist_and_expired_rows_reset() {
        let s = CounterStore::new();
        let l = limit(10);
        s.load(
            StoredRow {
                key: "p".into(),
                quota: 2,
                used: 2,
                expiry: Some(50),
                persist: true,
            },
            0,
        );
        s.load(
            StoredRow {
                key: "n".into(),
                quota: 2,
                used: 2,
                expiry: None,
                persist: false,
            },
            0,
        );
        s.load(
            StoredRow {
                key: "live".into(),
                quota: 2,
                used: 2,
                expiry: Some(100),
                persist: false,
            },
            0,
        );
        let p = s.check_and_increment("p", 1, 60, &l).unwrap();
        assert_eq!((p.used, p.quota, p.expiry, p.inserted), (1, 2, 100, false));
        let n = s.check_and_increment("n", 1, 60, &l).unwrap();
        assert_eq!((n.used, n.quota), (1, 10));
        assert!(!s.check_and_increment("live", 1, 60, &l).unwrap().accepted);
    }

    #[test]
    fn eviction_keeps_what_matters() {
        let s = CounterStore::new();
        let l = limit(10);
        s.load(
            StoredRow {
                key: "old".into(),
                quota: 10,
                used: 1,
                expiry: Some(50),
                persist: false,
            },
            0,
        );
        s.load(
            StoredRow {
                key: "vip".into(),
                quota: 99,
                used: 1,
                expiry: Some(50),
                persist: true,
            },
            0,
        );
        s.check_and_increment("active", 1, 60, &l).unwrap();
        assert_eq!(s.evict_idle(60), 1);
        assert!(s.get("old").is_none() && s.get("vip").is_some() && s.get("active").is_some());
    }

    #[test]
    fn past_max_counters_new_keys_get_none() {
        let s = CounterStore::new();
        s.set_max_counters(2);
        let l = limit(10);
        s.check_and_increment("a", 1, 10, &l).unwrap();
        s.check_and_increment("b", 1, 10, &l).unwrap();
        assert_eq!(s.check_and_increment("c", 1, 10, &l), Err(Full));
        assert_eq!(
            s.check_and_increment("a", 1, 10, &l).unwrap().used,
            2,
            "known keys go on"
        );
        assert_eq!((s.count(), s.len()), (2, 2));
        // Idle counters make room when evicted.
        s.take_dirty();
        assert_eq!(s.evict_idle(150), 2);
        assert_eq!(s.count(), 0);
        assert!(s.check_and_increment("c", 1, 150, &l).is_ok());
        // An administrator's counter is made anyway.
        s.check_and_increment("d", 1, 150, &l).unwrap();
        s.set_quota("e", 5, true, 150, &l);
        assert_eq!(s.count(), 3);
    }

    #[test]
    fn senders_with_a_resting_row_are_not_new() {
        let s = CounterStore::new();
        let l = limit(10);
        let row = |key: &str, expiry, persist| StoredRow {
            key: key.into(),
            quota: 3,
            used: 2,
            expiry: Some(expiry),
            persist,
        };
        // Idle rows (window over, not persistent) rest: no counter.
        s.merge_stored(row("idle", 50, false), 60, 1, None);
        s.merge_stored(row("live", 100, false), 60, 1, None);
        s.merge_stored(row("vip", 50, true), 60, 1, None);
        assert!(s.get("idle").is_none() && s.get("live").is_some() && s.get("vip").is_some());
        assert_eq!(s.resting(), 1);
        assert!(
            !s.check_and_increment("idle", 1, 60, &l).unwrap().inserted,
            "returning"
        );
        assert!(
            s.check_and_increment("brand-new", 1, 60, &l)
                .unwrap()
                .inserted
        );
        // A stored counter evicted after its window rests too.
        s.mark_stored(["brand-new"]);
        s.check_and_increment("idle", 0, 60, &l).unwrap();
        s.take_dirty();
        assert_eq!(s.evict_idle(200), 3, "idle, brand-new, live");
        assert!(
            !s.check_and_increment("brand-new", 1, 200, &l)
                .unwrap()
                .inserted
        );
        // A full re-read that no longer sees a row forgets it.
        s.merge_stored(row("live", 100, false), 210, 2, None);
        s.forget_unseen(2, 10);
        assert_eq!(s.resting(), 1, "only live's row is still there");
        assert!(
            s.check_and_increment("idle", 1, 210, &l).unwrap().inserted,
            "deleted: new again"
        );
    }

    #[test]
    fn merged_rows_follow_the_window_rule() {
        let s = CounterStore::new();
        let l = limit(10);
        let row = |key: &str, quota, used, expiry, persist| StoredRow {
            key: key.into(),
            quota,
            used,
            expiry: Some(expiry),
            persist,
        };
        // Unknown key: taken as it is.
        s.merge_stored(row("new", 5, 3, 100, false), 60, 1, None);
        assert_eq!(s.get("new").map(|c| (c.quota, c.used)), Some((5, 3)));
        // Same window: stored used (everyone's flushed usage) + our pending.
        s.check_and_increment("same", 2, 10, &l).unwrap();
        s.merge_stored(row("same", 20, 7, 100, true), 60, 1, None);
        let c = s.get("same").unwrap();
        assert_eq!((c.quota, c.used, c.pending, c.persist), (20, 9, 2, true));
        // Both windows running, different ends (counted while the database
        // was away): the stored window is adopted, our pending added.
        s.merge_stored(row("same", 20, 1, 200, true), 10, 1, None);
        let c = s.get("same").unwrap();
        assert_eq!((c.used, c.expiry, c.pending), (3, 200, 2));
        // Our window finished, another daemon's running: taken as it is.
        s.merge_stored(row("same", 20, 4, 300, true), 250, 1, None);
        let c = s.get("same").unwrap();
        assert_eq!((c.used, c.expiry, c.pending), (4, 300, 0));
        // Finished stored window: only a persistent quota is taken.
        s.check_and_increment("ours", 4, 10, &l).unwrap();
        s.merge_stored(row("ours", 99, 50, 50, false), 60, 1, None);
        assert_eq!(s.get("ours").map(|c| (c.quota, c.used)), Some((10, 4)));
        s.merge_stored(row("ours", 99, 50, 50, true), 60, 1, None);
        assert_eq!(
            s.get("ours").map(|c| (c.quota, c.used, c.persist)),
            Some((99, 4, true))
        );
        // An admin change waiting to be written wins over the database.
        s.set_quota("ours", 7, false, 10, &l);
        s.merge_stored(row("ours", 99, 1, 100, true), 60, 1, None);
        assert_eq!(
            s.get("ours").map(|c| (c.quota, c.persist, c.used)),
            Some((7, false, 5))
        );
        // Units of a flush not yet confirmed count as not stored.
        s.check_and_increment("flying", 3, 10, &l).unwrap();
        let taken = s.take_dirty();
        let flying = |window, units| InFlight {
            window,
            units,
            ..InFlight::default()
        };
        s.merge_stored(
            row("flying", 10, 5, 100, false),
            60,
            1,
            Some(flying(100, 3)),
        );
        assert_eq!(s.get("flying").unwrap().used, 8, "5 stored + 3 unconfirmed");
        s.merge_stored(row("flying", 10, 5, 100, false), 60, 1, Some(flying(50, 3)));
        assert_eq!(s.get("flying").unwrap().used, 5, "another window's units");
        let admin = InFlight {
            set_quota: true,
            reset_used: true,
            ..flying(100, 3)
        };
        s.merge_stored(row("flying", 99, 40, 100, true), 60, 1, Some(admin));
        let c = s.get("flying").unwrap();
        assert_eq!(
            (c.quota, c.used, c.persist),
            (10, 5, false),
            "memory stands"
        );
        drop(taken);
        s.reset("ours");
        s.merge_stored(row("ours", 99, 40, 100, true), 60, 1, None);
        assert_eq!(
            s.get("ours").unwrap().used,
            0,
            "a pending reset is not undone"
        );
    }
}
