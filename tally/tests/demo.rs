//! The README's main job, short: `tally demo` brings the stack up, votes from around the world,
//! verifies every acknowledged vote was counted exactly once, writes its report (JSON, and HTML
//! that a real browser draws), and stops everything.

use std::process::Command;

#[test]
fn a_short_demo_counts_every_acknowledged_vote_exactly_once_and_cleans_up() {
    let tmp = tempfile::Builder::new()
        .prefix("tally-demo-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_str().unwrap();
    let reports = tmp.path().join("report");
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "demo",
            "--dir",
            dir,
            "--seconds",
            "4",
            "--rate",
            "400",
            "--voters",
            "500",
            "--json",
        ])
        .arg("--report")
        .arg(&reports)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["local", "down", "--dir", dir])
        .output();
    assert!(out.status.success(), "demo failed: {stdout}\n{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let acknowledged = report["acknowledged"].as_u64().unwrap();
    // Votes for the demo's poll after its close are answered 409: answered on time all the same.
    let closed = report["statuses"]["409"].as_u64().unwrap_or(0);
    let rate = (acknowledged + closed) as f64 / 4.0;
    assert!(
        (rate / 400.0 - 1.0).abs() <= 0.02,
        "the load did not answer 400 votes/s within 2%: {rate}"
    );
    // The demo ends as the night does: its poll closed, and certified exactly as acknowledged.
    let show = &report["show"];
    assert!(closed > 0, "no vote came after the close: {report}");
    assert_eq!(show["counts_match_acknowledged"], true, "{show}");
    assert_eq!(show["audit_matches"], true, "{show}");
    assert_eq!(show["acknowledged_after_close"], 0, "{show}");
    assert_eq!(show["digest"].as_str().unwrap().len(), 64, "{show}");
    assert!(show["final_seconds"].as_f64().unwrap() < 10.0, "{show}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["doubled"], 0, "{report}");
    assert_eq!(report["counted"], acknowledged);
    let regions = report["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 3);
    // Every region's freshness, from canaries seen on its results stream.
    let freshness = report["freshness_ms"].as_object().unwrap();
    assert_eq!(freshness.len(), 3, "{report}");
    for (region, f) in freshness {
        assert!(f["samples"].as_u64().unwrap() >= 20, "{region}: {f}");
        assert_eq!(f["unseen"], 0, "{region}: {f}");
        assert!(
            f["p99"].as_f64().unwrap() >= f["p50"].as_f64().unwrap(),
            "{region}: {f}"
        );
    }
    for r in regions {
        assert!(
            r["acknowledged"].as_u64().unwrap() > 0,
            "no voter was routed to {r}"
        );
        assert_eq!(r["results_match_primary"], true, "{r}");
    }
    assert!(
        stderr.contains("votes/s acknowledged"),
        "no live progress: {stderr}"
    );
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reports.join("report.json")).unwrap()).unwrap();
    assert_eq!(saved["acknowledged"], acknowledged);
    let throughput = saved["timeline"]["acknowledged_per_second"]
        .as_array()
        .unwrap();
    assert_eq!(throughput.len(), 3, "one line per region: {throughput:?}");
    let plotted: f64 = throughput
        .iter()
        .flat_map(|s| s["points"].as_array().unwrap())
        .map(|p| p[1].as_f64().unwrap())
        .sum();
    assert_eq!(
        plotted as u64, acknowledged,
        "the throughput plot does not add up to the acknowledged votes"
    );
    assert_eq!(
        saved["timeline"]["backlog"].as_array().unwrap().len(),
        4,
        "one line per shard"
    );
    assert_eq!(
        saved["timeline"]["replica_lag_kib"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "one line per replica"
    );
    let html = std::fs::read_to_string(reports.join("report.html")).unwrap();
    assert!(
        html.contains("closed to certified final"),
        "the report shows the time from the close to the certified result"
    );
    report_is_drawn_in_a_browser(&reports.join("report.html"), &tmp.path().join("report.png"));
    // Without --keep everything is stopped.
    let running: Vec<_> = std::fs::read_dir(tmp.path().join("run"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        running.is_empty(),
        "roles still registered as running: {running:?}"
    );
}

/// Headless Chromium opens the HTML report; every plot has its lines, drawn across the chart.
fn report_is_drawn_in_a_browser(page: &std::path::Path, screenshot: &std::path::Path) {
    let browser_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../browser");
    assert!(
        std::path::Path::new(browser_dir)
            .join("node_modules/playwright-core")
            .exists(),
        "playwright-core is not installed: run scripts/test (or `npm ci --prefix browser`)"
    );
    let out = Command::new("node")
        .arg(format!("{browser_dir}/report.mjs"))
        .arg(page)
        .arg(screenshot)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plots: std::collections::HashMap<&str, (usize, u32)> = stdout
        .lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("PLOT ")?.split(' ');
            let id = f.next()?;
            let lines = f.next()?.strip_prefix("lines=")?.parse().ok()?;
            let width = f
                .next()?
                .strip_prefix("drawn=")?
                .split('x')
                .next()?
                .parse()
                .ok()?;
            Some((id, (lines, width)))
        })
        .collect();
    for (id, lines) in [
        ("throughput", 3),
        ("errors", 3),
        ("latency", 3),
        ("percentiles", 3),
        ("backlog", 4),
        ("replica-lag", 2),
    ] {
        let (drawn, width) = plots
            .get(id)
            .copied()
            .unwrap_or_else(|| panic!("no plot {id}: {stdout}"));
        assert_eq!(drawn, lines, "plot {id}: {stdout}");
        assert!(
            width > 300,
            "plot {id} is not drawn across its chart: {stdout}"
        );
    }
    assert!(
        std::fs::metadata(screenshot).unwrap().len() > 10_000,
        "no screenshot of the report"
    );
}
