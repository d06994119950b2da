//! Real distance on one machine. Every cross-region connection of the local stack (replication
//! streams, an aggregator's writes to a remote primary, a reader's fallback to a remote server)
//! goes through a link: a TCP proxy that holds each chunk for the one-way delay before passing it
//! on, in both directions. Chunks keep flowing while earlier ones are held, so a link adds latency
//! without capping throughput, as a long fibre does. This machine has no `tc netem`; this is the
//! user-space stand-in.
//!
//! A link can also be cut: its connections are dropped and new ones refused until it is healed,
//! which is how a region is cut off from the others.
#![forbid(unsafe_code)]

mod http;
mod link;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use link::Links;

/// Environment variables for `tally wan`'s settings (each also a flag).
pub const ENV_WAN_LINKS: &str = "TALLY_WAN_LINKS";
pub const ENV_WAN_DELAY_MS: &str = "TALLY_WAN_DELAY_MS";

/// Bytes read from one side per chunk.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Chunks held per direction of a connection before its reader waits: enough for a link to
/// carry 64 MiB per held second.
pub const CHUNKS_HELD: usize = 1024;
/// The largest delay a link accepts: beyond this something is misconfigured.
pub const MAX_DELAY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WanError {
    #[error("invalid link {0:?}: expected FROM>TO@LISTEN=UPSTREAM, e.g. eu-west-1>us-east-1@127.0.0.1:7001=127.0.0.1:5432")]
    BadLink(String),
    #[error("link {0} is listed twice")]
    DuplicateListen(SocketAddr),
    #[error("delay of {0} ms is over the most allowed ({max} ms)", max = MAX_DELAY.as_millis())]
    DelayTooLong(u64),
    #[error("cannot listen on {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
}

/// One direction of travel between two regions: connections to `listen` reach `upstream`, a
/// server in region `to`, as a client in region `from` would.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Link {
    pub from: String,
    pub to: String,
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
}

impl Link {
    /// Parses `FROM>TO@LISTEN=UPSTREAM`.
    pub fn parse(text: &str) -> Result<Self, WanError> {
        let bad = || WanError::BadLink(text.to_string());
        let (regions, addrs) = text.trim().split_once('@').ok_or_else(bad)?;
        let (from, to) = regions.split_once('>').ok_or_else(bad)?;
        let (listen, upstream) = addrs.split_once('=').ok_or_else(bad)?;
        let region_ok = |r: &str| {
            !r.is_empty()
                && r.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !region_ok(from) || !region_ok(to) {
            return Err(bad());
        }
        Ok(Link {
            from: from.into(),
            to: to.into(),
            listen: listen.parse().map_err(|_| bad())?,
            upstream: upstream.parse().map_err(|_| bad())?,
        })
    }

    /// Does cutting `region` off cut this link?
    pub fn touches(&self, region: &str) -> bool {
        self.from == region || self.to == region
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}>{}@{}={}",
            self.from, self.to, self.listen, self.upstream
        )
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub links: Vec<Link>,
    /// One-way delay; a round trip over a link takes twice this.
    pub delay: Duration,
}

impl Config {
    /// A comma-separated list of links and a delay in milliseconds, checked.
    pub fn parse(links: &str, delay_ms: u64) -> Result<Self, WanError> {
        let links = links
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(Link::parse)
            .collect::<Result<Vec<_>, _>>()?;
        let mut seen = std::collections::HashSet::new();
        for l in &links {
            if !seen.insert(l.listen) {
                return Err(WanError::DuplicateListen(l.listen));
            }
        }
        Ok(Config {
            links,
            delay: delay(delay_ms)?,
        })
    }
}

/// A delay in milliseconds, checked against [`MAX_DELAY`].
pub fn delay(ms: u64) -> Result<Duration, WanError> {
    let d = Duration::from_millis(ms);
    if d > MAX_DELAY {
        return Err(WanError::DelayTooLong(ms));
    }
    Ok(d)
}

/// Opens every link and serves the control face on `listener` (`/status`, `POST /delay?ms=N`,
/// `POST /cut?region=R`, `POST /heal?region=R`, `/healthz`, `/readyz`, `/metrics`) until
/// `shutdown`. Every link is listening before this serves its first request.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WanError> {
    web::metrics_handle();
    let links = Links::open(&config).await?;
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        links = config.links.len(),
        delay_ms = config.delay.as_millis() as u64,
        "wan links open"
    );
    web::serve(
        listener,
        Arc::new(http::Control(links.clone())),
        web::ServeConfig::default(),
        shutdown,
    )
    .await;
    links.close();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_reads_back_as_written() {
        let text = "eu-west-1>us-east-1@127.0.0.1:7001=127.0.0.1:5432";
        let link = Link::parse(text).unwrap();
        assert_eq!(link.from, "eu-west-1");
        assert_eq!(link.to, "us-east-1");
        assert_eq!(link.upstream.port(), 5432);
        assert_eq!(link.to_string(), text);
        assert!(link.touches("us-east-1") && !link.touches("ap-southeast-1"));
    }

    #[test]
    fn bad_links_and_delays_are_refused() {
        for bad in [
            "",
            "eu-west-1@127.0.0.1:1=127.0.0.1:2",
            "eu-west-1>us-east-1@127.0.0.1:1",
            ">us-east-1@127.0.0.1:1=127.0.0.1:2",
            "a b>c@127.0.0.1:1=127.0.0.1:2",
            "a>b@localhost:1=127.0.0.1:2",
        ] {
            assert_eq!(
                Link::parse(bad),
                Err(WanError::BadLink(bad.into())),
                "{bad}"
            );
        }
        let twice = "a>b@127.0.0.1:1=127.0.0.1:2,b>a@127.0.0.1:1=127.0.0.1:3";
        assert_eq!(
            Config::parse(twice, 0).unwrap_err().to_string(),
            "link 127.0.0.1:1 is listed twice"
        );
        assert_eq!(
            Config::parse("", 10_001).unwrap_err().to_string(),
            "delay of 10001 ms is over the most allowed (10000 ms)"
        );
        assert_eq!(Config::parse(" , ", 70).unwrap().links, vec![]);
    }
}
