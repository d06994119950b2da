//! `tally reader`'s flags.

use std::time::Duration;

use clap::Args;
use reader::config::*;

use super::{urls, Common};
use crate::usage::bad;

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
    /// A file holding the control room's bearer token: requests with it see hidden polls'
    /// results before they are revealed.
    #[arg(long, env = ENV_OPERATOR_TOKEN_FILE)]
    pub operator_token_file: Option<std::path::PathBuf>,
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
        if let Some(path) = &self.operator_token_file {
            let token = std::fs::read_to_string(path)
                .map_err(|e| bad(format!("--operator-token-file {}: {e}", path.display())))?;
            let token = token.trim();
            if token.len() < 16 {
                return Err(bad(
                    "--operator-token-file: the token must be at least 16 characters",
                ));
            }
            c.operator_token = Some(token.to_string());
        }
        c.serve = self.common.serve_config()?;
        c.validate().map_err(bad)?;
        Ok(c)
    }
}
