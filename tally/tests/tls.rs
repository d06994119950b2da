//! TLS to PostgreSQL and Redis: servers that take only TLS, with a test CA made by `openssl`. The
//! roles run as the real binary, configured as an operator would: `rediss://` URLs,
//! `sslmode=require`, and `TALLY_TLS_CA_FILE`.

mod common;

use std::time::Duration;

use common::{command, http_get, listen, status, until, vote, wait_for_count, Role};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_work_through_tls_with_the_test_ca_and_fail_clearly_without_it() -> anyhow::Result<()>
{
    let (ca_dir, ca) = harness::test_ca()?;
    let ca_file = ca.ca_file();
    let with_ca = [(tls::ENV_CA_FILE, ca_file.to_str().unwrap())];
    // This process's own checks go through TLS too.
    tls::trust(Some(&ca_file))?;
    let pg = harness::PgCluster::start_tls(ca.clone()).await?;
    let redis = harness::RedisServer::start_tls(ca.clone()).await?;
    let (pg_url, redis_url) = (pg.url(), redis.url());
    assert!(pg_url.ends_with("sslmode=require") && redis_url.starts_with("rediss://"));
    let logs = ca_dir.path();

    // With the CA: a vote goes ingest -> Redis -> aggregator -> PostgreSQL -> reader, all over TLS.
    let ingest_at = listen();
    let ingest_args = |listen: &str, redis: &str| -> Vec<String> {
        [
            "ingest",
            "--listen",
            listen,
            "--redis-urls",
            redis,
            "--postgres-url",
            &pg_url,
        ]
        .into_iter()
        .chain(common::ANONYMOUS_VOTERS)
        .map(String::from)
        .collect()
    };
    let args = ingest_args(&ingest_at, &redis_url);
    let ingest = Role::start(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &with_ca,
        logs.join("ingest.log"),
    );
    until("ingest ready over TLS", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&ingest_at).is_ok()
            && status(&http_get(&ingest_at, "/readyz", "")) == 200
    })
    .await;
    let accepted = vote(&ingest_at, "tls-voter", "b");
    assert_eq!(status(&accepted), 202, "{accepted}\n{}", ingest.log());
    let mut queue = redis.connection().await?;
    let queued: u64 = redis::cmd("LLEN")
        .arg(model::queue::VOTES)
        .query_async(&mut queue)
        .await?;
    assert_eq!(queued, 1, "the vote is in the TLS-only Redis");

    let _aggregator = Role::start(
        &[
            "aggregator",
            "--listen",
            &listen(),
            "--redis-urls",
            &redis_url,
            "--postgres-url",
            &pg_url,
        ],
        &with_ca,
        logs.join("aggregator.log"),
    );
    let client = pg.client().await?;
    wait_for_count(
        &client,
        "SELECT count(*) FROM ballots WHERE voter_id = 'tls-voter'",
        1,
        |_| "the aggregator never wrote the ballot over TLS".into(),
    )
    .await?;

    let reader_at = listen();
    let _reader = Role::start(
        &["reader", "--listen", &reader_at, "--sources", &pg_url],
        &with_ca,
        logs.join("reader.log"),
    );
    until(
        "the reader serves the count read over TLS",
        Duration::from_secs(30),
        || {
            std::net::TcpStream::connect(&reader_at).is_ok() && {
                let r = http_get(&reader_at, "/v1/polls/default/results", "");
                status(&r) == 200 && r.contains(r#""b":1"#)
            }
        },
    )
    .await;

    // Without the CA, the server's certificate is not trusted, and the error says what to set.
    let out = command(&["poll", "list", "--postgres-url", &pg_url])
        .env_remove(tls::ENV_CA_FILE)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("TLS handshake with 127.0.0.1 failed") && err.contains(tls::ENV_CA_FILE),
        "{err}"
    );

    // Without TLS at all, PostgreSQL refuses by name.
    let plain = pg_url.replace("sslmode=require", "sslmode=disable");
    let out = command(&["poll", "list", "--postgres-url", &plain])
        .env(tls::ENV_CA_FILE, &ca_file)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no encryption"), "{err}");

    // A plain redis:// URL to the TLS-only Redis: ingest is not ready, votes get 503, and the
    // log says what the URL must be.
    let plain_at = listen();
    let args = ingest_args(&plain_at, &redis_url.replace("rediss://", "redis://"));
    let plain_ingest = Role::start(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &with_ca,
        logs.join("plain-ingest.log"),
    );
    until(
        "the plain ingest says why its shard is down",
        Duration::from_secs(30),
        || {
            plain_ingest
                .log()
                .contains("its URL must start with rediss://")
        },
    )
    .await;
    let readyz = http_get(&plain_at, "/readyz", "");
    assert_eq!(status(&readyz), 503, "{readyz}");
    assert!(readyz.contains(r#""shards_down":[0]"#), "{readyz}");
    assert_eq!(status(&vote(&plain_at, "plain-voter", "a")), 503);
    let queued: u64 = redis::cmd("LLEN")
        .arg(model::queue::VOTES)
        .query_async(&mut queue)
        .await?;
    assert_eq!(queued, 0, "nothing was queued through the plain URL");

    // A CA file that is not one stops a role before it binds its port.
    let not_a_ca = logs.join("not-a-ca.pem");
    std::fs::write(&not_a_ca, "hello\n")?;
    let args = ingest_args(&listen(), &redis_url);
    let out = command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .env(tls::ENV_CA_FILE, &not_a_ca)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("holds no PEM certificate"), "{err}");
    drop(ingest);
    Ok(())
}
