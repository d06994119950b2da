//! Real servers for integration tests: a PostgreSQL primary (optionally with a streaming
//! replica) and Redis servers, on free ports in temporary directories. Dropping a fixture stops
//! its servers and removes its files, also when the test panics. Never the machine's own servers.
#![forbid(unsafe_code)]

pub mod http;
pub mod idp;
mod sentinel;
pub mod votes;

pub use sentinel::ReplicatedShard;

use std::time::Duration;

use anyhow::Context;
use servers::{on_free_port, PgBin, Postgres, Redis, StopMode, TestCa};
use tempfile::TempDir;

/// Sends the code under test's logs to the test's output (shown for failing tests). `RUST_LOG`
/// filters; the default shows warnings.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A PostgreSQL primary with the Tally schema, and optionally one streaming replica of it.
pub struct PgCluster {
    pub primary: Postgres,
    pub replica: Option<Postgres>,
    dir: TempDir,
}

impl PgCluster {
    /// A migrated primary.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_inner(false, None).await
    }

    /// A migrated primary and a streaming replica that has replayed the schema.
    pub async fn start_with_replica() -> anyhow::Result<Self> {
        Self::start_inner(true, None).await
    }

    /// A migrated primary that takes only TLS connections, with `ca`'s server certificate. The
    /// process must trust `ca` ([`tls::trust`]) for the fixture's own connections.
    pub async fn start_tls(ca: TestCa) -> anyhow::Result<Self> {
        Self::start_inner(false, Some(ca)).await
    }

    async fn start_inner(with_replica: bool, tls: Option<TestCa>) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("tally-pg-").tempdir()?;
        let bin = PgBin::find()?;
        let mut primary = Postgres::new(bin.clone(), dir.path().join("primary"), 0);
        primary.tls = tls;
        // The cluster holds each server before it starts, so a start that fails half-way is
        // still stopped on drop (stopping goes by data directory, not by port).
        let cluster = PgCluster {
            primary,
            replica: None,
            dir,
        };
        let mut cluster = start_blocking(cluster, |cluster| {
            cluster.primary.init_primary()?;
            cluster.primary.port = start_postgres(cluster.primary.clone())?;
            Ok(())
        })
        .await?;
        db::ensure_database(&cluster.primary.admin_url(), db::DATABASE).await?;
        let mut client = db::connect(&cluster.url()).await?;
        db::migrate(&mut client).await?;
        if with_replica {
            cluster.replica = Some(Postgres::new(bin, cluster.dir.path().join("replica"), 0));
            cluster = start_blocking(cluster, |cluster| {
                let PgCluster {
                    primary, replica, ..
                } = cluster;
                let replica = replica.as_mut().expect("set above");
                replica.init_replica(primary, primary.port, "test_replica")?;
                replica.port = start_postgres(replica.clone())?;
                Ok(())
            })
            .await?;
        }
        Ok(cluster)
    }

    /// Superuser URL of the primary's `tally` database.
    pub fn url(&self) -> String {
        self.primary.url(servers::SUPERUSER, db::DATABASE)
    }

    /// Superuser URL of the replica's `tally` database.
    pub fn replica_url(&self) -> String {
        self.replica().url(servers::SUPERUSER, db::DATABASE)
    }

    pub fn replica(&self) -> &Postgres {
        self.replica
            .as_ref()
            .expect("cluster started without a replica")
    }

    /// A connection to the primary as the superuser.
    pub async fn client(&self) -> anyhow::Result<db::Client> {
        Ok(db::connect(&self.url()).await?)
    }

    /// Waits until the replica has replayed everything the primary had written when called.
    pub async fn wait_replica_caught_up(&self, limit: Duration) -> anyhow::Result<()> {
        let primary = self.client().await?;
        let lsn = db::current_lsn(&primary).await?;
        let replica = db::connect(&self.replica_url()).await?;
        let start = std::time::Instant::now();
        loop {
            if db::has_replayed(&replica, &lsn).await? {
                return Ok(());
            }
            anyhow::ensure!(
                start.elapsed() < limit,
                "replica did not reach {lsn} within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(r) = &self.replica {
            let _ = r.stop(StopMode::Immediate);
        }
        let _ = self.primary.stop(StopMode::Immediate);
    }
}

/// A test CA in a temporary directory (removed on drop).
pub fn test_ca() -> anyhow::Result<(TempDir, TestCa)> {
    let dir = tempfile::Builder::new().prefix("tally-ca-").tempdir()?;
    let ca = TestCa::create(dir.path())?;
    Ok((dir, ca))
}

/// Waits up to 30 s until no process works under `dir` (`servers::working_under`), then asserts
/// that `dir` holds nothing: what a stopped fixture, or an interrupted bench whose servers worked
/// there, must leave. Panics naming `what` and whatever it found.
pub fn assert_left_nothing_under(dir: &std::path::Path, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let running = servers::working_under(dir);
        if running.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: still running: {running:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<_> = std::fs::read_dir(dir)
        .expect("reading the directory")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{what}: left behind: {left:?}");
}

/// Runs a fixture's blocking `start` in tokio's blocking pool and hands the fixture back. The
/// fixture goes in before its servers start, so they are stopped on drop whether the start fails
/// half-way or the caller stops waiting (an interrupted bench, a timeout): tokio drops a finished
/// task's unclaimed output, where returning only a port left a server running in a removed
/// directory.
async fn start_blocking<F: Send + 'static>(
    mut fixture: F,
    start: impl FnOnce(&mut F) -> anyhow::Result<()> + Send + 'static,
) -> anyhow::Result<F> {
    tokio::task::spawn_blocking(move || {
        start(&mut fixture)?;
        Ok(fixture)
    })
    .await?
}

/// Starts an initialised PostgreSQL on a free port (see [`on_free_port`]); returns the port.
fn start_postgres(mut server: Postgres) -> anyhow::Result<u16> {
    on_free_port(|port| {
        server.port = port;
        server.start()
    })
    .with_context(|| format!("starting postgres in {}", server.data_dir.display()))?;
    Ok(server.port)
}

/// A Redis server with persistence on, in a temp dir.
pub struct RedisServer {
    pub server: Redis,
    _dir: TempDir,
}

impl RedisServer {
    /// Fsync `always`: the strictest setting, so fault tests prove the strongest guarantee.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(servers::Fsync::Always).await
    }

    pub async fn start_with(fsync: servers::Fsync) -> anyhow::Result<Self> {
        Self::start_inner(fsync, None, Vec::new(), None).await
    }

    /// Takes only TLS connections, with `ca`'s server certificate.
    pub async fn start_tls(ca: TestCa) -> anyhow::Result<Self> {
        Self::start_inner(servers::Fsync::Always, Some(ca), Vec::new(), None).await
    }

    /// With ACL users besides `default`.
    pub async fn start_with_users(users: Vec<servers::AclUser>) -> anyhow::Result<Self> {
        Self::start_inner(servers::Fsync::Always, None, users, None).await
    }

    /// A replica of this server, in sync once this returns.
    pub async fn start_replica(&self) -> anyhow::Result<Self> {
        let replica =
            Self::start_inner(self.server.fsync, None, Vec::new(), Some(self.server.port)).await?;
        let primary = self.server.port;
        let started = std::time::Instant::now();
        while servers::replicas_in_sync(primary, 0) == 0 {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "the replica of redis on {primary} did not catch up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(replica)
    }

    async fn start_inner(
        fsync: servers::Fsync,
        tls: Option<TestCa>,
        users: Vec<servers::AclUser>,
        replica_of: Option<u16>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("tally-redis-").tempdir()?;
        let fixture = Self {
            server: Redis {
                fsync,
                tls,
                users,
                replica_of,
                ..Redis::new(dir.path(), 0)
            },
            _dir: dir,
        };
        start_blocking(fixture, |fixture| {
            on_free_port(|port| {
                fixture.server.port = port;
                fixture.server.start()
            })
            .context("starting redis")
        })
        .await
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub async fn connection(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        redis_connection(&self.url()).await
    }

    /// How many times the server has run `command` (`INFO commandstats`).
    pub async fn calls(&self, command: &str) -> anyhow::Result<u64> {
        let mut con = self.connection().await?;
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut con)
            .await?;
        let key = format!("cmdstat_{}:calls=", command.to_ascii_lowercase());
        Ok(stats
            .lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .map(|rest| rest.split(',').next().unwrap_or_default().parse())
            .transpose()?
            .unwrap_or(0))
    }
}

/// How long tests and loads wait for one Redis reply. redis's own default is 500 ms, which a
/// busy 2-core CI machine exceeds now and then (an fsync, a starved core); a test must not fail
/// on that, only on a reply that never comes.
pub const PATIENT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection for tests and load tooling, waiting [`PATIENT_RESPONSE_TIMEOUT`] for a reply.
pub async fn redis_connection(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(PATIENT_RESPONSE_TIMEOUT));
    Ok(tls::redis_client(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

/// Votes a list element holds when the harness fills a queue: about what ingest's writes hold
/// under load.
pub const VOTES_PER_ELEMENT: usize = 50;

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.server.kill();
    }
}

impl RedisServer {
    /// Appends votes to this shard's queue as ingest's writes under load do: list elements of
    /// [`VOTES_PER_ELEMENT`] votes back to back, counted in `STORED` in the same transaction.
    pub async fn enqueue<'a>(
        &self,
        votes: impl IntoIterator<Item = &'a model::Vote>,
    ) -> anyhow::Result<()> {
        let mut con = self.connection().await?;
        let votes: Vec<&model::Vote> = votes.into_iter().collect();
        for writes in votes.chunks(10_000) {
            let elements: Vec<Vec<u8>> = writes
                .chunks(VOTES_PER_ELEMENT)
                .map(|element| {
                    element
                        .iter()
                        .flat_map(|v| model::wire::encode(v))
                        .collect()
                })
                .collect();
            let _: () = redis::pipe()
                .atomic()
                .cmd("RPUSH")
                .arg(model::queue::VOTES)
                .arg(elements)
                .ignore()
                .cmd("INCRBY")
                .arg(model::queue::STORED)
                .arg(writes.len())
                .ignore()
                .query_async(&mut con)
                .await?;
        }
        Ok(())
    }

    /// Votes waiting plus votes some aggregator holds in flight.
    pub async fn outstanding(&self) -> anyhow::Result<u64> {
        Ok(outstanding(&mut self.connection().await?).await?)
    }
}

/// Votes in a shard, waiting and in every worker's in-flight list, counted from the lists
/// themselves rather than trusted to the shard's count. Bytes that frame no vote count as one,
/// so a dead letter still to be written keeps the shard from looking drained. Read a page at a
/// time: exact once the shard is quiet, a close estimate while votes come and go.
pub async fn outstanding(con: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<u64> {
    let mut lists: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", model::queue::IN_FLIGHT_PREFIX))
        .query_async(con)
        .await?;
    lists.push(model::queue::VOTES.to_string());
    const PAGE: isize = 1_000;
    let mut n = 0u64;
    for list in lists {
        for start in (0..).step_by(PAGE as usize) {
            let elements: Vec<Vec<u8>> = redis::cmd("LRANGE")
                .arg(&list)
                .arg(start)
                .arg(start + PAGE - 1)
                .query_async(con)
                .await?;
            for element in &elements {
                let mut split = model::wire::split(element);
                n += split.by_ref().filter(Result::is_ok).count() as u64;
                n += u64::from(!split.rest().is_empty());
            }
            if elements.len() < PAGE as usize {
                break;
            }
        }
    }
    Ok(n)
}

/// Waits until no shard has a vote waiting or in flight.
pub async fn wait_drained(shards: &[RedisServer], limit: Duration) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    loop {
        let mut total = 0;
        for s in shards {
            total += s.outstanding().await?;
        }
        if total == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < limit,
            "{total} votes still outstanding after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` Redis servers, one per shard.
pub async fn redis_shards(n: usize) -> anyhow::Result<Vec<RedisServer>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(RedisServer::start().await?);
    }
    Ok(out)
}
