//! Per-key rate limits, by voter or client address, as GCRA: a token bucket kept as one
//! timestamp, the moment the key's bucket is full again. The keys live in a table of fixed size,
//! so a flood of new keys costs no memory, and a check touches one set of it: two adjacent cache
//! lines, where a hash map's probe and entry were two misses apart. Pure: the caller passes the
//! time.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use metrics::Counter;

use crate::config::Rate;

/// Sharded so concurrent requests rarely contend on one lock.
const SHARDS: usize = 64;
/// Slots per set: 8 of 16 bytes, two cache lines that the CPU fetches as a pair. With 4, a set
/// overflowed by chance often enough to forget 6% of the buckets of a half-full table.
const WAYS: usize = 8;

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// The key's whole hash; a slot never holds a key, only this.
    fingerprint: u64,
    /// Nanoseconds after the limiter's epoch when this key's bucket is full again (GCRA's
    /// theoretical arrival time). At or before now, the slot may be reused at no cost: a full
    /// bucket is what a key never seen gets. Zero in a slot never used.
    full_at: u64,
}

#[derive(Debug, Clone, Copy, Default)]
#[repr(align(128))]
struct Set([Slot; WAYS]);

/// Aligned so two shards' locks never share a cache line that both cores write.
#[repr(align(64))]
struct Shard(Mutex<Box<[Set]>>);

/// Keys are hashed with a key chosen at random per limiter, so no one can pick voter ids that
/// crowd one set and push others' buckets out.
pub struct Limiter {
    /// Nanoseconds per token, rounded up so the limit is never looser than asked.
    interval: u64,
    /// How far ahead of now a bucket's `full_at` may be and still give a token: (burst - 1)
    /// intervals.
    tolerance: u64,
    hasher: RandomState,
    epoch: Instant,
    sets_per_shard: usize,
    shards: Box<[Shard]>,
    /// Counts buckets forgotten before they were full again, because no bucket in their set was
    /// full: the table is too small for the keys in use.
    forgiven: Counter,
}

impl Limiter {
    /// A limiter holding at least `keys` keys (rounded up to a power of two, and to at least one
    /// set per shard); `forgiven` counts what a too-small table forgets.
    pub fn new(rate: Rate, keys: usize, forgiven: Counter) -> Self {
        let sets_per_shard = keys.div_ceil(SHARDS * WAYS).next_power_of_two();
        let interval = (1e9 / rate.per_second).ceil().max(1.0) as u64;
        Self {
            interval,
            tolerance: ((rate.burst - 1.0) * interval as f64) as u64,
            hasher: RandomState::new(),
            epoch: Instant::now(),
            sets_per_shard,
            shards: (0..SHARDS)
                .map(|_| Shard(Mutex::new(vec![Set::default(); sets_per_shard].into())))
                .collect(),
            forgiven,
        }
    }

    /// Takes a token for `key`, or says how long until one is available.
    pub fn check(&self, key: &[u8], now: Instant) -> Result<(), Duration> {
        let hash = self.hasher.hash_one(key);
        let (shard, set) = self.place(hash);
        // Never zero, so a slot never used reads as a bucket full long ago.
        let now = now.saturating_duration_since(self.epoch).as_nanos() as u64 + 1;
        let mut sets = self.shards[shard].0.lock().expect("limiter lock");
        let slots = &mut sets[set].0;
        let slot = match slots.iter().position(|s| s.fingerprint == hash) {
            Some(i) => &mut slots[i],
            None => {
                // The bucket nearest to full: forgetting it forgives the least.
                let victim = slots
                    .iter_mut()
                    .min_by_key(|s| s.full_at)
                    .expect("a set has slots");
                if victim.full_at > now {
                    self.forgiven.increment(1);
                }
                *victim = Slot {
                    fingerprint: hash,
                    full_at: 0,
                };
                victim
            }
        };
        let full_at = slot.full_at.max(now);
        let ahead = full_at - now;
        if ahead > self.tolerance {
            return Err(Duration::from_nanos(ahead - self.tolerance));
        }
        // Saturating: a rate of one a century has an interval past u64's nanoseconds.
        slot.full_at = full_at.saturating_add(self.interval);
        Ok(())
    }

    /// The shard and the set within it that hold `hash`, from disjoint bits of it.
    fn place(&self, hash: u64) -> (usize, usize) {
        (
            hash as usize % SHARDS,
            (hash / SHARDS as u64) as usize & (self.sets_per_shard - 1),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limiter(per_second: f64, burst: f64, keys: usize) -> Limiter {
        Limiter::new(Rate { per_second, burst }, keys, Counter::noop())
    }

    #[test]
    fn burst_then_refill() {
        let l = limiter(2.0, 3.0, 1024);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check(b"v", t0).is_ok());
        }
        let wait = l.check(b"v", t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert!(l.check(b"other", t0).is_ok(), "keys are independent");
        assert!(l.check(b"v", t0 + Duration::from_millis(499)).is_err());
        assert!(l.check(b"v", t0 + Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn a_table_a_quarter_full_remembers_every_bucket() {
        let l = limiter(1.0, 1.0, 100_000);
        assert_eq!(SHARDS * l.sets_per_shard * WAYS, 131_072);
        let t0 = Instant::now();
        // A quarter of the table's slots in use at once, each key's bucket empty.
        let keys = 32_768u32;
        for n in 0..keys {
            assert!(l.check(&n.to_le_bytes(), t0).is_ok());
        }
        let refused = (0..keys)
            .filter(|n| l.check(&n.to_le_bytes(), t0).is_err())
            .count();
        // A set can overflow by chance and forgive a bucket, and that key, checked again,
        // another: at a quarter load some 20 in 32,768 at most (with 4-way sets, hundreds).
        assert!(refused as u32 >= keys - keys / 200, "{refused} refused");
    }

    #[test]
    fn a_full_set_forgets_the_bucket_nearest_to_full() {
        let forgiven = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let l = Limiter::new(
            Rate {
                per_second: 1.0,
                burst: 1.0,
            },
            1,
            Counter::from_arc(forgiven.clone()),
        );
        assert_eq!(l.sets_per_shard, 1);
        // With one set per shard, keys of one shard share a set.
        let shard_of = |n: u32| l.place(l.hasher.hash_one(n.to_le_bytes())).0;
        let mut keys = (0..)
            .filter(|&n| shard_of(n) == shard_of(0))
            .map(u32::to_le_bytes);
        let mut key = || keys.next().unwrap();
        let limited = key();
        let full: Vec<_> = (1..WAYS).map(|_| key()).collect();
        let (fresh, newcomer) = (key(), key());
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        // Seven buckets full again at 1,000 ms; `limited`'s not until 2,500 ms.
        for k in &full {
            assert!(l.check(k, t0).is_ok());
        }
        assert!(l.check(&limited, at(1_500)).is_ok());
        // A ninth key needs a slot: a full bucket gives it up, at no cost, not `limited`.
        assert!(l.check(&fresh, at(1_600)).is_ok());
        assert!(
            l.check(&limited, at(1_700)).is_err(),
            "limited was forgotten"
        );
        assert_eq!(forgiven.load(std::sync::atomic::Ordering::Relaxed), 0);
        // Now every bucket in the set is short of full (`limited` 2,500 ms, `fresh` 2,600 ms,
        // the six used again 2,800 ms): the next key costs `limited`, the nearest to full.
        for k in &full[1..] {
            assert!(l.check(k, at(1_800)).is_ok());
        }
        assert!(l.check(&newcomer, at(1_900)).is_ok());
        assert_eq!(forgiven.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(
            l.check(&limited, at(1_950)).is_ok(),
            "limited was remembered"
        );
    }

    proptest! {
        #[test]
        fn never_admits_more_than_burst_plus_rate_times_elapsed(
            steps in proptest::collection::vec(0u64..200, 1..300),
            burst in 1.0f64..8.0,
        ) {
            let rate = Rate { per_second: 10.0, burst };
            let l = Limiter::new(rate, 64, Counter::noop());
            let t0 = Instant::now();
            let mut t = t0;
            let mut admitted = 0u32;
            for ms in steps {
                t += Duration::from_millis(ms);
                if l.check(b"k", t).is_ok() { admitted += 1; }
            }
            let bound = rate.burst + rate.per_second * t.duration_since(t0).as_secs_f64();
            prop_assert!(admitted as f64 <= bound + 1e-9);
        }
    }
}
