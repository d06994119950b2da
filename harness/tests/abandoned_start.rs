//! A fixture whose caller stops waiting while its server starts (an interrupted bench drops its
//! set-up at whatever await it is in) still stops that server and removes its directory.
//!
//! Alone in its binary: it points `TMPDIR` at a directory of its own, where every fixture makes
//! its files and its servers work, so any server found working there is one of its own.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use harness::{PgCluster, RedisServer};

/// Starts a fixture and drops the start as soon as a server under `tmp` has said it is ready
/// (before the start's own readiness check, polling every 20 ms, sees it), then drops the runtime,
/// which waits for its blocking tasks. True when the start was abandoned, false when it finished
/// first.
fn abandon_start<F, T>(tmp: &Path, start: impl FnOnce() -> F) -> bool
where
    F: Future<Output = anyhow::Result<T>>,
{
    let rt = tokio::runtime::Runtime::new().unwrap();
    let abandoned = rt.block_on(async {
        let ready = async {
            while !said_ready(tmp) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::select! {
            biased;
            () = ready => true,
            started = start() => {
                drop(started.expect("the fixture starts"));
                false
            }
        }
    });
    drop(rt);
    abandoned
}

/// Has a server under `dir` said it is ready: Redis in its log, PostgreSQL in `postmaster.pid`'s
/// status line?
fn said_ready(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| {
            let path = entry.path();
            let said = |file: &str, ready: fn(&str) -> bool| {
                path.ends_with(file)
                    && std::fs::read_to_string(&path).is_ok_and(|text| ready(&text))
            };
            path.is_dir() && said_ready(&path)
                || said("redis.log", |log| {
                    log.contains("Ready to accept connections")
                })
                || said("postmaster.pid", |pid| {
                    pid.lines().any(|l| l.trim() == "ready")
                })
        })
}

#[test]
fn a_start_abandoned_mid_way_stops_its_server_and_removes_its_directory() {
    let tmp = tempfile::tempdir().unwrap();
    std::env::set_var("TMPDIR", tmp.path());
    let tmp = tmp.path();
    // A start can win the race now and then (on a quiet machine Redis is up within 30 ms, before
    // its log is read, five times running in one CI run); one abandoned start in some tries is
    // what the test needs, and each lost try costs only a start.
    let abandoned_redis = (0..50).any(|_| abandon_start(tmp, RedisServer::start));
    assert!(
        abandoned_redis,
        "every redis start finished before it could be abandoned"
    );
    harness::assert_left_nothing_under(tmp, "redis, its start abandoned");
    let abandoned_postgres = (0..3).any(|_| abandon_start(tmp, PgCluster::start));
    assert!(
        abandoned_postgres,
        "every postgres start finished before it could be abandoned"
    );
    harness::assert_left_nothing_under(tmp, "postgres, its start abandoned");
}
