//! `tally gauntlet --quick` on a real local stack: every fault, each under 5,000 votes/s, and a
//! scoreboard reading zero lost, zero doubled, zero crashes, saved as JSON.

mod common;

use common::{ok, StackDir};

const FAULTS: [&str; 18] = [
    "kill-ingest",
    "kill-aggregator",
    "kill-aggregator",
    "kill-reader",
    "kill-replication",
    "kill-wan",
    "redis-kill",
    "redis-restart",
    "redis-failover",
    "aggregator-lost",
    "replica-stop",
    "region-cut",
    "clock-skew",
    "close-skew",
    "close-kill-aggregator",
    "close-cut",
    "region-down",
    "primary-failover",
];

#[test]
fn every_fault_loses_nothing_and_doubles_nothing() {
    let _turn = common::one_stack_at_a_time();
    let stack = StackDir::new("tally-gauntlet-");
    let dir = stack.dir();
    ok(&["local", "up", "--dir", dir]);

    let saved = stack.path().join("scoreboard.json");
    let out = ok(&[
        "gauntlet",
        "--quick",
        "--json",
        "--dir",
        dir,
        "--out",
        saved.to_str().unwrap(),
    ]);
    let board: serde_json::Value = serde_json::from_str(&out).unwrap();
    let on_disk: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    assert_eq!(
        board, on_disk,
        "the saved scoreboard is not the printed one"
    );

    let rows = board["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["fault"].as_str().unwrap()).collect();
    assert_eq!(names, FAULTS, "{board}");
    for r in rows {
        assert_eq!(r["error"], serde_json::Value::Null, "{r}");
        assert_eq!(r["lost"], 0, "{r}");
        assert_eq!(r["doubled"], 0, "{r}");
        assert_eq!(r["counted"], r["acknowledged"], "{r}");
        assert!(r["recovery_seconds"].as_f64().unwrap() < 30.0, "{r}");
        if !r["fault"].as_str().unwrap().starts_with("close-") {
            assert!(r["acknowledged"].as_u64().unwrap() > 50_000, "{r}");
        } else {
            // Votes after the close are refused (409) by design: the load offered as many.
            let offered = r["acknowledged"].as_u64().unwrap() + r["errors_seen"].as_u64().unwrap();
            assert!(offered > 50_000, "{r}");
            assert_eq!(
                r["certified_exact"], true,
                "the poll's certified result: {r}"
            );
        }
    }
    // Every report's fields, for the whole board too.
    let sum = |key: &str| rows.iter().map(|r| r[key].as_u64().unwrap()).sum::<u64>();
    assert_eq!(board["acknowledged"], sum("acknowledged"));
    assert_eq!(board["counted"], sum("counted"));
    // Faults that take a region's ingest or its Redis away are seen by voters as errors
    // (503s, refused connections), never as lost votes.
    let errors = |fault: &str| {
        rows.iter().find(|r| r["fault"] == fault).unwrap()["errors_seen"]
            .as_u64()
            .unwrap()
    };
    assert!(errors("redis-kill") > 0, "{board}");
    assert_eq!(
        (
            &board["lost"],
            &board["doubled"],
            &board["crashes"],
            &board["failed"]
        ),
        (
            &serde_json::json!(0),
            &serde_json::json!(0),
            &serde_json::json!(0),
            &serde_json::json!(0)
        ),
        "{board}"
    );
}
