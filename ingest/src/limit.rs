//! Token-bucket rate limits keyed by voter or client address. Pure: the caller passes the time.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Rate;

const SHARDS: usize = 64;
/// Buckets idle this long are full again and can be forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// A shard is swept of forgotten buckets when it holds this many, then whenever it has doubled
/// since the last sweep. Until 2026-12-02 this was a fixed bound, so a shard holding more buckets
/// than it, all used within [`FORGET_AFTER`] (6.4 million voters a minute on one ingest), was
/// swept, whole, on every vote.
const SWEEP_FIRST_AT: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The map's keys are already hashes, keyed at random per limiter: hashing them again is waste.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

struct Shard {
    buckets: HashMap<u64, Bucket, BuildHasherDefault<Prehashed>>,
    sweep_at: usize,
    sweeps: u64,
}

/// Sharded so concurrent requests rarely contend on one lock. Keys are hashed with a key chosen
/// at random per limiter, so no one can pick voter ids that crowd one shard.
pub struct Limiter {
    rate: Rate,
    hasher: RandomState,
    sweep_first_at: usize,
    shards: Vec<Mutex<Shard>>,
}

impl Limiter {
    pub fn new(rate: Rate) -> Self {
        Self::sweeping_first_at(rate, SWEEP_FIRST_AT)
    }

    fn sweeping_first_at(rate: Rate, sweep_first_at: usize) -> Self {
        Self {
            rate,
            hasher: RandomState::new(),
            sweep_first_at,
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        buckets: HashMap::default(),
                        sweep_at: sweep_first_at,
                        sweeps: 0,
                    })
                })
                .collect(),
        }
    }

    /// Takes a token for `key`, or says how long until one is available.
    pub fn check(&self, key: &[u8], now: Instant) -> Result<(), Duration> {
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shards[(hash % SHARDS as u64) as usize]
            .lock()
            .expect("limiter lock");
        if shard.buckets.len() >= shard.sweep_at {
            shard
                .buckets
                .retain(|_, b| now.saturating_duration_since(b.at) < FORGET_AFTER);
            shard.sweep_at = (shard.buckets.len() * 2).max(self.sweep_first_at);
            shard.sweeps += 1;
        }
        let b = shard.buckets.entry(hash).or_insert(Bucket {
            tokens: self.rate.burst,
            at: now,
        });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.rate.per_second;
        b.tokens = (b.tokens + refill).min(self.rate.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - b.tokens) / self.rate.per_second,
            ))
        }
    }

    #[cfg(test)]
    fn held_and_sweeps(&self) -> (usize, u64) {
        self.shards.iter().fold((0, 0), |(held, sweeps), s| {
            let s = s.lock().expect("limiter lock");
            (held + s.buckets.len(), sweeps + s.sweeps)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn burst_then_refill() {
        let l = Limiter::new(Rate {
            per_second: 2.0,
            burst: 3.0,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check(b"v", t0).is_ok());
        }
        let wait = l.check(b"v", t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert!(l.check(b"other", t0).is_ok(), "keys are independent");
        assert!(l.check(b"v", t0 + Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn keys_seen_within_a_minute_are_swept_rarely_and_older_ones_forgotten() {
        let l = Limiter::sweeping_first_at(
            Rate {
                per_second: 1.0,
                burst: 1.0,
            },
            16,
        );
        let t0 = Instant::now();
        // 64,000 keys within one second: none can be forgotten. Every shard passes its first
        // bound of 16 and goes on doubling; a sweep per check past the bound would be ~63,000.
        for n in 0..64_000u32 {
            assert!(l.check(&n.to_le_bytes(), t0).is_ok());
        }
        let (held, sweeps) = l.held_and_sweeps();
        assert_eq!(held, 64_000);
        assert!(sweeps <= 64 * 8, "{sweeps} sweeps");
        // A minute on, the next sweep of each shard forgets them.
        let later = t0 + FORGET_AFTER + Duration::from_secs(1);
        for n in 64_000..200_000u32 {
            assert!(l.check(&n.to_le_bytes(), later).is_ok());
        }
        let (held, _) = l.held_and_sweeps();
        assert!(
            held <= 136_000,
            "{held} held: the old keys were never forgotten"
        );
        // A key forgotten is a full bucket again; one remembered is still empty.
        assert!(l.check(&1u32.to_le_bytes(), later).is_ok());
        assert!(l.check(&199_999u32.to_le_bytes(), later).is_err());
    }

    proptest! {
        #[test]
        fn never_admits_more_than_burst_plus_rate_times_elapsed(
            steps in proptest::collection::vec(0u64..200, 1..300)
        ) {
            let rate = Rate { per_second: 10.0, burst: 5.0 };
            let l = Limiter::new(rate);
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
