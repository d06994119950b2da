//! The aggregator: drains a region's Redis shards into PostgreSQL, exactly once, in batches.
//!
//! ```text
//! pop ──(lock-free queue)──► lanes ──► batch ──► encode ──► write ──► ack
//! shard readers move votes    split by   when to   latest     COPY +     delete the
//! into in-flight lists        voter      flush     per voter  upsert     in-flight list
//! ```
//! One file per stage, in that order; this one only wires them together. A vote leaves Redis for
//! good only after the transaction holding it has committed.
#![forbid(unsafe_code)]

mod ack;
pub mod batch;
mod certify;
pub mod config;
pub mod encode;
mod health;
mod lanes;
pub mod lease;
mod pop;
pub mod replay;
pub mod write;

use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use redis::aio::ConnectionManagerConfig;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify, Semaphore};

pub use config::{BatchConfig, Config, ConfigError};

use batch::Batch;
use health::{Health, Http};
use lanes::{Lanes, Part};
use pop::Reader;

/// How long shutdown waits for in-flight batches before leaving them in Redis for the next run.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Shard(#[from] shard::LinkError),
    #[error(transparent)]
    Write(#[from] write::FatalWrite),
}

/// Runs the aggregator until `shutdown`; then stops taking votes, writes what it holds (or leaves
/// it in Redis if PostgreSQL is away), and returns. Returns early with an error only when a
/// write fails in a way retrying cannot fix.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AggregatorError> {
    config.validate()?;
    web::metrics_handle();
    let health = Arc::new(Health {
        shards_up: config
            .redis_urls
            .iter()
            .map(|_| Arc::new(AtomicBool::new(false)))
            .collect(),
        postgres_up: AtomicBool::new(false),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut pipeline = tokio::spawn(pipeline(config.clone(), health.clone(), stop_rx));
    let http = Arc::new(Http { health });
    let (http_stop_tx, http_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(web::serve(listener, http, config.serve.clone(), async {
        let _ = http_stop_rx.await;
    }));
    tracing::info!(region = %config.region, worker = %config.worker_id, shards = config.redis_urls.len(), "aggregator running");
    tokio::pin!(shutdown);
    let result = tokio::select! {
        r = &mut pipeline => r.expect("pipeline task panicked"),
        _ = &mut shutdown => {
            let _ = stop_tx.send(true);
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut pipeline).await {
                Ok(r) => r.expect("pipeline task panicked"),
                Err(_) => {
                    tracing::warn!("in-flight batches left in Redis for the next run");
                    pipeline.abort();
                    Ok(())
                }
            }
        }
    };
    let _ = http_stop_tx.send(());
    let _ = server.await;
    tracing::info!("aggregator stopped");
    result
}

async fn pipeline(
    config: Config,
    health: Arc<Health>,
    mut outer_stop: watch::Receiver<bool>,
) -> Result<(), AggregatorError> {
    let region = config.region.to_string();
    // Stops every task on shutdown, or as soon as one writer meets an error retrying cannot fix.
    let (stop_tx, stop) = watch::channel(false);
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<write::FatalWrite>(config.writers);
    let catalog = Arc::new(db::CatalogCache::default());
    tokio::spawn(db::CatalogCache::refresh_loop(
        Arc::downgrade(&catalog),
        config.postgres_url.clone(),
        Duration::from_secs(1),
    ));

    // A chunk spans every lane and holds its permit until the last lane commits it, so each shard
    // may hold enough for every lane to have one batch writing and one filling.
    let per_shard =
        (2 * config.writers * config.batch.max_events).div_ceil(config.pop_size) + config.writers;
    let queue = Arc::new(ArrayQueue::new(per_shard * config.redis_urls.len()));
    let wake = Arc::new(Notify::new());
    let mut acks: Vec<Arc<shard::Link>> = Vec::new();
    let mut relook: Vec<Arc<AtomicBool>> = Vec::new();
    let mut readers = Vec::new();
    for (shard, url) in config.redis_urls.iter().enumerate() {
        let normal = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2);
        let link = shard::Link::new(url, normal)?;
        let blocking = shard::Link::new(
            url,
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(None),
        )?;
        tokio::spawn(link.clone().follow());
        tokio::spawn(blocking.clone().follow());
        let (held_tx, held) = watch::channel(false);
        tokio::spawn(lease::hold(
            link.clone(),
            config.worker_id.clone(),
            config.lease,
            held_tx,
            stop.clone(),
        ));
        acks.push(link.clone());
        relook.push(Arc::default());
        let reader = Reader {
            shard,
            held,
            relook: relook[shard].clone(),
            region: region.clone(),
            worker: config.worker_id.clone(),
            link,
            blocking,
            out: queue.clone(),
            wake: wake.clone(),
            permits: Arc::new(Semaphore::new(per_shard)),
            claims: pop::Claims::default(),
            pop_size: config.pop_size,
            // Ingest's writes under load hold tens of votes: start by assuming many, so the
            // first move cannot be `pop_size` large elements; each move corrects it.
            votes_per_element: 64,
            block: config.block,
            linger: config.linger,
            recover_every: config.recover_every,
            // A clean stop releases its lease: its lists are found within a second.
            adopt_every: (config.lease / 2).min(Duration::from_secs(1)),
            catalog: catalog.clone(),
            postgres_url: config.postgres_url.clone(),
            up: health.shards_up[shard].clone(),
            retry_max: config.retry_max,
            hint: tls::redis_hint(url),
        };
        readers.push(tokio::spawn(reader.run(stop.clone())));
        tokio::spawn(health::backlog_probe(
            acks[shard].clone(),
            region.clone(),
            shard,
            stop.clone(),
        ));
    }
    tokio::spawn(certify::run(
        region.clone(),
        config.postgres_url.clone(),
        config.final_grace,
        config.certify_every,
        acks.iter()
            .enumerate()
            .map(|(i, link)| certify::Shard {
                index: i as u16,
                link: link.clone(),
            })
            .collect(),
        stop.clone(),
    ));
    tokio::spawn(health::primary_probe(
        config.postgres_url.clone(),
        health.clone(),
        stop.clone(),
    ));

    let replay = (config.wait_replicas > 0).then(|| {
        let replay = replay::Replay::new(config.wait_replicas);
        tokio::spawn(replay::watch_replicas(
            replay.clone(),
            config.postgres_url.clone(),
            stop.clone(),
        ));
        replay
    });
    let lane_acks = write::Acks {
        links: acks.clone(),
        relook,
        replay,
    };

    // One lane per writer, each with its own batcher and channel.
    let mut lanes_tx = Vec::with_capacity(config.writers);
    let mut writers = Vec::new();
    // Spread this worker's writers over the tally parts from a place its id decides, so workers
    // of different regions mostly land on different parts.
    let first_part = model::shard_of("tally-parts", &config.worker_id, write::TALLY_PARTS);
    for i in 0..config.writers {
        let w = write::Writer::new(
            config.postgres_url.clone(),
            first_part + i as u32,
            config.retry_min,
            config.retry_max,
        )
        .locating_commits(config.wait_replicas > 0);
        let (tx, rx) = mpsc::channel::<Batch<Part>>(1);
        lanes_tx.push(tx);
        let fatal_tx = fatal_tx.clone();
        let task = write::write_loop(
            w,
            catalog.clone(),
            rx,
            lane_acks.clone(),
            region.clone(),
            stop.clone(),
            config.retry_max,
        );
        writers.push(tokio::spawn(async move {
            if let Err(e) = task.await {
                let _ = fatal_tx.send(e).await;
            }
        }));
    }

    // Routes chunks to the lanes until every reader has stopped, then flushes what is left.
    let readers_done = async {
        for r in readers {
            let _ = r.await;
        }
    };
    tokio::pin!(readers_done);
    let mut lanes = Lanes::new(config.batch, lanes_tx);
    let mut readers_finished = false;
    let mut fatal = None;
    loop {
        let deadline = lanes.deadline();
        tokio::select! {
            _ = wake.notified() => {}
            _ = async { tokio::time::sleep_until(deadline.expect("guarded").into()).await }, if deadline.is_some() => {}
            _ = &mut readers_done, if !readers_finished => readers_finished = true,
            _ = outer_stop.changed() => { let _ = stop_tx.send(true); }
            e = fatal_rx.recv() => {
                fatal = e;
                break;
            }
        }
        lanes.take(&queue, &acks, &region, config.retry_max).await;
        lanes.flush_due(Instant::now()).await;
        if readers_finished && queue.is_empty() {
            lanes.flush_all().await;
            break;
        }
    }
    let _ = stop_tx.send(true);
    drop(fatal_tx);
    for w in writers {
        w.await.expect("writer task panicked");
    }
    // Whatever is still in flight is left for others to adopt at once, not after the lease.
    for link in &acks {
        lease::release(link, &config.worker_id).await;
    }
    match fatal.or(fatal_rx.recv().await) {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
