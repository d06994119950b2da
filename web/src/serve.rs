//! The accept loop: a cap on connections, a header timeout against slow clients, and a graceful
//! drain that answers every request in flight before returning.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::body::{Body as _, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::Body;

/// Environment variables for the settings every role's server shares.
pub const ENV_LISTEN: &str = "TALLY_LISTEN";
pub const ENV_REGION: &str = "TALLY_REGION";
pub const ENV_MAX_CONNECTIONS: &str = "TALLY_MAX_CONNECTIONS";
pub const ENV_KEEP_ALIVE_TIMEOUT_MS: &str = "TALLY_KEEP_ALIVE_TIMEOUT_MS";

/// The accept loop's list of open connections is swept of closed ones whenever its length doubles
/// past the last sweep, starting here: amortised, and bounded by twice the open connections.
const PRUNE_FIRST_AT: usize = 1024;

/// The longest request head (request line and headers) a connection reads: a longer one is
/// answered 431 and its connection closed. It is also as far as a connection's read buffer
/// grows, so `max_connections` clients sending heads that never end pin at most that many times
/// this: 625 MiB at the defaults, where hyper's own bound (~408 KiB) let them pin 3.9 GiB. A JWT
/// or a browser's cookies fit in it many times over.
pub const DEFAULT_MAX_HEAD_BYTES: usize = 64 * 1024;
/// hyper asserts its read buffer may grow to at least this.
const MIN_MAX_HEAD_BYTES: usize = 8 * 1024;

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
    /// A client must send a request's headers within this of connecting or of its last answer
    /// (idle keep-alive connections are closed after it too).
    pub header_read_timeout: Duration,
    /// On shutdown, requests in flight get this long to finish.
    pub drain_timeout: Duration,
    /// See [`DEFAULT_MAX_HEAD_BYTES`]; below 8 KiB counts as 8 KiB.
    pub max_head_bytes: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            enlisted: Enlisted::default(),
            header_read_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            max_head_bytes: DEFAULT_MAX_HEAD_BYTES,
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
    sweeps: Sweeps,
    /// A request is in the service, or its streamed answer is still being written.
    busy: AtomicBool,
    /// The sweep count when the connection was accepted or last finished answering: from then
    /// the client has `header_read_timeout` to send its next request's headers.
    idle_since: AtomicU64,
    /// What the accept loop has told the connection: [`RUNNING`], or a [`Stop`] as a `u8`.
    stop: AtomicU8,
    /// The connection's task, to wake when told to stop. Set on the task's first poll: the
    /// future a task was spawned with is polled with that task's waker every time.
    task: OnceLock<Waker>,
}

impl Connection {
    fn new(peer: SocketAddr, roll: Enlisted, sweeps: Sweeps) -> Self {
        Self(Arc::new(ConnectionState {
            peer,
            enlisted: AtomicBool::new(false),
            roll,
            idle_since: AtomicU64::new(sweeps.count()),
            sweeps,
            busy: AtomicBool::new(false),
            stop: AtomicU8::new(RUNNING),
            task: OnceLock::new(),
        }))
    }

    fn start_request(&self) {
        self.0.busy.store(true, Ordering::Relaxed);
    }

    fn finish_request(&self) {
        let state = &self.0;
        state
            .idle_since
            .store(state.sweeps.count(), Ordering::Relaxed);
        state.busy.store(false, Ordering::Relaxed);
    }

    /// Whether, at sweep number `sweep`, the connection has waited for a request's headers
    /// through `SWEEPS_PER_TIMEOUT` whole intervals between sweeps (a header timeout at least).
    fn overdue(&self, sweep: u64) -> bool {
        let state = &self.0;
        !state.busy.load(Ordering::Relaxed)
            && sweep.saturating_sub(state.idle_since.load(Ordering::Relaxed))
                > u64::from(SWEEPS_PER_TIMEOUT)
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

/// Marks the connection idle once its answer is handed over: at once for a body of known length
/// (a client too slow to take it is then cut as a slow client), and only when hyper drops it for
/// a streamed one, however long it streams.
fn answered(resp: Response<Body>, connection: &Connection) -> Response<Body> {
    if resp.body().size_hint().exact().is_some() {
        connection.finish_request();
        return resp;
    }
    let connection = connection.clone();
    resp.map(|body| Body::stream(Streamed { body, connection }))
}

/// What a connection's requests are handed to, shared by its requests alone: cloning the
/// service's own `Arc` per request would write one count from every core, a cache line
/// bouncing between them on each vote.
struct Handler<S> {
    service: Arc<S>,
    connection: Connection,
}

/// A streamed answer that keeps its connection busy until hyper is done with it.
struct Streamed {
    body: Body,
    connection: Connection,
}

impl Drop for Streamed {
    fn drop(&mut self) {
        self.connection.finish_request();
    }
}

impl hyper::body::Body for Streamed {
    type Data = bytes::Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// What the accept loop tells a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Stop {
    /// Shutting down: answer the request in flight, then close.
    Drain = 1,
    /// No request's headers came within the header timeout: close now.
    Close = 2,
}

/// A connection's stop word before the accept loop has said one.
const RUNNING: u8 = 0;

/// The stop signal lives in the connection's state, a flag and the task's waker, where a channel
/// a connection cost one more allocation and, since its task looks at it every time it runs (at
/// least twice a vote), a poll of a channel each time: 0.06-0.09 µs a vote in ingest's profile,
/// where this costs a load from a line the request already touched.
impl ConnectionState {
    fn tell(&self, stop: Stop) {
        // A `Close` after a `Drain` would cut a request that shutdown promised to answer.
        let _ =
            self.stop
                .compare_exchange(RUNNING, stop as u8, Ordering::Relaxed, Ordering::Relaxed);
        // Paired with the fence in `told`: either the task sees the word or this sees its waker.
        fence(Ordering::SeqCst);
        if let Some(task) = self.task.get() {
            task.wake_by_ref();
        }
    }

    /// What the connection has been told, or pending (and woken when told).
    fn told(&self, cx: &mut Context<'_>) -> Poll<Stop> {
        if self.task.get().is_none() {
            let _ = self.task.set(cx.waker().clone());
            fence(Ordering::SeqCst);
        }
        match self.stop.load(Ordering::Relaxed) {
            RUNNING => Poll::Pending,
            word if word == Stop::Close as u8 => Poll::Ready(Stop::Close),
            _ => Poll::Ready(Stop::Drain),
        }
    }
}

/// An open connection as the accept loop knows it: weak, so a closed connection leaves the
/// service's enlisted count at once, not at the next sweep.
struct Open(Weak<ConnectionState>);

/// The accept loop's open connections. However the loop ends (shutdown, or its future dropped),
/// each is told to drain.
#[derive(Default)]
struct OpenConnections(Vec<Open>);

impl Drop for OpenConnections {
    fn drop(&mut self) {
        for open in &self.0 {
            if let Some(state) = open.0.upgrade() {
                state.tell(Stop::Drain);
            }
        }
    }
}

/// The header timeout is checked by one sweep of the open connections this many times per
/// timeout, instead of hyper's timer armed and cancelled for every request (a clock read, an
/// allocation, and the timer wheel's insert and remove under its lock: with the sweep, ingest's
/// server threads spent 0.6-1.1 us a vote less, a seventh to a fifth of their cost above bare
/// hyper's, in two sets of six alternating runs). A connection notes the sweeps' count, not the
/// time, when it goes idle (a shared load, no clock read, per request), and is closed at the
/// sweep after `SWEEPS_PER_TIMEOUT` whole intervals: between one and 1 + 1/`SWEEPS_PER_TIMEOUT`
/// timeouts after its last answer (later if sweeps are delayed, never sooner).
const SWEEPS_PER_TIMEOUT: u32 = 4;

/// How many header-timeout sweeps one server has made. Written once a sweep and read by every
/// request, so its cache line stays shared between the cores: alone on its line, as a small
/// allocation beside memory written per request would miss the cache on every read.
#[derive(Debug, Clone, Default)]
struct Sweeps(Arc<SweepCount>);

#[derive(Debug, Default)]
#[repr(align(128))]
struct SweepCount(AtomicU64);

impl Sweeps {
    fn count(&self) -> u64 {
        self.0 .0.load(Ordering::Relaxed)
    }

    fn advance(&self) -> u64 {
        self.0 .0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Tells each connection whose headers are overdue at sweep number `sweep` to close, and
/// forgets those closed.
fn close_overdue(open: &mut Vec<Open>, sweep: u64) {
    let mut i = 0;
    while i < open.len() {
        if let Some(state) = open[i].0.upgrade() {
            let connection = Connection(state);
            if !connection.overdue(sweep) {
                i += 1;
                continue;
            }
            connection.0.tell(Stop::Close);
        }
        open.swap_remove(i);
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
    // One stop signal per connection rather than one shared watch: a connection looks at it each
    // time its task runs, at least twice a request, and a shared watch takes its waiters' lock,
    // contended across the workers.
    let mut open = OpenConnections::default();
    let mut prune_at = PRUNE_FIRST_AT;
    let sweeps = Sweeps::default();
    let mut sweep = tokio::time::interval(
        (config.header_read_timeout / SWEEPS_PER_TIMEOUT).max(Duration::from_millis(1)),
    );
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            _ = sweep.tick() => {
                close_overdue(&mut open.0, sweeps.advance());
                continue;
            }
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
        if open.0.len() >= prune_at {
            open.0.retain(|o| o.0.strong_count() > 0);
            prune_at = (open.0.len() * 2).max(PRUNE_FIRST_AT);
        }
        let _ = stream.set_nodelay(true);
        let connection = Connection::new(peer, config.enlisted.clone(), sweeps.clone());
        open.0.push(Open(Arc::downgrade(&connection.0)));
        let state = connection.0.clone();
        let handler = Arc::new(Handler {
            service: service.clone(),
            connection,
        });
        let conn = http1::Builder::new()
            .header_read_timeout(None)
            .max_buf_size(config.max_head_bytes.max(MIN_MAX_HEAD_BYTES))
            .half_close(S::ANSWERS_AFTER_HALF_CLOSE)
            .serve_connection(
                TokioIo::new(stream),
                service_fn(move |req| {
                    let handler = handler.clone();
                    async move {
                        handler.connection.start_request();
                        let resp = handler.service.call(req, &handler.connection).await;
                        Ok::<_, Infallible>(answered(resp, &handler.connection))
                    }
                }),
            );
        tokio::spawn(async move {
            // The connection, and with it its `Connection`, goes before its slot: a drained
            // server has no connection left enlisted.
            {
                let mut conn = std::pin::pin!(conn);
                let told = std::future::poll_fn(|cx| match conn.as_mut().poll(cx) {
                    Poll::Ready(_) => Poll::Ready(None),
                    Poll::Pending => state.told(cx).map(Some),
                })
                .await;
                match told {
                    // Dropping the connection closes it, as hyper's header timeout did.
                    None | Some(Stop::Close) => {}
                    // A shutdown, or the accept loop gone: finish what is in flight, close
                    // when idle.
                    Some(Stop::Drain) => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            }
            drop(state);
            drop(slot);
        });
    }
    drop(listener);
    drop(open);
    // Every connection task holds a slot until it ends: all slots back means all answered.
    let drained = slots.acquire_many(config.max_connections as u32);
    if tokio::time::timeout(config.drain_timeout, drained)
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain timeout");
    }
}
