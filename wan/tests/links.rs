//! Links against real sockets: an echo server behind a link, reached through it.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Echoes every byte back; closes its side when the client closes its own.
async fn echo_server() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

struct Wan {
    control: harness::http::Client,
    /// eu-west-1's way to the echo server in us-east-1.
    link: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(delay_ms: u64) -> anyhow::Result<Wan> {
    let upstream = echo_server().await?;
    let link = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let config = wan::Config::parse(&format!("eu-west-1>us-east-1@{link}={upstream}"), delay_ms)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let control = harness::http::Client::new(format!("http://{}", listener.local_addr()?));
    let (stop, stopped) = tokio::sync::oneshot::channel();
    tokio::spawn(wan::run(listener, config, async {
        let _ = stopped.await;
    }));
    control.wait_ready(Duration::from_secs(10)).await?;
    Ok(Wan {
        control,
        link,
        stop,
    })
}

async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> anyhow::Result<Vec<u8>> {
    stream.write_all(message).await?;
    let mut back = vec![0; message.len()];
    stream.read_exact(&mut back).await?;
    Ok(back)
}

#[tokio::test]
async fn a_round_trip_takes_the_delay_each_way() -> anyhow::Result<()> {
    let wan = start(150).await?;
    let mut s = TcpStream::connect(wan.link).await?;
    let start = Instant::now();
    assert_eq!(round_trip(&mut s, b"ping").await?, b"ping");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "round trip took {took:?}"
    );
    let _ = wan.stop.send(());
    Ok(())
}

/// Chunks sent back to back are held side by side, not one after another: a link adds latency,
/// not a cap on throughput. 40 round trips in series would take 40 x 400 ms = 16 s.
#[tokio::test]
async fn chunks_in_flight_share_the_delay() -> anyhow::Result<()> {
    let wan = start(200).await?;
    let s = TcpStream::connect(wan.link).await?;
    let (mut r, mut w) = s.into_split();
    let start = Instant::now();
    let sent: Vec<u8> = (0..4_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let to_send = sent.clone();
    let writer = tokio::spawn(async move {
        for piece in to_send.chunks(100_000) {
            w.write_all(piece).await?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        w.shutdown().await?;
        anyhow::Ok(())
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await?;
    writer.await??;
    let took = start.elapsed();
    assert_eq!(back.len(), sent.len());
    assert!(back == sent, "bytes changed or reordered on the way");
    assert!(took >= Duration::from_millis(400), "took {took:?}");
    assert!(
        took < Duration::from_secs(8),
        "took {took:?}: held in series"
    );
    let _ = wan.stop.send(());
    Ok(())
}

#[tokio::test]
async fn a_cut_region_drops_its_connections_until_healed() -> anyhow::Result<()> {
    let wan = start(0).await?;
    let mut open = TcpStream::connect(wan.link).await?;
    assert_eq!(round_trip(&mut open, b"before").await?, b"before");

    let cut = wan
        .control
        .request(Method::POST, "/cut?region=us-east-1", &[], "")
        .await?;
    assert_eq!(cut.status, 200, "{}", cut.text());
    assert_eq!(cut.json()["cut_regions"], serde_json::json!(["us-east-1"]));
    assert_eq!(cut.json()["links"][0]["cut"], true);
    // The open connection ends; a new one is accepted and closed at once.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the open connection outlived the cut");
    let mut refused = TcpStream::connect(wan.link).await?;
    assert!(round_trip(&mut refused, b"during").await.is_err());

    let healed = wan
        .control
        .request(Method::POST, "/heal?region=us-east-1", &[], "")
        .await?;
    assert_eq!(healed.json()["cut_regions"], serde_json::json!([]));
    let mut again = TcpStream::connect(wan.link).await?;
    assert_eq!(round_trip(&mut again, b"after").await?, b"after");
    let _ = wan.stop.send(());
    Ok(())
}

#[tokio::test]
async fn the_delay_changes_live_and_bad_requests_are_refused() -> anyhow::Result<()> {
    let wan = start(0).await?;
    let c = &wan.control;
    let changed = c.request(Method::POST, "/delay?ms=120", &[], "").await?;
    assert_eq!(changed.status, 200);
    assert_eq!(changed.json()["delay_ms"], 120.0);
    let mut s = TcpStream::connect(wan.link).await?;
    let start = Instant::now();
    round_trip(&mut s, b"x").await?;
    assert!(start.elapsed() >= Duration::from_millis(240));

    let too_long = c.request(Method::POST, "/delay?ms=60000", &[], "").await?;
    assert_eq!(
        (too_long.status.as_u16(), too_long.error_code().as_str()),
        (400, "bad_delay")
    );
    assert!(
        too_long.text().contains("over the most allowed"),
        "{}",
        too_long.text()
    );
    let no_ms = c.request(Method::POST, "/delay?seconds=1", &[], "").await?;
    assert_eq!(no_ms.status, 400);
    let unknown = c
        .request(Method::POST, "/cut?region=mars-1", &[], "")
        .await?;
    assert_eq!(
        (unknown.status.as_u16(), unknown.error_code().as_str()),
        (404, "unknown_region")
    );
    let wrong_method = c.get("/cut?region=us-east-1").await?;
    assert_eq!(wrong_method.status, 405);
    // None of that changed anything.
    let status = c.get("/status").await?.json();
    assert_eq!(status["delay_ms"], 120.0);
    assert_eq!(status["cut_regions"], serde_json::json!([]));
    assert_eq!(status["links"][0]["from"], "eu-west-1");
    let _ = wan.stop.send(());
    Ok(())
}

#[tokio::test]
async fn a_port_already_taken_is_a_clear_error() -> anyhow::Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?;
    let config = wan::Config::parse(&format!("a>b@{addr}=127.0.0.1:1"), 0)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let err = wan::run(listener, config, async {}).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("cannot listen on {addr}")),
        "{err}"
    );
    Ok(())
}
