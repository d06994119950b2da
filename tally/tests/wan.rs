//! The local stack with 70 ms between regions: every cross-region connection goes through a
//! link that holds it back. Replication is asynchronous, so a commit does not wait for a replica
//! in another region; the aggregators' acknowledgements to Redis do. A failover drill under load
//! still loses nothing, and replicas re-pointed at the new primary reach it through the links.

mod common;

use std::time::{Duration, Instant};

use common::{http_get, ok, StackDir};

fn status(dir: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&["local", "status", "--dir", dir, "--json"])).unwrap()
}

/// `tally wan`'s view of its links.
fn links(status: &serde_json::Value) -> serde_json::Value {
    let url = status["wan_url"].as_str().expect("a wan url");
    let response = http_get(url.trim_start_matches("http://"), "/status", "");
    let body = response.split("\r\n\r\n").nth(1).expect("a body");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {response}"))
}

fn open(links: &serde_json::Value, from: &str, to: &str) -> u64 {
    links["links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["from"] == from && l["to"] == to)
        .unwrap_or_else(|| panic!("no link {from}>{to}: {links}"))["open_connections"]
        .as_u64()
        .unwrap()
}

/// Three commits on the primary, one after another.
fn three_commits(url: &str) -> Duration {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = db::connect(url).await.unwrap();
        client
            .batch_execute("CREATE TABLE IF NOT EXISTS wan_probe (x int)")
            .await
            .unwrap();
        let start = Instant::now();
        for i in 0..3 {
            client
                .execute("INSERT INTO wan_probe VALUES ($1)", &[&i])
                .await
                .unwrap();
        }
        start.elapsed()
    })
}

#[test]
fn seventy_ms_between_regions_holds_commits_back_and_loses_nothing() {
    let _turn = common::one_stack_at_a_time();
    let stack = StackDir::new("tally-wan-");
    let dir = stack.dir();
    ok(&["local", "up", "--dir", dir, "--wan-ms", "70"]);

    let st = status(dir);
    assert_eq!(st["wan_ms"], 70, "{st}");
    assert_eq!(st["wan_running"], true);
    let seen = links(&st);
    assert_eq!(seen["delay_ms"], 70.0);
    // Each replica streams from the primary, and each remote aggregator writes to it, through
    // its region's link.
    for from in ["eu-west-1", "ap-southeast-1"] {
        assert!(open(&seen, from, "us-east-1") >= 2, "{from}: {seen}");
    }
    // A commit does not wait for a replica 70 ms away (a synchronous one would take 140 ms).
    let primary = st["regions"][0]["postgres_url"]
        .as_str()
        .unwrap()
        .to_string();
    let took = three_commits(&primary);
    assert!(
        took < Duration::from_millis(3 * 140),
        "three commits took {took:?}"
    );

    let report: serde_json::Value = serde_json::from_str(&ok(&[
        "drill",
        "primary-failover",
        "--rate",
        "5000",
        "--seconds",
        "20",
        "--json",
        "--dir",
        dir,
    ]))
    .unwrap();
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["doubled"], 0, "{report}");
    assert_eq!(report["counted"], report["acknowledged"], "{report}");
    assert!(
        report["acknowledged"].as_u64().unwrap() >= 95_000,
        "{report}"
    );
    assert!(
        report["recovery_seconds"].as_f64().unwrap() < 30.0,
        "{report}"
    );

    // The acknowledgements waited for a replica across a link: its WAL comes 70 ms later.
    let aggregator = st["regions"][0]["aggregator_url"].as_str().unwrap();
    let metrics = http_get(aggregator.trim_start_matches("http://"), "/metrics", "");
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name}: {metrics}"))
    };
    let (sum, count) = (
        value("tally_aggregator_replay_wait_seconds_sum"),
        value("tally_aggregator_replay_wait_seconds_count"),
    );
    assert!(
        count > 0.0 && sum / count >= 0.07,
        "mean replay wait {}",
        sum / count
    );

    // The other two servers follow the new primary across the links, the old one rewound.
    let new = report["new_primary"].as_str().unwrap().to_string();
    let seen = links(&status(dir));
    for from in ["us-east-1", "eu-west-1", "ap-southeast-1"] {
        if from != new {
            assert!(open(&seen, from, &new) >= 1, "{from}>{new}: {seen}");
        }
    }

    // A new delay applies to the running stack at once.
    ok(&["local", "up", "--dir", dir, "--wan-ms", "0"]);
    let st = status(dir);
    assert_eq!(st["wan_ms"], 0);
    assert_eq!(links(&st)["delay_ms"], 0.0);
    let too_far = common::tally(&["local", "up", "--dir", dir, "--wan-ms", "20000"]);
    assert!(!too_far.status.success());
    assert!(
        String::from_utf8_lossy(&too_far.stderr).contains("over the most allowed"),
        "{too_far:?}"
    );
    assert_eq!(
        status(dir)["wan_ms"],
        0,
        "a refused delay changed the stack"
    );
}
