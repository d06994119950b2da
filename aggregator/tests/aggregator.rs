//! The aggregator against real Redis shards and a real PostgreSQL primary.

mod common;

use std::time::Duration;

use common::*;
use harness::votes::{self, Reference};
use harness::{PgCluster, RedisServer};
use model::{Poll, RegionName, Vote};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use redis::AsyncCommands;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tallies_match_the_reference_and_a_recount() -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    polls(&pg).await?;
    let shards = harness::redis_shards(2).await?;
    let votes = votes::generate(30_000, 8_000, POLLS, 1);
    enqueue(&shards, &votes).await?;
    let agg = start(config(&pg, &shards, "w1")).await?;
    harness::wait_drained(&shards, DRAIN_LIMIT).await?;
    agg.stop().await?;
    assert_exact(&pg, &Reference::of(&votes)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_and_shuffled_order_change_nothing() -> anyhow::Result<()> {
    let votes = votes::generate(20_000, 5_000, POLLS, 2);
    let reference = Reference::of(&votes);
    let mut shuffled = votes.clone();
    shuffled.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));
    let mut reversed = votes.clone();
    reversed.reverse();
    let mut results = Vec::new();
    // Once in order; once shuffled and then every vote delivered a second time, in reverse.
    for round in [vec![votes.clone()], vec![shuffled, reversed]] {
        let pg = PgCluster::start().await?;
        polls(&pg).await?;
        let shards = harness::redis_shards(2).await?;
        let agg = start(config(&pg, &shards, "w1")).await?;
        for delivery in &round {
            enqueue(&shards, delivery).await?;
            harness::wait_drained(&shards, DRAIN_LIMIT).await?;
        }
        agg.stop().await?;
        assert_exact(&pg, &reference).await?;
        let client = pg.client().await?;
        results.push((
            votes::ballots(&client).await?,
            votes::tallies(&client).await?,
        ));
    }
    assert_eq!(results[0], results[1]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_at_random_instants_lose_nothing_and_double_nothing() -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    polls(&pg).await?;
    let shards = harness::redis_shards(2).await?;
    let votes = votes::generate(60_000, 20_000, POLLS, 3);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    // A continuous backlog: votes keep arriving while the worker is crashed and restarted.
    let feeder = {
        let votes = votes.clone();
        let urls: Vec<String> = shards.iter().map(|s| s.url()).collect();
        tokio::spawn(async move {
            let mut cons = Vec::new();
            for u in &urls {
                cons.push(harness::redis_connection(u).await?);
            }
            for part in votes.chunks(600) {
                for v in part {
                    let shard =
                        model::shard_of(v.poll.as_str(), v.voter.as_str(), urls.len() as u32)
                            as usize;
                    let _: () = cons[shard]
                        .rpush(model::queue::VOTES, model::wire::encode(v))
                        .await?;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::Ok(())
        })
    };
    for _ in 0..25 {
        let agg = start(config(&pg, &shards, "w1")).await?;
        let alive = rand::Rng::random_range(&mut rng, 20..250);
        tokio::time::sleep(Duration::from_millis(alive)).await;
        // Dropped wherever it is: mid-move, mid-COPY, mid-commit or mid-ack.
        agg.task.abort();
        let _ = agg.task.await;
    }
    feeder.await??;
    let agg = start(config(&pg, &shards, "w1")).await?;
    harness::wait_drained(&shards, DRAIN_LIMIT).await?;
    agg.stop().await?;
    assert_exact(&pg, &Reference::of(&votes)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_restart_mid_drain_is_waited_out() -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    polls(&pg).await?;
    let shards = harness::redis_shards(1).await?;
    let votes = votes::generate(80_000, 30_000, POLLS, 4);
    enqueue(&shards, &votes).await?;
    let agg = start(config(&pg, &shards, "w1")).await?;
    // Wait until it is visibly mid-drain, then crash and restart the primary.
    let client = pg.client().await?;
    let start_wait = std::time::Instant::now();
    while client
        .query_one("SELECT count(*) FROM ballots", &[])
        .await?
        .get::<_, i64>(0)
        == 0
    {
        anyhow::ensure!(
            start_wait.elapsed() < Duration::from_secs(30),
            "nothing was written"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(client);
    let primary = pg.primary.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        primary.stop(servers::StopMode::Immediate)?;
        std::thread::sleep(Duration::from_millis(500));
        primary.start()?;
        Ok(())
    })
    .await??;
    harness::wait_drained(&shards, DRAIN_LIMIT).await?;
    agg.stop().await?;
    assert_exact(&pg, &Reference::of(&votes)).await
}

#[tokio::test]
async fn poison_goes_to_the_dead_letter_list_with_a_reason() -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    polls(&pg).await?;
    let shards = harness::redis_shards(1).await?;
    let good = votes::generate(100, 50, POLLS, 5);
    let mut unknown_poll = good[0].clone();
    unknown_poll.poll = model::PollId::new("no-such-poll")?;
    let mut unknown_option = good[1].clone();
    unknown_option.option = model::OptionId::new("zzz")?;
    let mut future = model::wire::encode(&good[2]);
    future[0] = 9;
    let mut con = shards[0].connection().await?;
    let mut payloads: Vec<Vec<u8>> = good[..50].iter().map(model::wire::encode).collect();
    payloads.push(b"{\"voter_id\":\"x\",\"vote\":\"a\"}".to_vec());
    payloads.push(model::wire::encode(&unknown_poll));
    payloads.push(future);
    payloads.push(model::wire::encode(&unknown_option));
    payloads.extend(good[50..].iter().map(model::wire::encode));
    let _: () = con.rpush(model::queue::VOTES, payloads).await?;
    let agg = start(config(&pg, &shards, "w1")).await?;
    harness::wait_drained(&shards, DRAIN_LIMIT).await?;
    agg.stop().await?;
    assert_exact(&pg, &Reference::of(&good)).await?;
    let dead: Vec<Vec<u8>> = con.lrange(model::queue::DEAD_LETTERS, 0, -1).await?;
    let reasons: Vec<String> = dead
        .iter()
        .map(|d| String::from_utf8_lossy(d.split(|&b| b == b'\n').next().unwrap()).into_owned())
        .collect();
    assert_eq!(
        reasons,
        [
            "undecodable",
            "undecodable",
            "unknown poll",
            "unknown option"
        ]
    );
    assert!(
        dead[0].ends_with(b"{\"voter_id\":\"x\",\"vote\":\"a\"}"),
        "the payload is kept as it was"
    );
    Ok(())
}

/// Ingest pushes each write as one element of votes back to back and counts them in
/// `STORED`: every vote of every element is counted, a damaged element loses only what cannot be
/// read (dead-lettered), and the acknowledgements take the count back to zero.
#[tokio::test]
async fn elements_of_many_votes_are_counted_and_taken_off_the_shards_count() -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    polls(&pg).await?;
    let shards = harness::redis_shards(1).await?;
    let good = votes::generate(3_000, 700, POLLS, 7);
    let mut elements: Vec<Vec<u8>> = good[..2_990]
        .chunks(46)
        .map(|votes| votes.iter().flat_map(model::wire::encode).collect())
        .collect();
    let mut unknown_poll = good[2_990].clone();
    unknown_poll.poll = model::PollId::new("no-such-poll")?;
    let mut damaged: Vec<u8> = good[2_990..].iter().flat_map(model::wire::encode).collect();
    damaged.extend(model::wire::encode(&unknown_poll));
    damaged.extend_from_slice(b"\x01torn");
    elements.push(damaged);
    let mut con = shards[0].connection().await?;
    let _: () = redis::pipe()
        .atomic()
        .rpush(model::queue::VOTES, &elements)
        .ignore()
        .incr(model::queue::STORED, 3_001)
        .ignore()
        .query_async(&mut con)
        .await?;
    assert_eq!(
        shards[0].outstanding().await?,
        3_002,
        "3,001 votes and one torn tail"
    );

    let mut c = config(&pg, &shards, "w1");
    c.pop_size = 500;
    let agg = start(c).await?;
    harness::wait_drained(&shards, DRAIN_LIMIT).await?;
    agg.stop().await?;
    assert_exact(&pg, &Reference::of(&good)).await?;
    let dead: Vec<Vec<u8>> = con.lrange(model::queue::DEAD_LETTERS, 0, -1).await?;
    assert_eq!(
        dead.len(),
        2,
        "one dead letter a vote, one for the torn tail"
    );
    assert_eq!(
        dead[0],
        model::queue::dead_letter("undecodable", b"\x01torn"),
        "the tail is kept as it was"
    );
    assert_eq!(
        dead[1],
        model::queue::dead_letter("unknown poll", &model::wire::encode(&unknown_poll))
    );
    let stored: Option<i64> = con.get(model::queue::STORED).await?;
    assert_eq!(
        stored,
        Some(0),
        "every acknowledged vote taken off the count"
    );
    Ok(())
}

#[tokio::test]
async fn an_error_retrying_cannot_fix_stops_the_worker_and_keeps_the_votes() -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    polls(&pg).await?;
    pg.client()
        .await?
        .batch_execute("REVOKE INSERT ON ballots FROM tally_aggregator")
        .await?;
    let shards = harness::redis_shards(1).await?;
    let votes = votes::generate(500, 200, POLLS, 6);
    shards[0].enqueue(&votes).await?;
    let agg = start(config(&pg, &shards, "w1")).await?;
    let outcome = tokio::time::timeout(Duration::from_secs(30), agg.task)
        .await?
        .expect("no panic");
    let err = outcome
        .expect_err("the worker must stop on a permission error")
        .to_string();
    assert!(err.contains("permission denied for table ballots"), "{err}");
    assert_eq!(
        shards[0].outstanding().await?,
        500,
        "every vote stays in Redis"
    );
    Ok(())
}

/// Between the aggregator and a Redis shard: forwards every byte, except that it swallows the
/// first reply that `lost` picks, to a request holding `request`, and cuts that connection, as a
/// Redis killed after applying a command and before its reply went out would.
struct LostReply {
    request: &'static [u8],
    lost: fn(&[u8]) -> bool,
    armed: std::sync::atomic::AtomicBool,
    /// Told when a request holding `request` passes.
    sent: tokio::sync::Notify,
    swallowed: std::sync::atomic::AtomicUsize,
}

impl LostReply {
    /// In front of `shard`; the relay's `redis://` URL comes back with it.
    async fn start(
        shard: &RedisServer,
        request: &'static [u8],
        lost: fn(&[u8]) -> bool,
    ) -> anyhow::Result<(std::sync::Arc<Self>, String)> {
        let upstream = format!("127.0.0.1:{}", shard.server.port);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("redis://{}", listener.local_addr()?);
        let trap = std::sync::Arc::new(Self {
            request,
            lost,
            armed: std::sync::atomic::AtomicBool::new(true),
            sent: tokio::sync::Notify::new(),
            swallowed: std::sync::atomic::AtomicUsize::new(0),
        });
        let shared = trap.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                tokio::spawn(shared.clone().relay(client, server));
            }
        });
        Ok((trap, url))
    }

    async fn relay(
        self: std::sync::Arc<Self>,
        client: tokio::net::TcpStream,
        server: tokio::net::TcpStream,
    ) {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut from_client, mut to_client) = client.into_split();
        let (mut from_server, mut to_server) = server.into_split();
        let awaited = std::sync::atomic::AtomicBool::new(false);
        let up = async {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = from_client.read(&mut buf).await {
                if self.armed.load(Ordering::SeqCst)
                    && buf[..n]
                        .windows(self.request.len())
                        .any(|w| w == self.request)
                {
                    awaited.store(true, Ordering::SeqCst);
                    self.sent.notify_one();
                }
                if to_server.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        };
        let down = async {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = from_server.read(&mut buf).await {
                if awaited.load(Ordering::SeqCst)
                    && (self.lost)(&buf[..n])
                    && self.armed.swap(false, Ordering::SeqCst)
                {
                    self.swallowed.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                if to_client.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        };
        // Whichever side ends first closes both sockets as this returns.
        tokio::select! {
            _ = up => {}
            _ = down => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_whose_reply_was_lost_is_recovered_without_a_restart() -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    polls(&pg).await?;
    let shards = harness::redis_shards(1).await?;
    let a_vote = |reply: &[u8]| reply[0] == b'$' && !reply.starts_with(b"$-1");
    let (trap, url) = LostReply::start(&shards[0], b"BLMOVE", a_vote).await?;
    let mut config = config(&pg, &shards, "w1");
    config.redis_urls = vec![url];
    // Long enough that the vote pushed below meets the blocked move, not the next poll.
    config.block = Duration::from_secs(5);
    // Only the look after the error may take the list back here, not the one a period.
    config.recover_every = Duration::from_secs(3600);
    let agg = start(config).await?;
    tokio::time::timeout(Duration::from_secs(30), trap.sent.notified()).await?;
    let votes = votes::generate(3, 3, POLLS, 8);
    shards[0].enqueue(&votes).await?;
    harness::wait_drained(&shards, Duration::from_secs(60)).await?;
    assert_eq!(
        trap.swallowed.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the move's reply was lost once"
    );
    agg.stop().await?;
    assert_exact(&pg, &Reference::of(&votes)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_that_appears_while_all_is_well_is_taken_back_within_the_period(
) -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    polls(&pg).await?;
    let shards = harness::redis_shards(1).await?;
    let mut config = config(&pg, &shards, "w1");
    config.recover_every = Duration::from_millis(500);
    let agg = start(config).await?;
    // Drained: the reader is past its look at start.
    let first = votes::generate(50, 50, POLLS, 10);
    shards[0].enqueue(&first).await?;
    harness::wait_drained(&shards, Duration::from_secs(60)).await?;
    // What a move sent before an error and applied after the look that followed it leaves: a
    // list of this worker's, with votes, that no chunk holds, and no error to come.
    let late = votes::generate(30, 30, POLLS, 11);
    let payloads: Vec<Vec<u8>> = late.iter().map(model::wire::encode).collect();
    let mut con = shards[0].connection().await?;
    let _: () = con
        .rpush(model::queue::in_flight_key("w1", 1, 1), payloads)
        .await?;
    harness::wait_drained(&shards, Duration::from_secs(30)).await?;
    agg.stop().await?;
    let all: Vec<Vote> = first.into_iter().chain(late).collect();
    assert_exact(&pg, &Reference::of(&all)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_whose_reply_was_lost_stores_its_dead_letters_once() -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    polls(&pg).await?;
    let shards = harness::redis_shards(1).await?;
    // Only the ack names the dead-letter list; its reply is the first one after that.
    let (trap, url) =
        LostReply::start(&shards[0], model::queue::DEAD_LETTERS.as_bytes(), |_| true).await?;
    let good = votes::generate(20, 20, POLLS, 9);
    let mut payloads: Vec<Vec<u8>> = good.iter().map(model::wire::encode).collect();
    payloads.push(b"not a vote".to_vec());
    let mut con = shards[0].connection().await?;
    let _: () = con.rpush(model::queue::VOTES, payloads).await?;
    let mut config = config(&pg, &shards, "w1");
    config.redis_urls = vec![url];
    let agg = start(config).await?;
    harness::wait_drained(&shards, Duration::from_secs(60)).await?;
    agg.stop().await?;
    assert_eq!(
        trap.swallowed.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the ack's reply was lost once"
    );
    let dead: Vec<Vec<u8>> = con.lrange(model::queue::DEAD_LETTERS, 0, -1).await?;
    assert_eq!(
        dead,
        [model::queue::dead_letter("undecodable", b"not a vote")]
    );
    assert_exact(&pg, &Reference::of(&good)).await
}

fn vote_at(poll: &str, voter: &str, option: &str, cast_at: u64, id: u128) -> Vote {
    Vote {
        id: model::VoteId(id),
        poll: model::PollId::new(poll).unwrap(),
        option: model::OptionId::new(option).unwrap(),
        voter: model::VoterId::new(voter).unwrap(),
        cast_at: model::Stamp(cast_at),
        region: RegionName::new("us-east-1").unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_votes_are_kept_with_their_reason_and_a_closed_poll_is_certified_final(
) -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    let mut client = pg.client().await?;
    let now = db::poll_row(&client, "default").await?.now.0;
    let (opens, closes) = (now - 60_000_000, now - 1_000_000);
    let mut poll = Poll::new("night", &["a", "b"])?;
    poll.window = model::Window {
        opens_at: Some(model::Stamp(opens)),
        closes_at: Some(model::Stamp(closes)),
    };
    db::create_poll(&mut client, &poll).await?;
    let shards = harness::redis_shards(2).await?;
    let votes = vec![
        vote_at("night", "early", "a", opens - 1, 1),
        vote_at("night", "on-time", "a", opens, 2),
        vote_at("night", "on-time-2", "b", closes - 1, 3),
        vote_at("night", "late", "b", closes, 4),
        // A voter whose in-window vote would be hidden by their late one, deduplicated alone.
        vote_at("night", "twice", "a", closes - 10, 5),
        vote_at("night", "twice", "b", closes + 10, 6),
    ];
    enqueue(&shards, &votes).await?;
    let mut c = config(&pg, &shards, "w-night");
    c.final_grace = Duration::from_millis(200);
    c.certify_every = Duration::from_millis(50);
    let agg = start(c).await?;
    harness::wait_drained(&shards, DRAIN_LIMIT).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while db::poll_row(&client, "night").await?.final_at.is_none() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "never certified final"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ballots: Vec<(String, String)> = client
        .query(
            "SELECT voter_id, option FROM ballots WHERE poll_id = 'night' ORDER BY voter_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let pair = |v: &str, o: &str| (v.to_string(), o.to_string());
    assert_eq!(
        ballots,
        [
            pair("on-time", "a"),
            pair("on-time-2", "b"),
            pair("twice", "a")
        ]
    );
    let late: Vec<(String, String)> = client
        .query(
            "SELECT voter_id, reason FROM late_votes WHERE poll_id = 'night' ORDER BY voter_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        late,
        [
            pair("early", "before_open"),
            pair("late", "after_close"),
            pair("twice", "after_close")
        ]
    );
    // The certified result: the counts, and the digest of the canonical listing of the ballots.
    let row = client
        .query_one(
            "SELECT final_counts::text, digest FROM polls WHERE id = 'night'",
            &[],
        )
        .await?;
    let counts: serde_json::Value = serde_json::from_str(&row.get::<_, String>(0))?;
    assert_eq!(counts, serde_json::json!({"a": 2, "b": 1}));
    let listing = "on-time\ta\non-time-2\tb\ntwice\ta\n";
    let digest = sha256_hex(listing.as_bytes());
    assert_eq!(row.get::<_, String>(1), digest);

    // A vote stamped in the window but stored after the result was certified changes nothing.
    enqueue(
        &shards,
        &[vote_at("night", "straggler", "b", closes - 5, 7)],
    )
    .await?;
    harness::wait_drained(&shards, DRAIN_LIMIT).await?;
    agg.stop().await?;
    let after: i64 = client
        .query_one(
            "SELECT count(*) FROM late_votes WHERE poll_id = 'night' AND reason = 'after_final'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(after, 1);
    let audit = db::audit::audit(&client, "night", |_| Ok(())).await?;
    assert!(audit.matches, "{audit:?}");
    assert_eq!(
        audit.digest, digest,
        "nothing moved after the certification"
    );
    Ok(())
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
