//! Token-bucket rate limits keyed by voter or client address. Pure: the caller passes the time.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Rate;

const SHARDS: usize = 64;
/// Buckets idle this long are full again and can be forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Sharded so concurrent requests rarely contend on one lock.
pub struct Limiter {
    rate: Rate,
    shards: Vec<Mutex<HashMap<u64, Bucket>>>,
}

impl Limiter {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Takes a token for `key`, or says how long until one is available.
    pub fn check(&self, key: &[u8], now: Instant) -> Result<(), Duration> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let hash = h.finish();
        let mut shard = self.shards[(hash as usize) % SHARDS]
            .lock()
            .expect("limiter lock");
        if shard.len() > 100_000 {
            shard.retain(|_, b| now.duration_since(b.at) < FORGET_AFTER);
        }
        let b = shard.entry(hash).or_insert(Bucket {
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
