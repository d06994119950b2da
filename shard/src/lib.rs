//! One Redis shard as a role reaches it. A shard is named by a URL: `redis://` or `rediss://`
//! for a fixed address (a managed service's primary endpoint, whose name follows its failovers),
//! or `sentinel://[user:password@]host:port[,host:port...]/name` for the primary that Redis
//! Sentinel names for `name`. A [`Link`] keeps a connection to the shard's current primary: it
//! asks the sentinels again every [`RESOLVE_EVERY`] and whenever a command meets a replica
//! (`READONLY`) or a dead connection, so a role follows a failover without a restart.
#![forbid(unsafe_code)]

mod endpoint;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Notify;

pub use endpoint::{split_urls, Endpoint, EndpointError};

/// How often the sentinels are asked where the primary is.
pub const RESOLVE_EVERY: Duration = Duration::from_millis(250);
/// A sentinel that does not answer within this is skipped.
const SENTINEL_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0} was named the primary but answers as a replica")]
    NotPrimary(String),
}

/// A connection to a shard's current primary.
pub struct Link {
    endpoint: Endpoint,
    config: ConnectionManagerConfig,
    current: ArcSwapOption<Current>,
    /// Set when a command met something other than the primary: resolve again at once.
    stale: AtomicBool,
    wake: Notify,
}

struct Current {
    /// The address connected to (`host:port`).
    addr: String,
    conn: ConnectionManager,
}

impl Link {
    /// A link to `url`'s shard; connects lazily. For a Sentinel URL, call [`Link::follow`] in a
    /// task of its own to keep up with failovers.
    pub fn new(url: &str, config: ConnectionManagerConfig) -> Result<Arc<Self>, LinkError> {
        let endpoint = Endpoint::parse(url)?;
        let link = Arc::new(Self {
            endpoint,
            config,
            current: ArcSwapOption::empty(),
            stale: AtomicBool::new(true),
            wake: Notify::new(),
        });
        if let Endpoint::Direct { url } = &link.endpoint {
            // A fixed address connects lazily and reconnects on its own.
            let conn = ConnectionManager::new_lazy_with_config(
                tls::redis_client(url)?,
                link.config.clone(),
            )?;
            link.current.store(Some(Arc::new(Current {
                addr: url.clone(),
                conn,
            })));
            link.stale.store(false, Ordering::Relaxed);
        }
        Ok(link)
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The connection to the primary as last found, if one was.
    pub fn connection(&self) -> Option<ConnectionManager> {
        self.current.load().as_ref().map(|c| c.conn.clone())
    }

    /// The connection, or an error a caller treats as the shard being unavailable.
    pub fn get(&self) -> redis::RedisResult<ConnectionManager> {
        self.connection().ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::Io,
                "no primary found for the shard yet",
                self.endpoint.to_string(),
            ))
        })
    }

    /// Says what a command on the link's connection met: a replica where the primary was (a
    /// failover) or a dead connection makes the link look for the primary again.
    pub fn report(&self, e: &redis::RedisError) {
        let gone = e.is_connection_refusal() || e.is_connection_dropped();
        let sentinel = matches!(self.endpoint, Endpoint::Sentinel { .. });
        // A fixed address's connection reconnects by itself after a drop.
        if e.code() == Some("READONLY") || (gone && sentinel) {
            self.lost_primary();
        }
    }

    /// The connection reaches a node that is no longer the primary. A Sentinel link asks the
    /// sentinels at once; a fixed address connects again, since its name now points at the new
    /// primary and the old connection still reaches the demoted one.
    pub fn lost_primary(&self) {
        match &self.endpoint {
            Endpoint::Direct { url } => {
                let fresh = tls::redis_client(url).and_then(|client| {
                    ConnectionManager::new_lazy_with_config(client, self.config.clone())
                });
                if let Ok(conn) = fresh {
                    self.current.store(Some(Arc::new(Current {
                        addr: url.clone(),
                        conn,
                    })));
                }
            }
            Endpoint::Sentinel { .. } => {
                self.stale.store(true, Ordering::Relaxed);
                self.wake.notify_one();
            }
        }
    }

    /// Keeps a Sentinel link on the current primary until the link is dropped by every holder
    /// but this task. A fixed address returns at once: its connection reconnects itself.
    pub async fn follow(self: Arc<Self>) {
        let Endpoint::Sentinel { .. } = &self.endpoint else {
            return;
        };
        loop {
            if Arc::strong_count(&self) == 1 {
                return;
            }
            match self.resolve().await {
                Ok(addr) => {
                    let same = self.current.load().as_ref().is_some_and(|c| c.addr == addr);
                    if !same || self.stale.load(Ordering::Relaxed) {
                        match self.connect(&addr).await {
                            Ok(conn) => {
                                if !same {
                                    tracing::info!(shard = %self.endpoint, primary = %addr, "shard's primary found");
                                }
                                self.current.store(Some(Arc::new(Current { addr, conn })));
                                self.stale.store(false, Ordering::Relaxed);
                            }
                            Err(e) => {
                                tracing::debug!(shard = %self.endpoint, error = %e, "the named primary does not answer as one")
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(shard = %self.endpoint, error = %e, "no sentinel named the primary")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RESOLVE_EVERY) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// The primary's address, from the first sentinel that names one.
    async fn resolve(&self) -> Result<String, LinkError> {
        let Endpoint::Sentinel {
            sentinels, name, ..
        } = &self.endpoint
        else {
            unreachable!("only sentinel links resolve");
        };
        let mut last = None;
        for s in sentinels {
            let asked = async {
                let client = redis::Client::open(format!("redis://{s}/"))?;
                let mut c = client.get_multiplexed_async_connection().await?;
                let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(name)
                    .query_async(&mut c)
                    .await?;
                Ok::<_, redis::RedisError>(addr)
            };
            match tokio::time::timeout(SENTINEL_TIMEOUT, asked).await {
                Ok(Ok(Some((host, port)))) => return Ok(format!("{host}:{port}")),
                Ok(Ok(None)) => {
                    last = Some(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "the sentinel knows no such shard",
                        name.clone(),
                    )))
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "the sentinel did not answer",
                        s.clone(),
                    )))
                }
            }
        }
        Err(last
            .unwrap_or_else(|| {
                redis::RedisError::from((redis::ErrorKind::Io, "no sentinels", name.clone()))
            })
            .into())
    }

    /// A connection to `addr`, once it says it is a primary (a sentinel's word may be a moment
    /// behind a failover).
    async fn connect(&self, addr: &str) -> Result<ConnectionManager, LinkError> {
        let url = self.endpoint.node_url(addr);
        let client = tls::redis_client(&url)?;
        let mut conn = ConnectionManager::new_with_config(client, self.config.clone()).await?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        match Role::of(&role) {
            Role::Primary { .. } => Ok(conn),
            Role::Replica => Err(LinkError::NotPrimary(addr.to_string())),
        }
    }
}

/// What a node says it is, from its `ROLE` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A primary, with this many replicas connected.
    Primary { replicas: usize },
    /// A replica, or a sentinel: anything a write must not go to.
    Replica,
}

impl Role {
    pub fn of(reply: &[redis::Value]) -> Self {
        let primary = match reply.first() {
            Some(redis::Value::BulkString(b)) => b == b"master",
            Some(redis::Value::SimpleString(s)) => s == "master",
            _ => false,
        };
        match (primary, reply.get(2)) {
            (true, Some(redis::Value::Array(replicas))) => Role::Primary {
                replicas: replicas.len(),
            },
            (true, _) => Role::Primary { replicas: 0 },
            _ => Role::Replica,
        }
    }
}
