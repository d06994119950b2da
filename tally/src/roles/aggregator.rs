//! `tally aggregator`'s flags.

use std::time::Duration;

use aggregator::config::*;
use clap::Args;

use super::Common;
use crate::usage::bad;

#[derive(Debug, Args)]
pub struct AggregatorArgs {
    #[command(flatten)]
    pub common: Common,
    /// Names this worker's in-flight lists; keep it stable across restarts.
    #[arg(long, env = ENV_WORKER_ID)]
    pub worker_id: Option<String>,
    /// Redis shard URLs to drain, comma-separated, in shard order: `redis://`, `rediss://` or
    /// `sentinel://[user:password@]host:port,.../name`.
    #[arg(long, env = ENV_REDIS_URLS)]
    pub redis_urls: String,
    /// Where to write: list every region's server with target_session_attrs=read-write.
    #[arg(long, env = ENV_POSTGRES_URL)]
    pub postgres_url: String,
    #[arg(long, env = ENV_BATCH_MAX_EVENTS, default_value_t = aggregator::config::DEFAULT_MAX_EVENTS)]
    pub batch_max_events: usize,
    #[arg(long, env = ENV_BATCH_MAX_BYTES, default_value_t = aggregator::config::DEFAULT_MAX_BYTES)]
    pub batch_max_bytes: usize,
    #[arg(long, env = ENV_BATCH_TIMEOUT_MS, default_value_t = aggregator::config::DEFAULT_TIMEOUT.as_millis() as u64)]
    pub batch_timeout_ms: u64,
    /// Votes moved out of Redis per round trip.
    #[arg(long, env = ENV_POP_SIZE, default_value_t = aggregator::config::DEFAULT_POP_SIZE)]
    pub pop_size: usize,
    /// Batches written to PostgreSQL at once.
    #[arg(long, env = ENV_WRITERS, default_value_t = aggregator::config::DEFAULT_WRITERS)]
    pub writers: usize,
    /// How long after a poll's close its shards are looked at to certify it final: at least
    /// ingest's store timeout plus its bound on clock offset.
    #[arg(long, env = ENV_FINAL_GRACE_MS, default_value_t = aggregator::config::DEFAULT_FINAL_GRACE.as_millis() as u64)]
    pub final_grace_ms: u64,
    /// How long this worker's hold on its in-flight lists outlives it, in milliseconds: past
    /// that, another aggregator of the region adopts them.
    #[arg(long, env = ENV_LEASE_MS, default_value_t = aggregator::config::DEFAULT_LEASE.as_millis() as u64)]
    pub lease_ms: u64,
    /// Replicas that must have replayed a batch's commit before its votes leave Redis. With
    /// asynchronous replication (RDS across regions, the local stack) set 1: otherwise losing
    /// the primary can lose votes already counted.
    #[arg(long, env = ENV_WAIT_REPLICAS, default_value_t = 0)]
    pub wait_replicas: usize,
}

impl AggregatorArgs {
    pub fn config(&self) -> anyhow::Result<aggregator::Config> {
        let region = self.common.region()?;
        let worker = self
            .worker_id
            .clone()
            .unwrap_or_else(|| format!("{region}-0"));
        let mut c = aggregator::Config::new(
            region,
            worker,
            shard::split_urls(&self.redis_urls),
            self.postgres_url.clone(),
        );
        c.batch = aggregator::BatchConfig {
            max_events: self.batch_max_events,
            max_bytes: self.batch_max_bytes,
            timeout: Duration::from_millis(self.batch_timeout_ms),
        };
        c.pop_size = self.pop_size;
        c.writers = self.writers;
        c.final_grace = Duration::from_millis(self.final_grace_ms);
        c.lease = Duration::from_millis(self.lease_ms);
        c.wait_replicas = self.wait_replicas;
        c.serve = self.common.serve_config()?;
        c.validate().map_err(bad)?;
        Ok(c)
    }
}
