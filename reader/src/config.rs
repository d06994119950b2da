//! The reader's settings, with defaults in constants.

use std::time::Duration;

use model::RegionName;

/// Environment variables for the reader's settings (each also a flag of `tally reader`).
pub const ENV_POSTGRES_SOURCES: &str = "TALLY_POSTGRES_SOURCES";
pub const ENV_CACHE_TTL_MS: &str = "TALLY_CACHE_TTL_MS";
pub const ENV_MAX_LAG_MS: &str = "TALLY_MAX_LAG_MS";
pub const ENV_HEARTBEAT_MS: &str = "TALLY_HEARTBEAT_MS";
pub const ENV_OPERATOR_TOKEN_FILE: &str = "TALLY_OPERATOR_TOKEN_FILE";

/// How long a results snapshot is served before it is refreshed.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_millis(100);
/// A replica further behind than this is passed over for the next source in the list.
pub const DEFAULT_MAX_LAG: Duration = Duration::from_secs(5);
/// A comment line on every event stream this often, so proxies keep it open.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
/// A source that failed to connect is not retried for this long.
pub const RECONNECT_AFTER: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct Config {
    pub region: RegionName,
    /// Where results come from, in order of preference: the local replica first, then other
    /// replicas, then (if configured) the primary. Each is `name=url` or just a URL.
    pub sources: Vec<Source>,
    pub cache_ttl: Duration,
    pub max_lag: Duration,
    pub heartbeat: Duration,
    /// The control room's bearer token, which sees hidden polls' results.
    pub operator_token: Option<String>,
    pub serve: web::ServeConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub name: String,
    pub url: String,
}

impl Source {
    /// `name=postgres://...`, or a bare URL or key-value string named by its position.
    pub fn parse(spec: &str, position: usize) -> Self {
        match spec.split_once('=') {
            Some((name, url))
                if !name.is_empty()
                    && (url.starts_with("postgres://") || url.starts_with("postgresql://")) =>
            {
                Source {
                    name: name.to_string(),
                    url: url.to_string(),
                }
            }
            _ => Source {
                name: format!("source-{position}"),
                url: spec.to_string(),
            },
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("at least one PostgreSQL source is required")]
    NoSources,
    #[error("invalid PostgreSQL URL for source {name}: {reason}")]
    BadUrl { name: String, reason: String },
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
}

impl Config {
    pub fn new(region: RegionName, sources: Vec<Source>) -> Self {
        Self {
            region,
            sources,
            cache_ttl: DEFAULT_CACHE_TTL,
            max_lag: DEFAULT_MAX_LAG,
            heartbeat: DEFAULT_HEARTBEAT,
            operator_token: None,
            serve: web::ServeConfig::default(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.sources.is_empty() {
            return Err(ConfigError::NoSources);
        }
        for s in &self.sources {
            s.url
                .parse::<tokio_postgres::Config>()
                .map_err(|e| ConfigError::BadUrl {
                    name: s.name.clone(),
                    reason: e.to_string(),
                })?;
        }
        for (name, d) in [("cache ttl", self.cache_ttl), ("heartbeat", self.heartbeat)] {
            if d.is_zero() {
                return Err(ConfigError::Zero(name));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_with_or_without_a_name() {
        assert_eq!(
            Source::parse("eu-west-1=postgres://r@127.0.0.1:5/tally", 0),
            Source {
                name: "eu-west-1".into(),
                url: "postgres://r@127.0.0.1:5/tally".into()
            }
        );
        assert_eq!(Source::parse("postgres://r@h/db", 2).name, "source-2");
        assert_eq!(Source::parse("host=a user=b", 1).url, "host=a user=b");
    }
}
