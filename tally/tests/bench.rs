//! `tally bench ingest`, `reader` and `aggregator --replay` keep their contract on a short run: one JSON
//! object whose ratio is the median of as many alternating round pairs as were asked for, every
//! answer a success, and (ingest) every acknowledged vote really in Redis.

mod common;

use std::time::Duration;

/// One benchmark at a time: each starts its own servers on free ports, and two at once would
/// also share the two cores they measure on.
fn bench(args: &[&str]) -> serde_json::Value {
    let _one = common::one_stack_at_a_time();
    let out = common::ok(args);
    let last = out.lines().last().expect("bench printed nothing");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {last}"))
}

fn median(xs: &[f64]) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn number(v: &serde_json::Value, what: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

/// The HTTP statuses a `{"<status>": count}` object holds.
fn statuses(counts: &serde_json::Value) -> Vec<String> {
    counts
        .as_object()
        .unwrap_or_else(|| panic!("not a status count: {counts}"))
        .keys()
        .cloned()
        .collect()
}

/// Checks what both benchmarks share and returns the details.
fn check_rounds(result: &serde_json::Value, pairs: usize) -> &serde_json::Value {
    let ratios: Vec<f64> = result["details"]["pair_ratios"]
        .as_array()
        .unwrap_or_else(|| panic!("no pair_ratios: {result}"))
        .iter()
        .map(|r| number(r, "a pair ratio"))
        .collect();
    assert_eq!(ratios.len(), pairs, "{result}");
    assert!(ratios.iter().all(|r| *r > 0.0), "{result}");
    assert!(
        (number(&result["ratio"], "ratio") - median(&ratios)).abs() < 1e-9,
        "the ratio is not the median pair: {result}"
    );
    assert!(number(&result["rate"], "rate") > 0.0, "{result}");
    assert!(
        number(&result["baseline_rate"], "baseline_rate") > 0.0,
        "{result}"
    );
    &result["details"]
}

#[test]
fn ingest_reports_the_median_pair_and_stores_what_it_acknowledged() {
    let result = bench(&[
        "bench",
        "ingest",
        "--seconds",
        "1",
        "--rounds",
        "3",
        "--shards",
        "3",
        "--group-max-in-flight",
        "1",
        "--group-linger-us",
        "300",
        "--json",
    ]);
    assert_eq!(result["role"], "ingest");
    assert_eq!(result["baseline"], "bare-hyper");
    let details = check_rounds(&result, 3);
    assert_eq!(details["shards"], 3, "{result}");
    assert_eq!(details["group_max_in_flight"], 1, "{result}");
    assert_eq!(details["group_linger_us"], 300, "{result}");
    assert_eq!(
        details["voter_limit"], true,
        "ingest is measured as it ships, with its per-voter limit: {result}"
    );
    // Where the CPU went, each side: ingest's includes its Redis servers' work; in the baseline's
    // rounds they only keep house.
    let cpu = &details["cpu_us_per_answer"];
    let baseline_cpu = &details["baseline_cpu_us_per_answer"];
    assert!(number(&cpu["server"], "server CPU") > 0.0, "{result}");
    assert!(
        number(&cpu["redis"], "Redis CPU") > number(&baseline_cpu["redis"], "baseline Redis CPU"),
        "{result}"
    );
    let total = |c: &serde_json::Value| number(&c["total"], "total CPU");
    assert!(
        (number(&details["cpu_ratio"], "cpu_ratio") - total(baseline_cpu) / total(cpu)).abs()
            < 1e-9,
        "{result}"
    );
    assert!(
        number(
            &details["open_loop_cpu_us_per_vote"]["total"],
            "open-loop CPU"
        ) > 0.0,
        "{result}"
    );
    // Group commit: at least one vote a write, and more than one under this load.
    assert!(
        number(&details["votes_per_write"], "votes per write") > 1.0,
        "{result}"
    );
    assert_eq!(
        statuses(&details["closed_loop_statuses"]),
        ["202"],
        "{result}"
    );
    // The baseline ran the same open loop, so ingest's latency there has a control.
    assert_eq!(
        statuses(&details["baseline_open_loop_statuses"]),
        ["202"],
        "{result}"
    );
    assert!(
        number(&details["baseline_open_loop_p99_ms"], "baseline p99") > 0.0,
        "{result}"
    );
    // Each side's p99 per half second of its 1 s open loop: two windows, and the worst of them at
    // least the whole loop's p99 (a p99 no window reaches would be more than 1% of the answers
    // above every window's own p99).
    assert_eq!(details["open_loop_window_ms"], 500, "{result}");
    for (windows, whole) in [
        ("open_loop_window_p99_ms", "open_loop_p99_ms"),
        (
            "baseline_open_loop_window_p99_ms",
            "baseline_open_loop_p99_ms",
        ),
    ] {
        let p99s: Vec<f64> = details[windows]
            .as_array()
            .unwrap_or_else(|| panic!("{windows} is not a list: {result}"))
            .iter()
            .map(|w| number(w, windows))
            .collect();
        assert_eq!(p99s.len(), 2, "{windows}: {result}");
        let worst = p99s.iter().copied().fold(0.0, f64::max);
        // Both come from the same kind of histogram; 1% spare for how its quantile rounds a rank.
        assert!(
            worst > 0.0 && worst * 1.01 >= number(&details[whole], whole),
            "{windows}: {result}"
        );
    }
    let acked = number(
        &details["acknowledged_in_last_closed_round_and_open_loop"],
        "acknowledged",
    );
    assert!(acked > 0.0, "{result}");
    // Redis holds every round's votes, warm-ups included, across the three shards: at least every
    // one counted here.
    assert!(
        number(&details["stored_in_redis"], "stored") >= acked,
        "fewer votes in Redis than acknowledged: {result}"
    );
}

#[test]
fn reader_reports_the_median_pair() {
    let result = bench(&[
        "bench",
        "reader",
        "--seconds",
        "1",
        "--rounds",
        "2",
        "--subscribers",
        "50",
        "--json",
    ]);
    assert_eq!(result["role"], "reader");
    let details = check_rounds(&result, 2);
    assert_eq!(statuses(&details["statuses"]), ["200"], "{result}");
}

#[test]
fn aggregator_measures_the_replay_wait_against_the_same_drain_without_it() {
    let result = bench(&[
        "bench",
        "aggregator",
        "--votes",
        "20000",
        "--voters",
        "5000",
        "--baseline-votes",
        "200",
        "--replay",
        "--json",
    ]);
    assert_eq!(result["role"], "aggregator", "{result}");
    let details = &result["details"];
    assert_eq!(details["tallies_exact"], true, "{result}");
    let replay = &details["replay"];
    assert!(number(&replay["rate"], "rate") > 0.0, "{result}");
    let ratio = number(&replay["ratio_to_without"], "ratio_to_without");
    assert!(ratio > 0.0 && ratio.is_finite(), "{result}");
}

#[test]
fn an_interrupted_bench_stops_the_servers_it_started_and_removes_their_directories() {
    let _one = common::one_stack_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let mut bench = common::command(&["bench", "ingest", "--seconds", "60", "--json"])
        .env("TMPDIR", tmp.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let servers_up = || {
        let running = servers::working_under(tmp.path());
        let redis = running.iter().filter(|(_, n)| n == "redis-server").count();
        redis == 2 && running.iter().any(|(_, n)| n == "postgres")
    };
    common::wait_until(
        Duration::from_secs(120),
        || {
            let up = servers_up();
            assert!(up || bench.try_wait().unwrap().is_none(), "the bench ended");
            up
        },
        || {
            format!(
                "the bench's servers did not come up: {:?}",
                servers::working_under(tmp.path())
            )
        },
    );
    common::interrupt(bench);
    // Stopped on the way out, not left to whoever finds them.
    harness::assert_left_nothing_under(tmp.path(), "after the bench was interrupted");
}
