//! The timestamp that orders one voter's votes across regions.
//!
//! Wall-clock microseconds, made strictly monotonic per process so two votes from one ingest
//! never share a stamp; ties between regions are broken by [`crate::VoteId`]. "Latest vote wins"
//! compares `(stamp, vote_id)`, a total order every aggregator computes identically.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Stamp(pub u64);

impl Stamp {
    pub fn now() -> Self {
        Stamp(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0),
        )
    }
}

/// A hybrid clock: never goes backwards and never repeats, even if the wall clock steps back.
#[derive(Debug, Default)]
pub struct Clock {
    last: AtomicU64,
    /// Added to the wall clock: a host whose clock is off, as the fault drills make one.
    skew_micros: i64,
}

impl Clock {
    pub fn new() -> Self {
        Self::default()
    }

    /// A clock reading `skew_micros` ahead of the wall clock (behind, when negative).
    pub fn skewed(skew_micros: i64) -> Self {
        Self {
            skew_micros,
            ..Self::default()
        }
    }

    pub fn stamp(&self) -> Stamp {
        let wall = Stamp::now().0.saturating_add_signed(self.skew_micros);
        self.stamp_at(Stamp(wall))
    }

    /// The stamp for a vote arriving when the wall clock reads `wall`.
    pub fn stamp_at(&self, wall: Stamp) -> Stamp {
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = wall.0.max(last + 1);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Stamp(next),
                Err(seen) => last = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_strictly_increasing_even_when_the_wall_clock_steps_back() {
        let clock = Clock::new();
        let a = clock.stamp_at(Stamp(1_000));
        let b = clock.stamp_at(Stamp(900));
        let c = clock.stamp_at(Stamp(1_000));
        let d = clock.stamp_at(Stamp(5_000));
        assert_eq!([a.0, b.0, c.0, d.0], [1_000, 1_001, 1_002, 5_000]);
    }

    #[test]
    fn a_skewed_clock_reads_ahead_or_behind_the_wall() {
        let wall = Stamp::now().0;
        let ahead = Clock::skewed(5_000_000).stamp().0;
        let behind = Clock::skewed(-5_000_000).stamp().0;
        assert!(
            ahead >= wall + 5_000_000 && ahead < wall + 6_000_000,
            "{ahead} vs {wall}"
        );
        assert!(
            behind >= wall - 5_000_000 && behind < wall - 4_000_000,
            "{behind} vs {wall}"
        );
    }

    #[test]
    fn concurrent_stamps_never_repeat() {
        let clock = std::sync::Arc::new(Clock::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let clock = clock.clone();
                std::thread::spawn(move || (0..10_000).map(|_| clock.stamp().0).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
