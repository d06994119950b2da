//! The accept loop: a cap on connections, a header timeout against slow clients, and a graceful
//! drain that answers every request in flight before returning.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};

use crate::Body;

/// The connections' stop signals are swept of closed connections whenever their count doubles
/// past the last sweep, starting here: amortised, and bounded by twice the open connections.
const PRUNE_FIRST_AT: usize = 1024;

/// A role's request handler.
pub trait Service: Send + Sync + 'static {
    /// Whether a request is still answered after its client shuts down its sending side
    /// (hyper's `half_close`). Off, hyper reads ahead on every connection whose handler is
    /// pending, to notice a client gone: one more `read` per request, and, because the
    /// request's headers and body still point into the read buffer, a fresh 8 KiB buffer too.
    /// A handler that always waits on something (ingest, for Redis) turns it on; one that
    /// streams its answer keeps it off, so a departed client is noticed before the next write.
    const ANSWERS_AFTER_HALF_CLOSE: bool = false;

    fn call(
        &self,
        req: Request<Incoming>,
        conn: &Connection,
    ) -> impl Future<Output = Response<Body>> + Send;
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Connections beyond this are closed on accept.
    pub max_connections: usize,
    /// Counts the open connections the service has enlisted (a clone of the config shares the
    /// count).
    pub enlisted: Enlisted,
    /// A client must send a request's headers within this.
    pub header_read_timeout: Duration,
    /// On shutdown, requests in flight get this long to finish.
    pub drain_timeout: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            enlisted: Enlisted::default(),
            header_read_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// How many open connections their service has enlisted (see [`Connection::enlist`]). Ingest
/// enlists a connection once it has voted: an HTTP/1 connection carries one request at a time,
/// so once every enlisted connection's vote is waiting, no voter that has been seen can send
/// another. Connections that never enlist (probes, scrapes, refused or slow clients) do not count.
#[derive(Debug, Clone, Default)]
pub struct Enlisted(Arc<AtomicUsize>);

impl Enlisted {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// The connection a request came on.
#[derive(Debug, Clone)]
pub struct Connection(Arc<ConnectionState>);

#[derive(Debug)]
struct ConnectionState {
    peer: SocketAddr,
    enlisted: AtomicBool,
    roll: Enlisted,
}

impl Connection {
    fn new(peer: SocketAddr, roll: Enlisted) -> Self {
        Self(Arc::new(ConnectionState {
            peer,
            enlisted: AtomicBool::new(false),
            roll,
        }))
    }

    pub fn peer(&self) -> SocketAddr {
        self.0.peer
    }

    /// Counts this connection in the server's [`Enlisted`] until it closes and its last request
    /// is answered. Calling it again changes nothing.
    pub fn enlist(&self) {
        let state = &self.0;
        // A plain load first: a connection enlists once and is asked on every request.
        if !state.enlisted.load(Ordering::Relaxed) && !state.enlisted.swap(true, Ordering::Relaxed)
        {
            state.roll.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for ConnectionState {
    fn drop(&mut self) {
        if *self.enlisted.get_mut() {
            self.roll.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Serves `service` on `listener` until `shutdown` completes, then stops accepting and waits
/// (up to `drain_timeout`) for open requests to be answered.
pub async fn serve<S: Service>(
    listener: TcpListener,
    service: Arc<S>,
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(config.max_connections));
    // One stop signal per connection rather than one shared watch: a connection is polled at
    // least twice a request, and polling a pending oneshot is an atomic load where a shared
    // watch takes its waiters' lock, contended across the workers.
    let mut stops: Vec<oneshot::Sender<()>> = Vec::new();
    let mut prune_at = PRUNE_FIRST_AT;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("tally_http_connections_refused_total").increment(1);
            continue;
        };
        if stops.len() >= prune_at {
            stops.retain(|s| !s.is_closed());
            prune_at = (stops.len() * 2).max(PRUNE_FIRST_AT);
        }
        let (stop, stopped) = oneshot::channel();
        stops.push(stop);
        let _ = stream.set_nodelay(true);
        let svc = service.clone();
        let connection = Connection::new(peer, config.enlisted.clone());
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            .half_close(S::ANSWERS_AFTER_HALF_CLOSE)
            .serve_connection(
                TokioIo::new(stream),
                service_fn(move |req| {
                    let svc = svc.clone();
                    let connection = connection.clone();
                    async move { Ok::<_, Infallible>(svc.call(req, &connection).await) }
                }),
            );
        tokio::spawn(async move {
            // The connection, and with it its `Connection`, goes before its slot: a drained
            // server has no connection left enlisted.
            {
                let mut conn = std::pin::pin!(conn);
                let mut stopped = stopped;
                tokio::select! {
                    biased;
                    _ = conn.as_mut() => {}
                    // A sent stop or a dropped sender (the serve loop is gone): finish what is
                    // in flight, close when idle.
                    _ = &mut stopped => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    for stop in stops {
        let _ = stop.send(());
    }
    // Every connection task holds a slot until it ends: all slots back means all answered.
    let drained = slots.acquire_many(config.max_connections as u32);
    if tokio::time::timeout(config.drain_timeout, drained)
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain timeout");
    }
}
