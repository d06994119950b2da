//! `tally local` and `tally poll` as a user runs them: the real binary, real servers.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{ok, one_stack_at_a_time, tally, StackDir};

fn pids(dir: &std::path::Path) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir(dir.join("run"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| servers::read_pid(&e.path()))
        .collect();
    let server_pidfiles =
        glob(dir, "redis", "redis.pid")
            .into_iter()
            .chain(glob(dir, "pg", "postmaster.pid"));
    pids.extend(server_pidfiles.filter_map(|f| servers::read_pid(&f)));
    pids
}

fn glob(dir: &std::path::Path, sub: &str, file: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir.join(sub))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join(file))
        .filter(|p| p.exists())
        .collect()
}

#[test]
fn up_status_poll_and_down() {
    let _one = one_stack_at_a_time();
    let stack = StackDir::new("tally-local-");
    let dir = stack.dir();
    ok(&["local", "up", "--dir", dir]);
    let running = pids(stack.path());
    assert!(
        running.len() >= 3 * 3 + 3 + 4,
        "roles, postgres and redis pids: {running:?}"
    );
    // An aggregator left stopped (as an interrupted `tally bad-input` could leave one).
    let aggregator = common::role_pids(stack.path(), "aggregator")[0];
    let state = |pid| servers::process_state(pid).expect("the aggregator runs");
    assert!(Command::new("kill")
        .args(["-STOP", &aggregator.to_string()])
        .status()
        .unwrap()
        .success());
    common::wait_until(
        Duration::from_secs(10),
        || state(aggregator) == 'T',
        || "never stopped".into(),
    );
    // A second `up` restarts nothing, continues what is stopped, and succeeds.
    ok(&["local", "up", "--dir", dir]);
    assert_eq!(
        pids(stack.path()),
        running,
        "a second up restarted something"
    );
    assert_ne!(state(aggregator), 'T', "the aggregator is still stopped");

    let status: serde_json::Value =
        serde_json::from_str(&ok(&["local", "status", "--dir", dir, "--json"])).unwrap();
    let regions = status["regions"].as_array().unwrap();
    let names: Vec<&str> = regions
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["us-east-1", "eu-west-1", "ap-southeast-1"]);
    for r in regions {
        for key in ["ingest_url", "reader_url", "postgres_url"] {
            assert!(
                r[key].as_str().is_some_and(|u| u.contains("127.0.0.1:")),
                "{key} in {r}"
            );
        }
        assert!(!r["metrics_urls"].as_array().unwrap().is_empty());
        assert!(!r["redis_urls"].as_array().unwrap().is_empty());
        assert!(
            r["replica_lag_bytes"].as_i64().is_some(),
            "replica lag missing: {r}"
        );
        assert!(
            r["processes"]
                .as_object()
                .unwrap()
                .values()
                .all(|v| v == true),
            "{r}"
        );
    }
    assert_eq!(
        regions[0]["redis_urls"].as_array().unwrap().len(),
        2,
        "us-east-1 runs two shards"
    );

    ok(&[
        "poll",
        "create",
        "finale",
        "--options",
        "red,green,blue",
        "--dir",
        dir,
    ]);
    let created = Instant::now();
    for r in &regions[1..] {
        let url = r["postgres_url"].as_str().unwrap().to_string();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let seen = rt.block_on(async {
            let client = db::connect(&url).await.unwrap();
            loop {
                let polls = db::load_polls(&client).await.unwrap();
                if polls.iter().any(|p| p.id.as_str() == "finale") {
                    return created.elapsed();
                }
                assert!(
                    created.elapsed() < Duration::from_secs(2),
                    "poll not on replica {url} within 2 s"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        assert!(seen < Duration::from_secs(2));
    }
    // Voting by hand, as the README shows: a token of the stack's identity provider.
    let jwks = status["jwks_url"].as_str().unwrap();
    assert!(
        common::http_get(
            jwks.trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap(),
            "/.well-known/jwks.json",
            ""
        )
        .contains(r#""kty":"EC""#),
        "the identity provider serves its keys at {jwks}"
    );
    let token = ok(&["local", "token", "--voter", "alice", "--dir", dir]);
    let ingest = regions[1]["ingest_url"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://");
    let bearer = format!("Authorization: Bearer {}", token.trim());
    // Ingest reads its catalog from its replica once a second: the new poll may be a moment away.
    let mut answer = String::new();
    common::wait_until(
        Duration::from_secs(10),
        || {
            answer = common::post_vote(ingest, "finale", &bearer, "red");
            common::status(&answer) != 404
        },
        || "ingest never learnt of the new poll".into(),
    );
    assert_eq!(common::status(&answer), 202, "{answer}");
    // The voter cannot name itself, and no token is no voter.
    let answer = common::post_vote(ingest, "finale", "X-Voter-Id: mallory", "red");
    assert_eq!(common::status(&answer), 400, "{answer}");
    assert!(answer.contains("untrusted_voter_header"), "{answer}");
    let answer = common::post_vote(ingest, "finale", "X-Nothing: 1", "red");
    assert_eq!(common::status(&answer), 401, "{answer}");

    let again = tally(&["poll", "create", "finale", "--options", "x,y", "--dir", dir]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    ok(&["local", "down", "--dir", dir]);
    let alive = || -> Vec<u32> {
        running
            .iter()
            .copied()
            .filter(|&p| servers::pid_alive(p))
            .collect()
    };
    common::wait_until(
        Duration::from_secs(10),
        || alive().is_empty(),
        || format!("processes left running after down: {:?}", alive()),
    );
}

#[test]
fn failures_give_one_line_and_a_nonzero_exit_never_a_hang() {
    let _one = one_stack_at_a_time();
    let stack = StackDir::new("tally-local-");
    let dir = stack.dir();
    // No PostgreSQL binaries where we are told to look.
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["local", "up", "--dir", dir])
        .env("TALLY_PG_BIN", "/nonexistent/bin")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("not found") && err.contains("apt-get install postgresql"),
        "{err}"
    );

    // A port the stack wants is taken by someone else.
    ok(&["local", "up", "--dir", dir]);
    ok(&["local", "down", "--dir", dir]);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(stack.path().join("stack.json")).unwrap()).unwrap();
    let port = state["regions"][1]["ingest"].as_u64().unwrap() as u16;
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let start = Instant::now();
    let out = tally(&["local", "up", "--dir", dir]);
    assert!(start.elapsed() < Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("port {port}")) && err.contains("in use"),
        "{err}"
    );

    // Bad settings: exit 64 with one line, before anything is bound.
    let anonymous = common::ANONYMOUS_VOTERS;
    let with_voters = |args: &[&'static str]| -> Vec<&'static str> {
        args.iter().copied().chain(anonymous).collect()
    };
    let no_voters = [
        "ingest",
        "--redis-urls",
        "redis://127.0.0.1:1/",
        "--postgres-url",
        "postgres://x",
    ];
    for args in [
        &with_voters(&[
            "ingest",
            "--redis-urls",
            "http://x",
            "--postgres-url",
            "postgres://x",
        ])[..],
        // No voter identity, or anonymity without what it needs.
        &no_voters[..],
        &[&no_voters[..], &["--anonymous-voters"]].concat()[..],
        &[
            &no_voters[..],
            &["--anonymous-voters", "--cookie-secret", "short"],
        ]
        .concat()[..],
        &[
            &no_voters[..],
            &[
                "--jwks-file",
                "/nonexistent/jwks.json",
                "--jwt-issuer",
                "i",
                "--jwt-audience",
                "a",
            ],
        ]
        .concat()[..],
        &[
            &no_voters[..],
            &["--jwks-url", "http://127.0.0.1:1/jwks.json"],
        ]
        .concat()[..],
        &[
            &no_voters[..],
            &[
                "--anonymous-voters",
                "--cookie-secret",
                anonymous[2],
                "--trusted-proxies",
                "10.0.0.0/33",
            ],
        ]
        .concat()[..],
        &[
            "aggregator",
            "--redis-urls",
            "redis://127.0.0.1:1/",
            "--postgres-url",
            "host=x",
            "--pop-size",
            "0",
        ][..],
        &["reader", "--sources", ""][..],
        &["ingest", "--postgres-url", "x"][..],
        &with_voters(&[&no_voters[..], &["--group-linger-us", "2000000"]].concat())[..],
        &with_voters(&[&no_voters[..], &["--limit-keys", "1000000000"]].concat())[..],
        &with_voters(&[&no_voters[..], &["--keep-alive-timeout-ms", "0"]].concat())[..],
        &[
            "poll",
            "create",
            "p",
            "--options",
            "only-one",
            "--postgres-url",
            "postgres://127.0.0.1:1/x",
        ][..],
    ] {
        let out = tally(args);
        assert_eq!(
            out.status.code(),
            Some(64),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim().lines().count(),
            1,
            "{args:?}"
        );
    }
}
