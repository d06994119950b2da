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

    let mut idle = TcpStream::connect(addr).await?;
    send(&mut idle, "/fast").await?;
    read_until(&mut idle, "fast done").await?;

    let mut busy = TcpStream::connect(addr).await?;
    send(&mut busy, "/slow").await?;
    timeout(PATIENCE, service.entered.notified()).await?;

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
