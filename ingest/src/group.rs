//! When a shard's queued votes go out as one write: the group-commit decision, without IO.
//!
//! A write costs Redis and ingest far more than a vote in it does (a wakeup and a round trip on
//! each side against a memcpy), so votes that arrive close together should share one. Under
//! saturation they do by themselves: while every write slot is busy, votes pile up and the next
//! write takes them all. Below saturation a slot is usually free and each vote would go out
//! nearly alone; there the first vote of a batch waits up to `linger` for company, like a Kafka
//! producer's `linger.ms`. A batch that reaches `target_votes` goes as soon as a slot is free (like
//! Kafka's `batch.size`, but only the wait's end: while every slot is busy a batch grows on to
//! `max_votes`, so a shard that stalled drains in big writes), and so does one that nobody else
//! can join: when every open connection that has voted already has a vote waiting on a shard (a
//! lone client voting vote by vote, a closed-loop benchmark), lingering would only add latency.
//!
//! The target is what lets the linger be long: with only `max_votes` (1,024) to end it, a linger
//! long enough to fill writes below saturation held votes back at saturation too, whenever a slot
//! came free before the next batch was big, and cost the closed loop more than Redis saved.
//!
//! Nor does a batch wait for votes that are not expected to come in time: the linger ends one
//! expected gap between votes early, the gap judged from the shard's recent [`Arrivals`]. A shard
//! taking a few hundred votes a second, where a 2 ms linger would gather less than one more, writes
//! each vote at once; one taking tens of thousands lingers all but the last few microseconds.

use std::time::Duration;

use tokio::time::Instant;

/// How a shard's writer forms its writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommit {
    /// Most votes one write carries.
    pub max_votes: usize,
    /// Votes that end a batch's linger: a batch this big (or `max_votes`, if fewer) goes as soon
    /// as a write slot is free.
    pub target_votes: usize,
    /// Writes one shard may have outstanding at once.
    pub max_in_flight: usize,
    /// How long the oldest vote of a batch may wait for others while a write slot is free.
    pub linger: Duration,
}

/// What the writer does next with the batch it is forming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Take up to `max_votes` queued votes and write them now.
    Cut,
    /// Every write slot is busy: wait for a write to finish.
    WaitForSlot,
    /// Wait for more votes until this instant (or until the batch is full).
    LingerUntil(Instant),
}

/// The batch being formed, as the writer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forming {
    /// Votes in the batch being formed (the shard's oldest; votes past `max_votes` wait in the
    /// next).
    pub queued: usize,
    /// When the oldest of them was queued.
    pub oldest: Instant,
    /// Writes this shard has outstanding.
    pub in_flight: usize,
    /// Whether a voter could still send a vote: some open connection that has voted has no vote
    /// waiting.
    pub more_may_come: bool,
    /// The shard's recent mean gap between votes ([`Arrivals::gap`]).
    pub gap: Duration,
}

impl GroupCommit {
    pub fn next(&self, batch: Forming, now: Instant) -> Next {
        if batch.in_flight >= self.max_in_flight {
            return Next::WaitForSlot;
        }
        // Past this instant the next vote is not expected before the linger is over.
        let until = batch.oldest + self.linger.saturating_sub(batch.gap);
        if self.is_enough(batch.queued) || now >= until || !batch.more_may_come {
            Next::Cut
        } else {
            Next::LingerUntil(until)
        }
    }

    /// Whether a batch of `votes` is big enough not to wait for more.
    pub fn is_enough(&self, votes: usize) -> bool {
        votes >= self.target_votes.min(self.max_votes)
    }
}

/// Over how long a shard's recent votes are counted to judge their rate: long enough to hold
/// dozens of votes at the rates where lingering pays (above one vote a linger), short enough
/// that a shard whose load fell stops lingering within a fraction of a second.
pub const ARRIVALS_WINDOW: Duration = Duration::from_millis(100);

/// A shard's recent votes, counted as they are written and decaying with [`ARRIVALS_WINDOW`]
/// as their time constant, so the count is about the rate times the window. Counting written
/// batches rather than each vote keeps it off the vote's path and under no lock: only the writer
/// updates it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Arrivals {
    recent: f64,
    at: Option<Instant>,
}

impl Arrivals {
    /// `votes` went out in a write at `now`.
    pub fn written(&mut self, now: Instant, votes: usize) {
        self.recent = self.decayed(now) + votes as f64;
        self.at = Some(now);
    }

    /// The mean gap between the shard's votes, judged at `now` from the recent ones and the
    /// `forming` votes not yet written; `Duration::MAX` while there are none.
    pub fn gap(&self, now: Instant, forming: usize) -> Duration {
        let votes = self.decayed(now) + forming as f64;
        if votes <= 0.0 {
            return Duration::MAX;
        }
        Duration::try_from_secs_f64(ARRIVALS_WINDOW.as_secs_f64() / votes).unwrap_or(Duration::MAX)
    }

    fn decayed(&self, now: Instant) -> f64 {
        match self.at {
            Some(at) => {
                let age = now.saturating_duration_since(at).as_secs_f64();
                self.recent * (-age / ARRIVALS_WINDOW.as_secs_f64()).exp()
            }
            None => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(max_votes: usize, max_in_flight: usize, linger_us: u64) -> GroupCommit {
        GroupCommit {
            max_votes,
            target_votes: max_votes,
            max_in_flight,
            linger: Duration::from_micros(linger_us),
        }
    }

    fn forming(queued: usize, oldest: Instant, in_flight: usize) -> Forming {
        Forming {
            queued,
            oldest,
            in_flight,
            more_may_come: true,
            gap: Duration::ZERO,
        }
    }

    #[test]
    fn a_lone_vote_waits_out_the_linger_then_goes() {
        let p = policy(1024, 2, 500);
        let t0 = Instant::now();
        let until = t0 + Duration::from_micros(500);
        assert_eq!(p.next(forming(1, t0, 0), t0), Next::LingerUntil(until));
        assert_eq!(
            p.next(forming(1, t0, 1), t0 + Duration::from_micros(499)),
            Next::LingerUntil(until)
        );
        assert_eq!(p.next(forming(1, t0, 1), until), Next::Cut);
    }

    #[test]
    fn a_full_batch_goes_at_once_and_no_linger_means_no_wait() {
        let t0 = Instant::now();
        assert_eq!(policy(64, 2, 500).next(forming(64, t0, 1), t0), Next::Cut);
        assert_eq!(policy(64, 2, 0).next(forming(1, t0, 0), t0), Next::Cut);
    }

    #[test]
    fn a_batch_that_reaches_its_target_goes_at_once_and_a_smaller_one_lingers() {
        let t0 = Instant::now();
        let p = GroupCommit {
            target_votes: 64,
            ..policy(1024, 2, 2000)
        };
        assert_eq!(p.next(forming(64, t0, 1), t0), Next::Cut);
        assert_eq!(
            p.next(forming(63, t0, 1), t0),
            Next::LingerUntil(t0 + Duration::from_micros(2000))
        );
        // A target above the most a write carries is met at that most.
        let above = GroupCommit {
            target_votes: 4096,
            ..policy(16, 2, 2000)
        };
        assert_eq!(above.next(forming(16, t0, 0), t0), Next::Cut);
    }

    #[test]
    fn a_batch_nobody_else_can_join_goes_at_once() {
        let t0 = Instant::now();
        let alone = Forming {
            more_may_come: false,
            ..forming(3, t0, 0)
        };
        assert_eq!(policy(64, 2, 500).next(alone, t0), Next::Cut);
    }

    #[test]
    fn no_write_starts_while_every_slot_is_busy() {
        let t0 = Instant::now();
        let late = t0 + Duration::from_secs(1);
        let full = Forming {
            more_may_come: false,
            ..forming(5000, t0, 2)
        };
        assert_eq!(policy(64, 2, 500).next(full, late), Next::WaitForSlot);
    }

    #[test]
    fn a_batch_waits_only_while_another_vote_is_expected_before_the_linger_ends() {
        let t0 = Instant::now();
        let p = GroupCommit {
            target_votes: 64,
            ..policy(1024, 2, 2000)
        };
        let at = |votes_a_second: u64| Forming {
            gap: Duration::from_secs(1) / votes_a_second as u32,
            ..forming(1, t0, 0)
        };
        // 300 votes a second: the next is 3.3 ms away, after a 2 ms linger would be over.
        assert_eq!(p.next(at(300), t0), Next::Cut);
        // 2,000 a second: the next is 0.5 ms away, so it waits until 0.5 ms before the linger ends.
        assert_eq!(
            p.next(at(2_000), t0),
            Next::LingerUntil(t0 + Duration::from_micros(1_500))
        );
        assert_eq!(
            p.next(at(2_000), t0 + Duration::from_micros(1_500)),
            Next::Cut
        );
        // 50,000 a second: all but the last 20 µs.
        assert_eq!(
            p.next(at(50_000), t0),
            Next::LingerUntil(t0 + Duration::from_micros(1_980))
        );
    }

    /// `written` calls, each `every` apart, of `votes` each, the last at the returned instant.
    fn steady(
        arrivals: &mut Arrivals,
        t0: Instant,
        every: Duration,
        votes: usize,
        writes: u32,
    ) -> Instant {
        let mut now = t0;
        for i in 0..writes {
            now = t0 + every * i;
            arrivals.written(now, votes);
        }
        now
    }

    #[test]
    fn arrivals_judge_the_recent_rate_and_forget_an_old_one() {
        let t0 = Instant::now();
        let mut arrivals = Arrivals::default();
        assert_eq!(arrivals.gap(t0, 0), Duration::MAX);
        // Never written to, the votes forming count alone.
        let gap = arrivals.gap(t0, 4).abs_diff(ARRIVALS_WINDOW / 4);
        assert!(gap < Duration::from_micros(1), "{gap:?} off");
        // 64 votes a millisecond for a second: a gap of 1/64 ms.
        let now = steady(&mut arrivals, t0, Duration::from_millis(1), 64, 1000);
        let gap = arrivals.gap(now, 0).as_nanos() as f64;
        assert!((gap - 15_625.0).abs() < 15_625.0 * 0.02, "{gap} ns");
        // Five windows of silence later the rate has fallen below 1,000 votes a second.
        assert!(arrivals.gap(now + ARRIVALS_WINDOW * 5, 0) > Duration::from_millis(1));
    }

    proptest! {
        #[test]
        fn arrivals_come_to_any_steady_rate(
            every_us in 10u64..5_000,
            votes in 1usize..1024,
        ) {
            let t0 = Instant::now();
            let every = Duration::from_micros(every_us);
            let mut arrivals = Arrivals::default();
            // Twenty windows' worth of writes at one rate.
            let writes = (ARRIVALS_WINDOW.as_micros() as u64 * 20 / every_us) as u32;
            let now = steady(&mut arrivals, t0, every, votes, writes);
            let expected = every.as_secs_f64() / votes as f64;
            let gap = arrivals.gap(now, 0).as_secs_f64();
            // Right after a write the decayed count is at its peak: within one write's share
            // (and the nanosecond a `Duration` rounds to).
            let share = every.as_secs_f64() / ARRIVALS_WINDOW.as_secs_f64();
            prop_assert!(gap <= expected * 1.01 + 1e-9, "{gap} against {expected}");
            prop_assert!(gap >= expected * (1.0 - share) * 0.99 - 1e-9, "{gap} against {expected}");
        }

        #[test]
        fn the_decision_keeps_every_bound(
            max_votes in 1usize..2048,
            target_votes in 1usize..4096,
            max_in_flight in 1usize..8,
            linger_us in 0u64..5_000,
            queued in 1usize..4096,
            in_flight in 0usize..10,
            age_us in 0u64..10_000,
            more_may_come: bool,
            gap_us in prop_oneof![0u64..5_000, Just(u64::MAX)],
        ) {
            let p = GroupCommit { target_votes, ..policy(max_votes, max_in_flight, linger_us) };
            let enough = target_votes.min(max_votes);
            let oldest = Instant::now();
            let now = oldest + Duration::from_micros(age_us);
            let gap = Duration::from_micros(gap_us);
            let batch = Forming { queued, oldest, in_flight, more_may_come, gap };
            // The wait that the gap leaves: none once the next vote is due after the linger.
            let wait_us = linger_us.saturating_sub(gap_us);
            match p.next(batch, now) {
                // A write starts only into a free slot, and only when it is big enough, nobody
                // else can join it, or its oldest vote has waited as long as another vote could
                // still come within the linger.
                Next::Cut => {
                    prop_assert!(in_flight < max_in_flight);
                    prop_assert!(queued >= enough || !more_may_come || age_us >= wait_us);
                }
                Next::WaitForSlot => prop_assert!(in_flight >= max_in_flight),
                // Lingering never holds the oldest vote longer than the linger less the gap, and
                // never holds a batch that is big enough or that nobody else can join.
                Next::LingerUntil(until) => {
                    prop_assert!(in_flight < max_in_flight);
                    prop_assert!(queued < enough && more_may_come);
                    prop_assert!(until > now);
                    prop_assert_eq!(until, oldest + Duration::from_micros(wait_us));
                }
            }
        }
    }
}
