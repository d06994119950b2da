//! The aggregator: drains a region's Redis shards into PostgreSQL, exactly once, in batches.
//!
//! ```text
//! shard readers --(lock-free queue)--> batcher --> writers: COPY + upsert + COMMIT --> ack (DEL in-flight)
//! ```
//! A vote leaves Redis for good only after the transaction holding it has committed.
#![forbid(unsafe_code)]

pub mod batch;
pub mod config;
pub mod copy;
mod drain;
pub mod write;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use web::{error, json, Body};

pub use config::{BatchConfig, Config, ConfigError};

use batch::{Batch, Batcher};
use drain::{Part, Pending, Reader};

/// How long shutdown waits for in-flight batches before leaving them in Redis for the next run.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Write(#[from] write::FatalWrite),
}

/// What `/readyz` reports.
struct Health {
    shards_up: Vec<Arc<AtomicBool>>,
    postgres_up: AtomicBool,
}

struct Http {
    health: Arc<Health>,
}

impl web::Service for Http {
    async fn call(&self, req: Request<Incoming>, _conn: &web::Connection) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => {
                json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
            }
            (&Method::GET, "/readyz") => {
                let down: Vec<usize> = (0..self.health.shards_up.len())
                    .filter(|&i| !self.health.shards_up[i].load(Ordering::Relaxed))
                    .collect();
                let pg = self.health.postgres_up.load(Ordering::Relaxed);
                let ok = down.is_empty() && pg;
                let status = if ok {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json(
                    status,
                    &serde_json::json!({"ready": ok, "postgres": pg, "shards_down": down}),
                )
            }
            (&Method::GET, "/metrics") => web::render_metrics(),
            (_, "/healthz" | "/readyz" | "/metrics") => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use GET",
            ),
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such path"),
        }
    }
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
    let mut acks: Vec<ConnectionManager> = Vec::new();
    let mut readers = Vec::new();
    for (shard, url) in config.redis_urls.iter().enumerate() {
        let client = tls::redis_client(url)?;
        let normal = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), normal.clone())?;
        let blocking = ConnectionManager::new_lazy_with_config(
            client,
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(None),
        )?;
        acks.push(conn.clone());
        let reader = Reader {
            shard,
            region: region.clone(),
            worker: config.worker_id.clone(),
            conn,
            blocking,
            out: queue.clone(),
            wake: wake.clone(),
            permits: Arc::new(Semaphore::new(per_shard)),
            claims: drain::Claims::default(),
            pop_size: config.pop_size,
            // Ingest's writes under load hold tens of votes: start by assuming many, so the
            // first move cannot be `pop_size` large elements; each move corrects it.
            votes_per_element: 64,
            block: config.block,
            linger: config.linger,
            recover_every: config.recover_every,
            catalog: catalog.clone(),
            postgres_url: config.postgres_url.clone(),
            up: health.shards_up[shard].clone(),
            retry_max: config.retry_max,
            hint: tls::redis_hint(url),
        };
        readers.push(tokio::spawn(reader.run(stop.clone())));
        tokio::spawn(backlog_probe(
            acks[shard].clone(),
            region.clone(),
            shard,
            stop.clone(),
        ));
    }
    tokio::spawn(primary_probe(
        config.postgres_url.clone(),
        health.clone(),
        stop.clone(),
    ));

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
        );
        let (tx, rx) = mpsc::channel::<Batch<Part>>(1);
        lanes_tx.push(tx);
        let fatal_tx = fatal_tx.clone();
        let task = write_loop(
            w,
            rx,
            acks.clone(),
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

    // The batcher: runs until every reader has stopped, then flushes what is left.
    let readers_done = async {
        for r in readers {
            let _ = r.await;
        }
    };
    tokio::pin!(readers_done);
    let mut lanes: Vec<Batcher<Part>> = (0..config.writers)
        .map(|_| Batcher::new(config.batch))
        .collect();
    let mut readers_finished = false;
    let mut fatal = None;
    loop {
        let deadline = lanes.iter().filter_map(Batcher::deadline).min();
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
        let now = Instant::now();
        while let Some(chunk) = queue.pop() {
            let (parts, nothing_to_write) = chunk.split(lanes.len());
            if let Some(pending) = nothing_to_write {
                let mut conn = acks[pending.shard].clone();
                let region = region.clone();
                let retry_max = config.retry_max;
                tokio::spawn(
                    async move { drain::ack(&mut conn, &pending, &region, retry_max).await },
                );
            }
            for (lane, part) in parts {
                if let Some(b) = lanes[lane].push(part, now) {
                    let _ = lanes_tx[lane].send(b).await;
                }
            }
        }
        for (lane, batcher) in lanes.iter_mut().enumerate() {
            if let Some(b) = batcher.poll(now) {
                let _ = lanes_tx[lane].send(b).await;
            }
        }
        if readers_finished && queue.is_empty() {
            for (lane, batcher) in lanes.iter_mut().enumerate() {
                if let Some(b) = batcher.flush() {
                    let _ = lanes_tx[lane].send(b).await;
                }
            }
            break;
        }
    }
    let _ = stop_tx.send(true);
    drop(lanes_tx);
    drop(fatal_tx);
    for w in writers {
        w.await.expect("writer task panicked");
    }
    match fatal.or(fatal_rx.recv().await) {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

async fn write_loop(
    mut writer: write::Writer,
    mut batches: mpsc::Receiver<Batch<Part>>,
    acks: Vec<ConnectionManager>,
    region: String,
    stop: watch::Receiver<bool>,
    retry_max: Duration,
) -> Result<(), write::FatalWrite> {
    let committed =
        metrics::counter!("tally_aggregator_votes_committed_total", "region" => region.clone());
    let batch_size = metrics::histogram!("tally_aggregator_batch_size", "region" => region.clone());
    let write_seconds =
        metrics::histogram!("tally_aggregator_write_seconds", "region" => region.clone());
    let commit_lag =
        metrics::histogram!("tally_aggregator_commit_lag_seconds", "region" => region.clone());
    let mut copy = bytes::BytesMut::new();
    loop {
        let Some(batch) = batches.recv().await else {
            return Ok(());
        };
        metrics::counter!("tally_aggregator_flushes_total", "region" => region.clone(), "reason" => batch.reason.as_str()).increment(1);
        let count = batch.items.iter().map(|c| c.votes.len()).sum::<usize>();
        if count > 0 {
            let latest = batch::latest_per_voter(batch.items.iter().flat_map(|c| c.votes.iter()));
            let oldest = batch
                .items
                .iter()
                .flat_map(|c| c.votes.iter())
                .map(|v| v.cast_at.0)
                .min()
                .unwrap_or(0);
            copy.clear();
            copy::encode(latest, &mut copy);
            let started = Instant::now();
            match writer.write(copy.split().freeze(), &stop).await {
                Ok(_) => {}
                // Leave the chunks' in-flight lists in Redis: the next run writes them.
                Err(write::WriteOutcome::Abandoned) => continue,
                Err(write::WriteOutcome::Fatal(e)) => {
                    tracing::error!(error = %e, "stopping: a batch cannot be written; its votes stay in Redis");
                    return Err(e);
                }
            }
            write_seconds.record(started.elapsed().as_secs_f64());
            tracing::debug!(
                votes = count,
                chunks = batch.items.len(),
                reason = batch.reason.as_str(),
                seconds = started.elapsed().as_secs_f64(),
                "batch committed"
            );
            let lag = model::Stamp::now().0.saturating_sub(oldest) as f64 / 1e6;
            commit_lag.record(lag);
            committed.increment(count as u64);
        }
        batch_size.record(batch.events as f64);
        // A chunk is acknowledged by the last lane to commit its votes.
        let complete: Vec<&Arc<Pending>> = batch
            .items
            .iter()
            .filter(|part| part.chunk.remaining.fetch_sub(1, Ordering::AcqRel) == 1)
            .map(|part| &part.chunk)
            .collect();
        let acks_done = complete.into_iter().map(|chunk| {
            let mut conn = acks[chunk.shard].clone();
            let region = region.clone();
            async move { drain::ack(&mut conn, chunk, &region, retry_max).await }
        });
        futures_util::future::join_all(acks_done).await;
    }
}

/// Keeps `/readyz` truthful while idle: can we reach a writable primary?
async fn primary_probe(url: String, health: Arc<Health>, mut stop: watch::Receiver<bool>) {
    let mut client: Option<db::Client> = None;
    loop {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = tokio::time::timeout(Duration::from_secs(2), db::connect(&url))
                .await
                .ok()
                .and_then(Result::ok);
        }
        let writable = match &client {
            Some(c) => matches!(
                tokio::time::timeout(Duration::from_secs(2), c.query_one("SELECT NOT pg_is_in_recovery()", &[])).await,
                Ok(Ok(row)) if row.get::<_, bool>(0)
            ),
            None => false,
        };
        health.postgres_up.store(writable, Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Exports each shard's votes not yet acknowledged (waiting or in flight), so operators see a
/// backlog build.
async fn backlog_probe(
    mut conn: ConnectionManager,
    region: String,
    shard: usize,
    mut stop: watch::Receiver<bool>,
) {
    let gauge = metrics::gauge!("tally_aggregator_backlog", "region" => region, "shard" => shard.to_string());
    loop {
        if let Ok(n) = redis::cmd("GET")
            .arg(model::queue::STORED)
            .query_async::<Option<i64>>(&mut conn)
            .await
        {
            gauge.set(model::queue::stored_votes(n) as f64);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}
