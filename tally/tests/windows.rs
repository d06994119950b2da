//! The night of the show on a real local stack: votes in all three regions through a close
//! scheduled ahead, the certified result, the export a third party checks, hidden results, and
//! moving a window.

mod common;

use std::collections::BTreeMap;

use common::{ok, tally, StackDir};

fn sha256_hex(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum runs");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn a_close_is_one_instant_everywhere_and_the_result_is_certified_exactly() {
    let _one = common::one_stack_at_a_time();
    let stack = StackDir::new("tally-windows-");
    let dir = stack.dir();
    ok(&["local", "up", "--dir", dir]);

    // Votes from every region through a close four fifths of the way in.
    let report: serde_json::Value = serde_json::from_str(&ok(&[
        "load",
        "--show",
        "--rate",
        "2000",
        "--seconds",
        "12",
        "--json",
        "--dir",
        dir,
    ]))
    .unwrap();
    let show = &report["show"];
    let poll = show["poll"].as_str().unwrap();
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["doubled"], 0, "{report}");
    assert_eq!(
        show["acknowledged_after_close"], 0,
        "every 202 is stamped before the close"
    );
    assert!(
        report["statuses"]["409"].as_u64().unwrap() > 100,
        "votes after the close got 409: {report}"
    );
    assert_eq!(show["counts_match_acknowledged"], true, "{show}");
    assert_eq!(
        show["certified"], show["acknowledged"],
        "each voter's latest acknowledged vote, once"
    );
    for region in report["regions"].as_array().unwrap() {
        assert!(region["acknowledged"].as_u64().unwrap() > 1000, "{region}");
    }

    // No counted ballot is stamped at or after the close, and nothing was even stored late.
    let results: serde_json::Value = serde_json::from_str(&ok(&[
        "poll",
        "results",
        poll,
        "--wait-final",
        "--json",
        "--dir",
        dir,
    ]))
    .unwrap();
    assert_eq!(results["state"], "final");
    assert_eq!(results["digest"], show["digest"]);
    let final_seconds = results["final_seconds"].as_f64().unwrap();
    assert!(
        (0.0..10.0).contains(&final_seconds),
        "certified within a few seconds of the close plus its grace: {final_seconds}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&ok(&["local", "status", "--dir", dir, "--json"])).unwrap();
    let primary = status["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["postgres_role"] == "primary")
        .unwrap()["postgres_url"]
        .as_str()
        .unwrap()
        .to_string();
    let late_ballots: i64 = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let client = db::connect(&primary).await?;
            let row = client
                .query_one(
                    "SELECT count(*) FROM ballots b JOIN polls p ON p.id = b.poll_id
                      WHERE b.poll_id = $1
                        AND b.cast_at >= (EXTRACT(EPOCH FROM p.closes_at) * 1000000)::int8",
                    &[&poll],
                )
                .await?;
            anyhow::Ok(row.get(0))
        })
        .unwrap();
    assert_eq!(late_ballots, 0, "a ballot stamped at or after the close");

    // The audit recounts from the ballots; the export lets anyone recompute counts and digest.
    let export = stack.path().join("ballots.tsv");
    let audit: serde_json::Value = serde_json::from_str(&ok(&[
        "poll",
        "audit",
        poll,
        "--json",
        "--export",
        export.to_str().unwrap(),
        "--dir",
        dir,
    ]))
    .unwrap();
    assert_eq!(audit["matches"], true, "{audit}");
    assert_eq!(audit["digest"], show["digest"]);
    assert_eq!(
        sha256_hex(&export),
        show["digest"].as_str().unwrap(),
        "sha256sum of the export"
    );
    let mut from_file: BTreeMap<String, i64> = BTreeMap::new();
    let text = std::fs::read_to_string(&export).unwrap();
    let mut voters: Vec<&str> = Vec::new();
    for line in text.lines() {
        let (voter, option) = line.split_once('\t').unwrap();
        voters.push(voter);
        *from_file.entry(option.to_string()).or_default() += 1;
    }
    assert!(
        voters.windows(2).all(|w| w[0].as_bytes() < w[1].as_bytes()),
        "one line a voter, sorted"
    );
    let certified: BTreeMap<String, i64> =
        serde_json::from_value(show["certified"].clone()).unwrap();
    let nonzero: BTreeMap<String, i64> = certified.into_iter().filter(|(_, n)| *n > 0).collect();
    assert_eq!(
        from_file, nonzero,
        "the export's lines are the certified counts"
    );
    let regions = audit["by_region"].as_object().unwrap();
    assert_eq!(regions.len(), 3, "counts per region: {audit}");

    // A final poll's result is frozen: reopening it is refused.
    let reopen = tally(&["poll", "open", poll, "--dir", dir]);
    assert_eq!(
        reopen.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&reopen.stderr)
    );
    ok(&["local", "down", "--dir", dir]);
}

#[test]
fn windows_move_until_they_end_and_hidden_results_wait_for_the_reveal() {
    let _one = common::one_stack_at_a_time();
    let stack = StackDir::new("tally-windows-");
    let dir = stack.dir();
    ok(&["local", "up", "--dir", dir]);
    ok(&[
        "poll",
        "create",
        "later",
        "--options",
        "x,y",
        "--opens-at",
        "2099-01-01T00:00:00Z",
        "--closes-at",
        "2099-01-01T02:00:00+01:00",
        "--dir",
        dir,
    ]);
    let refused = tally(&[
        "poll",
        "create",
        "bad",
        "--options",
        "x,y",
        "--opens-at",
        "2099-01-01T00:00:00Z",
        "--closes-at",
        "2098-01-01T00:00:00Z",
        "--dir",
        dir,
    ]);
    assert_eq!(refused.status.code(), Some(64));
    let refused = tally(&[
        "poll",
        "create",
        "bad",
        "--options",
        "x,y",
        "--closes-at",
        "tomorrow",
        "--dir",
        dir,
    ]);
    assert_eq!(refused.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("RFC 3339"));
    ok(&[
        "poll",
        "schedule",
        "later",
        "--opens-at",
        "2098-06-01T00:00:00Z",
        "--dir",
        dir,
    ]);
    let results: serde_json::Value =
        serde_json::from_str(&ok(&["poll", "results", "later", "--json", "--dir", dir])).unwrap();
    assert_eq!(results["state"], "scheduled");
    assert_eq!(results["opens_at"], "2098-06-01T00:00:00.000Z");
    assert_eq!(results["closes_at"], "2099-01-01T01:00:00.000Z");
    ok(&["poll", "close", "later", "--dir", dir]);
    let results: serde_json::Value =
        serde_json::from_str(&ok(&["poll", "results", "later", "--json", "--dir", dir])).unwrap();
    assert_eq!(results["state"], "closed");
    let moved = tally(&[
        "poll",
        "schedule",
        "later",
        "--closes-at",
        "2099-01-01T00:00:00Z",
        "--dir",
        dir,
    ]);
    assert_eq!(
        moved.status.code(),
        Some(64),
        "an ended window does not move"
    );

    // Hidden until revealed, on every region's reader.
    ok(&[
        "poll",
        "create",
        "secret",
        "--options",
        "x,y",
        "--hidden",
        "--dir",
        dir,
    ]);
    let status: serde_json::Value =
        serde_json::from_str(&ok(&["local", "status", "--dir", dir, "--json"])).unwrap();
    let readers: Vec<String> = status["regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r["reader_url"]
                .as_str()
                .unwrap()
                .trim_start_matches("http://")
                .to_string()
        })
        .collect();
    let status_of =
        |reader: &str| common::status(&common::http_get(reader, "/v1/polls/secret/results", ""));
    for reader in &readers {
        common::wait_until(
            std::time::Duration::from_secs(10),
            || status_of(reader) == 403,
            || format!("{reader} does not keep the poll hidden"),
        );
    }
    ok(&["poll", "reveal", "secret", "--dir", dir]);
    for reader in &readers {
        common::wait_until(
            std::time::Duration::from_secs(10),
            || status_of(reader) == 200,
            || format!("{reader} does not serve the revealed poll"),
        );
    }
    ok(&["local", "down", "--dir", dir]);
}
