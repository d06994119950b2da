//! What the aggregator's tests share: polls, a worker run in-process, votes spread over shards
//! as ingest spreads them, and the check that tallies and ballots match a reference.
#![allow(dead_code)]

use std::time::Duration;

use aggregator::Config;
use harness::votes::{self, Reference};
use harness::{PgCluster, RedisServer};
use model::{Poll, RegionName, Vote};
use tokio::sync::oneshot;

pub const POLLS: &[&str] = &["p1", "p2", "p3"];
pub const DRAIN_LIMIT: Duration = Duration::from_secs(120);

pub async fn polls(pg: &PgCluster) -> anyhow::Result<()> {
    let mut client = pg.client().await?;
    for p in POLLS {
        db::create_poll(&mut client, &Poll::new(p, &["a", "b", "c"])?).await?;
    }
    Ok(())
}

pub struct Running {
    pub stop: oneshot::Sender<()>,
    pub task: tokio::task::JoinHandle<Result<(), aggregator::AggregatorError>>,
}

impl Running {
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}

pub fn config(pg: &PgCluster, shards: &[RedisServer], worker: &str) -> Config {
    let mut c = Config::new(
        RegionName::new("us-east-1").unwrap(),
        worker.into(),
        shards.iter().map(|s| s.url()).collect(),
        pg.primary.url(db::AGGREGATOR_ROLE, db::DATABASE),
    );
    c.pop_size = 1_000;
    c.batch.max_events = 4_000;
    c.retry_max = Duration::from_millis(200);
    c
}

pub async fn start(config: Config) -> anyhow::Result<Running> {
    harness::init_logs();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(aggregator::run(listener, config, async move {
        let _ = stopped.await;
    }));
    Ok(Running { stop, task })
}

/// Spreads votes over shards by the real shard function, as ingest would.
pub async fn enqueue(shards: &[RedisServer], votes: &[Vote]) -> anyhow::Result<()> {
    for (i, s) in shards.iter().enumerate() {
        let mine = votes.iter().filter(|v| {
            model::shard_of(v.poll.as_str(), v.voter.as_str(), shards.len() as u32) as usize == i
        });
        s.enqueue(mine).await?;
    }
    Ok(())
}

pub async fn assert_exact(pg: &PgCluster, reference: &Reference) -> anyhow::Result<()> {
    let client = pg.client().await?;
    let tallies = votes::tallies(&client).await?;
    assert_eq!(
        tallies,
        votes::recount(&client).await?,
        "tallies differ from a recount of the ballots"
    );
    assert_eq!(
        tallies,
        reference.tallies(),
        "tallies differ from the reference"
    );
    assert_eq!(
        votes::ballots(&client).await?,
        reference.ballots(),
        "ballots differ from the reference"
    );
    Ok(())
}
