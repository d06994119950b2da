//! `tally ingest|aggregator|reader`: every setting a flag and a `TALLY_*` variable, checked
//! before a port is bound.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use model::RegionName;

pub const ENV_LISTEN: &str = "TALLY_LISTEN";
pub const ENV_REGION: &str = "TALLY_REGION";
pub const ENV_REDIS_URLS: &str = "TALLY_REDIS_URLS";
pub const ENV_POSTGRES_URL: &str = "TALLY_POSTGRES_URL";
pub const ENV_POSTGRES_SOURCES: &str = "TALLY_POSTGRES_SOURCES";
pub const ENV_MAX_CONNECTIONS: &str = "TALLY_MAX_CONNECTIONS";
pub const ENV_QUEUE_BOUND: &str = "TALLY_QUEUE_BOUND";
pub const ENV_GROUP_MAX_VOTES: &str = "TALLY_GROUP_MAX_VOTES";
pub const ENV_GROUP_TARGET_VOTES: &str = "TALLY_GROUP_TARGET_VOTES";
pub const ENV_GROUP_MAX_IN_FLIGHT: &str = "TALLY_GROUP_MAX_IN_FLIGHT";
pub const ENV_GROUP_LINGER_US: &str = "TALLY_GROUP_LINGER_US";
pub const ENV_WAIT_REPLICAS: &str = "TALLY_WAIT_REPLICAS";
pub const ENV_VOTER_RATE: &str = "TALLY_VOTER_RATE";
pub const ENV_VOTER_BURST: &str = "TALLY_VOTER_BURST";
pub const ENV_IP_RATE: &str = "TALLY_IP_RATE";
pub const ENV_IP_BURST: &str = "TALLY_IP_BURST";
pub const ENV_LIMIT_KEYS: &str = "TALLY_LIMIT_KEYS";
pub const ENV_BODY_LIMIT: &str = "TALLY_BODY_LIMIT";
pub const ENV_JWKS_FILE: &str = "TALLY_JWKS_FILE";
pub const ENV_JWT_ISSUER: &str = "TALLY_JWT_ISSUER";
pub const ENV_JWT_AUDIENCE: &str = "TALLY_JWT_AUDIENCE";
pub const ENV_WORKER_ID: &str = "TALLY_WORKER_ID";
pub const ENV_BATCH_MAX_EVENTS: &str = "TALLY_BATCH_MAX_EVENTS";
pub const ENV_BATCH_MAX_BYTES: &str = "TALLY_BATCH_MAX_BYTES";
pub const ENV_BATCH_TIMEOUT_MS: &str = "TALLY_BATCH_TIMEOUT_MS";
pub const ENV_POP_SIZE: &str = "TALLY_POP_SIZE";
pub const ENV_WRITERS: &str = "TALLY_WRITERS";
pub const ENV_CACHE_TTL_MS: &str = "TALLY_CACHE_TTL_MS";
pub const ENV_MAX_LAG_MS: &str = "TALLY_MAX_LAG_MS";
pub const ENV_HEARTBEAT_MS: &str = "TALLY_HEARTBEAT_MS";
pub const ENV_POSTGRES_SERVERS: &str = "TALLY_POSTGRES_SERVERS";
pub const ENV_DATA_DIRS: &str = "TALLY_DATA_DIRS";
pub const ENV_PROBE_INTERVAL_MS: &str = "TALLY_PROBE_INTERVAL_MS";
pub const ENV_FAILOVER_MISSES: &str = "TALLY_FAILOVER_MISSES";
pub const ENV_FAILOVER: &str = "TALLY_FAILOVER";
pub const ENV_REPLICA_ROUTES: &str = "TALLY_REPLICA_ROUTES";
pub const ENV_WAN_LINKS: &str = "TALLY_WAN_LINKS";
pub const ENV_WAN_DELAY_MS: &str = "TALLY_WAN_DELAY_MS";
pub const ENV_CLOCK_SKEW_MS: &str = "TALLY_CLOCK_SKEW_MS";

/// A bad setting: reported on one line, exit status 64 (EX_USAGE).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadConfig(pub String);

fn bad(e: impl std::fmt::Display) -> anyhow::Error {
    BadConfig(e.to_string()).into()
}

#[derive(Debug, Args)]
pub struct Common {
    /// Address to serve HTTP on.
    #[arg(long, env = ENV_LISTEN, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// The region this process serves.
    #[arg(long, env = ENV_REGION, default_value = "us-east-1")]
    pub region: String,
    /// Most open connections.
    #[arg(long, env = ENV_MAX_CONNECTIONS, default_value_t = 10_000)]
    pub max_connections: usize,
}

impl Common {
    fn region(&self) -> anyhow::Result<RegionName> {
        RegionName::new(&self.region).map_err(|e| bad(format!("--region: {e}")))
    }

    fn serve(&self) -> web::ServeConfig {
        web::ServeConfig {
            max_connections: self.max_connections,
            ..Default::default()
        }
    }
}

fn urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

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
        c.serve = self.common.serve();
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

#[derive(Debug, Args)]
pub struct AggregatorArgs {
    #[command(flatten)]
    pub common: Common,
    /// Names this worker's in-flight lists; keep it stable across restarts.
    #[arg(long, env = ENV_WORKER_ID)]
    pub worker_id: Option<String>,
    /// Redis shard URLs to drain, comma-separated.
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
            urls(&self.redis_urls),
            self.postgres_url.clone(),
        );
        c.batch = aggregator::BatchConfig {
            max_events: self.batch_max_events,
            max_bytes: self.batch_max_bytes,
            timeout: Duration::from_millis(self.batch_timeout_ms),
        };
        c.pop_size = self.pop_size;
        c.writers = self.writers;
        c.serve = self.common.serve();
        c.validate().map_err(bad)?;
        Ok(c)
    }
}

#[derive(Debug, Args)]
pub struct ReaderArgs {
    #[command(flatten)]
    pub common: Common,
    /// Results sources in order of preference, comma-separated `name=postgres://...`:
    /// the local replica first, then other replicas, then the primary if it may be used.
    #[arg(long, env = ENV_POSTGRES_SOURCES)]
    pub sources: String,
    #[arg(long, env = ENV_CACHE_TTL_MS, default_value_t = reader::config::DEFAULT_CACHE_TTL.as_millis() as u64)]
    pub cache_ttl_ms: u64,
    /// A source further behind than this is passed over.
    #[arg(long, env = ENV_MAX_LAG_MS, default_value_t = reader::config::DEFAULT_MAX_LAG.as_millis() as u64)]
    pub max_lag_ms: u64,
    #[arg(long, env = ENV_HEARTBEAT_MS, default_value_t = reader::config::DEFAULT_HEARTBEAT.as_millis() as u64)]
    pub heartbeat_ms: u64,
}

impl ReaderArgs {
    pub fn config(&self) -> anyhow::Result<reader::Config> {
        let sources = urls(&self.sources)
            .iter()
            .enumerate()
            .map(|(i, s)| reader::Source::parse(s, i))
            .collect();
        let mut c = reader::Config::new(self.common.region()?, sources);
        c.cache_ttl = Duration::from_millis(self.cache_ttl_ms);
        c.max_lag = Duration::from_millis(self.max_lag_ms);
        c.heartbeat = Duration::from_millis(self.heartbeat_ms);
        c.serve = self.common.serve();
        c.validate().map_err(bad)?;
        Ok(c)
    }
}

#[derive(Debug, Args)]
pub struct ReplicationArgs {
    /// Address to serve `/status`, `/metrics` and the probes on.
    #[arg(long, env = ENV_LISTEN, default_value = "127.0.0.1:8083")]
    pub listen: String,
    /// Every region's PostgreSQL server, comma-separated `region=postgres://superuser@...`.
    #[arg(long, env = ENV_POSTGRES_SERVERS)]
    pub servers: String,
    /// Data directories of servers on this machine, `region=/path,...`: a failed primary among
    /// them is stopped and left to come back as a replica (fencing).
    #[arg(long, env = ENV_DATA_DIRS, default_value = "")]
    pub data_dirs: String,
    #[arg(long, env = ENV_PROBE_INTERVAL_MS, default_value_t = replication::watch::DEFAULT_INTERVAL.as_millis() as u64)]
    pub probe_interval_ms: u64,
    /// Failed probes of the primary in a row before a failover.
    #[arg(long, env = ENV_FAILOVER_MISSES, default_value_t = replication::failover::DEFAULT_MISSES_BEFORE_FAILOVER)]
    pub failover_misses: u32,
    /// Fail over when the primary is gone (else watch and report only).
    #[arg(long, env = ENV_FAILOVER, default_value_t = true, action = clap::ArgAction::Set)]
    pub failover: bool,
    /// How one region's replica reaches another region's server when not at the address in
    /// `--servers`, `from>to=host:port,...` (the local stack's WAN links).
    #[arg(long, env = ENV_REPLICA_ROUTES, default_value = "")]
    pub replica_routes: String,
}

impl ReplicationArgs {
    pub fn config(&self) -> anyhow::Result<replication::Config> {
        let pairs = |list: &str, what: &str| -> anyhow::Result<Vec<(String, String)>> {
            urls(list)
                .into_iter()
                .map(|item| match item.split_once('=') {
                    Some((region, value))
                        if RegionName::new(region).is_ok() && !value.is_empty() =>
                    {
                        Ok((region.to_string(), value.to_string()))
                    }
                    _ => Err(bad(format!("{what}: {item:?} is not region=value"))),
                })
                .collect()
        };
        let dirs = pairs(&self.data_dirs, "--data-dirs")?;
        let mut servers = Vec::new();
        for (region, url) in pairs(&self.servers, "--servers")? {
            url.parse::<tokio_postgres::Config>()
                .map_err(|e| bad(format!("--servers: {region}: {e}")))?;
            servers.push(replication::Server {
                data_dir: dirs
                    .iter()
                    .find(|(r, _)| *r == region)
                    .map(|(_, d)| d.into()),
                region,
                url,
            });
        }
        if servers.is_empty() {
            return Err(bad("--servers: no PostgreSQL servers given"));
        }
        if self.probe_interval_ms == 0 || self.failover_misses == 0 {
            return Err(bad(
                "--probe-interval-ms and --failover-misses must be greater than zero",
            ));
        }
        let pg_bin = if dirs.is_empty() {
            None
        } else {
            Some(servers::PgBin::find().map_err(bad)?)
        };
        Ok(replication::Config {
            servers,
            interval: Duration::from_millis(self.probe_interval_ms),
            misses_before_failover: self.failover_misses,
            failover: self.failover,
            pg_bin,
            routes: urls(&self.replica_routes)
                .into_iter()
                .map(|item| route(&item))
                .collect::<anyhow::Result<_>>()?,
        })
    }
}

/// `from>to=host:port`.
fn route(item: &str) -> anyhow::Result<replication::Route> {
    let parsed = item.split_once('=').and_then(|(regions, addr)| {
        let (from, to) = regions.split_once('>')?;
        let (host, port) = addr.rsplit_once(':')?;
        RegionName::new(from).ok()?;
        RegionName::new(to).ok()?;
        Some(replication::Route {
            from: from.into(),
            to: to.into(),
            host: host.into(),
            port: port.parse().ok()?,
        })
    });
    parsed.ok_or_else(|| {
        bad(format!(
            "--replica-routes: {item:?} is not from>to=host:port"
        ))
    })
}

#[derive(Debug, Args)]
pub struct WanArgs {
    /// Address to serve `/status`, `/metrics` and the controls (`POST /delay`, `/cut`, `/heal`) on.
    #[arg(long, env = ENV_LISTEN, default_value = "127.0.0.1:8084")]
    pub listen: String,
    /// The links, comma-separated `from>to@listen=upstream`.
    #[arg(long, env = ENV_WAN_LINKS)]
    pub links: String,
    /// One-way delay on every link, in milliseconds.
    #[arg(long, env = ENV_WAN_DELAY_MS, default_value_t = 0)]
    pub delay_ms: u64,
}

impl WanArgs {
    pub fn config(&self) -> anyhow::Result<wan::Config> {
        let config = wan::Config::parse(&self.links, self.delay_ms).map_err(bad)?;
        if config.links.is_empty() {
            return Err(bad("--links: no links given"));
        }
        Ok(config)
    }
}

/// Binds after the configuration was checked; a port in use is an operational error, not a usage one.
pub async fn bind(listen: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))
}
