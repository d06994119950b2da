//! The dashboards and alerts work against the real thing: the local stack's Prometheus scrapes
//! every role while `tally load` runs, every panel query of every Grafana dashboard returns data,
//! and every alert rule of the clusters' PrometheusRule is loaded and healthy.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use hyper::Method;

const DASHBOARDS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../k8s/base/observe/dashboards"
);
const RULES: &str = include_str!("../../k8s/base/observe/prometheus-rule.yaml");

fn tally(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Every panel query of every dashboard, as Grafana would send it for all regions.
fn panel_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(DASHBOARDS).unwrap() {
        let path = entry.unwrap().path();
        let d: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for panel in d["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$region", ".*")
                    .replace("$__rate_interval", "10s");
                out.push((
                    format!(
                        "{} / {}",
                        d["title"].as_str().unwrap(),
                        panel["title"].as_str().unwrap()
                    ),
                    expr,
                ));
            }
        }
    }
    assert!(
        out.len() >= 20,
        "only {} panel queries found in {DASHBOARDS}",
        out.len()
    );
    out
}

async fn query(prometheus: &harness::http::Client, expr: &str) -> serde_json::Value {
    let reply = prometheus
        .request(
            Method::POST,
            "/api/v1/query",
            &[("content-type", "application/x-www-form-urlencoded")],
            format!("query={}", form_encode(expr)),
        )
        .await
        .unwrap();
    let body = reply.json();
    assert_eq!(body["status"], "success", "{expr}: {body}");
    body["data"]["result"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_and_alert_rule_works_against_the_local_stack_under_load() {
    let tmp = tempfile::Builder::new()
        .prefix("tally-observe-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_str().unwrap().to_owned();
    let up = tally(&["local", "up", "--dir", &dir]);
    assert!(
        up.status.success(),
        "local up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let status: serde_json::Value =
        serde_json::from_slice(&tally(&["local", "status", "--dir", &dir, "--json"]).stdout)
            .unwrap();
    let url = status["prometheus_url"]
        .as_str()
        .unwrap_or_else(|| panic!("no Prometheus in the local stack: {status}"))
        .to_owned();
    let prometheus = harness::http::Client::new(url);
    let prometheus_pid: u32 = std::fs::read_to_string(tmp.path().join("prometheus/prometheus.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let load = {
        let dir = dir.clone();
        std::thread::spawn(move || {
            let report = tempfile::tempdir().unwrap();
            tally(&[
                "load",
                "--dir",
                &dir,
                "--seconds",
                "25",
                "--rate",
                "300",
                "--voters",
                "300",
                "--json",
                "--report",
                report.path().to_str().unwrap(),
            ])
        })
    };

    let queries = panel_queries();
    let mut empty: BTreeSet<(String, String)> = queries.iter().cloned().collect();
    let start = Instant::now();
    while !empty.is_empty() && start.elapsed() < Duration::from_secs(40) {
        for (panel, expr) in empty.clone() {
            if !query(&prometheus, &expr)
                .await
                .as_array()
                .unwrap()
                .is_empty()
            {
                empty.remove(&(panel, expr));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let targets_up = query(&prometheus, "count(up == 1)").await;
    let rules = prometheus
        .request(Method::GET, "/api/v1/rules", &[], "")
        .await
        .unwrap()
        .json();
    let load = load.join().unwrap();
    let down = tally(&["local", "down", "--dir", &dir]);

    assert!(
        empty.is_empty(),
        "{} of {} panel queries returned no data: {empty:#?}",
        empty.len(),
        queries.len()
    );
    assert_eq!(
        targets_up[0]["value"][1], "11",
        "every role of every region, the replication watcher and the WAN links are scraped: {targets_up}"
    );
    let loaded: Vec<&serde_json::Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    let alerts: BTreeSet<&str> = loaded
        .iter()
        .filter(|r| r["type"] == "alerting")
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    let defined: BTreeSet<&str> = RULES
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(
        alerts, defined,
        "the local Prometheus loaded other alerts than the PrometheusRule defines"
    );
    for r in &loaded {
        assert_eq!(
            r["health"], "ok",
            "rule {} is unhealthy: {}",
            r["name"], r["lastError"]
        );
    }
    assert!(
        load.status.success(),
        "load: {}",
        String::from_utf8_lossy(&load.stderr)
    );
    assert!(
        down.status.success(),
        "down: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(
        !servers::pid_alive(prometheus_pid),
        "prometheus still running after down"
    );
}
