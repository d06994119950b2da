//! `kill -9` of a real aggregator process at random instants, over and over, while votes keep
//! coming: the load's own check must still find every acknowledged vote counted exactly once.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{tally, StackDir};
use rand::{Rng, SeedableRng};

#[test]
fn kill_dash_nine_of_the_aggregator_twenty_times_under_load_loses_and_doubles_nothing() {
    let stack = StackDir::new("tally-kill-");
    let dir = stack.dir().to_string();
    assert!(tally(&["local", "up", "--dir", &dir]).status.success());

    let load = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "load",
            "--dir",
            &dir,
            "--seconds",
            "40",
            "--rate",
            "400",
            "--voters",
            "2000",
            "--json",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pidfile = stack.path().join("run/us-east-1-aggregator.pid");
    let mut load = load;
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut kills = 0;
    while kills < 20 {
        assert!(
            load.try_wait().unwrap().is_none(),
            "the load ended before kill {kills}: every kill must land under load"
        );
        std::thread::sleep(Duration::from_millis(rng.random_range(50..400)));
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        servers::signal(pid, "KILL");
        while servers::pid_alive(pid) {
            std::thread::sleep(Duration::from_millis(5));
        }
        kills += 1;
        // `up` restarts what is not running; the new aggregator first finishes its predecessor's work.
        let up = tally(&["local", "up", "--dir", &dir]);
        assert!(
            up.status.success(),
            "{}",
            String::from_utf8_lossy(&up.stderr)
        );
    }
    let out = load.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert!(out.status.success(), "{report}");
    assert!(report["acknowledged"].as_u64().unwrap() > 5_000, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["doubled"], 0, "{report}");
}
