//! The fixtures start real servers and clean up after themselves, also on panic.

use harness::{PgCluster, RedisServer};

#[tokio::test]
async fn replica_streams_from_primary() -> anyhow::Result<()> {
    let pg = PgCluster::start_with_replica().await?;
    let replica = db::connect(&pg.replica_url()).await?;
    let in_recovery: bool = replica
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0);
    assert!(in_recovery, "the replica must be a hot standby");
    pg.client()
        .await?
        .batch_execute("CREATE TABLE probe(x int); INSERT INTO probe VALUES (42)")
        .await?;
    pg.wait_replica_caught_up(std::time::Duration::from_secs(5))
        .await?;
    let x: i32 = replica.query_one("SELECT x FROM probe", &[]).await?.get(0);
    assert_eq!(x, 42);
    Ok(())
}

#[tokio::test]
async fn servers_stop_when_the_fixture_drops_even_on_panic() -> anyhow::Result<()> {
    // Checked by process, not by port: tests running beside this one may take a freed port at once.
    let redis = RedisServer::start().await?;
    let redis_pid = redis.server.pid().expect("redis writes its pid file");
    let postmaster_pid = {
        let pg = PgCluster::start().await?;
        let pid: u32 = std::fs::read_to_string(pg.primary.data_dir.join("postmaster.pid"))?
            .lines()
            .next()
            .unwrap()
            .parse()?;
        assert!(servers::pid_alive(pid));
        pid
    };
    let panicked = tokio::spawn(async move {
        let _owned_by_the_panicking_task = redis;
        panic!("test body panicked");
    })
    .await;
    assert!(panicked.is_err());
    assert!(
        !servers::pid_alive(redis_pid),
        "redis (pid {redis_pid}) outlived its fixture"
    );
    assert!(
        !servers::pid_alive(postmaster_pid),
        "postgres (pid {postmaster_pid}) outlived its fixture"
    );
    Ok(())
}
