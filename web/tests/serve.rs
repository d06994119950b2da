//! The serve loop's graceful drain: on shutdown it stops accepting, closes idle keep-alive
//! connections, answers the request in flight, and only then returns.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};
use tokio::time::timeout;
use web::{Body, ServeConfig};

const PATIENCE: Duration = Duration::from_secs(10);

/// `/slow` is answered only once the test releases it; anything else at once. `/enlist` enlists
/// its connection.
#[derive(Default)]
struct Held {
    entered: Notify,
    release: Notify,
}

impl web::Service for Held {
    async fn call(&self, req: Request<Incoming>, conn: &web::Connection) -> Response<Body> {
        if req.uri().path() == "/enlist" {
            conn.enlist();
        }
        if req.uri().path() == "/slow" {
            self.entered.notify_one();
            self.release.notified().await;
            return web::text(StatusCode::OK, "text/plain", "slow done");
        }
        web::text(StatusCode::OK, "text/plain", "fast done")
    }
}

async fn send(stream: &mut TcpStream, path: &str) -> anyhow::Result<()> {
    let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    Ok(())
}

/// Reads until `want` has arrived, for a response on a connection that stays open.
async fn read_until(stream: &mut TcpStream, want: &str) -> anyhow::Result<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains(want) {
        let n = timeout(PATIENCE, stream.read(&mut buf)).await??;
        anyhow::ensure!(
            n > 0,
            "closed before {want:?}: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&seen).into_owned())
}

/// Two connections to a server of [`Held`]: one answered once and idle, one whose `/slow`
/// request the service holds.
async fn idle_and_busy(
    addr: std::net::SocketAddr,
    service: &Held,
) -> anyhow::Result<(TcpStream, TcpStream)> {
    let mut idle = TcpStream::connect(addr).await?;
    send(&mut idle, "/fast").await?;
    read_until(&mut idle, "fast done").await?;
    let mut busy = TcpStream::connect(addr).await?;
    send(&mut busy, "/slow").await?;
    timeout(PATIENCE, service.entered.notified()).await?;
    Ok((idle, busy))
}

async fn read_to_close(stream: &mut TcpStream) -> anyhow::Result<String> {
    let mut all = Vec::new();
    timeout(PATIENCE, stream.read_to_end(&mut all)).await??;
    Ok(String::from_utf8_lossy(&all).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_connections_and_answers_the_request_in_flight() -> anyhow::Result<()>
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let service = Arc::new(Held::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(web::serve(
        listener,
        service.clone(),
        ServeConfig::default(),
        async {
            let _ = stopped.await;
        },
    ));
    let (mut idle, mut busy) = idle_and_busy(addr, &service).await?;

    stop.send(()).expect("serve is running");

    // The idle keep-alive connection is closed, not left to the drain timeout.
    let after = read_to_close(&mut idle).await?;
    assert_eq!(after, "", "nothing more on the idle connection, then EOF");

    // New connections are refused while the one request is still being answered.
    let refused = timeout(PATIENCE, async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(refused.is_ok(), "still accepting after shutdown");
    assert!(!server.is_finished(), "returned with a request in flight");

    service.release.notify_one();
    let answer = read_to_close(&mut busy).await?;
    assert!(
        answer.starts_with("HTTP/1.1 200 OK"),
        "the request in flight is answered: {answer}"
    );
    assert!(answer.ends_with("slow done"), "{answer}");
    timeout(PATIENCE, server).await??;
    Ok(())
}

/// A server whose future is dropped (its task aborted) without a shutdown still drains: the idle
/// connection closes and the request in flight is answered, as the connections outlive the loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_server_drains_its_connections() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let service = Arc::new(Held::default());
    let server = tokio::spawn(web::serve(
        listener,
        service.clone(),
        ServeConfig::default(),
        std::future::pending(),
    ));
    let (mut idle, mut busy) = idle_and_busy(addr, &service).await?;

    server.abort();
    assert!(server.await.is_err_and(|e| e.is_cancelled()));
    assert_eq!(
        read_to_close(&mut idle).await?,
        "",
        "the idle connection closes"
    );
    service.release.notify_one();
    let answer = read_to_close(&mut busy).await?;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.ends_with("slow done"), "{answer}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enlisted_counts_the_connections_the_service_enlisted_until_they_close(
) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = ServeConfig::default();
    let enlisted = config.enlisted.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(web::serve(
        listener,
        Arc::new(Held::default()),
        config,
        async {
            let _ = stopped.await;
        },
    ));
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).await?;
        // Enlisting twice counts once.
        for _ in 0..2 {
            send(&mut s, "/enlist").await?;
            read_until(&mut s, "fast done").await?;
        }
        streams.push(s);
    }
    // Neither a connection whose requests do not enlist it nor one that never sends one counts.
    let mut bystander = TcpStream::connect(addr).await?;
    send(&mut bystander, "/fast").await?;
    read_until(&mut bystander, "fast done").await?;
    let _silent = TcpStream::connect(addr).await?;
    assert_eq!(enlisted.get(), 3);
    streams.truncate(1);
    // The server sees the two closes as it reads them.
    timeout(PATIENCE, async {
        while enlisted.get() != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await?;
    stop.send(()).expect("serve is running");
    timeout(PATIENCE, server).await??;
    assert_eq!(enlisted.get(), 0, "every connection closed on shutdown");
    Ok(())
}

/// The header and body timeouts of these tests: short, so a test waits them out in well under a
/// second, yet long against a loopback round trip.
const HEADERS_DUE: Duration = Duration::from_millis(400);
const BODY_DUE: Duration = Duration::from_millis(400);

/// `/echo` answers the body read with [`web::read_body`] (408 when it does not come in time);
/// `/stream` answers a body streamed from `chunks`; anything else as [`Held`] does.
#[derive(Default)]
struct Timed {
    held: Held,
    chunks: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<bytes::Bytes>>>,
}

struct Chunks(tokio::sync::mpsc::Receiver<bytes::Bytes>);

impl hyper::body::Body for Chunks {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(hyper::body::Frame::data(c))))
    }
}

impl web::Service for Timed {
    async fn call(&self, req: Request<Incoming>, conn: &web::Connection) -> Response<Body> {
        match req.uri().path() {
            "/echo" => match web::read_body(req.into_body(), 1024, BODY_DUE).await {
                Ok(body) => web::text(StatusCode::OK, "text/plain", body),
                Err(e) => web::text(StatusCode::REQUEST_TIMEOUT, "text/plain", e.to_string()),
            },
            "/stream" => {
                let rx = self.chunks.lock().unwrap().take().expect("one stream");
                let mut resp = Response::new(Body::stream(Chunks(rx)));
                *resp.status_mut() = StatusCode::OK;
                resp
            }
            _ => self.held.call(req, conn).await,
        }
    }
}

async fn serve_timed(
    service: Arc<Timed>,
) -> anyhow::Result<(std::net::SocketAddr, oneshot::Sender<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(web::serve(
        listener,
        service,
        ServeConfig {
            header_read_timeout: HEADERS_DUE,
            ..ServeConfig::default()
        },
        async {
            let _ = stopped.await;
        },
    ));
    Ok((addr, stop))
}

/// Sends a header line every `HEADERS_DUE / 4` and never ends the headers; returns how long the
/// server kept the connection open.
async fn trickle_headers(addr: std::net::SocketAddr) -> anyhow::Result<Duration> {
    // Before the connect: the server's count starts at its accept, which may come before the
    // client's connect returns.
    let opened = tokio::time::Instant::now();
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET /fast HTTP/1.1\r\nhost: test\r\n").await?;
    let mut buf = [0u8; 64];
    for line in 0u64.. {
        anyhow::ensure!(opened.elapsed() < PATIENCE, "still open after {PATIENCE:?}");
        tokio::select! {
            read = s.read(&mut buf) => {
                anyhow::ensure!(matches!(read, Ok(0) | Err(_)), "answered a request without its end of headers");
                break;
            }
            () = tokio::time::sleep(HEADERS_DUE / 4) => {
                if s.write_all(format!("x-slow-{line}: .\r\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        }
    }
    Ok(opened.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_not_sent_in_time_close_the_connection() -> anyhow::Result<()> {
    let (addr, _stop) = serve_timed(Arc::new(Timed::default())).await?;
    let open_for = trickle_headers(addr).await?;
    assert!(
        open_for >= HEADERS_DUE,
        "closed after {open_for:?}, before the timeout"
    );

    // An idle keep-alive connection gets the same time for its next request's headers, counted
    // from its last answer (which the server counts from before the client reads it, so this
    // measures from the request).
    let mut idle = TcpStream::connect(addr).await?;
    let asked = tokio::time::Instant::now();
    send(&mut idle, "/fast").await?;
    read_until(&mut idle, "fast done").await?;
    assert_eq!(
        read_to_close(&mut idle).await?,
        "",
        "nothing more, then EOF"
    );
    assert!(
        asked.elapsed() >= HEADERS_DUE,
        "idle closed after {:?}",
        asked.elapsed()
    );
    Ok(())
}

/// A load balancer reuses a connection only while it has been idle for less than its own idle
/// timeout; the deployment sets the roles' keep-alive timeout above it (75 s against the ALB's
/// 60), scaled down here. A connection idle for almost the balancer's timeout still takes its
/// next request: the balancer never sends on a connection the role has closed (its 502s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_takes_a_request_until_the_balancers_idle_timeout() -> anyhow::Result<()>
{
    let balancer_idle = HEADERS_DUE * 60 / 75;
    let (addr, _stop) = serve_timed(Arc::new(Timed::default())).await?;
    let mut reused = TcpStream::connect(addr).await?;
    send(&mut reused, "/fast").await?;
    read_until(&mut reused, "fast done").await?;
    for _ in 0..3 {
        tokio::time::sleep(balancer_idle * 9 / 10).await;
        send(&mut reused, "/fast").await?;
        let answer = read_until(&mut reused, "fast done").await?;
        assert!(answer.contains("HTTP/1.1 200 OK"), "{answer}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_or_a_stream_being_answered_outlasts_the_header_timeout() -> anyhow::Result<()> {
    let service = Arc::new(Timed::default());
    let (chunks, rx) = tokio::sync::mpsc::channel(1);
    *service.chunks.lock().unwrap() = Some(rx);
    let (addr, _stop) = serve_timed(service.clone()).await?;

    // Held in the service for three header timeouts: the answer still comes.
    let mut busy = TcpStream::connect(addr).await?;
    send(&mut busy, "/slow").await?;
    timeout(PATIENCE, service.held.entered.notified()).await?;
    tokio::time::sleep(HEADERS_DUE * 3).await;
    service.held.release.notify_one();
    let answer = read_until(&mut busy, "slow done").await?;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");

    // A streamed answer longer than the timeout is not cut either.
    let mut stream = TcpStream::connect(addr).await?;
    send(&mut stream, "/stream").await?;
    chunks
        .send(bytes::Bytes::from_static(b"first-chunk"))
        .await?;
    read_until(&mut stream, "first-chunk").await?;
    tokio::time::sleep(HEADERS_DUE * 3).await;
    chunks
        .send(bytes::Bytes::from_static(b"second-chunk"))
        .await?;
    read_until(&mut stream, "second-chunk").await?;
    drop(chunks);
    // Ended, the connection is idle and gets closed like any other.
    let after = read_to_close(&mut stream).await?;
    assert!(
        after.ends_with("0\r\n\r\n"),
        "the chunked end, then EOF: {after:?}"
    );
    Ok(())
}

/// Posts `parts` to `/echo` as one body of `content_length` bytes, `pause` between parts, and
/// reads the answer up to `until`; returns it and how long it took from the first part.
async fn post_echo(
    addr: std::net::SocketAddr,
    content_length: usize,
    parts: &[&str],
    pause: Duration,
    until: &str,
) -> anyhow::Result<(String, Duration)> {
    let mut s = TcpStream::connect(addr).await?;
    let head =
        format!("POST /echo HTTP/1.1\r\nhost: test\r\ncontent-length: {content_length}\r\n\r\n");
    let started = tokio::time::Instant::now();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        let bytes = if i == 0 {
            format!("{head}{part}")
        } else {
            part.to_string()
        };
        s.write_all(bytes.as_bytes()).await?;
    }
    let answer = read_until(&mut s, until).await?;
    Ok((answer, started.elapsed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_is_read_whole_or_refused_when_it_does_not_come_in_time() -> anyhow::Result<()> {
    let (addr, _stop) = serve_timed(Arc::new(Timed::default())).await?;

    // With its headers, as nearly every body comes.
    let (answer, _) = post_echo(addr, 11, &["hello-world"], Duration::ZERO, "hello-world").await?;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");

    // In two parts, the second well inside the timeout: the timer armed for it must not fire.
    let (answer, _) = post_echo(addr, 11, &["hello-", "world"], BODY_DUE / 4, "world").await?;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nhello-world"), "{answer}");

    // Half a body and then nothing: 408 once the timeout has passed, not before.
    let (answer, took) =
        post_echo(addr, 10, &["half-"], Duration::ZERO, "not received within").await?;
    assert!(
        answer.starts_with("HTTP/1.1 408 Request Timeout"),
        "{answer}"
    );
    assert!(took >= BODY_DUE, "refused after {took:?}");
    Ok(())
}

/// Sends a `GET /fast` whose one extra header holds `value_len` bytes; returns the answer.
async fn get_with_header(addr: std::net::SocketAddr, value_len: usize) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    let head = format!(
        "GET /fast HTTP/1.1\r\nhost: test\r\nconnection: close\r\nx-pad: {}\r\n\r\n",
        "p".repeat(value_len)
    );
    // A server that refuses a head may answer and close before it has read all of it.
    let _ = s.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match timeout(PATIENCE, s.read(&mut buf)).await? {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            // The reset that follows a refusal of unread bytes; the answer came before it.
            Err(_) if !answer.is_empty() => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_over_the_limit_gets_431_and_a_long_one_within_it_is_served() -> anyhow::Result<()> {
    let (addr, _stop) = serve_timed(Arc::new(Timed::default())).await?;
    let within = get_with_header(addr, web::DEFAULT_MAX_HEAD_BYTES / 2).await?;
    assert!(within.starts_with("HTTP/1.1 200 OK"), "{within:.200}");
    // Well inside hyper's own bound (~408 KiB), which would have served it.
    let over = get_with_header(addr, web::DEFAULT_MAX_HEAD_BYTES * 2).await?;
    assert!(
        over.starts_with("HTTP/1.1 431 Request Header Fields Too Large"),
        "{over:.200}"
    );
    Ok(())
}
