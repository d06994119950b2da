//! The region's Redis shards: where each vote is stored (see [`crate::writer`] for how), whether
//! each shard is up and how full, from its writes and a probe every [`PROBE_EVERY`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;
use std::time::Duration;

use model::RegionName;
use tokio::time::Instant;

pub use crate::accumulator::StoreError;

use crate::accumulator::Waiting;
use crate::config::Config;
use crate::writer::{
    write_loop, Census, Lingering, Queue, Status, WriteSettings, RESPONSE_TIMEOUT,
};

/// Requests waiting for one shard beyond this are refused rather than queued in memory.
const PENDING_PER_SHARD: usize = 65_536;
/// How often each shard's depth and health are probed.
const PROBE_EVERY: Duration = Duration::from_millis(250);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

pub struct Shard {
    index: u32,
    queue: Arc<Queue>,
    link: Arc<shard::Link>,
    /// Replicas that must hold a write before it is acknowledged.
    wait_replicas: u32,
    status: Arc<Status>,
    bound: u64,
    /// Added to the log line when the shard cannot be reached (see [`tls::redis_hint`]).
    hint: &'static str,
}

impl Shard {
    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn is_up(&self) -> bool {
        self.status.up.load(Ordering::Relaxed)
    }

    pub fn depth(&self) -> u64 {
        self.status.depth.load(Ordering::Relaxed)
    }

    /// Stores one vote whose request was read at `queued` (its deadline counts from there); `Ok`
    /// means Redis holds it.
    pub async fn store(
        &self,
        vote: &model::wire::Fields<'_>,
        queued: Instant,
    ) -> Result<(), StoreError> {
        if !self.is_up() {
            return Err(StoreError::Unavailable);
        }
        if self.depth() >= self.bound {
            return Err(StoreError::Full);
        }
        let lingering = &self.queue.lingering;
        let census = &lingering.census;
        // The vote joins a batch on the first poll, where its task's waker is at hand.
        let mut waiting: Option<Waiting> = None;
        std::future::poll_fn(|cx| {
            if let Some(waiting) = &mut waiting {
                return waiting.poll(cx);
            }
            census.unanswered.fetch_add(1, Ordering::Relaxed);
            let joined = {
                let mut accumulator = self.queue.lock();
                (accumulator.queued < PENDING_PER_SHARD)
                    .then(|| accumulator.add(vote, queued, lingering.group.max_votes, cx.waker()))
            };
            let Some((joined, forming)) = joined else {
                census.unanswered.fetch_sub(1, Ordering::Relaxed);
                return Poll::Ready(Err(StoreError::Full));
            };
            lingering.arrived(queued, forming);
            // Its write cannot have been settled without waking this task.
            waiting = Some(joined);
            Poll::Pending
        })
        .await
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::Relaxed);
        self.queue.lingering.wake.notify_one();
    }
}

pub struct Shards {
    shards: Vec<Arc<Shard>>,
}

impl Shards {
    /// Connects lazily (a shard that is down at start-up is reported down, not fatal) and starts
    /// each shard's writer and probe. The writers stop once `Shards` is dropped and their
    /// queues are written.
    pub fn start(config: &Config) -> Result<Self, shard::LinkError> {
        let mut shards = Vec::with_capacity(config.redis_urls.len());
        let census = Arc::new(Census {
            voting: config.serve.enlisted.clone(),
            unanswered: AtomicUsize::new(0),
        });
        for (i, url) in config.redis_urls.iter().enumerate() {
            let link = shard::Link::new(
                url,
                redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500)),
            )?;
            tokio::spawn(link.clone().follow());
            let queue = Arc::new(Queue {
                accumulator: Mutex::default(),
                lingering: Lingering::new(config.group, census.clone()),
                stopping: AtomicBool::new(false),
                closed: AtomicBool::new(false),
            });
            let shard = Arc::new(Shard {
                index: i as u32,
                queue: queue.clone(),
                link,
                wait_replicas: config.wait_replicas,
                status: Arc::default(),
                bound: config.queue_bound,
                hint: tls::redis_hint(url),
            });
            tokio::spawn(write_loop(
                shard.index,
                Arc::downgrade(&shard.status),
                shard.link.clone(),
                queue,
                WriteSettings {
                    group: config.group,
                    wait_replicas: config.wait_replicas,
                    store_timeout: config.store_timeout,
                },
                config.region.clone(),
            ));
            tokio::spawn(probe_loop(Arc::downgrade(&shard), config.region.clone()));
            shards.push(shard);
        }
        tokio::spawn(census_loop(Arc::downgrade(&census), config.region.clone()));
        Ok(Self { shards })
    }

    pub fn count(&self) -> u32 {
        self.shards.len() as u32
    }

    pub fn get(&self, index: u32) -> &Shard {
        &self.shards[index as usize]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Shard> {
        self.shards.iter().map(|s| s.as_ref())
    }

    /// From now on every batch goes without waiting out its linger: the server is stopping, so
    /// its requests in flight are to be answered as soon as their votes are stored.
    pub fn stop_lingering(&self) {
        for shard in &self.shards {
            shard.queue.stopping.store(true, Ordering::Relaxed);
            shard.queue.lingering.wake.notify_one();
        }
    }

    /// Waits until every shard has answered a probe once (or `limit` passes).
    pub async fn wait_probed(&self, limit: Duration) {
        let start = tokio::time::Instant::now();
        while self.iter().any(|s| !s.is_up()) && start.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Publishes the connections the linger waits for, as often as the shards are probed, until
/// the writers holding the census are gone.
async fn census_loop(census: Weak<Census>, region: RegionName) {
    let voting = metrics::gauge!("tally_ingest_voting_connections", "region" => region.to_string());
    loop {
        let Some(c) = census.upgrade() else { return };
        voting.set(c.voting.get() as f64);
        drop(c);
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// The shard's stored votes, once it answers as a primary with the replicas its writes wait for:
/// a write that cannot reach them would only be refused after its wait.
async fn probe(s: &Shard) -> redis::RedisResult<Option<i64>> {
    let mut conn = s.link.get()?;
    let mut pipe = redis::pipe();
    pipe.cmd("GET").arg(model::queue::STORED).cmd("ROLE");
    let (stored, role): (Option<i64>, Vec<redis::Value>) = pipe
        .query_async(&mut conn)
        .await
        .inspect_err(|e| s.link.report(e))?;
    let shard::Role::Primary { replicas } = shard::Role::of(&role) else {
        s.link.lost_primary();
        return Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "the shard's node is a replica, not its primary",
        )));
    };
    if replicas < s.wait_replicas as usize {
        return Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "fewer replicas connected than a write waits for",
            format!("{replicas} of {}", s.wait_replicas),
        )));
    }
    Ok(stored)
}

async fn probe_loop(shard: Weak<Shard>, region: RegionName) {
    // Logged on the way down, not on every failed probe; `None` until the first probe.
    let mut was_up: Option<bool> = None;
    loop {
        let Some(s) = shard.upgrade() else { return };
        let probe = tokio::time::timeout(RESPONSE_TIMEOUT, probe(&s)).await;
        let labels = [
            ("region", region.to_string()),
            ("shard", s.index.to_string()),
        ];
        let waiting = s.queue.lock().queued;
        metrics::gauge!("tally_ingest_votes_waiting", &labels).set(waiting as f64);
        match probe {
            Ok(Ok(stored)) => {
                let depth = model::queue::stored_votes(stored);
                was_up = Some(true);
                s.status.depth.store(depth, Ordering::Relaxed);
                s.status.up.store(true, Ordering::Relaxed);
                metrics::gauge!("tally_ingest_queue_depth", &labels).set(depth as f64);
                metrics::gauge!("tally_ingest_shard_up", &labels).set(1.0);
            }
            failed => {
                if was_up != Some(false) {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {RESPONSE_TIMEOUT:?}"),
                    };
                    tracing::warn!(shard = s.index, error = %why, "queue shard unavailable{}", s.hint);
                }
                was_up = Some(false);
                s.status.up.store(false, Ordering::Relaxed);
                metrics::gauge!("tally_ingest_shard_up", &labels).set(0.0);
            }
        }
        drop(s);
        tokio::time::sleep(PROBE_EVERY).await;
    }
}
