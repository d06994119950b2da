//! A vote is acknowledged only once its shard's replica holds it too (`WAIT`), so a failover
//! that promotes the replica loses nothing acknowledged; without the wait, it does.

mod common;

use std::time::Duration;

use common::vote;
use harness::{PgCluster, ReplicatedShard};
use redis::AsyncCommands;

/// How long the sentinel and ingest get to notice a failover and serve again.
const FAILOVER_WITHIN: Duration = Duration::from_secs(30);

/// The voters whose votes the queue of the server on `port` holds.
async fn voters_in(port: u16) -> anyhow::Result<Vec<String>> {
    let mut con = harness::redis_connection(&format!("redis://127.0.0.1:{port}/")).await?;
    let elements: Vec<Vec<u8>> = con.lrange(model::queue::VOTES, 0, -1).await?;
    let mut voters = Vec::new();
    for element in &elements {
        for bytes in model::wire::split(element) {
            voters.push(model::wire::decode(bytes?)?.voter.as_str().to_string());
        }
    }
    Ok(voters)
}

/// Votes `voters` in turn; returns those answered 202 and the other answers.
async fn cast(
    client: &harness::http::Client,
    voters: impl Iterator<Item = String>,
) -> anyhow::Result<(Vec<String>, Vec<harness::http::Reply>)> {
    let (mut acknowledged, mut refused) = (Vec::new(), Vec::new());
    for voter in voters {
        let reply = vote(client, "default", "a", &voter).await?;
        if reply.status == 202 {
            acknowledged.push(voter);
        } else {
            refused.push(reply);
        }
    }
    Ok((acknowledged, refused))
}

/// Until a vote is acknowledged again (ingest follows the sentinel to the new primary).
async fn until_acknowledged(client: &harness::http::Client, tag: &str) -> anyhow::Result<String> {
    let started = std::time::Instant::now();
    for i in 0.. {
        let voter = format!("{tag}-{i}");
        if vote(client, "default", "a", &voter).await?.status == 202 {
            return Ok(voter);
        }
        anyhow::ensure!(
            started.elapsed() < FAILOVER_WITHIN,
            "no vote acknowledged within {FAILOVER_WITHIN:?} ({tag})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_its_replica_stopped_a_shard_refuses_and_a_failover_loses_nothing_acknowledged(
) -> anyhow::Result<()> {
    harness::init_logs();
    let pg = PgCluster::start().await?;
    let shard = ReplicatedShard::start(1).await?;
    let mut config = common::config(&pg, vec![shard.url()]);
    config.wait_replicas = 1;
    let ingest = common::serve(config).await?;

    let (mut acknowledged, refused) =
        cast(&ingest.client, (0..50).map(|i| format!("before-{i}"))).await?;
    assert!(
        refused.is_empty(),
        "refused with the replica up: {:?}",
        refused[0].text()
    );

    // The replica stops taking the stream: nothing can be copied to it, nothing is acknowledged.
    let primary = shard.primary()?.port;
    let replica = shard.servers.iter().find(|s| s.port != primary).unwrap();
    let replica_pid = replica.pid().expect("the replica runs");
    servers::signal(replica_pid, "STOP");
    let (stalled, refused) = cast(&ingest.client, (0..5).map(|i| format!("stalled-{i}"))).await?;
    servers::signal(replica_pid, "CONT");
    assert!(
        stalled.is_empty(),
        "acknowledged without a replica: {stalled:?}"
    );
    for reply in &refused {
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert_eq!(reply.error_code(), "unavailable");
        assert!(
            reply.text().contains("could not copy it to a replica"),
            "{}",
            reply.text()
        );
    }

    shard.wait_in_sync(Duration::from_secs(30)).await?;
    acknowledged.extend(
        cast(&ingest.client, (0..50).map(|i| format!("after-{i}")))
            .await?
            .0,
    );
    assert_eq!(acknowledged.len(), 100);

    // The primary dies; the sentinel promotes the replica, which has every acknowledged vote.
    shard.server(primary)?.kill();
    let promoted = shard.wait_promoted(primary, FAILOVER_WITHIN).await?.port;
    let held = voters_in(promoted).await?;
    let missing: Vec<&String> = acknowledged.iter().filter(|v| !held.contains(v)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged and lost in the failover: {missing:?}"
    );

    // With no replica left the shard refuses; the old primary back as a replica, ingest, which
    // followed the sentinel, acknowledges on the new primary.
    let refused = vote(&ingest.client, "default", "a", "orphan").await?;
    assert_eq!(refused.status, 503, "{}", refused.text());
    tokio::task::spawn_blocking({
        let old = shard.server(primary)?.clone();
        move || old.start()
    })
    .await??;
    let voter = until_acknowledged(&ingest.client, "rejoined").await?;
    assert!(
        voters_in(promoted).await?.contains(&voter),
        "acknowledged elsewhere than the new primary"
    );
    ingest.shutdown().await
}

/// The control: the same failover without ingest's wait loses votes it acknowledged, so the
/// test above would catch a wait that did nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_wait_a_failover_loses_acknowledged_votes() -> anyhow::Result<()> {
    harness::init_logs();
    let pg = PgCluster::start().await?;
    let shard = ReplicatedShard::start(1).await?;
    let mut config = common::config(&pg, vec![shard.url()]);
    config.wait_replicas = 0;
    let ingest = common::serve(config).await?;

    let primary = shard.primary()?.port;
    let replica = shard.servers.iter().find(|s| s.port != primary).unwrap();
    let replica_pid = replica.pid().expect("the replica runs");
    servers::signal(replica_pid, "STOP");
    // More than the sockets between them hold, so what follows stays in the primary's memory
    // (as it would behind a slow link) and dies with it.
    let mut con = harness::redis_connection(&shard.server(primary)?.url()).await?;
    let filler = vec![b'x'; 1 << 20];
    for i in 0..32 {
        let _: () = con.set(format!("filler:{i}"), &filler).await?;
    }
    let (acknowledged, refused) =
        cast(&ingest.client, (0..20).map(|i| format!("unsafe-{i}"))).await?;
    assert!(
        refused.is_empty(),
        "refused without a wait: {:?}",
        refused[0].text()
    );
    shard.server(primary)?.kill();
    servers::signal(replica_pid, "CONT");
    let promoted = shard.wait_promoted(primary, FAILOVER_WITHIN).await?.port;
    let held = voters_in(promoted).await?;
    let lost = acknowledged.iter().filter(|v| !held.contains(v)).count();
    assert_eq!(
        lost,
        acknowledged.len(),
        "the replica had none of the votes acknowledged while it was behind"
    );
    ingest.shutdown().await
}
