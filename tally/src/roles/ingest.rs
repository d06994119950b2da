//! `tally ingest`'s flags.

use std::time::Duration;

use clap::Args;
use ingest::config::*;

use super::{urls, Common};
use crate::usage::bad;

#[derive(Debug, Args)]
pub struct IngestArgs {
    #[command(flatten)]
    pub common: Common,
    /// Redis shard URLs, comma-separated; the position is the shard number.
    #[arg(long, env = ENV_REDIS_URLS)]
    pub redis_urls: String,
    /// PostgreSQL to read the poll catalog from (the local replica is fine).
    #[arg(long, env = ENV_POSTGRES_URL)]
    pub postgres_url: String,
    /// Votes a shard may hold, stored and not yet acknowledged by an aggregator, before it
    /// refuses more with 503.
    #[arg(long, env = ENV_QUEUE_BOUND, default_value_t = ingest::config::DEFAULT_QUEUE_BOUND)]
    pub queue_bound: u64,
    /// Most votes in one group-commit write.
    #[arg(long, env = ENV_GROUP_MAX_VOTES, default_value_t = ingest::config::DEFAULT_GROUP_MAX_VOTES)]
    pub group_max_votes: usize,
    /// Votes that end a batch's linger: a batch this big goes as soon as a write slot is free.
    #[arg(long, env = ENV_GROUP_TARGET_VOTES, default_value_t = ingest::config::DEFAULT_GROUP_TARGET_VOTES)]
    pub group_target_votes: usize,
    /// Group-commit writes in flight per shard.
    #[arg(long, env = ENV_GROUP_MAX_IN_FLIGHT, default_value_t = ingest::config::DEFAULT_GROUP_MAX_IN_FLIGHT)]
    pub group_max_in_flight: usize,
    /// Microseconds a batch's first vote may wait for others while a write slot is free (0 = none).
    #[arg(long, env = ENV_GROUP_LINGER_US,
          default_value_t = ingest::config::DEFAULT_GROUP_LINGER.as_micros() as u64)]
    pub group_linger_us: u64,
    /// Acknowledge only once this many Redis replicas have the vote (WAIT); 0 = do not wait.
    #[arg(long, env = ENV_WAIT_REPLICAS, default_value_t = 0)]
    pub wait_replicas: u32,
    /// Votes per second per voter (0 = no limit).
    #[arg(long, env = ENV_VOTER_RATE, default_value_t = ingest::config::DEFAULT_VOTER_RATE)]
    pub voter_rate: f64,
    #[arg(long, env = ENV_VOTER_BURST, default_value_t = ingest::config::DEFAULT_VOTER_BURST)]
    pub voter_burst: f64,
    /// Votes per second per client address (0 = no limit).
    #[arg(long, env = ENV_IP_RATE, default_value_t = 0.0)]
    pub ip_rate: f64,
    #[arg(long, env = ENV_IP_BURST, default_value_t = 1000.0)]
    pub ip_burst: f64,
    /// Keys each rate limit remembers (16 bytes each); past it, a new key displaces the bucket
    /// nearest to full (counted in tally_ingest_limit_forgiven_total).
    #[arg(long, env = ENV_LIMIT_KEYS, default_value_t = ingest::config::DEFAULT_LIMIT_KEYS)]
    pub limit_keys: usize,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = ENV_BODY_LIMIT, default_value_t = ingest::config::DEFAULT_BODY_LIMIT)]
    pub body_limit: usize,
    /// Turns on JWT voters: the JWKS file with the signing keys (RS256/ES256).
    #[arg(long, env = ENV_JWKS_FILE, requires_all = ["jwt_issuer", "jwt_audience"])]
    pub jwks_file: Option<std::path::PathBuf>,
    #[arg(long, env = ENV_JWT_ISSUER)]
    pub jwt_issuer: Option<String>,
    #[arg(long, env = ENV_JWT_AUDIENCE)]
    pub jwt_audience: Option<String>,
    /// For fault drills: stamp votes as if this host's clock were this many milliseconds ahead
    /// (negative: behind).
    #[arg(long, env = ENV_CLOCK_SKEW_MS, default_value_t = 0, allow_negative_numbers = true)]
    pub clock_skew_ms: i64,
}

fn rate(per_second: f64, burst: f64) -> Option<ingest::Rate> {
    (per_second > 0.0).then_some(ingest::Rate { per_second, burst })
}

impl IngestArgs {
    pub fn config(&self) -> anyhow::Result<ingest::Config> {
        let mut c = ingest::Config::new(
            self.common.region()?,
            urls(&self.redis_urls),
            self.postgres_url.clone(),
        );
        c.queue_bound = self.queue_bound;
        c.group = ingest::GroupCommit {
            max_votes: self.group_max_votes,
            target_votes: self.group_target_votes,
            max_in_flight: self.group_max_in_flight,
            linger: Duration::from_micros(self.group_linger_us),
        };
        c.wait_replicas = self.wait_replicas;
        c.voter_limit = rate(self.voter_rate, self.voter_burst);
        c.ip_limit = rate(self.ip_rate, self.ip_burst);
        c.limit_keys = self.limit_keys;
        c.body_limit = self.body_limit;
        c.serve = self.common.serve_config();
        c.clock_skew_ms = self.clock_skew_ms;
        if let Some(jwks) = &self.jwks_file {
            let issuer = self.jwt_issuer.clone().unwrap_or_default();
            let audience = self.jwt_audience.clone().unwrap_or_default();
            c.auth =
                Some(ingest::auth::AuthConfig::from_file(jwks, issuer, audience).map_err(bad)?);
        }
        c.validate().map_err(bad)?;
        Ok(c)
    }
}
