//! The failover drills on a real local stack, under 5,000 votes/s, with replication asynchronous
//! as RDS's across regions: a region lost, the primary lost, and the primary's whole region
//! lost. Nothing acknowledged is lost or counted twice, each recovers in under 30 s, and the
//! stack is whole again afterwards (the old primary streams as a replica, its lag visible in
//! `tally local status`).

mod common;

use common::{http_get, ok, StackDir};

fn drill(dir: &str, which: &[&str]) -> serde_json::Value {
    let mut args = vec!["drill"];
    args.extend_from_slice(which);
    args.extend_from_slice(&["--rate", "5000", "--seconds", "20", "--json", "--dir", dir]);
    let report: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    let n = |k: &str| {
        report[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} in {report}"))
    };
    assert_eq!(n("lost"), 0.0, "{which:?}: {report}");
    assert_eq!(n("doubled"), 0.0, "{which:?}: {report}");
    assert_eq!(n("counted"), n("acknowledged"));
    // 20 s at 5,000 votes/s; the votes sent to a region in the moment it died are not acknowledged.
    assert!(n("acknowledged") >= 95_000.0, "{which:?}: {report}");
    assert!(
        n("recovery_seconds") > 0.0 && n("recovery_seconds") < 30.0,
        "{report}"
    );
    assert!(n("detect_seconds") <= n("recovery_seconds"));
    report
}

fn status(dir: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&["local", "status", "--dir", dir, "--json"])).unwrap()
}

#[test]
fn region_down_then_primary_failover_lose_nothing() {
    let stack = StackDir::new("tally-drill-");
    let dir = stack.dir();
    ok(&["local", "up", "--dir", dir]);

    let report = drill(dir, &["region-down", "eu-west-1"]);
    // Europe's voters went to eu-west-1's first failover target, then came back.
    let changes = report["load"]["route_changes"].as_array().unwrap();
    let eu: Vec<&str> = changes
        .iter()
        .filter(|c| c["continent"] == "EU")
        .map(|c| c["region"].as_str().unwrap())
        .collect();
    assert_eq!(eu, ["us-east-1", "eu-west-1"], "{changes:?}");
    let regions = status(dir)["regions"].as_array().unwrap().clone();
    assert!(regions.iter().all(|r| r["processes"]
        .as_object()
        .unwrap()
        .values()
        .all(|v| v == true)));

    let report = drill(dir, &["primary-failover"]);
    assert_eq!(report["target"], "us-east-1");
    let new = report["new_primary"].as_str().unwrap().to_string();
    assert_ne!(new, "us-east-1");
    let regions = status(dir)["regions"].as_array().unwrap().clone();
    let roles: Vec<(&str, &str)> = regions
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap(),
                r["postgres_role"].as_str().unwrap(),
            )
        })
        .collect();
    for (name, role) in &roles {
        let want = if *name == new { "primary" } else { "replica" };
        assert_eq!(*role, want, "{roles:?}");
    }
    // Every replica, the rewound old primary among them, streams and shows its lag.
    for r in &regions {
        assert!(r["replica_lag_bytes"].as_i64().is_some(), "{r}");
    }
    // The watcher exports the lag per replica.
    let replication = status(dir)["replication_url"].as_str().unwrap().to_string();
    let port: u16 = replication.rsplit(':').next().unwrap().parse().unwrap();
    let metrics = http_get(&format!("127.0.0.1:{port}"), "/metrics", "");
    assert!(
        metrics.contains("tally_replication_lag_bytes{region=\"us-east-1\"}"),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("tally_replication_primary{{region=\"{new}\"}} 1")));

    // The primary's whole region at once: its PostgreSQL, Redis and roles.
    let report = drill(dir, &["region-down", &new]);
    let newer = report["new_primary"].as_str().unwrap().to_string();
    assert_ne!(newer, new, "{report}");
    let regions = status(dir)["regions"].as_array().unwrap().clone();
    for r in &regions {
        let want = if r["name"] == newer.as_str() {
            "primary"
        } else {
            "replica"
        };
        assert_eq!(r["postgres_role"], want, "{r}");
    }
}
