//! A latency histogram for a path taken on every request: counted into its buckets as it is
//! recorded, and rendered on `/metrics` beside the recorder's metrics in the same text format.
//!
//! The Prometheus recorder keeps every histogram sample (the value and the time it came, pushed
//! onto a shared list under an epoch guard) until its upkeep folds them in: on ingest's vote path
//! that was a clock read and ~0.1 µs a vote, and 16 bytes a vote held for up to a second. Here a
//! sample is two relaxed additions to counters of the recording thread's own stripe.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

/// Latency buckets (seconds) for every `_seconds` histogram, this one's and the recorder's: 100 µs to 10 s.
pub(crate) const SECONDS_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Counters are kept this many times over, each thread adding to one of them, so two cores
/// recording at once do not pull one cache line back and forth.
const STRIPES: usize = 16;

/// Bounds (the recorder's `_seconds` buckets) and the `+Inf` bucket past them.
const BUCKETS: usize = SECONDS_BUCKETS.len() + 1;

#[repr(align(128))]
#[derive(Default)]
struct Stripe {
    buckets: [AtomicU64; BUCKETS],
    sum_nanos: AtomicU64,
}

struct Series {
    name: &'static str,
    /// Rendered labels, `key="value"` joined by commas.
    labels: String,
    stripes: Box<[Stripe]>,
}

/// A `_seconds` histogram with the recorder's `_seconds` buckets. Handles with the same name and
/// labels count into the same series.
#[derive(Clone)]
pub struct LatencyHistogram(Arc<Series>);

/// Every series made in this process, rendered by [`render`] in the order they were made.
fn registry() -> &'static Mutex<Vec<Arc<Series>>> {
    static SERIES: OnceLock<Mutex<Vec<Arc<Series>>>> = OnceLock::new();
    SERIES.get_or_init(Mutex::default)
}

/// Nanoseconds of each bound, for comparing a sample without converting it to seconds.
fn bounds_nanos() -> &'static [u64; BUCKETS - 1] {
    static BOUNDS: OnceLock<[u64; BUCKETS - 1]> = OnceLock::new();
    BOUNDS.get_or_init(|| SECONDS_BUCKETS.map(|s| Duration::from_secs_f64(s).as_nanos() as u64))
}

/// The stripe this thread adds to: threads take them in turn as they first record.
fn stripe_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
    }
    INDEX.with(|index| {
        index.get().unwrap_or_else(|| {
            let i = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
            index.set(Some(i));
            i
        })
    })
}

impl LatencyHistogram {
    /// The series `name` with `labels`; the name must end in `_seconds`.
    pub fn new(name: &'static str, labels: &[(&str, &str)]) -> Self {
        debug_assert!(
            name.ends_with("_seconds"),
            "{name} is not a _seconds histogram"
        );
        let mut rendered = String::new();
        for (key, value) in labels {
            if !rendered.is_empty() {
                rendered.push(',');
            }
            let value = value
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = write!(rendered, "{key}=\"{value}\"");
        }
        let mut series = registry().lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = series
            .iter()
            .find(|s| s.name == name && s.labels == rendered)
        {
            return Self(existing.clone());
        }
        let made = Arc::new(Series {
            name,
            labels: rendered,
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
        });
        series.push(made.clone());
        Self(made)
    }

    pub fn record(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let bucket = bounds_nanos().partition_point(|&bound| bound < nanos);
        let stripe = &self.0.stripes[stripe_index()];
        stripe.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        stripe.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// Every series in the Prometheus text format, one `# TYPE` line a name.
pub(crate) fn render(out: &mut String) {
    let series = registry()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let mut names: Vec<&'static str> = series.iter().map(|s| s.name).collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        let _ = writeln!(out, "# TYPE {name} histogram");
        for s in series.iter().filter(|s| s.name == name) {
            let mut counts = [0u64; BUCKETS];
            let mut sum_nanos = 0u64;
            for stripe in s.stripes.iter() {
                for (count, bucket) in counts.iter_mut().zip(&stripe.buckets) {
                    *count += bucket.load(Ordering::Relaxed);
                }
                sum_nanos = sum_nanos.wrapping_add(stripe.sum_nanos.load(Ordering::Relaxed));
            }
            let (sep, labels) = if s.labels.is_empty() {
                ("", String::new())
            } else {
                (",", format!("{{{}}}", s.labels))
            };
            let mut cumulative = 0;
            for (i, count) in counts.iter().enumerate() {
                cumulative += count;
                let le = SECONDS_BUCKETS
                    .get(i)
                    .map_or_else(|| "+Inf".to_string(), f64::to_string);
                let _ = writeln!(
                    out,
                    "{name}_bucket{{{}{sep}le=\"{le}\"}} {cumulative}",
                    s.labels
                );
            }
            let _ = writeln!(out, "{name}_sum{labels} {}", sum_nanos as f64 / 1e9);
            let _ = writeln!(out, "{name}_count{labels} {cumulative}");
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered() -> String {
        let mut out = String::new();
        render(&mut out);
        out
    }

    #[test]
    fn samples_land_in_the_first_bucket_at_or_above_them_and_add_up() {
        let h = LatencyHistogram::new("tally_test_render_seconds", &[("region", "eu")]);
        // On a bound counts in that bound's bucket, as Prometheus's `le` says.
        h.record(Duration::from_micros(100));
        h.record(Duration::from_micros(101));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60));
        // From another thread, into another stripe: still one series.
        let other = h.clone();
        std::thread::spawn(move || other.record(Duration::from_millis(3)))
            .join()
            .unwrap();
        let out = rendered();
        for line in [
            "# TYPE tally_test_render_seconds histogram",
            "tally_test_render_seconds_bucket{region=\"eu\",le=\"0.0001\"} 1",
            "tally_test_render_seconds_bucket{region=\"eu\",le=\"0.00025\"} 2",
            "tally_test_render_seconds_bucket{region=\"eu\",le=\"0.0025\"} 2",
            "tally_test_render_seconds_bucket{region=\"eu\",le=\"0.005\"} 4",
            "tally_test_render_seconds_bucket{region=\"eu\",le=\"10\"} 4",
            "tally_test_render_seconds_bucket{region=\"eu\",le=\"+Inf\"} 5",
            "tally_test_render_seconds_sum{region=\"eu\"} 60.006201",
            "tally_test_render_seconds_count{region=\"eu\"} 5",
        ] {
            assert!(out.lines().any(|l| l == line), "no {line:?} in\n{out}");
        }
    }

    #[test]
    fn one_name_is_one_type_line_and_one_series_per_label_set() {
        let a = LatencyHistogram::new("tally_test_series_seconds", &[("region", "a")]);
        let again = LatencyHistogram::new("tally_test_series_seconds", &[("region", "a")]);
        let b = LatencyHistogram::new("tally_test_series_seconds", &[("region", "b\"q")]);
        a.record(Duration::from_millis(1));
        again.record(Duration::from_millis(1));
        b.record(Duration::from_millis(1));
        let out = rendered();
        let type_lines = out
            .lines()
            .filter(|l| *l == "# TYPE tally_test_series_seconds histogram")
            .count();
        assert_eq!(type_lines, 1, "{out}");
        assert!(
            out.contains("tally_test_series_seconds_count{region=\"a\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("tally_test_series_seconds_count{region=\"b\\\"q\"} 1\n"),
            "{out}"
        );
    }
}
