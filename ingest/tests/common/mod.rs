//! What every ingest test starts: ingest in-process on port 0, against real Redis shards and a
//! real PostgreSQL catalog, and ways to look at what it stored.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use harness::http::Client;
use harness::{PgCluster, RedisServer};
use ingest::identity::TrustedProxies;
use ingest::Config;
use model::RegionName;
use redis::AsyncCommands;
use tokio::sync::oneshot;

pub struct Stack {
    pub pg: PgCluster,
    pub shards: Vec<RedisServer>,
    pub client: Client,
    pub base: String,
    pub stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<Result<(), ingest::IngestError>>,
}

/// Ingest's settings for a test: the catalog refreshed often, no per-voter limit, and the test
/// standing where a gateway would (its `X-Voter-Id` says who votes).
pub fn config(pg: &PgCluster, redis_urls: Vec<String>) -> Config {
    let mut config = Config::new(
        RegionName::new("us-east-1").unwrap(),
        redis_urls,
        pg.primary.url(db::INGEST_ROLE, db::DATABASE),
    );
    config.catalog_refresh = Duration::from_millis(100);
    config.voter_limit = None;
    config.trusted_proxies = TrustedProxies::parse("127.0.0.1/32").unwrap();
    config
}

/// Ingest in-process on port 0, once it answers ready.
pub struct Serving {
    pub client: Client,
    pub base: String,
    pub stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<Result<(), ingest::IngestError>>,
}

pub async fn serve(config: Config) -> anyhow::Result<Serving> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(ingest::run(listener, config, async move {
        let _ = stopped.await;
    }));
    let base = format!("http://{addr}");
    let serving = Serving {
        client: Client::new(base.clone()),
        base,
        stop: Some(stop),
        task,
    };
    serving.client.wait_ready(Duration::from_secs(10)).await?;
    Ok(serving)
}

impl Serving {
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop.take().unwrap().send(()).ok();
        self.task.await??;
        Ok(())
    }
}

impl Stack {
    pub async fn start(shards: usize, tweak: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        let pg = PgCluster::start().await?;
        let shards = harness::redis_shards(shards).await?;
        let mut config = config(&pg, shards.iter().map(|s| s.url()).collect());
        tweak(&mut config);
        let Serving {
            client,
            base,
            stop,
            task,
        } = serve(config).await?;
        Ok(Stack {
            pg,
            shards,
            client,
            base,
            stop,
            task,
        })
    }

    /// Every vote in every shard's queue, decoded, with its shard. Checks on the way that each
    /// shard's count of stored votes says as many as its list holds.
    pub async fn queued(&self) -> anyhow::Result<Vec<(usize, model::Vote)>> {
        let mut out = Vec::new();
        for (i, s) in self.shards.iter().enumerate() {
            let mut con = s.connection().await?;
            let elements: Vec<Vec<u8>> = con.lrange(model::queue::VOTES, 0, -1).await?;
            let before = out.len();
            for element in &elements {
                for bytes in model::wire::split(element) {
                    out.push((i, model::wire::decode(bytes?)?));
                }
            }
            let stored: Option<u64> = con.get(model::queue::STORED).await?;
            anyhow::ensure!(
                stored.unwrap_or(0) == (out.len() - before) as u64,
                "shard {i} counts {stored:?} stored votes but holds {}",
                out.len() - before
            );
        }
        Ok(out)
    }

    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop.take().unwrap().send(()).ok();
        self.task.await??;
        Ok(())
    }
}

pub async fn vote(
    client: &Client,
    poll: &str,
    option: &str,
    voter: &str,
) -> anyhow::Result<harness::http::Reply> {
    client
        .post_json(
            &format!("/v1/polls/{poll}/votes"),
            &[("x-voter-id", voter)],
            &format!(r#"{{"option":"{option}"}}"#),
        )
        .await
}
