//! `tally ingest`'s flags.

use std::time::Duration;

use clap::Args;
use ingest::auth::Keys;
use ingest::config::*;
use ingest::identity::{AnonymousVoters, Identity, JwtConfig, KeySource, TrustedProxies};

use super::Common;
use crate::usage::bad;

#[derive(Debug, Args)]
pub struct IngestArgs {
    #[command(flatten)]
    pub common: Common,
    /// Redis shard URLs, comma-separated; the position is the shard number. `redis://` or
    /// `rediss://` for a fixed address, `sentinel://[user:password@]host:port,.../name` for the
    /// primary Sentinel names (followed through failovers).
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
    /// JWT voters: the identity provider's key set (RS256/ES256), e.g. an Auth0 tenant's
    /// `https://TENANT/.well-known/jwks.json`; fetched at start, refreshed, and at once when a
    /// token names a key it lacks.
    #[arg(long, env = ENV_JWKS_URL, conflicts_with = "jwks_file", requires_all = ["jwt_issuer", "jwt_audience"])]
    pub jwks_url: Option<String>,
    /// JWT voters: the key set in a file, read again at every refresh.
    #[arg(long, env = ENV_JWKS_FILE, requires_all = ["jwt_issuer", "jwt_audience"])]
    pub jwks_file: Option<std::path::PathBuf>,
    /// The tokens' issuer (`iss`).
    #[arg(long, env = ENV_JWT_ISSUER)]
    pub jwt_issuer: Option<String>,
    /// The tokens' audience (`aud`).
    #[arg(long, env = ENV_JWT_AUDIENCE)]
    pub jwt_audience: Option<String>,
    /// Seconds of clock difference allowed when checking `exp` and `nbf`.
    #[arg(long, env = ENV_JWT_LEEWAY_S, default_value_t = ingest::identity::DEFAULT_JWT_LEEWAY.as_secs())]
    pub jwt_leeway_s: u64,
    /// Seconds between fetches of the key set.
    #[arg(long, env = ENV_JWKS_REFRESH_S, default_value_t = ingest::identity::DEFAULT_JWKS_REFRESH.as_secs())]
    pub jwks_refresh_s: u64,
    /// A token with an unknown key id fetches the key set at most this often (seconds).
    #[arg(long, env = ENV_JWKS_UNKNOWN_KEY_REFETCH_S, default_value_t = ingest::identity::DEFAULT_UNKNOWN_KEY_REFETCH.as_secs())]
    pub jwks_unknown_key_refetch_s: u64,
    /// Verified tokens remembered (about 100 bytes each), so a voter voting again costs no
    /// signature check.
    #[arg(long, env = ENV_TOKEN_CACHE_ENTRIES, default_value_t = ingest::identity::DEFAULT_TOKEN_CACHE_ENTRIES)]
    pub token_cache_entries: usize,
    /// No identity provider, on purpose: voters are ids in a cookie signed with
    /// `--cookie-secret`, or a trusted proxy's `X-Voter-Id`. For demos and the original app's page.
    #[arg(long, env = ENV_ANONYMOUS_VOTERS, conflicts_with_all = ["jwks_url", "jwks_file"])]
    pub anonymous_voters: bool,
    /// Signs anonymous voters' cookies; every ingest of a deployment shares it (32 bytes or more).
    #[arg(long, env = ENV_COOKIE_SECRET, hide_env_values = true)]
    pub cookie_secret: Option<String>,
    /// Gateways and load balancers, comma-separated CIDRs: only connections from them may send
    /// `X-Voter-Id`, and the client address is the right-most `X-Forwarded-For` entry not in them.
    #[arg(long, env = ENV_TRUSTED_PROXIES, default_value = "")]
    pub trusted_proxies: String,
    /// Origins besides the site itself whose pages may post votes, comma-separated
    /// (`https://partner.example`).
    #[arg(long, env = ENV_ALLOWED_ORIGINS, value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Set cookies only over HTTPS (`Secure`), as behind a TLS-terminating load balancer.
    #[arg(long, env = ENV_SECURE_COOKIES)]
    pub secure_cookies: bool,
    /// A catalog not read for this long is stale: votes get 503 and ingest is not ready.
    #[arg(long, env = ENV_CATALOG_MAX_AGE_MS, default_value_t = ingest::config::DEFAULT_CATALOG_MAX_AGE.as_millis() as u64)]
    pub catalog_max_age_ms: u64,
    /// Votes get 503 while this host's clock is further than this from the database's.
    #[arg(long, env = ENV_MAX_CLOCK_OFFSET_MS, default_value_t = ingest::config::DEFAULT_MAX_CLOCK_OFFSET.as_millis() as u64)]
    pub max_clock_offset_ms: u64,
    /// Drills only, never production: stamp votes as if this host's clock were this many
    /// milliseconds ahead (negative: behind).
    #[arg(long, env = ENV_DRILL_CLOCK_SKEW_MS, default_value_t = 0, allow_negative_numbers = true, hide = true)]
    pub drill_clock_skew_ms: i64,
}

impl IngestArgs {
    /// Where voters' identities come from: a key set, or anonymity chosen on purpose.
    fn identity(&self) -> anyhow::Result<Identity> {
        let keys = match (&self.jwks_url, &self.jwks_file) {
            (Some(url), _) => Some(KeySource::Url(url.clone())),
            (None, Some(path)) => {
                // A file can be checked now: a bad one stops ingest before it binds a port.
                let text = std::fs::read(path)
                    .map_err(|e| bad(format!("--jwks-file {}: {e}", path.display())))?;
                Keys::from_jwks(&text, &path.display().to_string())
                    .map_err(|e| bad(format!("--jwks-file {e}")))?;
                Some(KeySource::File(path.clone()))
            }
            (None, None) => None,
        };
        if let Some(keys) = keys {
            let mut jwt = JwtConfig::new(
                keys,
                self.jwt_issuer.clone().unwrap_or_default(),
                self.jwt_audience.clone().unwrap_or_default(),
            );
            jwt.leeway = Duration::from_secs(self.jwt_leeway_s);
            jwt.refresh = Duration::from_secs(self.jwks_refresh_s);
            jwt.unknown_key_refetch = Duration::from_secs(self.jwks_unknown_key_refetch_s);
            jwt.cache_entries = self.token_cache_entries;
            return Ok(Identity::Jwt(jwt));
        }
        if !self.anonymous_voters {
            return Err(bad(
                "no voter identity: give --jwks-url (or --jwks-file) with --jwt-issuer and --jwt-audience, or choose --anonymous-voters",
            ));
        }
        let secret = self.cookie_secret.as_deref().ok_or_else(|| {
            bad("--anonymous-voters needs --cookie-secret (TALLY_COOKIE_SECRET), shared by every ingest of the deployment")
        })?;
        Ok(Identity::Anonymous(AnonymousVoters::new(secret.as_bytes())))
    }
}

fn rate(per_second: f64, burst: f64) -> Option<ingest::Rate> {
    (per_second > 0.0).then_some(ingest::Rate { per_second, burst })
}

impl IngestArgs {
    pub fn config(&self) -> anyhow::Result<ingest::Config> {
        let mut c = ingest::Config::new(
            self.common.region()?,
            shard::split_urls(&self.redis_urls),
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
        c.serve = self.common.serve_config()?;
        c.drill_clock_skew_ms = self.drill_clock_skew_ms;
        c.catalog_max_age = Duration::from_millis(self.catalog_max_age_ms);
        c.max_clock_offset = Duration::from_millis(self.max_clock_offset_ms);
        c.identity = self.identity()?;
        c.trusted_proxies = TrustedProxies::parse(&self.trusted_proxies)
            .map_err(|e| bad(format!("--trusted-proxies: {e}")))?;
        c.allowed_origins = self
            .allowed_origins
            .iter()
            .map(|o| o.trim().to_string())
            .filter(|o| !o.is_empty())
            .collect();
        c.secure_cookies = self.secure_cookies;
        c.validate().map_err(bad)?;
        Ok(c)
    }
}
