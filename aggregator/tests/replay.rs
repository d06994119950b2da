//! Replication is asynchronous, so a commit can exist on the primary alone. These tests cut the
//! replica off, let a worker drain, lose the primary and promote the replica: with the replay
//! wait the votes are still in Redis and the new primary counts them exactly once; without it
//! (the control) they were taken out of Redis and are gone.

mod common;

use std::time::Duration;

use common::*;
use harness::votes::{self, Reference};
use harness::{PgCluster, RedisServer};
use servers::{Postgres, StopMode};

/// Both servers, whichever takes writes: how a worker finds the primary after a failover.
fn either(pg: &PgCluster) -> String {
    format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user={} dbname={} target_session_attrs=read-write",
        pg.primary.port,
        pg.replica().port,
        db::AGGREGATOR_ROLE,
        db::DATABASE
    )
}

/// The replica stops receiving WAL (it keeps what it has replayed).
async fn cut_off(pg: &PgCluster) -> anyhow::Result<()> {
    let replica = db::connect(&pg.replica_url()).await?;
    replica
        .batch_execute("ALTER SYSTEM SET primary_conninfo = ''")
        .await?;
    replica.batch_execute("SELECT pg_reload_conf()").await?;
    let primary = pg.client().await?;
    poll_until("the primary to lose its replica", || async {
        let streaming: i64 = primary
            .query_one("SELECT count(*) FROM pg_stat_replication", &[])
            .await?
            .get(0);
        Ok(streaming == 0)
    })
    .await
}

/// The primary is lost and the replica promoted, as `tally replication` does.
async fn fail_over(pg: &PgCluster) -> anyhow::Result<db::Client> {
    let primary: Postgres = pg.primary.clone();
    tokio::task::spawn_blocking(move || primary.stop(StopMode::Immediate)).await??;
    let replica = db::connect(&pg.replica_url()).await?;
    replica
        .query_one("SELECT pg_promote(true, 60)", &[])
        .await?;
    replica
        .batch_execute("ALTER SYSTEM RESET default_transaction_read_only")
        .await?;
    replica.batch_execute("SELECT pg_reload_conf()").await?;
    Ok(replica)
}

async fn counted(client: &db::Client) -> anyhow::Result<i64> {
    Ok(client
        .query_one("SELECT count(*) FROM ballots", &[])
        .await?
        .get(0))
}

async fn poll_until<F, Fut>(what: &str, mut done: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let start = std::time::Instant::now();
    while !done().await? {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Drains `votes` with the replica cut off; returns once the primary holds all of them.
async fn drain_unreplicated(
    pg: &PgCluster,
    shards: &[RedisServer],
    votes: &[model::Vote],
    wait_replicas: usize,
) -> anyhow::Result<Running> {
    polls(pg).await?;
    pg.wait_replica_caught_up(Duration::from_secs(30)).await?;
    cut_off(pg).await?;
    enqueue(shards, votes).await?;
    let mut config = config(pg, shards, "w1");
    config.postgres_url = either(pg);
    config.wait_replicas = wait_replicas;
    config.recover_every = Duration::from_millis(200);
    let agg = start(config).await?;
    let primary = pg.client().await?;
    let ballots = Reference::of(votes).ballots().len() as i64;
    poll_until("every vote committed on the primary", || async {
        Ok(counted(&primary).await? == ballots)
    })
    .await?;
    Ok(agg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn votes_leave_redis_only_once_a_replica_replayed_them() -> anyhow::Result<()> {
    let pg = PgCluster::start_with_replica().await?;
    let shards = harness::redis_shards(2).await?;
    let votes = votes::generate(6_000, 2_000, POLLS, 11);
    let agg = drain_unreplicated(&pg, &shards, &votes, 1).await?;

    // Committed on the primary, replayed nowhere: nothing may leave Redis. A worker without
    // the wait acknowledges within milliseconds of its commit (the control below).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut queued = 0;
    for s in &shards {
        queued += s.outstanding().await?;
    }
    assert_eq!(
        queued,
        votes.len() as u64,
        "votes left Redis before any replica replayed them"
    );

    let new_primary = fail_over(&pg).await?;
    // The worker finds the promoted server, gives up on the old timeline's commits and applies
    // their lists again.
    let reference = Reference::of(&votes);
    let ballots = reference.ballots().len() as i64;
    poll_until("the new primary to count every vote", || async {
        Ok(counted(&new_primary).await? == ballots)
    })
    .await?;
    assert_eq!(votes::tallies(&new_primary).await?, reference.tallies());
    assert_eq!(votes::ballots(&new_primary).await?, reference.ballots());
    assert_eq!(
        votes::tallies(&new_primary).await?,
        votes::recount(&new_primary).await?
    );
    let _ = agg.stop.send(());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_without_the_wait_a_failover_loses_counted_votes() -> anyhow::Result<()> {
    let pg = PgCluster::start_with_replica().await?;
    let shards = harness::redis_shards(2).await?;
    let votes = votes::generate(6_000, 2_000, POLLS, 12);
    let agg = drain_unreplicated(&pg, &shards, &votes, 0).await?;
    harness::wait_drained(&shards, DRAIN_LIMIT).await?;
    agg.stop().await?;

    let new_primary = fail_over(&pg).await?;
    assert_eq!(
        counted(&new_primary).await?,
        0,
        "the cut-off replica should lack every commit"
    );
    let mut queued = 0;
    for s in &shards {
        queued += s.outstanding().await?;
    }
    assert_eq!(queued, 0, "and Redis no longer holds them: they are lost");
    Ok(())
}
