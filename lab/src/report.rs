//! The load's report over time: per region, acknowledged votes, errors and latency second by
//! second; per shard, the Redis backlog; per replica, its lag. Saved as JSON and as one
//! self-contained HTML page whose plots are inline SVG, so it opens anywhere without a network.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::edge::RouteChange;
use crate::freshness::Freshness;
use std::collections::BTreeMap;

/// The percentiles plotted and reported for the whole run.
pub const PERCENTILES: &[(f64, &str)] = &[
    (0.5, "p50"),
    (0.9, "p90"),
    (0.99, "p99"),
    (0.999, "p99.9"),
    (0.9999, "p99.99"),
    (1.0, "max"),
];

/// A named line: `[x, y]` points.
#[derive(Debug, Serialize)]
pub struct Report {
    pub acknowledged: u64,
    pub counted: u64,
    pub lost: u64,
    pub doubled: u64,
    pub rate_target: f64,
    pub rate_achieved: f64,
    /// How the offered rate moved over the run (`rate_target` is its mean).
    pub shape: bench::load::Shape,
    pub seconds: f64,
    pub statuses: std::collections::BTreeMap<u16, u64>,
    pub transport_errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub voters: usize,
    /// Per region: how long after its `202` a vote showed in that region's results (ms).
    pub freshness_ms: BTreeMap<String, Freshness>,
    /// Where the plane pushed back (429, 503) and for how long.
    pub pushback: Vec<Pushback>,
    /// Per region: acknowledged votes, and whether its reader shows the primary's counts in every poll.
    pub regions: Vec<RegionReport>,
    pub drained_in_seconds: f64,
    /// When the edge sent a continent's voters to another region (a region's health changed).
    pub route_changes: Vec<RouteChange>,
    pub timeline: Timeline,
    /// The poll of the night, when the load voted in one: its close, its certified result.
    pub show: Option<ShowReport>,
    /// From the show's close to its certified result (as in `show`), for a rehearsal's summary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_seconds: Option<f64>,
}

/// A poll closed during the load, once certified final.
#[derive(Debug, Serialize)]
pub struct ShowReport {
    pub poll: String,
    /// Microseconds since the epoch.
    pub closes_at: u64,
    pub final_at: u64,
    /// From the close to the certified result.
    pub final_seconds: f64,
    pub certified: std::collections::BTreeMap<String, i64>,
    /// Each voter's latest acknowledged vote, counted by option.
    pub acknowledged: std::collections::BTreeMap<String, i64>,
    /// The certified counts are the acknowledged ones (checked when every vote was answered 202
    /// or 409, so every stored vote was acknowledged).
    pub counts_match_acknowledged: bool,
    pub digest: String,
    /// The ballots' recount agrees with the tallies and the certified counts and digest.
    pub audit_matches: bool,
    /// Votes stored but not counted because of their stamp (see `tally poll audit`).
    pub refused_late: i64,
    /// Votes acknowledged (202) with a stamp at or after the close: none, or the cut-off failed.
    pub acknowledged_after_close: u64,
}

/// One kind of pushback over a run: answers with `status`, in how many seconds of the run (in
/// the region that saw it longest), from the first such second to the end of the last.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Pushback {
    pub status: u16,
    pub answers: u64,
    pub seconds: u64,
    pub first_s: f64,
    pub last_s: f64,
}

/// The answers by which the plane asks voters to come back later.
const PUSHBACK: [u16; 2] = [429, 503];

#[derive(Debug, Serialize)]
pub struct RegionReport {
    pub name: String,
    pub acknowledged: u64,
    /// Its reader shows the primary's counts in every poll (against a target without a
    /// database: the counts acknowledged).
    pub results_match_primary: bool,
    pub reader_total: i64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Series {
    pub name: String,
    pub points: Vec<[f64; 2]>,
}

/// Everything plotted. Times are seconds since the load started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timeline {
    /// Votes due (offered) per second, per region: the open loop's schedule as it ran.
    pub offered_per_second: Vec<Series>,
    /// Acknowledged votes per second, per region.
    pub acknowledged_per_second: Vec<Series>,
    /// Answers other than 202, and failed connections, per second, per region.
    pub errors_per_second: Vec<Series>,
    /// 99th percentile latency (ms) of the requests due in each second, per region.
    pub p99_ms: Vec<Series>,
    /// Latency (ms) at each of [`PERCENTILES`] over the whole run, per region; x is the index.
    pub percentiles_ms: Vec<Series>,
    /// Votes waiting or in flight in each Redis shard, sampled every second.
    pub backlog: Vec<Series>,
    /// WAL bytes (KiB) each replica has yet to replay, as the primary sees it, every second.
    pub replica_lag_kib: Vec<Series>,
}

/// One region's answers, bucketed by the second each request was due.
pub struct RegionRecorder {
    name: String,
    seconds: Vec<Second>,
    whole: Histogram<u64>,
}

struct Second {
    acknowledged: u64,
    errors: u64,
    /// Answers with each [`PUSHBACK`] status.
    pushback: [u64; PUSHBACK.len()],
    latency: Histogram<u64>,
}

fn histogram(digits: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, digits).expect("static bounds")
}

impl RegionRecorder {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            seconds: Vec::new(),
            whole: histogram(3),
        }
    }

    pub fn record(&mut self, due_s: f64, latency_us: u64, status: Option<u16>, acknowledged: bool) {
        let i = due_s.max(0.0) as usize;
        while self.seconds.len() <= i {
            self.seconds.push(Second {
                acknowledged: 0,
                errors: 0,
                pushback: [0; PUSHBACK.len()],
                latency: histogram(2),
            });
        }
        let s = &mut self.seconds[i];
        if acknowledged {
            s.acknowledged += 1;
        } else {
            s.errors += 1;
        }
        if let Some(k) = PUSHBACK.iter().position(|p| Some(*p) == status) {
            s.pushback[k] += 1;
        }
        let _ = s.latency.record(latency_us);
        let _ = self.whole.record(latency_us);
    }

    /// Adds this region's lines to the timeline, and its pushback to `pushback`.
    pub fn finish(self, timeline: &mut Timeline, pushback: &mut Vec<Pushback>) {
        for (k, status) in PUSHBACK.iter().enumerate() {
            let busy: Vec<usize> = (0..self.seconds.len())
                .filter(|i| self.seconds[*i].pushback[k] > 0)
                .collect();
            let (Some(first), Some(last)) = (busy.first(), busy.last()) else {
                continue;
            };
            let answers = busy.iter().map(|i| self.seconds[*i].pushback[k]).sum();
            match pushback.iter_mut().find(|p| p.status == *status) {
                Some(p) => {
                    p.answers += answers;
                    p.seconds = p.seconds.max(busy.len() as u64);
                    p.first_s = p.first_s.min(*first as f64);
                    p.last_s = p.last_s.max(*last as f64 + 1.0);
                }
                None => pushback.push(Pushback {
                    status: *status,
                    answers,
                    seconds: busy.len() as u64,
                    first_s: *first as f64,
                    last_s: *last as f64 + 1.0,
                }),
            }
        }
        let at = |f: &dyn Fn(&Second) -> f64| Series {
            name: self.name.clone(),
            points: self
                .seconds
                .iter()
                .enumerate()
                .map(|(i, s)| [i as f64, f(s)])
                .collect(),
        };
        timeline
            .offered_per_second
            .push(at(&|s| (s.acknowledged + s.errors) as f64));
        timeline
            .acknowledged_per_second
            .push(at(&|s| s.acknowledged as f64));
        timeline.errors_per_second.push(at(&|s| s.errors as f64));
        timeline
            .p99_ms
            .push(at(&|s| s.latency.value_at_quantile(0.99) as f64 / 1000.0));
        timeline.percentiles_ms.push(Series {
            name: self.name.clone(),
            points: PERCENTILES
                .iter()
                .enumerate()
                .map(|(i, (q, _))| [i as f64, self.whole.value_at_quantile(*q) as f64 / 1000.0])
                .collect(),
        });
    }
}

/// Writes `report.json` and `report.html` into `dir`; returns the HTML page's path.
pub fn save(report: &Report, dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(report)?)?;
    let page = dir.join("report.html");
    std::fs::write(&page, html(report))?;
    Ok(page)
}

const PALETTE: &[&str] = &[
    "#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563",
];

pub fn html(r: &Report) -> String {
    let t = &r.timeline;
    let mut out = String::from(concat!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Tally load report</title><style>",
        "body{font:14px system-ui,sans-serif;margin:2em auto;max-width:800px;color:#111}",
        "table{border-collapse:collapse}td,th{padding:2px 10px;text-align:right;border-bottom:1px solid #ddd}",
        "th:first-child,td:first-child{text-align:left}figure{margin:1.5em 0}figcaption{font-weight:600;margin-bottom:4px}",
        ".legend{display:flex;gap:14px;flex-wrap:wrap;font-size:12px}.swatch{display:inline-block;width:10px;height:10px;margin-right:4px}",
        ".ok{color:#16a34a}.bad{color:#dc2626}svg text{font-size:11px;fill:#444}",
        "</style></head><body><h1>Tally load report</h1>"
    ));
    let verdict = if r.lost == 0 && r.doubled == 0 {
        "<span class=\"ok\">every acknowledged vote counted exactly once</span>"
    } else {
        "<span class=\"bad\">VOTES LOST OR DOUBLED</span>"
    };
    let _ = write!(
        out,
        "<p id=\"verdict\">{verdict}</p><table id=\"summary\"><tr><th>acknowledged</th><td>{}</td></tr><tr><th>counted</th><td>{}</td></tr>\
         <tr><th>lost</th><td>{}</td></tr><tr><th>doubled</th><td>{}</td></tr><tr><th>rate</th><td>{:.0}/s of {:.0}/s over {:.1} s</td></tr>\
         <tr><th>latency p50 / p99 / p99.9</th><td>{:.1} / {:.1} / {:.1} ms</td></tr><tr><th>statuses</th><td>{}</td></tr>\
         <tr><th>queues drained after the last vote</th><td>{:.1} s</td></tr></table>",
        r.acknowledged,
        r.counted,
        r.lost,
        r.doubled,
        r.rate_achieved,
        r.rate_target,
        r.seconds,
        r.p50_ms,
        r.p99_ms,
        r.p999_ms,
        escape(&serde_json::to_string(&r.statuses).unwrap_or_default()),
        r.drained_in_seconds
    );
    if let Some(s) = &r.show {
        let _ = write!(
            out,
            "<h2>The close</h2><table id=\"show\"><tr><th>poll</th><td>{}</td></tr>\
             <tr><th>closed to certified final</th><td>{:.1} s</td></tr>\
             <tr><th>certified counts</th><td>{}</td></tr><tr><th>digest</th><td>{}</td></tr>\
             <tr><th>matches what was acknowledged</th><td>{}</td></tr></table>",
            escape(&s.poll),
            s.final_seconds,
            escape(&serde_json::to_string(&s.certified).unwrap_or_default()),
            escape(&s.digest),
            if s.counts_match_acknowledged && s.audit_matches {
                "yes"
            } else {
                "NO"
            }
        );
    }
    out.push_str("<table id=\"regions\"><tr><th>region</th><th>acknowledged</th><th>reader shows</th><th>reader matches primary</th></tr>");
    for g in &r.regions {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&g.name),
            g.acknowledged,
            g.reader_total,
            if g.results_match_primary {
                "yes"
            } else {
                "<span class=\"bad\">no</span>"
            }
        );
    }
    out.push_str("</table>");
    out.push_str("<h2>Freshness</h2><p>How long after its <code>202</code> a vote showed in each region's results, from canary votes.</p><table id=\"freshness\"><tr><th>region</th><th>p50 ms</th><th>p99 ms</th><th>max ms</th><th>canaries</th><th>never seen</th><th>p99 by the region that took the vote</th></tr>");
    for (name, f) in &r.freshness_ms {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{:.0}</td><td>{:.0}</td><td>{:.0}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(name),
            f.p50,
            f.p99,
            f.max,
            f.samples,
            f.unseen,
            escape(
                &f.from
                    .iter()
                    .map(|(origin, s)| format!("{origin} {:.0}", s.p99))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        );
    }
    out.push_str("</table>");
    if r.pushback.is_empty() {
        out.push_str("<p id=\"pushback\">The plane never pushed back (no 429, no 503).</p>");
    } else {
        out.push_str("<h2>Pushback</h2><table id=\"pushback\"><tr><th>status</th><th>answers</th><th>seconds with any</th><th>from</th><th>to</th></tr>");
        for p in &r.pushback {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.0} s</td><td>{:.0} s</td></tr>",
                p.status, p.answers, p.seconds, p.first_s, p.last_s
            );
        }
        out.push_str("</table>");
    }
    let seconds = Axis::Seconds;
    out += &plot(
        "offered",
        &format!(
            "Votes per second offered ({:?} shape) and acknowledged, all regions",
            r.shape
        ),
        &[
            total("offered", &t.offered_per_second),
            total("acknowledged", &t.acknowledged_per_second),
        ],
        seconds,
    );
    out += &plot(
        "throughput",
        "Acknowledged votes per second, by region",
        &t.acknowledged_per_second,
        seconds,
    );
    out += &plot(
        "errors",
        "Errors per second (non-202 answers, failed connections), by region",
        &t.errors_per_second,
        seconds,
    );
    out += &plot(
        "latency",
        "p99 latency (ms) of the votes due each second, by region",
        &t.p99_ms,
        seconds,
    );
    out += &plot(
        "percentiles",
        "Latency percentiles over the whole run (ms), by region",
        &t.percentiles_ms,
        Axis::Percentiles,
    );
    out += &plot(
        "backlog",
        "Redis backlog (votes waiting or in flight), by shard",
        &t.backlog,
        seconds,
    );
    out += &plot(
        "replica-lag",
        "Replica lag (KiB of WAL not yet replayed), by replica",
        &t.replica_lag_kib,
        seconds,
    );
    out.push_str("</body></html>\n");
    out
}

#[derive(Clone, Copy)]
enum Axis {
    Seconds,
    Percentiles,
}

const W: f64 = 760.0;
const H: f64 = 240.0;
const LEFT: f64 = 64.0;
const BOTTOM: f64 = 24.0;
const TOP: f64 = 8.0;
const RIGHT: f64 = 12.0;

/// One line chart with axes, ticks and a legend.
fn plot(id: &str, caption: &str, series: &[Series], axis: Axis) -> String {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p[0]));
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p[1]));
    let x_max = xs.fold(1.0_f64, f64::max);
    let y_max = nice_ceiling(ys.fold(0.0_f64, f64::max));
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x_of = |x: f64| LEFT + x / x_max * pw;
    let y_of = |y: f64| TOP + ph - y / y_max * ph;

    let mut svg = format!(
        "<svg viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"{}\">",
        escape(caption)
    );
    for i in 0..=4 {
        let y = y_max * i as f64 / 4.0;
        let py = y_of(y);
        let _ = write!(
            svg,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{py:.1}\" y2=\"{py:.1}\" stroke=\"#e5e7eb\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            py + 4.0,
            short(y)
        );
    }
    match axis {
        Axis::Seconds => {
            let step = nice_ceiling(x_max / 8.0).max(1.0);
            let mut x = 0.0;
            while x <= x_max + 1e-9 {
                let _ = write!(
                    svg,
                    "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}s</text>",
                    x_of(x),
                    H - 6.0,
                    short(x)
                );
                x += step;
            }
        }
        Axis::Percentiles => {
            for (i, (_, label)) in PERCENTILES.iter().enumerate() {
                let _ = write!(
                    svg,
                    "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
                    x_of(i as f64),
                    H - 6.0
                );
            }
        }
    }
    let _ = write!(
        svg,
        "<line x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{}\" stroke=\"#9ca3af\"/>",
        TOP + ph
    );
    let mut legend = String::from("<div class=\"legend\">");
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let mut d = String::new();
        for (j, p) in s.points.iter().enumerate() {
            let _ = write!(
                d,
                "{}{:.1},{:.1}",
                if j == 0 { "M" } else { " L" },
                x_of(p[0]),
                y_of(p[1])
            );
        }
        if !d.is_empty() {
            let _ = write!(svg, "<path class=\"line\" data-series=\"{}\" d=\"{d}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>", escape(&s.name));
            if s.points.len() == 1 {
                let p = s.points[0];
                let _ = write!(
                    svg,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>",
                    x_of(p[0]),
                    y_of(p[1])
                );
            }
        }
        let _ = write!(
            legend,
            "<span><span class=\"swatch\" style=\"background:{color}\"></span>{}</span>",
            escape(&s.name)
        );
    }
    svg.push_str("</svg>");
    legend.push_str("</div>");
    format!(
        "<figure class=\"plot\" id=\"{id}\"><figcaption>{}</figcaption>{svg}{legend}</figure>",
        escape(caption)
    )
}

/// The regions' lines added up, second by second.
fn total(name: &str, lines: &[Series]) -> Series {
    let mut points: Vec<[f64; 2]> = Vec::new();
    for line in lines {
        for (i, p) in line.points.iter().enumerate() {
            if points.len() <= i {
                points.push([p[0], 0.0]);
            }
            points[i][1] += p[1];
        }
    }
    Series {
        name: name.into(),
        points,
    }
}

/// The smallest 1, 2 or 5 times a power of ten at or above `v` (1 for nothing to show).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|c| *c >= v * (1.0 - 1e-12))
        .unwrap_or(10.0 * magnitude)
}

fn short(v: f64) -> String {
    match v.abs() {
        a if a >= 1e6 => format!("{:.1}M", v / 1e6),
        a if a >= 1e4 => format!("{:.0}k", v / 1e3),
        a if a >= 100.0 || v.fract() == 0.0 => format!("{v:.0}"),
        _ => format!("{v:.2}"),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ceilings_are_one_two_or_five_times_a_power_of_ten() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(5.0), 5.0);
        assert_eq!(nice_ceiling(1234.0), 2000.0);
        assert_eq!(nice_ceiling(0.07), 0.1);
    }

    #[test]
    fn answers_are_bucketed_by_the_second_they_were_due() {
        let mut r = RegionRecorder::new("eu-west-1");
        r.record(0.2, 1_000, Some(202), true);
        r.record(0.9, 3_000, Some(503), false);
        r.record(2.5, 2_000, Some(202), true);
        r.record(4.1, 2_000, Some(503), false);
        r.record(4.2, 2_000, Some(429), false);
        let mut t = Timeline::default();
        let mut pushback = Vec::new();
        r.finish(&mut t, &mut pushback);
        assert_eq!(
            pushback,
            vec![
                Pushback {
                    status: 429,
                    answers: 1,
                    seconds: 1,
                    first_s: 4.0,
                    last_s: 5.0
                },
                Pushback {
                    status: 503,
                    answers: 2,
                    seconds: 2,
                    first_s: 0.0,
                    last_s: 5.0
                },
            ]
        );
        assert_eq!(t.offered_per_second[0].points[4], [4.0, 2.0]);
        assert_eq!(
            t.acknowledged_per_second[0].points[..3],
            [[0.0, 1.0], [1.0, 0.0], [2.0, 1.0]]
        );
        assert_eq!(
            t.errors_per_second[0].points[..3],
            [[0.0, 1.0], [1.0, 0.0], [2.0, 0.0]]
        );
        assert_eq!(t.percentiles_ms[0].points.len(), PERCENTILES.len());
        assert!((t.percentiles_ms[0].points.last().unwrap()[1] - 3.0).abs() < 0.01);
    }

    #[test]
    fn names_are_escaped_in_the_page() {
        let s = Series {
            name: "<script>".into(),
            points: vec![[0.0, 1.0], [1.0, 2.0]],
        };
        let svg = plot("x", "a & b", &[s], Axis::Seconds);
        assert!(
            !svg.contains("<script>")
                && svg.contains("&lt;script&gt;")
                && svg.contains("a &amp; b")
        );
        assert!(svg.contains("class=\"line\""));
    }
}
