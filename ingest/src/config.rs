//! Ingest's settings, with defaults in constants and one validation at start-up.

use std::time::Duration;

use model::RegionName;
use web::ServeConfig;

pub use crate::group::GroupCommit;
use crate::identity::{AnonymousVoters, Identity, TrustedProxies, MIN_COOKIE_SECRET_BYTES};

/// Environment variables for ingest's settings (each also a flag of `tally ingest`).
pub const ENV_REDIS_URLS: &str = "TALLY_REDIS_URLS";
pub const ENV_POSTGRES_URL: &str = "TALLY_POSTGRES_URL";
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
pub const ENV_JWKS_URL: &str = "TALLY_JWKS_URL";
pub const ENV_JWT_LEEWAY_S: &str = "TALLY_JWT_LEEWAY_S";
pub const ENV_JWKS_REFRESH_S: &str = "TALLY_JWKS_REFRESH_S";
pub const ENV_JWKS_UNKNOWN_KEY_REFETCH_S: &str = "TALLY_JWKS_UNKNOWN_KEY_REFETCH_S";
pub const ENV_TOKEN_CACHE_ENTRIES: &str = "TALLY_TOKEN_CACHE_ENTRIES";
pub const ENV_ANONYMOUS_VOTERS: &str = "TALLY_ANONYMOUS_VOTERS";
pub const ENV_COOKIE_SECRET: &str = "TALLY_COOKIE_SECRET";
pub const ENV_TRUSTED_PROXIES: &str = "TALLY_TRUSTED_PROXIES";
pub const ENV_ALLOWED_ORIGINS: &str = "TALLY_ALLOWED_ORIGINS";
pub const ENV_SECURE_COOKIES: &str = "TALLY_SECURE_COOKIES";
pub const ENV_JWT_ISSUER: &str = "TALLY_JWT_ISSUER";
pub const ENV_JWT_AUDIENCE: &str = "TALLY_JWT_AUDIENCE";
pub const ENV_DRILL_CLOCK_SKEW_MS: &str = "TALLY_DRILL_CLOCK_SKEW_MS";
pub const ENV_CATALOG_MAX_AGE_MS: &str = "TALLY_CATALOG_MAX_AGE_MS";
pub const ENV_MAX_CLOCK_OFFSET_MS: &str = "TALLY_MAX_CLOCK_OFFSET_MS";

/// Most votes one write (one list element) carries.
pub const DEFAULT_GROUP_MAX_VOTES: usize = 1024;
/// Votes that end a batch's linger: enough that a write's fixed cost (~50 µs of Redis's CPU on
/// two cores) is a small share of it, few enough that at saturation (256 connections, ~128 votes
/// a shard in circulation) a freed slot does not wait long. 128 measured worse on two cores:
/// 0.856x of bare hyper's rate against 0.887x in the same runs.
pub const DEFAULT_GROUP_TARGET_VOTES: usize = 64;
/// Group-commit writes one shard may have outstanding at once.
pub const DEFAULT_GROUP_MAX_IN_FLIGHT: usize = 2;
/// How long a batch's first vote may wait for others while a write slot is free. Under load the
/// arriving votes end the wait on time; when none comes, tokio's timer ends it on its next
/// millisecond tick. Long enough that at ~28,000 votes/s a shard (0.8x of bare hyper's rate on a
/// slow two-core day) a write carries ~56 votes; a fifth of the 10 ms latency target.
pub const DEFAULT_GROUP_LINGER: Duration = Duration::from_millis(2);
/// Above this many queued votes a shard refuses new ones (503) until aggregators catch up.
pub const DEFAULT_QUEUE_BOUND: u64 = 5_000_000;
/// Largest accepted request body.
pub const DEFAULT_BODY_LIMIT: usize = 4096;
/// A request body must arrive within this.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the poll catalog is re-read from PostgreSQL.
pub const DEFAULT_CATALOG_REFRESH: Duration = Duration::from_secs(1);
/// A catalog not read for longer than this is stale: ingest refuses votes (503) and is not ready,
/// rather than take one by rules that may have changed (a poll closed since, say).
pub const DEFAULT_CATALOG_MAX_AGE: Duration = Duration::from_secs(5);
/// Ingest refuses votes while its clock is further than this from the database's: a vote's
/// stamp decides whether it was cast before the close.
pub const DEFAULT_MAX_CLOCK_OFFSET: Duration = Duration::from_millis(500);
/// How long a vote may wait for its shard's acknowledgement before it is answered 503.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(2);
/// Per-voter limit: votes per second, and the burst allowed on top.
pub const DEFAULT_VOTER_RATE: f64 = 5.0;
pub const DEFAULT_VOTER_BURST: f64 = 20.0;
/// Keys each rate limit keeps (16 bytes each and their set's lock, 4.6 MiB: more than a core's
/// caches hold, which is why a check prefetches its set: see the `limit` module). Only a
/// key whose bucket is not full needs one, and each vote keeps its key's bucket short of full for
/// one token's time, so by Little's law the keys needed are votes a second times seconds a token:
/// 50,000 for 250,000 votes a second at the default 5 a second, a fifth of this.
pub const DEFAULT_LIMIT_KEYS: usize = 1 << 18;
/// 4.6 GiB a limit: more is a typo, not a plan.
pub const MAX_LIMIT_KEYS: usize = 1 << 28;

#[derive(Debug, Clone)]
pub struct Config {
    pub region: RegionName,
    /// One URL per shard; the index is the shard number.
    pub redis_urls: Vec<String>,
    /// Where the poll catalog is read from (the local replica is fine).
    pub postgres_url: String,
    pub catalog_refresh: Duration,
    pub catalog_max_age: Duration,
    pub max_clock_offset: Duration,
    pub group: GroupCommit,
    pub queue_bound: u64,
    pub store_timeout: Duration,
    /// After each write, wait for this many Redis replicas (`WAIT`); 0 = do not wait.
    pub wait_replicas: u32,
    pub body_limit: usize,
    pub body_timeout: Duration,
    pub voter_limit: Option<Rate>,
    pub ip_limit: Option<Rate>,
    /// Keys each rate limit holds; past it, a new key displaces the bucket nearest to full.
    pub limit_keys: usize,
    /// Where voters' identities come from.
    pub identity: Identity,
    /// Gateways and load balancers: only connections from them may send `X-Voter-Id` or
    /// `X-Forwarded-For`.
    pub trusted_proxies: TrustedProxies,
    /// Origins besides the site itself whose pages may post votes.
    pub allowed_origins: Vec<String>,
    /// Cookies only over HTTPS (`Secure`).
    pub secure_cookies: bool,
    pub serve: ServeConfig,
    /// Milliseconds added to this host's clock when stamping votes: only for drills that show
    /// what a skewed clock does. Never a production setting: ingest measures its clock against
    /// the database's and refuses votes past `max_clock_offset`.
    pub drill_clock_skew_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("at least one Redis shard URL is required")]
    NoShards,
    #[error("invalid Redis URL {0:?}")]
    BadRedisUrl(String),
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    #[error("{what} must be at most {max}")]
    TooLarge { what: &'static str, max: usize },
    #[error("the catalog's staleness bound must be longer than its refresh period")]
    StaleBound,
    #[error("the cookie secret must be at least {MIN_COOKIE_SECRET_BYTES} bytes")]
    ShortCookieSecret,
    #[error("the JWT issuer and audience must not be empty")]
    EmptyIssuerOrAudience,
    #[error("the group-commit linger ({linger:?}) must be shorter than the store timeout ({store_timeout:?})")]
    LingerTooLong {
        linger: Duration,
        store_timeout: Duration,
    },
}

impl Default for GroupCommit {
    fn default() -> Self {
        Self {
            max_votes: DEFAULT_GROUP_MAX_VOTES,
            target_votes: DEFAULT_GROUP_TARGET_VOTES,
            max_in_flight: DEFAULT_GROUP_MAX_IN_FLIGHT,
            linger: DEFAULT_GROUP_LINGER,
        }
    }
}

impl Config {
    /// Defaults for everything but the addresses.
    pub fn new(region: RegionName, redis_urls: Vec<String>, postgres_url: String) -> Self {
        Self {
            region,
            redis_urls,
            postgres_url,
            catalog_refresh: DEFAULT_CATALOG_REFRESH,
            catalog_max_age: DEFAULT_CATALOG_MAX_AGE,
            max_clock_offset: DEFAULT_MAX_CLOCK_OFFSET,
            group: GroupCommit::default(),
            queue_bound: DEFAULT_QUEUE_BOUND,
            store_timeout: DEFAULT_STORE_TIMEOUT,
            wait_replicas: 0,
            body_limit: DEFAULT_BODY_LIMIT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            voter_limit: Some(Rate {
                per_second: DEFAULT_VOTER_RATE,
                burst: DEFAULT_VOTER_BURST,
            }),
            ip_limit: None,
            limit_keys: DEFAULT_LIMIT_KEYS,
            identity: Identity::Anonymous(AnonymousVoters::with_random_secret()),
            trusted_proxies: TrustedProxies::default(),
            allowed_origins: Vec::new(),
            secure_cookies: false,
            serve: ServeConfig::default(),
            drill_clock_skew_ms: 0,
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
        for (name, v) in [
            ("group commit max votes", self.group.max_votes),
            ("group commit target votes", self.group.target_votes),
            ("group commit max in flight", self.group.max_in_flight),
            ("body limit", self.body_limit),
            ("max connections", self.serve.max_connections),
            ("rate limit keys", self.limit_keys),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.limit_keys > MAX_LIMIT_KEYS {
            return Err(ConfigError::TooLarge {
                what: "rate limit keys",
                max: MAX_LIMIT_KEYS,
            });
        }
        if self.queue_bound == 0 {
            return Err(ConfigError::Zero("queue bound"));
        }
        if self.catalog_max_age <= self.catalog_refresh {
            return Err(ConfigError::StaleBound);
        }
        // A vote that lingers its whole store timeout could never be acknowledged.
        if self.group.linger >= self.store_timeout {
            return Err(ConfigError::LingerTooLong {
                linger: self.group.linger,
                store_timeout: self.store_timeout,
            });
        }
        match &self.identity {
            Identity::Anonymous(voters) if voters.secret_len() < MIN_COOKIE_SECRET_BYTES => {
                return Err(ConfigError::ShortCookieSecret)
            }
            Identity::Jwt(jwt) => {
                if jwt.issuer.is_empty() || jwt.audience.is_empty() {
                    return Err(ConfigError::EmptyIssuerOrAudience);
                }
                if jwt.cache_entries == 0 || jwt.refresh.is_zero() {
                    return Err(ConfigError::Zero("JWT key refresh and token cache"));
                }
            }
            Identity::Anonymous(_) => {}
        }
        for rate in [self.voter_limit, self.ip_limit].into_iter().flatten() {
            if rate.per_second <= 0.0 || rate.burst < 1.0 {
                return Err(ConfigError::Zero("rate limit"));
            }
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
            vec!["redis://127.0.0.1:6400/".into()],
            "postgres://127.0.0.1/tally".into(),
        )
    }

    #[test]
    fn a_linger_as_long_as_the_store_timeout_is_refused() {
        let mut c = config();
        assert_eq!(c.validate(), Ok(()));
        c.group.linger = c.store_timeout;
        let err = c.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "the group-commit linger (2s) must be shorter than the store timeout (2s)"
        );
        c.group.linger = Duration::ZERO;
        assert_eq!(c.validate(), Ok(()), "no linger is allowed");
    }

    #[test]
    fn the_rate_limit_table_is_bounded_both_ways() {
        let mut c = config();
        c.limit_keys = 0;
        assert_eq!(c.validate(), Err(ConfigError::Zero("rate limit keys")));
        c.limit_keys = MAX_LIMIT_KEYS + 1;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            format!("rate limit keys must be at most {MAX_LIMIT_KEYS}")
        );
        c.limit_keys = MAX_LIMIT_KEYS;
        assert_eq!(c.validate(), Ok(()));
    }
}
