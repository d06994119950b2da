//! The baselines: bare hyper servers that do the least a role's endpoint could do.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Reads the request body and answers `202 {"vote_id":...}`, storing nothing.
pub async fn accept_votes(listener: TcpListener) {
    serve(listener, |body: Bytes| {
        let _ = body;
        (
            StatusCode::ACCEPTED,
            Bytes::from_static(b"{\"vote_id\":\"00000000-0000-0000-0000-000000000000\"}"),
        )
    })
    .await
}

/// Answers every request with `body`.
pub async fn fixed_json(listener: TcpListener, body: Bytes) {
    serve(listener, move |_| (StatusCode::OK, body.clone())).await
}

async fn serve<F>(listener: TcpListener, answer: F)
where
    F: Fn(Bytes) -> (StatusCode, Bytes) + Clone + Send + Sync + 'static,
{
    loop {
        let Ok((stream, _)): Result<(_, SocketAddr), _> = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let answer = answer.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let answer = answer.clone();
                async move {
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    let (status, out) = answer(body);
                    let mut resp = Response::new(Full::new(out));
                    *resp.status_mut() = status;
                    resp.headers_mut().insert(
                        "content-type",
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
