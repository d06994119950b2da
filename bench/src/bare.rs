//! The baselines: bare hyper servers that do the least a role's endpoint could do.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What a baseline answers for a stored vote: a vote id, the same size as ingest's.
pub(crate) const NIL_VOTE_ID: &[u8] = b"{\"vote_id\":\"00000000-0000-0000-0000-000000000000\"}";

/// Reads the request body and answers `202 {"vote_id":...}`, storing nothing.
pub async fn accept_votes(listener: TcpListener) {
    serve(listener, |_, _| async {
        (StatusCode::ACCEPTED, Bytes::from_static(NIL_VOTE_ID))
    })
    .await
}

/// Answers every request with `body`.
pub async fn fixed_json(listener: TcpListener, body: Bytes) {
    serve(listener, move |_, _| {
        let body = body.clone();
        async move { (StatusCode::OK, body) }
    })
    .await
}

/// Serves HTTP/1 on `listener`: each request's headers and whole body go to `answer`, whose
/// status and body go back as JSON.
pub(crate) async fn serve<F, Fut>(listener: TcpListener, answer: F)
where
    F: Fn(HeaderMap, Bytes) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (StatusCode, Bytes)> + Send,
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
                    let (parts, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    let (status, out) = answer(parts.headers, body).await;
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
