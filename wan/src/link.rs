//! The links themselves: an accept loop per link, and per connection two directions that each
//! hold chunks for the delay.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{Config, Link, WanError, CHUNKS_HELD, CHUNK_BYTES};

/// Every link of one process, and the settings they share. Cloning shares them.
#[derive(Clone)]
pub struct Links(Arc<Shared>);

struct Shared {
    links: Vec<LinkState>,
    delay_micros: AtomicU64,
    cut: Mutex<BTreeSet<String>>,
    /// Bumped on every cut, so each open connection looks again at whether its link still stands.
    cuts: watch::Sender<u64>,
    accept_loops: Mutex<Vec<JoinHandle<()>>>,
}

struct LinkState {
    link: Link,
    open: AtomicUsize,
}

#[derive(Debug, serde::Serialize)]
pub struct LinkStatus {
    #[serde(flatten)]
    pub link: Link,
    pub open_connections: usize,
    pub cut: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct Status {
    pub delay_ms: f64,
    pub cut_regions: Vec<String>,
    pub links: Vec<LinkStatus>,
}

impl Links {
    /// Binds every link's port, then starts accepting on all of them.
    pub async fn open(config: &Config) -> Result<Self, WanError> {
        let mut listeners = Vec::new();
        for link in &config.links {
            let listener = TcpListener::bind(link.listen)
                .await
                .map_err(|e| WanError::Bind {
                    addr: link.listen,
                    reason: e.to_string(),
                })?;
            listeners.push(listener);
        }
        let links = Links(Arc::new(Shared {
            links: config
                .links
                .iter()
                .map(|l| LinkState {
                    link: l.clone(),
                    open: AtomicUsize::new(0),
                })
                .collect(),
            delay_micros: AtomicU64::new(0),
            cut: Mutex::new(BTreeSet::new()),
            cuts: watch::channel(0).0,
            accept_loops: Mutex::new(Vec::new()),
        }));
        links.set_delay(config.delay);
        let loops = listeners
            .into_iter()
            .enumerate()
            .map(|(i, listener)| tokio::spawn(links.clone().accept(i, listener)))
            .collect();
        *links.0.accept_loops.lock().expect("accept loops") = loops;
        Ok(links)
    }

    /// Applies to chunks read from now on; chunks already held keep their release time, and
    /// order within a direction never changes.
    pub fn set_delay(&self, delay: Duration) {
        self.0
            .delay_micros
            .store(delay.as_micros() as u64, Ordering::Relaxed);
        metrics::gauge!("tally_wan_delay_seconds").set(delay.as_secs_f64());
    }

    pub fn delay(&self) -> Duration {
        Duration::from_micros(self.0.delay_micros.load(Ordering::Relaxed))
    }

    /// Drops every connection on the links to and from `region`, and refuses new ones, until
    /// [`Links::heal`]. Returns whether anything changed.
    pub fn cut(&self, region: &str) -> bool {
        let changed = self
            .0
            .cut
            .lock()
            .expect("cut set")
            .insert(region.to_string());
        if changed {
            self.0.cuts.send_modify(|n| *n += 1);
            tracing::warn!(region, "region cut off");
        }
        changed
    }

    pub fn heal(&self, region: &str) -> bool {
        let changed = self.0.cut.lock().expect("cut set").remove(region);
        if changed {
            tracing::info!(region, "region reconnected");
        }
        changed
    }

    pub fn knows(&self, region: &str) -> bool {
        self.0.links.iter().any(|l| l.link.touches(region))
    }

    fn is_cut(&self, link: &Link) -> bool {
        let cut = self.0.cut.lock().expect("cut set");
        cut.contains(&link.from) || cut.contains(&link.to)
    }

    pub fn status(&self) -> Status {
        // Collected before the links: `is_cut` takes the same lock.
        let cut_regions = self
            .0
            .cut
            .lock()
            .expect("cut set")
            .iter()
            .cloned()
            .collect();
        Status {
            delay_ms: self.delay().as_secs_f64() * 1000.0,
            cut_regions,
            links: self
                .0
                .links
                .iter()
                .map(|l| LinkStatus {
                    link: l.link.clone(),
                    open_connections: l.open.load(Ordering::Relaxed),
                    cut: self.is_cut(&l.link),
                })
                .collect(),
        }
    }

    /// Stops accepting; open connections end with the runtime.
    pub fn close(&self) {
        for h in self.0.accept_loops.lock().expect("accept loops").drain(..) {
            h.abort();
        }
    }

    async fn accept(self, index: usize, listener: TcpListener) {
        let link = &self.0.links[index].link;
        loop {
            let client = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, %link, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            if self.is_cut(link) {
                metrics::counter!("tally_wan_refused_total", "from" => link.from.clone(), "to" => link.to.clone()).increment(1);
                continue;
            }
            tokio::spawn(self.clone().carry(index, client));
        }
    }

    /// One connection, both ways, until both sides have closed, either fails, or the link is cut.
    async fn carry(self, index: usize, client: TcpStream) {
        let state = &self.0.links[index];
        let link = &state.link;
        let mut cuts = self.0.cuts.subscribe();
        // The upstream connects at once; the client's first bytes then wait out the delay like
        // every other chunk (the TCP handshake's own round trip is not simulated).
        let upstream = match TcpStream::connect(link.upstream).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, %link, "upstream refused");
                return;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        metrics::counter!("tally_wan_connections_total", "from" => link.from.clone(), "to" => link.to.clone()).increment(1);
        state.open.fetch_add(1, Ordering::Relaxed);
        let (client_read, client_write) = client.into_split();
        let (upstream_read, upstream_write) = upstream.into_split();
        let both = async {
            tokio::try_join!(
                self.direction(client_read, upstream_write, link, "out"),
                self.direction(upstream_read, client_write, link, "back"),
            )
        };
        let cut = async {
            loop {
                if cuts.changed().await.is_err() || self.is_cut(link) {
                    return;
                }
            }
        };
        tokio::select! {
            _ = both => {}
            _ = cut => {}
        }
        state.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Reads chunks from `from` and writes each to `to` once it has been held for the delay.
    async fn direction(
        &self,
        mut from: OwnedReadHalf,
        mut to: OwnedWriteHalf,
        link: &Link,
        way: &'static str,
    ) -> std::io::Result<()> {
        let bytes = metrics::counter!("tally_wan_bytes_total", "from" => link.from.clone(), "to" => link.to.clone(), "direction" => way);
        let (held_tx, mut held) = mpsc::channel::<(Instant, Option<Bytes>)>(CHUNKS_HELD);
        let read = async move {
            let mut buf = BytesMut::with_capacity(CHUNK_BYTES);
            loop {
                buf.reserve(CHUNK_BYTES);
                let n = from.read_buf(&mut buf).await?;
                let due = Instant::now() + self.delay();
                let chunk = (n > 0).then(|| buf.split().freeze());
                let end = chunk.is_none();
                if held_tx.send((due, chunk)).await.is_err() || end {
                    return Ok::<_, std::io::Error>(());
                }
            }
        };
        let write = async move {
            while let Some((due, chunk)) = held.recv().await {
                tokio::time::sleep_until(due).await;
                match chunk {
                    Some(chunk) => {
                        to.write_all(&chunk).await?;
                        bytes.increment(chunk.len() as u64);
                    }
                    // The sender closed its side: pass the close on, as late as its data.
                    None => return to.shutdown().await,
                }
            }
            Ok(())
        };
        tokio::try_join!(read, write).map(|_| ())
    }
}
