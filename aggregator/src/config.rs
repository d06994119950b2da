//! The aggregator's settings: defaults in constants, validated once at start-up.

use std::time::Duration;

use model::RegionName;

/// Environment variables for the aggregator's settings (each also a flag of `tally aggregator`).
pub const ENV_REDIS_URLS: &str = "TALLY_REDIS_URLS";
pub const ENV_POSTGRES_URL: &str = "TALLY_POSTGRES_URL";
pub const ENV_WORKER_ID: &str = "TALLY_WORKER_ID";
pub const ENV_BATCH_MAX_EVENTS: &str = "TALLY_BATCH_MAX_EVENTS";
pub const ENV_BATCH_MAX_BYTES: &str = "TALLY_BATCH_MAX_BYTES";
pub const ENV_BATCH_TIMEOUT_MS: &str = "TALLY_BATCH_TIMEOUT_MS";
pub const ENV_POP_SIZE: &str = "TALLY_POP_SIZE";
pub const ENV_WRITERS: &str = "TALLY_WRITERS";
pub const ENV_FINAL_GRACE_MS: &str = "TALLY_FINAL_GRACE_MS";
pub const ENV_LEASE_MS: &str = "TALLY_LEASE_MS";
pub const ENV_WAIT_REPLICAS: &str = "TALLY_WAIT_REPLICAS";

/// A batch is written once it holds this many votes...
pub const DEFAULT_MAX_EVENTS: usize = 50_000;
/// ...or this many payload bytes...
pub const DEFAULT_MAX_BYTES: usize = 8 * 1024 * 1024;
/// ...or its first vote has waited this long.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(20);
/// About this many votes moved out of Redis per round trip: whole list elements, as many as
/// recent elements' votes say make this many.
pub const DEFAULT_POP_SIZE: usize = 5_000;
/// Batches being written to PostgreSQL at once (one connection each). Several in flight keep a
/// cross-region writer busy while earlier batches are still travelling: through a 70 ms link
/// (`tally bench aggregator --wan-ms 70`) 4 writers kept 0.71x of the direct rate, 8 kept 0.84x,
/// 12 kept 0.88x; next to the primary 8 are no slower than 4. The primary can move to any
/// region, so every aggregator is set for distance.
pub const DEFAULT_WRITERS: usize = 8;
/// After a move that found fewer than `pop_size` votes, a reader waits this long before the next,
/// so a trickle of votes is taken in a few larger moves instead of a stream of tiny ones that
/// would keep the shard's single thread busy while ingest is waiting on it.
pub const DEFAULT_LINGER: Duration = Duration::from_millis(10);
/// How long an idle shard reader blocks waiting for a vote.
pub const DEFAULT_BLOCK: Duration = Duration::from_millis(200);
/// How often a reader looks for in-flight lists of its worker that no chunk holds, besides at
/// start and after every error: a move sent on a connection that timed out can still be applied
/// after the reader's look that followed the error, and its list would otherwise wait for the
/// next error or a restart. One `SCAN` of the shard's few keys a period.
pub const DEFAULT_RECOVER_EVERY: Duration = Duration::from_secs(30);
/// Back-off bounds while PostgreSQL or Redis is unreachable.
pub const DEFAULT_RETRY_MIN: Duration = Duration::from_millis(50);
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(2);

/// Ingest's store timeout (2 s) and bound on clock offset (0.5 s), and half a second to spare.
pub const DEFAULT_FINAL_GRACE: Duration = Duration::from_millis(3000);
pub const DEFAULT_CERTIFY_EVERY: Duration = Duration::from_millis(250);
/// Long enough that a slow moment is not a death; short enough that a worker gone for good
/// delays its votes by seconds.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// A lease is renewed every third of its length: shorter than this, one slow Redis reply would
/// let a live worker's lists be adopted.
pub const MIN_LEASE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct Config {
    pub region: RegionName,
    /// Names this worker's in-flight lists; stable across restarts so a restarted worker
    /// finishes what it had taken.
    pub worker_id: String,
    /// The shards to drain, one URL each.
    pub redis_urls: Vec<String>,
    /// Where batches are written: every region's server with `target_session_attrs=read-write`,
    /// so writes follow the primary wherever it is.
    pub postgres_url: String,
    pub batch: BatchConfig,
    pub pop_size: usize,
    pub writers: usize,
    pub block: Duration,
    pub linger: Duration,
    pub recover_every: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// How long after a poll's close its shards are looked at to certify it final: at least
    /// ingest's store timeout (a vote acknowledged is stored by its stamp plus that) and its
    /// bound on clock offset (the stamp is ingest's clock; the close, the primary's).
    pub final_grace: Duration,
    /// How often due polls are looked for.
    pub certify_every: Duration,
    /// How long this worker's hold on its in-flight lists outlives it: past that, a live worker
    /// of the region adopts them.
    pub lease: Duration,
    /// Replicas that must have replayed a batch's commit before its votes leave Redis (see
    /// `replay`); 0 acknowledges at the commit. With asynchronous replication, set 1 or more:
    /// otherwise the primary's loss can take counted votes with it.
    pub wait_replicas: usize,
    pub serve: web::ServeConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    pub max_events: usize,
    pub max_bytes: usize,
    pub timeout: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_events: DEFAULT_MAX_EVENTS,
            max_bytes: DEFAULT_MAX_BYTES,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("at least one Redis shard URL is required")]
    NoShards,
    #[error("invalid Redis URL {0:?}")]
    BadRedisUrl(String),
    #[error("invalid PostgreSQL URL: {0}")]
    BadPostgresUrl(String),
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    #[error("worker id must be 1-64 characters of [A-Za-z0-9_.-]")]
    BadWorkerId,
    #[error("pop size ({pop}) must not exceed the batch's max events ({max})")]
    PopLargerThanBatch { pop: usize, max: usize },
    #[error("the lease must be at least {} ms", MIN_LEASE.as_millis())]
    LeaseTooShort,
}

impl Config {
    pub fn new(
        region: RegionName,
        worker_id: String,
        redis_urls: Vec<String>,
        postgres_url: String,
    ) -> Self {
        Self {
            region,
            worker_id,
            redis_urls,
            postgres_url,
            batch: BatchConfig::default(),
            pop_size: DEFAULT_POP_SIZE,
            writers: DEFAULT_WRITERS,
            block: DEFAULT_BLOCK,
            linger: DEFAULT_LINGER,
            recover_every: DEFAULT_RECOVER_EVERY,
            retry_min: DEFAULT_RETRY_MIN,
            retry_max: DEFAULT_RETRY_MAX,
            final_grace: DEFAULT_FINAL_GRACE,
            certify_every: DEFAULT_CERTIFY_EVERY,
            lease: DEFAULT_LEASE,
            wait_replicas: 0,
            serve: web::ServeConfig::default(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.redis_urls.is_empty() {
            return Err(ConfigError::NoShards);
        }
        for url in &self.redis_urls {
            let ok = match shard::Endpoint::parse(url) {
                Ok(shard::Endpoint::Direct { url }) => tls::redis_client(&url).is_ok(),
                Ok(shard::Endpoint::Sentinel { .. }) => true,
                Err(_) => false,
            };
            if !ok {
                return Err(ConfigError::BadRedisUrl(tls::redact(url)));
            }
        }
        self.postgres_url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| ConfigError::BadPostgresUrl(e.to_string()))?;
        let id_ok = !self.worker_id.is_empty()
            && self.worker_id.len() <= 64
            && self
                .worker_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !id_ok {
            return Err(ConfigError::BadWorkerId);
        }
        for (name, v) in [
            ("batch max events", self.batch.max_events),
            ("batch max bytes", self.batch.max_bytes),
            ("pop size", self.pop_size),
            ("writers", self.writers),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.batch.timeout.is_zero() {
            return Err(ConfigError::Zero("batch timeout"));
        }
        if self.recover_every.is_zero() {
            return Err(ConfigError::Zero("recovery period"));
        }
        if self.lease < MIN_LEASE {
            return Err(ConfigError::LeaseTooShort);
        }
        if self.pop_size > self.batch.max_events {
            return Err(ConfigError::PopLargerThanBatch {
                pop: self.pop_size,
                max: self.batch.max_events,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::new(
            RegionName::new("us-east-1").unwrap(),
            "w-1".into(),
            vec!["redis://127.0.0.1:1/".into()],
            "host=127.0.0.1 user=x".into(),
        )
    }

    #[test]
    fn defaults_are_valid_and_bad_settings_say_why() {
        config().validate().unwrap();
        let mut c = config();
        c.redis_urls.clear();
        assert_eq!(c.validate(), Err(ConfigError::NoShards));
        let mut c = config();
        c.worker_id = "a b".into();
        assert_eq!(c.validate(), Err(ConfigError::BadWorkerId));
        let mut c = config();
        c.batch.max_events = 10;
        assert_eq!(
            c.validate(),
            Err(ConfigError::PopLargerThanBatch {
                pop: DEFAULT_POP_SIZE,
                max: 10
            })
        );
        let mut c = config();
        c.writers = 0;
        assert_eq!(c.validate(), Err(ConfigError::Zero("writers")));
        let mut c = config();
        c.recover_every = Duration::ZERO;
        assert_eq!(c.validate(), Err(ConfigError::Zero("recovery period")));
        let mut c = config();
        c.lease = Duration::from_millis(999);
        assert_eq!(c.validate(), Err(ConfigError::LeaseTooShort));
        let mut c = config();
        c.redis_urls = vec!["sentinel://127.0.0.1:26379/shard-0".into()];
        assert_eq!(c.validate(), Ok(()));
        let mut c = config();
        c.redis_urls = vec!["sentinel://127.0.0.1/shard-0".into()];
        assert!(matches!(c.validate(), Err(ConfigError::BadRedisUrl(_))));
        let mut c = config();
        c.redis_urls = vec!["http://x".into()];
        assert!(matches!(c.validate(), Err(ConfigError::BadRedisUrl(_))));
    }
}
