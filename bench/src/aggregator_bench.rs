//! `tally bench aggregator`: drain a pre-filled backlog from real Redis into real PostgreSQL, and
//! in the same run and database the original app's worker: one vote popped, one `INSERT` (then
//! `UPDATE` on conflict) per round trip.

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
        }
    }
}

const POLLS: &[&str] = &["final", "semi-1", "semi-2", "audience"];

pub fn run(opts: &Options) -> anyhow::Result<Comparison> {
    let server_rt = crate::server_runtime(2)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let pg = harness::PgCluster::start().await?;
        let mut client = pg.client().await?;
        for p in POLLS {
            db::create_poll(&mut client, &Poll::new(p, &["a", "b", "c"])?).await?;
        }
        let shards = harness::redis_shards(opts.shards).await?;
        let all = votes::generate(opts.votes, opts.voters, POLLS, 42);
        eprintln!(
            "bench aggregator: filling {} votes from {} voters into {} shards",
            all.len(),
            opts.voters,
            opts.shards
        );
        for (i, s) in shards.iter().enumerate() {
            let mine = all.iter().filter(|v| {
                model::shard_of(v.poll.as_str(), v.voter.as_str(), opts.shards as u32) as usize == i
            });
            s.enqueue(mine).await?;
        }

        let mut config = aggregator::Config::new(
            model::RegionName::new("us-east-1")?,
            "bench-0".into(),
            shards.iter().map(|s| s.url()).collect(),
            pg.primary.url(db::AGGREGATOR_ROLE, db::DATABASE),
        );
        config.writers = opts.writers;
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
        harness::wait_drained(&shards, Duration::from_secs(600)).await?;
        let elapsed = started.elapsed();
        let _ = stop.send(());
        task.await??;
        let rate = all.len() as f64 / elapsed.as_secs_f64();

        let reference = Reference::of(&all);
        let exact = votes::tallies(&client).await? == reference.tallies();
        anyhow::ensure!(exact, "the drained tallies differ from the reference");

        let baseline =
            crate::original::worker(&pg, &shards[0], &all[..opts.baseline_votes.min(all.len())])
                .await?;
        Ok(Comparison::new(
            "aggregator",
            rate,
            "one-row-upsert",
            baseline,
            serde_json::json!({
                "votes": all.len(),
                "voters": opts.voters,
                "drain_seconds": elapsed.as_secs_f64(),
                "tallies_exact": exact,
                "baseline_votes": opts.baseline_votes,
                "writers": opts.writers,
                "batch_max_events": opts.max_events,
            }),
        ))
    })
}
