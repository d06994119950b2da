//! A queue shard as production runs it: a primary, its replicas, and a Redis Sentinel that
//! promotes a replica when the primary is gone.

use std::time::{Duration, Instant};

use anyhow::Context;
use servers::{on_free_port, Redis, Sentinel};
use tempfile::TempDir;

/// The name the sentinel knows the shard by.
pub const SHARD: &str = "shard-0";

pub struct ReplicatedShard {
    /// The first primary, then the replicas; Sentinel may have swapped their roles since.
    pub servers: Vec<Redis>,
    pub sentinel: Sentinel,
    _dir: TempDir,
}

impl ReplicatedShard {
    /// A primary with `replicas` replicas in sync, watched by one sentinel that fails it over
    /// half a second after it stops answering.
    pub async fn start(replicas: usize) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("tally-shard-").tempdir()?;
        let root = dir.path().to_path_buf();
        let (servers, sentinel) = tokio::task::spawn_blocking(move || {
            let start = |name: &str, replica_of: Option<u16>| {
                on_free_port(|port| {
                    let mut server = Redis::new(root.join(name), port);
                    server.replica_of = replica_of;
                    server.start().map(|()| server)
                })
                .with_context(|| format!("starting redis {name}"))
            };
            let primary = start("primary", None)?;
            let mut servers = vec![primary];
            for k in 0..replicas {
                let port = servers[0].port;
                servers.push(start(&format!("replica-{k}"), Some(port))?);
            }
            let sentinel = on_free_port(|port| {
                let sentinel = Sentinel {
                    dir: root.join("sentinel"),
                    port,
                    shards: vec![(SHARD.to_string(), servers[0].port)],
                    quorum: 1,
                    down_after: Duration::from_millis(500),
                };
                sentinel.start().map(|()| sentinel)
            })
            .context("starting the sentinel")?;
            anyhow::Ok((servers, sentinel))
        })
        .await??;
        let shard = Self {
            servers,
            sentinel,
            _dir: dir,
        };
        shard.wait_in_sync(Duration::from_secs(30)).await?;
        Ok(shard)
    }

    /// The URL the roles reach the shard by: through the sentinel.
    pub fn url(&self) -> String {
        format!("sentinel://127.0.0.1:{}/{SHARD}", self.sentinel.port)
    }

    /// The server the sentinel names the primary.
    pub fn primary(&self) -> anyhow::Result<&Redis> {
        let port = self
            .sentinel
            .primary_port(SHARD)
            .context("the sentinel names no primary")?;
        self.server(port)
    }

    pub fn server(&self, port: u16) -> anyhow::Result<&Redis> {
        self.servers
            .iter()
            .find(|s| s.port == port)
            .with_context(|| format!("no server of the shard on port {port}"))
    }

    /// Until the primary has every replica that runs connected and caught up with it.
    pub async fn wait_in_sync(&self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let running = self.servers.iter().filter(|s| s.is_running()).count();
            if let Ok(primary) = self.primary() {
                if servers::replicas_in_sync(primary.port, 0) + 1 >= running {
                    return Ok(());
                }
            }
            anyhow::ensure!(
                started.elapsed() < limit,
                "the shard's replicas did not catch up within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Until the sentinel names a primary other than the server on `old`; returns it.
    pub async fn wait_promoted(&self, old: u16, limit: Duration) -> anyhow::Result<&Redis> {
        let started = Instant::now();
        loop {
            if let Some(port) = self.sentinel.primary_port(SHARD).filter(|&p| p != old) {
                return self.server(port);
            }
            anyhow::ensure!(
                started.elapsed() < limit,
                "the sentinel promoted no replica within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ReplicatedShard {
    fn drop(&mut self) {
        self.sentinel.stop();
        for server in &self.servers {
            server.kill();
        }
    }
}
