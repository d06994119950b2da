//! Least privilege in Redis, and secrets kept out of logs: ingest and the aggregator run as the
//! real binary under their own Redis ACL users (`model::queue::INGEST_ACL`, `AGGREGATOR_ACL`) and
//! their own PostgreSQL roles; a vote goes through; each user is refused what it must not do;
//! and no password appears in any log line, not even in the error for a bad URL.

mod common;

use std::time::Duration;

use common::{command, http_get, listen, status, until, vote, wait_for_count, Role};
use servers::AclUser;

const INGEST_PASSWORD: &str = "ingest-5ecret-Zq81";
const AGGREGATOR_PASSWORD: &str = "aggregator-5ecret-Kp27";

async fn as_user(
    port: u16,
    user: &str,
    password: &str,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    redis::Client::open(format!("redis://{user}:{password}@127.0.0.1:{port}/"))?
        .get_multiplexed_async_connection()
        .await
}

/// "allowed", or the error running `args` as that connection's user gets (with "NOPERM" in it
/// for a refusal, also when a script's command is the one refused).
async fn refusal(conn: &mut redis::aio::MultiplexedConnection, args: &[&str]) -> String {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    match cmd.query_async::<redis::Value>(conn).await {
        Ok(_) => "allowed".to_string(),
        Err(e) => e.to_string(),
    }
}

fn refused(answer: &str) -> bool {
    let a = answer.to_lowercase();
    a.contains("noperm") || a.contains("can't access")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_has_only_its_redis_rights_and_logs_no_secret() -> anyhow::Result<()> {
    let redis = harness::RedisServer::start_with_users(vec![
        AclUser {
            name: "tally-ingest".into(),
            password: INGEST_PASSWORD.into(),
            rules: model::queue::INGEST_ACL.into(),
        },
        AclUser {
            name: "tally-aggregator".into(),
            password: AGGREGATOR_PASSWORD.into(),
            rules: model::queue::AGGREGATOR_ACL.into(),
        },
    ])
    .await?;
    let pg = harness::PgCluster::start().await?;
    let port = redis.server.port;
    let logs = tempfile::tempdir()?;
    let role_url = |role: &str| pg.primary.url(role, db::DATABASE);
    let info = [("RUST_LOG", "info")];

    let ingest_at = listen();
    let ingest_redis = format!("redis://tally-ingest:{INGEST_PASSWORD}@127.0.0.1:{port}/");
    let ingest_pg = role_url(db::INGEST_ROLE);
    let ingest_args: Vec<&str> = [
        "ingest",
        "--listen",
        &ingest_at,
        "--redis-urls",
        &ingest_redis,
        "--postgres-url",
        &ingest_pg,
    ]
    .into_iter()
    .chain(common::ANONYMOUS_VOTERS)
    .collect();
    let ingest = Role::start(&ingest_args, &info, logs.path().join("ingest.log"));
    until(
        "ingest ready as its own users",
        Duration::from_secs(30),
        || {
            std::net::TcpStream::connect(&ingest_at).is_ok()
                && status(&http_get(&ingest_at, "/readyz", "")) == 200
        },
    )
    .await;
    for n in 0..20 {
        let r = vote(&ingest_at, &format!("acl-voter-{n}"), "a");
        assert_eq!(status(&r), 202, "{r}\n{}", ingest.log());
    }

    // A payload no vote decodes from, so the aggregator's user must also dead-letter it.
    let mut queue = redis.connection().await?;
    let _: () = redis::cmd("RPUSH")
        .arg(model::queue::VOTES)
        .arg("not a vote")
        .query_async(&mut queue)
        .await?;
    let aggregator = Role::start(
        &[
            "aggregator",
            "--listen",
            &listen(),
            "--redis-urls",
            &format!("redis://tally-aggregator:{AGGREGATOR_PASSWORD}@127.0.0.1:{port}/"),
            "--postgres-url",
            &role_url(db::AGGREGATOR_ROLE),
        ],
        &info,
        logs.path().join("aggregator.log"),
    );
    let client = pg.client().await?;
    wait_for_count(
        &client,
        "SELECT count(*) FROM ballots WHERE voter_id LIKE 'acl-voter-%'",
        20,
        |n| {
            format!(
                "{n}/20 ballots: the aggregator's user lacks a right it needs?\n{}",
                aggregator.log()
            )
        },
    )
    .await?;
    // Acknowledged too: nothing left waiting or in flight, and the dead letter stored once.
    harness::wait_drained(std::slice::from_ref(&redis), Duration::from_secs(30)).await?;
    let dead: Vec<Vec<u8>> = redis::cmd("LRANGE")
        .arg(model::queue::DEAD_LETTERS)
        .arg(0)
        .arg(-1)
        .query_async(&mut queue)
        .await?;
    assert_eq!(
        dead,
        [model::queue::dead_letter("undecodable", b"not a vote")],
        "{}",
        aggregator.log()
    );

    // Ingest can push and nothing else: not read, pop, move, delete, touch other keys or the server.
    let mut ingest_user = as_user(port, "tally-ingest", INGEST_PASSWORD).await?;
    assert_eq!(
        refusal(&mut ingest_user, &["RPUSH", "tally:votes", "x"]).await,
        "allowed"
    );
    for args in [
        &["LPOP", "tally:votes"][..],
        &["LRANGE", "tally:votes", "0", "-1"],
        &[
            "LMOVE",
            "tally:votes",
            "tally:inflight:x:1",
            "LEFT",
            "RIGHT",
        ],
        &["DEL", "tally:votes"],
        &["RPUSH", "tally:dead", "x"],
        &["DECRBY", "tally:votes:stored", "1"],
        &["SET", "tally:votes:stored", "0"],
        &["SET", "other", "x"],
        &["KEYS", "*"],
        &["FLUSHALL"],
        &["CONFIG", "GET", "*"],
        &["EVAL", "return 1", "0"],
    ] {
        let got = refusal(&mut ingest_user, args).await;
        assert!(refused(&got), "ingest: {args:?}: {got}");
    }
    // The aggregator pops and moves, pushes only onto in-flight lists and dead letters.
    let mut aggregator_user = as_user(port, "tally-aggregator", AGGREGATOR_PASSWORD).await?;
    let got = refusal(
        &mut aggregator_user,
        &[
            "LMOVE",
            "tally:votes",
            "tally:inflight:t:1",
            "LEFT",
            "RIGHT",
        ],
    )
    .await;
    assert!(refused(&got), "LMOVE is not needed (BLMOVE is): {got}");
    assert_eq!(
        refusal(
            &mut aggregator_user,
            &[
                "BLMOVE",
                "tally:votes",
                "tally:inflight:t:1",
                "LEFT",
                "RIGHT",
                "0.1"
            ]
        )
        .await,
        "allowed"
    );
    for args in [
        &["RPUSH", "tally:votes", "forged"][..],
        &["LPUSH", "tally:votes", "forged"],
        &[
            "EVAL",
            "return redis.call('RPUSH', KEYS[1], 'forged')",
            "1",
            "tally:votes",
        ],
        &["SET", "other", "x"],
        &["GET", "other"],
        &["INCRBY", "tally:votes:stored", "1"],
        &["FLUSHALL"],
        &["CONFIG", "SET", "appendonly", "no"],
        &["ACL", "LIST"],
    ] {
        let got = refusal(&mut aggregator_user, args).await;
        assert!(refused(&got), "aggregator: {args:?}: {got}");
    }
    let left: u64 = redis::cmd("LLEN")
        .arg(model::queue::VOTES)
        .query_async(&mut queue)
        .await?;
    assert_eq!(left, 0, "a forged vote reached the queue");
    assert!(
        as_user(port, "tally-ingest", "wrong").await.is_err(),
        "a wrong password is refused"
    );

    // A URL the role refuses is reported without its password.
    let refused_url = format!("http://tally-ingest:{INGEST_PASSWORD}@x/");
    let args: Vec<&str> = [
        "ingest",
        "--redis-urls",
        &refused_url,
        "--postgres-url",
        "postgres://x",
    ]
    .into_iter()
    .chain(common::ANONYMOUS_VOTERS)
    .collect();
    let out = command(&args).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("tally-ingest:***@x"), "{err}");
    assert!(!err.contains(INGEST_PASSWORD), "{err}");

    drop(ingest);
    drop(aggregator);
    for log in ["ingest.log", "aggregator.log"] {
        let text = std::fs::read_to_string(logs.path().join(log))?;
        assert!(
            !text.is_empty(),
            "{log} is empty: the grep would prove nothing"
        );
        for secret in [INGEST_PASSWORD, AGGREGATOR_PASSWORD] {
            assert!(!text.contains(secret), "{log} holds a password:\n{text}");
        }
    }
    Ok(())
}
