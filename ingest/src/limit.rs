//! Per-key rate limits, by voter or client address, as GCRA: a token bucket kept as one
//! timestamp, the moment the key's bucket is full again. The keys live in a table of fixed size,
//! so a flood of new keys costs no memory, and a check touches one set of it: two adjacent cache
//! lines holding the set's lock and its slots. Pure: the caller passes the time.
//!
//! With many voters the table is far larger than the CPU's caches, so a check's set is nearly
//! always a miss to memory (measured at ~0.25 µs a vote, the largest single cost ingest adds to a
//! request). [`Limiter::locate`] finds the set and starts its load, so the caller can do other
//! work (read and decode the body) while it arrives, and [`Bucket::take`] then finds it in cache.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use metrics::Counter;

use crate::config::Rate;

/// Slots per set: 7 of 16 bytes and the set's lock fill two cache lines, which the CPU fetches
/// as a pair. With 4, a set overflowed by chance often enough to forget 6% of the buckets of a
/// half-full table.
const WAYS: usize = 7;

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// The key's whole hash; a slot never holds a key, only this.
    fingerprint: u64,
    /// Nanoseconds after the limiter's epoch when this key's bucket is full again (GCRA's
    /// theoretical arrival time). At or before now, the slot may be reused at no cost: a full
    /// bucket is what a key never seen gets. Zero in a slot never used.
    full_at: u64,
}

/// A lock a set: concurrent checks contend only on the same set, and taking the lock fetches the
/// slots with it.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Set(Mutex<[Slot; WAYS]>);

const _: () = assert!(
    std::mem::size_of::<Set>() == 128,
    "a set is two cache lines"
);

/// A key's bucket, located by [`Limiter::locate`] in that limiter's table.
#[derive(Clone, Copy)]
pub struct Bucket<'a> {
    limiter: &'a Limiter,
    hash: u64,
    set: usize,
}

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
    sets: Box<[Set]>,
    /// Counts buckets forgotten before they were full again, because no bucket in their set was
    /// full: the table is too small for the keys in use.
    forgiven: Counter,
}

impl Limiter {
    /// A limiter with room for at least `keys` keys; `forgiven` counts what a too-small table
    /// forgets.
    pub fn new(rate: Rate, keys: usize, forgiven: Counter) -> Self {
        let interval = (1e9 / rate.per_second).ceil().max(1.0) as u64;
        Self {
            interval,
            tolerance: ((rate.burst - 1.0) * interval as f64) as u64,
            hasher: RandomState::new(),
            epoch: Instant::now(),
            sets: table(keys.div_ceil(WAYS).max(1)),
            forgiven,
        }
    }

    /// Takes a token for `key`, or says how long until one is available.
    pub fn check(&self, key: &[u8], now: Instant) -> Result<(), Duration> {
        self.locate(key).take(now)
    }

    /// Finds `key`'s bucket and has the CPU start loading its set.
    pub fn locate(&self, key: &[u8]) -> Bucket<'_> {
        let hash = self.hasher.hash_one(key);
        // The hash's high bits scaled to the table (Lemire's multiply-shift): any table size,
        // no division.
        let set = ((u128::from(hash) * self.sets.len() as u128) >> 64) as usize;
        prefetch(&self.sets[set]);
        Bucket {
            limiter: self,
            hash,
            set,
        }
    }
}

impl Bucket<'_> {
    /// Takes a token from this bucket, or says how long until one is available.
    pub fn take(self, now: Instant) -> Result<(), Duration> {
        let limiter = self.limiter;
        // Never zero, so a slot never used reads as a bucket full long ago.
        let now = now.saturating_duration_since(limiter.epoch).as_nanos() as u64 + 1;
        // Nothing under the lock can leave a set half-changed.
        let mut slots = limiter.sets[self.set]
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let slot = match slots.iter().position(|s| s.fingerprint == self.hash) {
            Some(i) => &mut slots[i],
            None => {
                // The bucket nearest to full: forgetting it forgives the least.
                let victim = slots
                    .iter_mut()
                    .min_by_key(|s| s.full_at)
                    .expect("a set has slots");
                if victim.full_at > now {
                    limiter.forgiven.increment(1);
                }
                *victim = Slot {
                    fingerprint: self.hash,
                    full_at: 0,
                };
                victim
            }
        };
        let full_at = slot.full_at.max(now);
        let ahead = full_at - now;
        if ahead > limiter.tolerance {
            return Err(Duration::from_nanos(ahead - limiter.tolerance));
        }
        // Saturating: a rate of one a century has an interval past u64's nanoseconds.
        slot.full_at = full_at.saturating_add(limiter.interval);
        Ok(())
    }
}

/// `sets` empty sets, in memory the kernel is asked to back with huge pages: a table of many
/// 4 KiB pages misses the TLB on most checks as well as the cache, and the prefetch waits for
/// that page walk (~0.2 µs a vote measured, nearly all of what the prefetch left).
fn table(sets: usize) -> Box<[Set]> {
    let mut table = Vec::with_capacity(sets);
    // Advised before the first write, so the pages are huge from their first fault.
    advise_huge_pages(table.spare_capacity_mut());
    table.resize_with(sets, Set::default);
    table.into_boxed_slice()
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn advise_huge_pages<T>(memory: &mut [T]) {
    const PAGE: usize = 4096;
    let start = memory.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(memory);
    let (first, last) = (start.next_multiple_of(PAGE), end / PAGE * PAGE);
    if first < last {
        // SAFETY: the range lies within `memory`, which this function borrows mutably, so nothing
        // else uses it; MADV_HUGEPAGE changes only how the kernel backs those pages, never their
        // contents. Where the kernel does not do huge pages it fails, and the table works as
        // before, so the result is ignored.
        unsafe {
            libc::madvise(
                first as *mut libc::c_void,
                last - first,
                libc::MADV_HUGEPAGE,
            );
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages<T>(_: &mut [T]) {}

/// Asks the CPU to bring both cache lines of `set` in, without waiting for them.
#[inline]
#[allow(unsafe_code)]
fn prefetch(set: &Set) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let first = (set as *const Set).cast::<i8>();
        // SAFETY: `_mm_prefetch` is a hint: it reads nothing into the program, never faults, and
        // needs only SSE, which every x86-64 CPU has. Both lines lie inside `set`.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(first);
            _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(64));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = set;
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
        let slots = l.sets.len() * WAYS;
        assert!((100_000..100_000 + WAYS).contains(&slots), "{slots} slots");
        let t0 = Instant::now();
        // A quarter of the table's slots in use at once, each key's bucket empty.
        let keys = (slots / 4) as u32;
        for n in 0..keys {
            assert!(l.check(&n.to_le_bytes(), t0).is_ok());
        }
        let refused = (0..keys)
            .filter(|n| l.check(&n.to_le_bytes(), t0).is_err())
            .count();
        // A set can overflow by chance and forgive a bucket, and that key, checked again,
        // another: at a quarter load some 20 in 25,000 at most (with 4-way sets, hundreds).
        assert!(
            refused as u32 >= keys - keys / 200,
            "{refused} refused of {keys}"
        );
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
        // Room for one key is one set, which every key shares.
        assert_eq!(l.sets.len(), 1);
        let mut keys = (0u32..).map(u32::to_le_bytes);
        let mut key = || keys.next().unwrap();
        let limited = key();
        let full: Vec<_> = (1..WAYS).map(|_| key()).collect();
        let (fresh, newcomer) = (key(), key());
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        // Six buckets full again at 1,000 ms; `limited`'s not until 2,500 ms.
        for k in &full {
            assert!(l.check(k, t0).is_ok());
        }
        assert!(l.check(&limited, at(1_500)).is_ok());
        // An eighth key needs a slot: a full bucket gives it up, at no cost, not `limited`.
        assert!(l.check(&fresh, at(1_600)).is_ok());
        assert!(
            l.check(&limited, at(1_700)).is_err(),
            "limited was forgotten"
        );
        assert_eq!(forgiven.load(std::sync::atomic::Ordering::Relaxed), 0);
        // Now every bucket in the set is short of full (`limited` 2,500 ms, `fresh` 2,600 ms,
        // the five used again 2,800 ms): the next key costs `limited`, the nearest to full.
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
