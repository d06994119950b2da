//! No worker's votes left behind: the in-flight lists of a worker whose lease expired are
//! adopted by the region's live workers, each by exactly one, and counted once.

mod common;

use std::time::Duration;

use common::*;
use harness::votes::{self, Reference};
use harness::{PgCluster, RedisServer};
use model::{queue, Vote};
use redis::AsyncCommands;

/// Puts `votes` into in-flight lists of `worker` as its moves would have left them: elements of
/// 50 votes, lists of `per_list` votes scored by their first position, counted as stored and
/// moved. Returns the lists' keys.
async fn strand(
    shard: &RedisServer,
    worker: &str,
    votes: &[Vote],
    per_list: usize,
) -> anyhow::Result<Vec<String>> {
    let mut con = shard.connection().await?;
    let mut keys = Vec::new();
    for (seq, list) in votes.chunks(per_list).enumerate() {
        let key = queue::in_flight_key(worker, 1, seq as u64 + 1);
        let elements: Vec<Vec<u8>> = list
            .chunks(harness::VOTES_PER_ELEMENT)
            .map(|e| e.iter().flat_map(model::wire::encode).collect())
            .collect();
        let moved: i64 = con.incr(queue::MOVED, elements.len()).await?;
        let first = moved - elements.len() as i64 + 1;
        let _: () = redis::pipe()
            .atomic()
            .rpush(&key, &elements)
            .ignore()
            .zadd(queue::IN_FLIGHT, &key, first)
            .ignore()
            .incr(queue::STORED, list.len())
            .ignore()
            .query_async(&mut con)
            .await?;
        keys.push(key);
    }
    Ok(keys)
}

async fn exists(shard: &RedisServer, key: &str) -> anyhow::Result<bool> {
    Ok(shard.connection().await?.exists(key).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_workers_adopt_each_expired_list_exactly_once() -> anyhow::Result<()> {
    let shard = RedisServer::start().await?;
    let votes = votes::generate(400, 400, POLLS, 21);
    let lists = strand(&shard, "ghost", &votes, 40).await?;
    let held = strand(&shard, "sleeper", &votes[..40], 40).await?;
    let mut con = shard.connection().await?;
    let _: () = con.set_ex(queue::lease_key("sleeper"), "held", 600).await?;
    let scores: Vec<(String, f64)> = con.zrange_withscores(queue::IN_FLIGHT, 0, -1).await?;
    let score_of = |key: &str| scores.iter().find(|(k, _)| k == key).map(|(_, s)| *s);

    const RACERS: usize = 8;
    for (list, sleeping) in lists
        .iter()
        .map(|l| (l, false))
        .chain(held.iter().map(|l| (l, true)))
    {
        let before: Vec<Vec<u8>> = con.lrange(list, 0, -1).await?;
        let score = score_of(list);
        let mut racers = Vec::new();
        for r in 0..RACERS {
            let mut c = shard.connection().await?;
            let (list, into) = (list.clone(), queue::in_flight_key(&format!("w{r}"), 2, 1));
            racers.push(tokio::spawn(async move {
                let took = aggregator::lease::adopt(&mut c, &list, &into).await?;
                anyhow::Ok((took, into))
            }));
        }
        let mut adopters = Vec::new();
        for r in racers {
            let (took, into) = r.await??;
            if took {
                adopters.push(into);
            }
        }
        if sleeping {
            assert!(
                adopters.is_empty(),
                "{list} was adopted while its lease was held"
            );
            assert_eq!(con.lrange::<_, Vec<Vec<u8>>>(list, 0, -1).await?, before);
            continue;
        }
        assert_eq!(adopters.len(), 1, "{list} adopted by {adopters:?}");
        let into = &adopters[0];
        assert!(
            !exists(&shard, list).await?,
            "{list} still exists after its adoption"
        );
        assert_eq!(con.lrange::<_, Vec<Vec<u8>>>(into, 0, -1).await?, before);
        let now: Vec<(String, f64)> = con.zrange_withscores(queue::IN_FLIGHT, 0, -1).await?;
        assert!(
            now.iter().all(|(k, _)| k != list),
            "{list} still scored in flight"
        );
        assert_eq!(
            now.iter().find(|(k, _)| k == into).map(|(_, s)| *s),
            score,
            "the adopted list keeps its place"
        );
        // Its votes are in exactly one list: the key of every loser is absent.
        for r in 0..RACERS {
            let other = queue::in_flight_key(&format!("w{r}"), 2, 1);
            if &other != into {
                assert!(!exists(&shard, &other).await?);
            }
        }
        // The next list's race starts from clean keys.
        let _: () = con.rename(into, format!("{into}:done")).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_workers_votes_are_counted_once_by_two_live_workers_and_a_held_lease_is_respected(
) -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    polls(&pg).await?;
    let shards = vec![RedisServer::start().await?];
    let all = votes::generate(6_000, 3_000, POLLS, 22);
    let (stranded, rest) = all.split_at(2_000);
    let (sleeping, queued) = rest.split_at(500);
    strand(&shards[0], "ghost", stranded, 250).await?;
    let sleeper_lists = strand(&shards[0], "sleeper", sleeping, 250).await?;
    let mut con = shards[0].connection().await?;
    let _: () = con.set_ex(queue::lease_key("sleeper"), "held", 600).await?;
    enqueue(&shards, queued).await?;

    let a = start(config(&pg, &shards, "a")).await?;
    let b = start(config(&pg, &shards, "b")).await?;
    let started = std::time::Instant::now();
    loop {
        let left = shards[0].outstanding().await?;
        let ghosts: Vec<String> = con.keys(queue::in_flight_pattern("ghost")).await?;
        if left == sleeping.len() as u64 && ghosts.is_empty() {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < DRAIN_LIMIT,
            "{left} votes outstanding, ghost lists {ghosts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counted: Vec<Vote> = stranded.iter().chain(queued).cloned().collect();
    assert_exact(&pg, &Reference::of(&counted)).await?;
    for list in &sleeper_lists {
        assert!(
            exists(&shards[0], list).await?,
            "{list} was taken from a live worker"
        );
    }

    // The sleeper's lease gone, its lists are adopted too, and nothing is counted twice.
    let _: () = con.del(queue::lease_key("sleeper")).await?;
    harness::wait_drained(&shards, DRAIN_LIMIT).await?;
    a.stop().await?;
    b.stop().await?;
    assert_exact(&pg, &Reference::of(&all)).await?;
    let stored: Option<u64> = con.get(queue::STORED).await?;
    assert_eq!(stored, Some(0), "every vote acknowledged once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_releases_the_lease_so_what_is_left_is_adopted_at_once() -> anyhow::Result<()>
{
    let pg = PgCluster::start().await?;
    polls(&pg).await?;
    let shards = vec![RedisServer::start().await?];
    let mut leaving = config(&pg, &shards, "leaving");
    leaving.lease = Duration::from_secs(600);
    let leaving = start(leaving).await?;
    let mut con = shards[0].connection().await?;
    let lease = queue::lease_key("leaving");
    let started = std::time::Instant::now();
    while !con.exists::<_, bool>(&lease).await? {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "no lease taken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    leaving.stop().await?;
    assert!(
        !con.exists::<_, bool>(&lease).await?,
        "the lease outlived a clean stop"
    );

    // What a worker stopped mid-write leaves: lists of its own, adopted well within its lease.
    let votes = votes::generate(300, 300, POLLS, 23);
    strand(&shards[0], "leaving", &votes, 100).await?;
    let heir = start(config(&pg, &shards, "heir")).await?;
    harness::wait_drained(&shards, Duration::from_secs(30)).await?;
    heir.stop().await?;
    assert_exact(&pg, &Reference::of(&votes)).await
}
