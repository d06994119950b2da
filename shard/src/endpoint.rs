//! Where a shard is: a URL, parsed and checked once.

use std::fmt;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EndpointError {
    #[error("{0:?} is not a redis://, rediss:// or sentinel:// URL")]
    Scheme(String),
    #[error("{0:?}: a sentinel URL names its sentinels and the shard, sentinel://host:port[,host:port]/name")]
    Sentinel(String),
}

#[derive(Clone, PartialEq)]
pub enum Endpoint {
    /// A fixed address, as given.
    Direct { url: String },
    /// The primary the sentinels name `name`; `credentials` (`user:password`) and `tls` are for
    /// the data nodes.
    Sentinel {
        sentinels: Vec<String>,
        name: String,
        credentials: Option<String>,
        tls: bool,
    },
}

/// A comma-separated list of shard URLs, in shard order. A sentinel URL's own commas (between
/// its sentinels) stay inside it: a new URL starts only where a scheme does.
pub fn split_urls(list: &str) -> Vec<String> {
    let mut urls: Vec<String> = Vec::new();
    for piece in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match urls.last_mut() {
            Some(last) if !piece.contains("://") => {
                last.push(',');
                last.push_str(piece);
            }
            _ => urls.push(piece.to_string()),
        }
    }
    urls
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Self, EndpointError> {
        if url.starts_with("redis://") || url.starts_with("rediss://") {
            return Ok(Endpoint::Direct {
                url: url.to_string(),
            });
        }
        let (tls, rest) = match (
            url.strip_prefix("sentinel://"),
            url.strip_prefix("sentinels://"),
        ) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => return Err(EndpointError::Scheme(redact(url))),
        };
        let bad = || EndpointError::Sentinel(redact(url));
        let (authority, name) = rest.split_once('/').ok_or_else(bad)?;
        let name = name.trim_end_matches('/');
        let (credentials, hosts) = match authority.rsplit_once('@') {
            Some((c, h)) => (Some(c.to_string()), h),
            None => (None, authority),
        };
        let sentinels: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_string)
            .collect();
        let valid = !name.is_empty()
            && !sentinels.is_empty()
            && sentinels.iter().all(|h| {
                h.rsplit_once(':')
                    .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            });
        if !valid {
            return Err(bad());
        }
        Ok(Endpoint::Sentinel {
            sentinels,
            name: name.to_string(),
            credentials,
            tls,
        })
    }

    /// The URL of a data node at `addr` (`host:port`), with the endpoint's credentials and TLS.
    pub fn node_url(&self, addr: &str) -> String {
        match self {
            Endpoint::Direct { url } => url.clone(),
            Endpoint::Sentinel {
                credentials, tls, ..
            } => format!(
                "{}://{}{addr}/",
                if *tls { "rediss" } else { "redis" },
                credentials
                    .as_ref()
                    .map(|c| format!("{c}@"))
                    .unwrap_or_default()
            ),
        }
    }
}

/// Passwords never leave in an error or a log line.
fn redact(url: &str) -> String {
    tls::redact(url)
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Direct { url } => f.write_str(&redact(url)),
            Endpoint::Sentinel {
                sentinels, name, ..
            } => {
                write!(f, "sentinel {name} ({})", sentinels.join(","))
            }
        }
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_keeps_each_sentinel_urls_commas() {
        assert_eq!(
            split_urls("sentinel://a:1,b:2,c:3/s-0, redis://x:6379/,sentinel://a:1/s-1,"),
            [
                "sentinel://a:1,b:2,c:3/s-0",
                "redis://x:6379/",
                "sentinel://a:1/s-1"
            ]
        );
        assert_eq!(split_urls(" , "), Vec::<String>::new());
    }

    #[test]
    fn urls_name_a_fixed_address_or_the_sentinels_and_the_shard() {
        assert_eq!(
            Endpoint::parse("redis://127.0.0.1:6400/").unwrap(),
            Endpoint::Direct {
                url: "redis://127.0.0.1:6400/".into()
            }
        );
        let e = Endpoint::parse(
            "sentinel://tally-ingest:pw@127.0.0.1:26379,127.0.0.1:26380/us-east-1-0",
        )
        .unwrap();
        assert_eq!(
            e,
            Endpoint::Sentinel {
                sentinels: vec!["127.0.0.1:26379".into(), "127.0.0.1:26380".into()],
                name: "us-east-1-0".into(),
                credentials: Some("tally-ingest:pw".into()),
                tls: false
            }
        );
        assert_eq!(
            e.node_url("10.0.0.1:6379"),
            "redis://tally-ingest:pw@10.0.0.1:6379/"
        );
        assert!(
            !e.to_string().contains("pw"),
            "no password in what is shown"
        );
        assert!(
            Endpoint::parse("sentinel://127.0.0.1:26379").is_err(),
            "no shard name"
        );
        assert!(Endpoint::parse("sentinel://host/x").is_err(), "no port");
        assert!(Endpoint::parse("http://x").is_err());
    }
}
