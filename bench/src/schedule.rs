//! When each request of an open loop is due. A steady loop sends at one rate; a shaped one
//! follows the night of a TV vote: the surge when lines open, a calm middle, the rush before
//! the close. Every shape keeps the mean rate asked for, so runs of different shapes offer the
//! same number of votes.

use std::time::Duration;

/// How the offered rate moves over a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// The mean rate throughout.
    #[default]
    Steady,
    /// From nothing to twice the mean, linearly.
    Ramp,
    /// The first tenth at several times the mean (lines open), then below it.
    Surge,
    /// A surge when lines open, a steady middle, and a rush that builds until the close.
    Show,
}

/// `(x, rate)` corners of a shape, `x` from 0 to 1 of the run; the rate is linear between
/// corners and relative (scaled so its mean is 1).
fn corners(shape: Shape) -> &'static [(f64, f64)] {
    match shape {
        Shape::Steady => &[(0.0, 1.0), (1.0, 1.0)],
        Shape::Ramp => &[(0.0, 0.0), (1.0, 1.0)],
        Shape::Surge => &[(0.0, 6.0), (0.1, 6.0), (0.1, 1.0), (1.0, 1.0)],
        Shape::Show => &[(0.0, 6.0), (0.1, 6.0), (0.1, 1.0), (0.8, 1.0), (1.0, 3.0)],
    }
}

/// The due times of an open loop's requests: `total` of them over `duration`, offered at
/// `mean_rate` on average, shaped by `shape`.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub shape: Shape,
    pub mean_rate: f64,
    pub duration: Duration,
    pub total: u64,
    /// Per corner: the share of all requests due before it.
    before: Vec<f64>,
    area: f64,
}

impl Schedule {
    pub fn new(shape: Shape, mean_rate: f64, duration: Duration) -> Self {
        let c = corners(shape);
        let mut before = vec![0.0];
        for w in c.windows(2) {
            let last = *before.last().expect("one at least");
            before.push(last + (w[1].0 - w[0].0) * (w[0].1 + w[1].1) / 2.0);
        }
        let area = *before.last().expect("one at least");
        for b in &mut before {
            *b /= area;
        }
        Self {
            shape,
            mean_rate,
            duration,
            total: (mean_rate * duration.as_secs_f64()).round() as u64,
            before,
            area,
        }
    }

    pub fn steady(rate: f64, duration: Duration) -> Self {
        Self::new(Shape::Steady, rate, duration)
    }

    /// The offered rate, per second, `at` into the run.
    pub fn rate_at(&self, at: Duration) -> f64 {
        let x = (at.as_secs_f64() / self.duration.as_secs_f64()).clamp(0.0, 1.0);
        let c = corners(self.shape);
        let i = c
            .windows(2)
            .rposition(|w| w[0].0 <= x && x <= w[1].0 && w[0].0 < w[1].0)
            .unwrap_or(0);
        let ((x0, r0), (x1, r1)) = (c[i], c[i + 1]);
        (r0 + (r1 - r0) * (x - x0) / (x1 - x0)) / self.area * self.mean_rate
    }

    /// When the `n`th request is due, from the start: where the share of requests due so far
    /// reaches `n / total`. Counted from the start each time, not as intervals, whose rounding
    /// adds up (46 µs over a second at 91,603/s) and pushed a loop's last requests past its end.
    pub fn due(&self, n: u64) -> Duration {
        if self.shape == Shape::Steady {
            return Duration::from_secs_f64(n as f64 / self.mean_rate);
        }
        let share = n as f64 / self.total.max(1) as f64;
        let c = corners(self.shape);
        let i = self
            .before
            .windows(2)
            .position(|b| share < b[1])
            .unwrap_or(c.len() - 2);
        let ((x0, r0), (x1, r1)) = (c[i], c[i + 1]);
        // Within the segment the rate is linear, so the share is quadratic in x: solve
        // area * (share - before) = r0 * d + (r1 - r0) / (x1 - x0) * d² / 2 for d.
        let want = (share - self.before[i]) * self.area;
        let slope = if x1 > x0 { (r1 - r0) / (x1 - x0) } else { 0.0 };
        let d = if slope.abs() < 1e-12 {
            if r0 > 0.0 {
                want / r0
            } else {
                0.0
            }
        } else {
            (-r0 + (r0 * r0 + 2.0 * slope * want).max(0.0).sqrt()) / slope
        };
        let x = (x0 + d.max(0.0)).min(1.0);
        Duration::from_secs_f64(x * self.duration.as_secs_f64())
    }

    /// Requests due in each second of the run, as scheduled: the offered-rate line of a report.
    pub fn offered_per_second(&self) -> Vec<u64> {
        let seconds = self.duration.as_secs_f64().ceil() as usize;
        let mut out = vec![0u64; seconds.max(1)];
        for n in 0..self.total {
            let s = (self.due(n).as_secs_f64() as usize).min(out.len() - 1);
            out[s] += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_request_of_a_steady_loop_is_due_within_it() {
        for rate in [1.0f64, 3.0, 7_919.0, 91_603.444_354_063_55, 250_000.0] {
            for seconds in [1.0f64, 3.0] {
                let s = Schedule::steady(rate, Duration::from_secs_f64(seconds));
                assert!(s.due(s.total - 1) < s.duration, "{rate}/s over {seconds} s");
            }
        }
    }

    #[test]
    fn a_show_opens_with_its_surge_and_ends_with_its_rush() {
        let s = Schedule::new(Shape::Show, 1_000.0, Duration::from_secs(30));
        let offered = s.offered_per_second();
        assert_eq!(offered.iter().sum::<u64>(), 30_000);
        let surge = 6.0 / 1.7 * 1_000.0;
        for (second, n) in offered.iter().enumerate().take(3) {
            let n = *n as f64;
            assert!(
                (n - surge).abs() < surge * 0.01,
                "second {second}: {n} offered, the surge is {surge:.0}/s"
            );
        }
        let calm = 1.0 / 1.7 * 1_000.0;
        assert!((offered[10] as f64 - calm).abs() < calm * 0.01);
        assert!(offered[29] > offered[24] && offered[24] > offered[10]);
        assert!((s.rate_at(Duration::from_secs_f64(29.99)) - 3.0 / 1.7 * 1_000.0).abs() < 5.0);
    }

    proptest! {
        #[test]
        fn every_shape_keeps_its_requests_in_order_within_the_run(
            shape in prop_oneof![Just(Shape::Steady), Just(Shape::Ramp), Just(Shape::Surge), Just(Shape::Show)],
            rate in 1.0f64..50_000.0,
            seconds in 1u64..120,
        ) {
            let s = Schedule::new(shape, rate, Duration::from_secs(seconds));
            let step = (s.total / 2_000).max(1);
            let mut last = Duration::ZERO;
            for n in (0..s.total).step_by(step as usize).chain(s.total.checked_sub(1)) {
                let due = s.due(n);
                prop_assert!(due >= last, "request {n} due before the one before it");
                prop_assert!(due <= s.duration);
                last = due;
            }
        }

        #[test]
        fn the_requests_due_follow_the_rate(
            shape in prop_oneof![Just(Shape::Ramp), Just(Shape::Surge), Just(Shape::Show)],
            at in 0.02f64..0.98,
        ) {
            // Near any instant, the requests due per second are the shape's rate there.
            let s = Schedule::new(shape, 10_000.0, Duration::from_secs(100));
            let t = Duration::from_secs_f64(at * 100.0);
            let due_by = |t: Duration| {
                let (mut lo, mut hi) = (0, s.total);
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    if s.due(mid) < t { lo = mid + 1 } else { hi = mid }
                }
                lo as f64
            };
            let width = Duration::from_millis(200);
            let measured = (due_by(t + width) - due_by(t)) / width.as_secs_f64();
            // The shape's mean rate over the window, integrated: a window may straddle a step.
            let expected = (0..200)
                .map(|i| s.rate_at(t + width.mul_f64((i as f64 + 0.5) / 200.0)))
                .sum::<f64>()
                / 200.0;
            prop_assert!((measured - expected).abs() <= expected * 0.05 + 20.0,
                "{shape:?} at {at}: {measured}/s due, the shape says {expected}/s");
        }
    }
}
