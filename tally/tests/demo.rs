//! The README's main job, short: `tally demo` brings the stack up, votes from around the world,
//! verifies every acknowledged vote was counted exactly once, and stops everything.

use std::process::Command;

#[test]
fn a_short_demo_counts_every_acknowledged_vote_exactly_once_and_cleans_up() {
    let tmp = tempfile::Builder::new().prefix("tally-demo-").tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["demo", "--dir", dir, "--seconds", "4", "--rate", "400", "--voters", "500", "--json"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = Command::new(env!("CARGO_BIN_EXE_tally")).args(["local", "down", "--dir", dir]).output();
    assert!(out.status.success(), "demo failed: {stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let acknowledged = report["acknowledged"].as_u64().unwrap();
    assert!(acknowledged >= 1_500, "only {acknowledged} votes acknowledged: {report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["doubled"], 0, "{report}");
    assert_eq!(report["counted"], acknowledged);
    let regions = report["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 3);
    for r in regions {
        assert!(r["acknowledged"].as_u64().unwrap() > 0, "no voter was routed to {r}");
        assert_eq!(r["results_match_primary"], true, "{r}");
    }
    assert!(stderr.contains("votes/s acknowledged"), "no live progress: {stderr}");
    // Without --keep everything is stopped.
    for pidfile in std::fs::read_dir(tmp.path().join("run")).unwrap().flatten() {
        panic!("a role is still registered as running: {:?}", pidfile.path());
    }
}
