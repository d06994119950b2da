//! The regression gate can fail: a deliberately slowed build of the hot-path benches (every
//! iteration does its work four times) is compared with a baseline saved from the normal build,
//! and `tally bench gate` rejects it; the normal build, measured again, passes at the same
//! threshold. The threshold is wide because this test shares a noisy 2-core machine.

use std::path::Path;
use std::process::{Command, Output};

const THRESHOLD: &str = "100";

/// `cargo bench` of the vote hot paths, briefly, into `results`. Its own target directory: the
/// suite's `cargo test` holds the workspace's.
fn bench(results: &Path, features: &[&str], criterion_args: &[&str]) {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(env!("CARGO"))
        .current_dir(workspace)
        .args([
            "bench",
            "--locked",
            "-q",
            "-p",
            "bench",
            "--bench",
            "hot_paths",
        ])
        .args(features)
        .args([
            "--",
            "^vote/",
            "--warm-up-time",
            "0.5",
            "--measurement-time",
            "1",
            "--noplot",
        ])
        .args(criterion_args)
        .env(
            "CARGO_TARGET_DIR",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("gate-target"),
        )
        .env("CRITERION_HOME", results)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn gate(results: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "bench",
            "gate",
            "--baseline",
            "before",
            "--threshold",
            THRESHOLD,
            "--criterion-dir",
        ])
        .arg(results)
        .output()
        .unwrap()
}

#[test]
fn the_gate_fails_a_deliberately_slowed_build_and_passes_the_normal_one() {
    let results = tempfile::tempdir().unwrap();
    bench(results.path(), &[], &["--save-baseline", "before"]);

    bench(
        results.path(),
        &["--features", "slowdown"],
        &["--baseline", "before"],
    );
    let slowed = gate(results.path());
    let (stdout, stderr) = (
        String::from_utf8_lossy(&slowed.stdout),
        String::from_utf8_lossy(&slowed.stderr),
    );
    assert!(
        !slowed.status.success(),
        "the gate passed a build that does every hot path four times:\n{stdout}"
    );
    assert!(
        stderr.contains(&format!(
            "3 of 3 benches are more than {THRESHOLD}% slower than baseline \"before\""
        )),
        "{stderr}\n{stdout}"
    );
    for bench in ["vote/decode", "vote/shard_of", "vote/parse_validate_encode"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(bench) && l.ends_with("SLOWER")),
            "{bench} not flagged:\n{stdout}"
        );
    }

    bench(results.path(), &[], &["--baseline", "before"]);
    let normal = gate(results.path());
    let stdout = String::from_utf8_lossy(&normal.stdout);
    assert!(
        normal.status.success(),
        "the gate failed the unchanged build:\n{stdout}{}",
        String::from_utf8_lossy(&normal.stderr)
    );
    assert!(stdout.contains("gate passed"), "{stdout}");
}
