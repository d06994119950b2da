//! The driver behind [`crate::auth::Verifier`]'s key set: fetched at start (readiness waits for
//! it), again every `refresh`, and at once when a token names a key the set lacks, but never more
//! often than `unknown_key_refetch`, so made-up key ids cannot turn into a flood of fetches. A
//! failed fetch keeps the last good keys.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Uri;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::auth::{Keys, Verifier};
use crate::identity::KeySource;

/// A fetch must be done within this.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A key set larger than this is not a key set.
const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// While no good key set was ever fetched, try again this often.
const RETRY_UNLOADED: Duration = Duration::from_secs(1);

/// Keeps the verifier's keys fresh until the task is aborted.
pub async fn refresh_loop(verifier: Arc<Verifier>, region: String) {
    let config = verifier.config().clone();
    let refreshed = metrics::counter!("tally_ingest_jwks_fetches_total", "region" => region.clone(), "outcome" => "ok");
    let failed = metrics::counter!("tally_ingest_jwks_fetches_total", "region" => region, "outcome" => "failed");
    loop {
        let started = Instant::now();
        match load(&config.keys).await {
            Ok(keys) => {
                let before = verifier.is_loaded();
                tracing::info!(source = %config.keys, kids = ?keys.kids(), "identity provider's keys loaded");
                verifier.set_keys(keys);
                if !before {
                    tracing::info!("voters' tokens are verified from now on");
                }
                refreshed.increment(1);
            }
            Err(e) => {
                failed.increment(1);
                tracing::warn!(source = %config.keys, error = %e, "fetching the identity provider's keys failed; keeping the last good ones");
            }
        }
        verifier.fetched.notify_waiters();
        let next = started
            + if verifier.is_loaded() {
                config.refresh
            } else {
                RETRY_UNLOADED
            };
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => break,
                () = verifier.wanted.notified() => {
                    if started.elapsed() >= config.unknown_key_refetch {
                        break;
                    }
                    // Too soon: the token waiting for a fetch is refused now, not later.
                    verifier.fetched.notify_waiters();
                }
            }
        }
    }
}

/// The key set at `source`.
pub async fn load(source: &KeySource) -> Result<Keys, String> {
    let name = source.to_string();
    let document = match source {
        KeySource::File(path) => tokio::fs::read(path).await.map_err(|e| e.to_string())?,
        KeySource::Url(url) => tokio::time::timeout(FETCH_TIMEOUT, get(url))
            .await
            .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))??
            .to_vec(),
    };
    Keys::from_jwks(&document, &name).map_err(|e| e.to_string())
}

/// `GET url` over HTTP or HTTPS (the process's trust), the body when the answer is 200.
async fn get(url: &str) -> Result<Bytes, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("{url:?}: not an http:// or https:// URL")),
    };
    let host = uri.host().ok_or_else(|| format!("{url:?}: no host"))?;
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    let request = hyper::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, host)
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = if https {
        let tls = tls::connect(tcp, host).await.map_err(|e| e.to_string())?;
        send(TokioIo::new(tls), request).await?
    } else {
        send(TokioIo::new(tcp), request).await?
    };
    Ok(response)
}

async fn send<T>(io: T, request: hyper::Request<Empty<Bytes>>) -> Result<Bytes, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    if response.status() != hyper::StatusCode::OK {
        return Err(format!("answered {}", response.status()));
    }
    Limited::new(response.into_body(), MAX_DOCUMENT_BYTES)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| format!("reading the key set: {e}"))
}
