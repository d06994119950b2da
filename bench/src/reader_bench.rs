//! `tally bench reader`: results from a reader on a real streaming replica against a bare hyper
//! server answering a fixed JSON body, under the same load; then 1,000 event-stream subscribers
//! and how long a change takes to reach all of them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::load::{alternate, MakeRequest};
use crate::Comparison;

#[derive(Debug, Clone)]
pub struct Options {
    pub round: Duration,
    /// Rounds per side, alternating.
    pub pairs: usize,
    pub connections: usize,
    pub subscribers: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            round: Duration::from_secs(3),
            pairs: crate::load::DEFAULT_PAIRS,
            connections: 32,
            subscribers: 1_000,
        }
    }
}

pub fn run(opts: &Options) -> anyhow::Result<Comparison> {
    let server_rt = crate::server_runtime(2)?;
    let client_rt = crate::client_runtime(2)?;
    crate::until_interrupted(&client_rt, async {
        let pg = harness::PgCluster::start_with_replica().await?;
        let sources = vec![reader::Source {
            name: "replica".into(),
            url: pg.replica().url(db::READER_ROLE, db::DATABASE),
        }];
        let config = reader::Config::new(model::RegionName::new("eu-west-1")?, sources);
        let (reader_listener, reader_addr) = crate::loopback_listener()?;
        let (bare_listener, bare_addr) = crate::loopback_listener()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = server_rt.spawn(async move {
            reader::run(crate::tokio_listener(reader_listener), config, async {
                let _ = stopped.await;
            })
            .await
        });
        let client = harness::http::Client::new(format!("http://{reader_addr}"));
        client.wait_ready(Duration::from_secs(15)).await?;
        // The baseline answers with exactly the body the reader serves.
        let body = client.get("/v1/polls/default/results").await?.body;
        server_rt.spawn(async move {
            crate::bare::fixed_json(crate::tokio_listener(bare_listener), body).await
        });

        let make: MakeRequest = Arc::new(|_| {
            Request::get("/v1/polls/default/results")
                .body(Full::new(Bytes::new()))
                .expect("static request")
        });
        let rounds = alternate(
            bare_addr,
            reader_addr,
            opts.connections,
            opts.round,
            opts.pairs,
            make,
            &crate::cpu::CpuMeter::default(),
        )
        .await;

        let fanout = fanout(&pg, reader_addr, opts.subscribers).await?;
        let _ = stop.send(());
        server.await??;
        let summary = rounds.last.summary();
        Ok(Comparison::alternated(
            "reader",
            "bare-hyper",
            &rounds,
            serde_json::json!({
                "connections": opts.connections,
                "p99_ms": summary.p99_ms,
                "statuses": summary.statuses,
                "subscribers": opts.subscribers,
                "fanout_all_received_after_replica_ms": fanout.0,
                "fanout_all_received_after_commit_ms": fanout.1,
            }),
        ))
    })
}

/// Opens `n` event streams, changes a tally on the primary, and returns how long until every
/// subscriber had the change: (from when the replica had replayed it, from the commit), in ms.
async fn fanout(
    pg: &harness::PgCluster,
    addr: std::net::SocketAddr,
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(n);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<Instant>(n);
    for _ in 0..n {
        let (ready_tx, done_tx) = (ready_tx.clone(), done_tx.clone());
        tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(b"GET /v1/polls/default/results/stream HTTP/1.1\r\nHost: bench\r\n\r\n")
                .await?;
            let mut seen = String::new();
            let mut buf = vec![0u8; 4096];
            let mut events = 0;
            loop {
                let k = s.read(&mut buf).await?;
                anyhow::ensure!(k > 0, "stream closed");
                seen.push_str(&String::from_utf8_lossy(&buf[..k]));
                while let Some(i) = seen.find("event: results") {
                    seen.drain(..i + 14);
                    events += 1;
                    if events == 1 {
                        let _ = ready_tx.send(()).await;
                    } else {
                        let _ = done_tx.send(Instant::now()).await;
                        return anyhow::Ok(());
                    }
                }
            }
        });
    }
    drop((ready_tx, done_tx));
    for _ in 0..n {
        tokio::time::timeout(Duration::from_secs(30), ready_rx.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("a subscriber failed"))?;
    }
    let primary = pg.client().await?;
    let replica = db::connect(&pg.replica_url()).await?;
    primary
        .batch_execute(
            "UPDATE tally_parts SET count = count + 1 WHERE poll_id = 'default' AND option = 'a'",
        )
        .await?;
    let committed = Instant::now();
    let lsn = db::current_lsn(&primary).await?;
    while !db::has_replayed(&replica, &lsn).await? {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let replayed = Instant::now();
    let mut last = replayed;
    for _ in 0..n {
        let t = tokio::time::timeout(Duration::from_secs(30), done_rx.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("a subscriber failed"))?;
        last = last.max(t);
    }
    Ok((
        last.saturating_duration_since(replayed).as_secs_f64() * 1000.0,
        last.saturating_duration_since(committed).as_secs_f64() * 1000.0,
    ))
}
