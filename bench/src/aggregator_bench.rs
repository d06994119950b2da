//! `tally bench aggregator`: drain a pre-filled backlog from real Redis into real PostgreSQL,
//! against the least any counted vote costs, in the same run and database: a raw binary `COPY` of
//! the ballots the drain wrote into a logged table with the ballots' key, as many writers at once.
//! The original app's worker (one vote popped, one `INSERT`, then `UPDATE` on conflict, per round
//! trip) is measured too, as `one_row_upsert`.

use std::time::{Duration, Instant};

use harness::votes::{self, Reference};
use model::Poll;

use crate::Comparison;

#[derive(Debug, Clone)]
pub struct Options {
    pub votes: usize,
    pub voters: usize,
    /// Votes the original worker pattern processes (it is slow; a sample gives its rate).
    pub baseline_votes: usize,
    pub shards: usize,
    pub writers: usize,
    pub max_events: usize,
    /// Also drain the same backlog again through a WAN link with this one-way delay (as an
    /// aggregator in another region than the primary writes), and compare the two rates.
    pub wan_ms: Option<u64>,
    /// Run PostgreSQL with a streaming replica, and drain the backlog again acknowledging each
    /// batch only once the replica replayed it (`wait_replicas = 1`): the replay wait's cost.
    pub replay: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            votes: 2_000_000,
            voters: 1_000_000,
            baseline_votes: 10_000,
            shards: 2,
            writers: aggregator::config::DEFAULT_WRITERS,
            max_events: aggregator::config::DEFAULT_MAX_EVENTS,
            wan_ms: None,
            replay: false,
        }
    }
}

const POLLS: &[&str] = &["final", "semi-1", "semi-2", "audience"];

pub fn run(opts: &Options) -> anyhow::Result<Comparison> {
    let server_rt = crate::server_runtime(2)?;
    let rt = crate::client_runtime(1)?;
    crate::until_interrupted(&rt, async {
        let pg = if opts.replay {
            harness::PgCluster::start_with_replica().await?
        } else {
            harness::PgCluster::start().await?
        };
        let mut client = pg.client().await?;
        for p in POLLS {
            db::create_poll(&mut client, &Poll::new(p, &["a", "b", "c"])?).await?;
        }
        let shards = harness::redis_shards(opts.shards).await?;
        let all = votes::generate(opts.votes, opts.voters, POLLS, 42);
        let reference = Reference::of(&all);
        let direct = pg.primary.url(db::AGGREGATOR_ROLE, db::DATABASE);
        let elapsed = drain(&server_rt, &shards, &all, direct, 0, opts).await?;
        let rate = all.len() as f64 / elapsed.as_secs_f64();
        let exact = votes::tallies(&client).await? == reference.tallies();
        anyhow::ensure!(exact, "the drained tallies differ from the reference");

        let mut wan = serde_json::Value::Null;
        if let Some(ms) = opts.wan_ms {
            reset(&client).await?;
            let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
            let link = wan::Link {
                from: "eu-west-1".into(),
                to: "us-east-1".into(),
                listen,
                upstream: format!("127.0.0.1:{}", pg.primary.port).parse()?,
            };
            let links = wan::Links::open(&wan::Config {
                links: vec![link],
                delay: wan::delay(ms)?,
            })
            .await?;
            let far = format!(
                "postgres://{}@{listen}/{}",
                db::AGGREGATOR_ROLE,
                db::DATABASE
            );
            let far_elapsed = drain(&server_rt, &shards, &all, far, 0, opts).await?;
            links.close();
            anyhow::ensure!(
                votes::tallies(&client).await? == reference.tallies(),
                "the tallies drained across the link differ from the reference"
            );
            let far_rate = all.len() as f64 / far_elapsed.as_secs_f64();
            eprintln!(
                "bench aggregator: {far_rate:.0} votes/s through a {ms} ms link, {:.2}x the direct rate",
                far_rate / rate
            );
            wan = serde_json::json!({
                "one_way_ms": ms,
                "rate": far_rate,
                "ratio_to_direct": far_rate / rate,
                "drain_seconds": far_elapsed.as_secs_f64(),
            });
        }

        let mut replay = serde_json::Value::Null;
        if opts.replay {
            reset(&client).await?;
            let both = format!(
                "host=127.0.0.1,127.0.0.1 port={},{} user={} dbname={} target_session_attrs=read-write",
                pg.primary.port,
                pg.replica().port,
                db::AGGREGATOR_ROLE,
                db::DATABASE
            );
            let waited = drain(&server_rt, &shards, &all, both, 1, opts).await?;
            anyhow::ensure!(
                votes::tallies(&client).await? == reference.tallies(),
                "the tallies drained with the replay wait differ from the reference"
            );
            let waited_rate = all.len() as f64 / waited.as_secs_f64();
            eprintln!(
                "bench aggregator: {waited_rate:.0} votes/s acknowledging only what the replica replayed, {:.3}x the rate without",
                waited_rate / rate
            );
            replay = serde_json::json!({
                "rate": waited_rate,
                "ratio_to_without": waited_rate / rate,
                "drain_seconds": waited.as_secs_f64(),
            });
        }

        let (raw_elapsed, ballots) = raw_keyed_copy(&pg, &all, opts.writers).await?;
        // The drain's votes over the time the copy took for their ballots: both rates count the
        // same votes, so their ratio is the copy's time over the drain's.
        let raw_rate = all.len() as f64 / raw_elapsed.as_secs_f64();
        let one_row =
            crate::original::worker(&pg, &shards[0], &all[..opts.baseline_votes.min(all.len())])
                .await?;
        Ok(Comparison::new(
            "aggregator",
            rate,
            "raw-keyed-copy",
            raw_rate,
            serde_json::json!({
                "ballots": ballots,
                "raw_copy_seconds": raw_elapsed.as_secs_f64(),
                "one_row_upsert_rate": one_row,
                "ratio_to_one_row_upsert": rate / one_row.max(f64::MIN_POSITIVE),
                "votes": all.len(),
                "voters": opts.voters,
                "drain_seconds": elapsed.as_secs_f64(),
                "tallies_exact": exact,
                "baseline_votes": opts.baseline_votes,
                "writers": opts.writers,
                "batch_max_events": opts.max_events,
                "wan": wan,
                "replay": replay,
            }),
        ))
    })
}

/// Empties what a drain wrote, so the next drain starts where the first did.
async fn reset(client: &db::Client) -> anyhow::Result<()> {
    // One statement per call: VACUUM refuses the implicit transaction of a batch.
    for sql in [
        "TRUNCATE ballots",
        "UPDATE tally_parts SET count = 0",
        "VACUUM ANALYZE",
    ] {
        client.batch_execute(sql).await?;
    }
    Ok(())
}

/// Copies the ballots `votes` leave (each voter's latest in each poll) into a logged table keyed
/// as `ballots` is, from `writers` connections at once, each its share in batches of the
/// aggregator's size; returns how long that took and how many ballots it wrote.
async fn raw_keyed_copy(
    pg: &harness::PgCluster,
    votes: &[model::Vote],
    writers: usize,
) -> anyhow::Result<(Duration, usize)> {
    let client = pg.client().await?;
    client
        .batch_execute(
            "DROP TABLE IF EXISTS raw_ballots;
             CREATE TABLE raw_ballots (
                 poll_id text NOT NULL, voter_id text NOT NULL, option text NOT NULL,
                 vote_id uuid NOT NULL, cast_at int8 NOT NULL, region text NOT NULL,
                 sure bool NOT NULL, PRIMARY KEY (poll_id, voter_id)) WITH (fillfactor = 90)",
        )
        .await?;
    let ballots = aggregator::encode::latest_per_voter(votes);
    let count = ballots.len();
    let writers = writers.max(1);
    let mut encoded = Vec::new();
    for part in ballots.chunks(count.div_ceil(writers).max(1)) {
        let mut batches = Vec::new();
        for batch in part.chunks(aggregator::config::DEFAULT_MAX_EVENTS) {
            let mut out = bytes::BytesMut::new();
            aggregator::encode::encode(batch.iter().map(|v| (*v, true)), &mut out);
            batches.push(out.freeze());
        }
        encoded.push(batches);
    }
    let url = pg.url();
    let started = Instant::now();
    let copies = encoded.into_iter().map(|batches| {
        let url = url.clone();
        tokio::spawn(async move {
            use futures_util::SinkExt;
            let client = db::connect(&url).await?;
            for batch in batches {
                let sink = client
                    .copy_in::<_, bytes::Bytes>("COPY raw_ballots FROM STDIN (FORMAT binary)")
                    .await?;
                futures_util::pin_mut!(sink);
                sink.send(batch).await?;
                sink.finish().await?;
            }
            anyhow::Ok(())
        })
    });
    for c in futures_util::future::join_all(copies).await {
        c??;
    }
    Ok((started.elapsed(), count))
}

/// Fills the shards with `votes`, then runs an aggregator writing to `postgres_url` until the
/// shards are empty; returns how long that took.
async fn drain(
    server_rt: &tokio::runtime::Runtime,
    shards: &[harness::RedisServer],
    votes: &[model::Vote],
    postgres_url: String,
    wait_replicas: usize,
    opts: &Options,
) -> anyhow::Result<Duration> {
    eprintln!(
        "bench aggregator: filling {} votes from {} voters into {} shards",
        votes.len(),
        opts.voters,
        opts.shards
    );
    for (i, s) in shards.iter().enumerate() {
        let mine = votes.iter().filter(|v| {
            model::shard_of(v.poll.as_str(), v.voter.as_str(), opts.shards as u32) as usize == i
        });
        s.enqueue(mine).await?;
    }
    let mut config = aggregator::Config::new(
        model::RegionName::new("us-east-1")?,
        "bench-0".into(),
        shards.iter().map(|s| s.url()).collect(),
        postgres_url,
    );
    config.writers = opts.writers;
    config.wait_replicas = wait_replicas;
    config.batch.max_events = opts.max_events;
    config.pop_size = config.pop_size.min(opts.max_events);
    let (listener, _) = crate::loopback_listener()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let task = server_rt.spawn(async move {
        aggregator::run(crate::tokio_listener(listener), config, async {
            let _ = stopped.await;
        })
        .await
    });
    harness::wait_drained(shards, Duration::from_secs(600)).await?;
    let elapsed = started.elapsed();
    let _ = stop.send(());
    task.await??;
    Ok(elapsed)
}
