//! Rehearsing against any deployment, through a target file only: the local stack written out
//! as one, loaded and checked through its readers with freshness per region; the night
//! rehearsed in the `show` shape to a certified result, with the plane's pushback reported; and
//! a target that cannot be verified refused before any vote is sent.

mod common;

use common::{ok, tally, StackDir};

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn polls_of_runs(dir: &str) -> Vec<String> {
    ok(&["poll", "list", "--dir", dir])
        .lines()
        .filter_map(|l| l.split('\t').next())
        .filter(|id| {
            id.starts_with("load-") || id.starts_with("canary-") || id.starts_with("show-")
        })
        .map(str::to_string)
        .collect()
}

/// socat terminating TLS in front of a region's server, as the deployment's load balancer does.
struct Terminator {
    at: String,
    child: std::process::Child,
}

impl Terminator {
    fn start(ca: &servers::TestCa, backend: &str) -> Self {
        let at = common::listen();
        let port = at.rsplit(':').next().unwrap();
        let child = std::process::Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={},key={}",
                ca.cert_file().display(),
                ca.key_file().display()
            ))
            .arg(format!("TCP:{backend}"))
            // Quiet: the readiness probe's bare connects end without a handshake.
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("socat runs (scripts/setup installs it)");
        common::wait_until(
            std::time::Duration::from_secs(10),
            || std::net::TcpStream::connect(&at).is_ok(),
            || format!("socat listening on {at}"),
        );
        Self { at, child }
    }
}

impl Drop for Terminator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_target_file_is_all_a_load_and_a_rehearsal_need() {
    let _one = common::one_stack_at_a_time();
    let stack = StackDir::new("tally-rehearse-");
    let dir = stack.dir();
    ok(&["local", "up", "--dir", dir]);
    let target = stack.path().join("target.toml");
    let target_arg = target.to_str().unwrap();
    ok(&["local", "status", "--dir", dir, "--target-file", target_arg]);
    let reports = stack.path().join("reports-here");

    // A target one of whose regions cannot be reached: one line naming it, and no vote sent.
    let file = std::fs::read_to_string(&target).unwrap();
    let ap_ingest = file
        .split("[[region]]")
        .find(|r| r.contains("ap-southeast-1"))
        .and_then(|r| r.lines().find(|l| l.starts_with("ingest")))
        .unwrap()
        .to_string();
    let unreachable = stack.path().join("unreachable.toml");
    let dead = common::listen(); // a free port nothing listens on
    std::fs::write(
        &unreachable,
        file.replace(&ap_ingest, &format!("ingest = \"http://{dead}\"")),
    )
    .unwrap();
    let out = tally(&[
        "load",
        "--target",
        unreachable.to_str().unwrap(),
        "--seconds",
        "2",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("ap-southeast-1 ingest") && stderr.contains(&dead.to_string()),
        "names what failed: {stderr}"
    );
    assert_eq!(
        polls_of_runs(dir),
        Vec::<String>::new(),
        "nothing was made or sent"
    );
    // A file that is wrong: exit 64 with what is wrong.
    let wrong = stack.path().join("wrong.toml");
    std::fs::write(&wrong, file.replace("[[region]]", "[[regions]]")).unwrap();
    let out = tally(&["rehearse", "--target", wrong.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("unknown field"), "{stderr}");

    // A load through the file alone (no --dir, no TALLY_DIR), checked through the readers.
    let args = [
        "load",
        "--target",
        target_arg,
        "--rate",
        "600",
        "--seconds",
        "6",
        "--voters",
        "3000",
        "--json",
        "--report",
    ];
    let out = common::command(&args)
        .arg(&reports)
        .env_remove("TALLY_DIR")
        .current_dir(stack.path())
        .output()
        .unwrap();
    let report = json(&common::succeeded(&args, out));
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["doubled"], 0, "{report}");
    let acknowledged = report["acknowledged"].as_u64().unwrap();
    assert!(acknowledged > 3_000, "{report}");
    assert_eq!(report["counted"], acknowledged);
    for r in report["regions"].as_array().unwrap() {
        assert_eq!(r["results_match_primary"], true, "as acknowledged: {r}");
        assert!(r["acknowledged"].as_u64().unwrap() > 1_000, "{r}");
    }
    let freshness = report["freshness_ms"].as_object().unwrap();
    assert_eq!(freshness.len(), 3, "{report}");
    for (region, f) in freshness {
        assert!(f["samples"].as_u64().unwrap() >= 30, "{region}: {f}");
        assert_eq!(f["unseen"], 0, "{region}: {f}");
        let (p50, p99, max) = (
            f["p50"].as_f64().unwrap(),
            f["p99"].as_f64().unwrap(),
            f["max"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p50 <= p99 && p99 <= max, "{region}: {f}");
        // By the region whose ingest took each canary: every region took some.
        let from = f["from"].as_object().unwrap();
        assert_eq!(from.len(), 3, "{region}: {f}");
        assert!(
            from.values().all(|s| s["max"].as_f64().unwrap() <= max),
            "{region}: {f}"
        );
    }
    let html = std::fs::read_to_string(reports.join("report.html")).unwrap();
    assert!(
        html.contains("id=\"freshness\""),
        "the page shows freshness"
    );

    // The night rehearsed over HTTPS, as through a load balancer, under the file's CA: the show
    // shape opens with its surge, few voters vote too often and are pushed back, the poll
    // closes as the load ends and is certified as acknowledged.
    let (_ca_dir, ca) = harness::test_ca().unwrap();
    let mut https = file.clone();
    let mut terminators = Vec::new();
    for line in file
        .lines()
        .filter(|l| l.starts_with("ingest") || l.starts_with("reader"))
    {
        let backend = line.split("http://").nth(1).unwrap().trim_end_matches('"');
        let t = Terminator::start(&ca, backend);
        let secure = line.replace(&format!("http://{backend}"), &format!("https://{}", t.at));
        https = https.replace(line, &secure);
        terminators.push(t);
    }
    let https_target = stack.path().join("https.toml");
    let ca_line = format!("ca_file = {:?}\n", ca.ca_file().to_str().unwrap());
    std::fs::write(&https_target, ca_line + &https).unwrap();
    let args = [
        "rehearse",
        "--target",
        https_target.to_str().unwrap(),
        "--rate",
        "600",
        "--seconds",
        "10",
        "--voters",
        "30",
        "--json",
        "--report",
    ];
    let out = common::command(&args)
        .arg(stack.path().join("rehearsal"))
        .env_remove("TALLY_DIR")
        .output()
        .unwrap();
    let report = json(&common::succeeded(&args, out));
    assert_eq!(report["shape"], "show");
    assert_eq!(
        report["regions"].as_array().unwrap().len(),
        3,
        "every region over HTTPS: {report}"
    );
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["doubled"], 0, "{report}");
    let show = &report["show"];
    assert_eq!(show["counts_match_acknowledged"], true, "{show}");
    assert_eq!(show["certified"], show["acknowledged"], "{show}");
    assert_eq!(
        show["audit_matches"], true,
        "every region shows one result: {show}"
    );
    assert_eq!(show["acknowledged_after_close"], 0, "{show}");
    assert!(report["final_seconds"].as_f64().unwrap() > 0.0, "{report}");
    let pushback = report["pushback"].as_array().unwrap();
    let limited = pushback.iter().find(|p| p["status"] == 429);
    assert!(
        limited.is_some_and(|p| p["answers"].as_u64().unwrap() > 100),
        "30 voters at 600 votes/s are pushed back: {report}"
    );
    // Open loop: the first seconds are offered at the surge, whatever the answers.
    let offered: Vec<f64> = (0..10)
        .map(|second| {
            report["timeline"]["offered_per_second"]
                .as_array()
                .unwrap()
                .iter()
                .map(|line| line["points"][second][1].as_f64().unwrap_or(0.0))
                .sum()
        })
        .collect();
    let surge = 6.0 / 1.7 * 600.0;
    assert!(
        (offered[0] - surge).abs() < surge * 0.05,
        "the first second offered {} votes, the surge is {surge:.0}/s: {offered:?}",
        offered[0]
    );
    assert!(
        offered[2] < offered[0] / 2.0,
        "then it settles: {offered:?}"
    );
}
