//! TLS from every role to PostgreSQL and Redis: rustls with the ring provider, trusting the CA in
//! [`ENV_CA_FILE`] (a private CA: the tests' own, or a cluster's) or else the system's roots.
//!
//! The trust is one per process, set once at start-up by [`trust`]. Whether a connection uses TLS
//! is the URL's business: `sslmode=require` for PostgreSQL (the default `prefer` uses TLS when the
//! server offers it), `rediss://` for Redis.
#![forbid(unsafe_code)]

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// The PEM file of the CA whose certificates the servers present.
pub const ENV_CA_FILE: &str = "TALLY_TLS_CA_FILE";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the CA file {path}: {source}")]
    ReadCa { path: PathBuf, source: io::Error },
    #[error("the CA file {path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("the CA file {path} holds a certificate rustls refuses: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("the process already trusts {already}; it cannot switch to {wanted}")]
    AlreadySet { already: String, wanted: String },
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("TLS handshake with {server} failed: {source} (if the server's certificate is signed by a private CA, point {ENV_CA_FILE} at that CA's PEM file)")]
    Handshake { server: String, source: io::Error },
}

struct Trust {
    ca_file: Option<PathBuf>,
    config: Arc<rustls::ClientConfig>,
    ca_pem: Option<Vec<u8>>,
}

static TRUST: OnceLock<Trust> = OnceLock::new();

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // Another crate in the process may enable a second provider; naming one as the process's
    // default keeps `ClientConfig::builder()` (as the redis crate calls it) from panicking.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load(ca_file: Option<&Path>) -> Result<Trust, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let mut ca_pem = None;
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| TlsError::ReadCa {
                path: path.into(),
                source,
            })?;
            let certs: Vec<CertificateDer> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::BadCertificate {
                    path: path.into(),
                    reason: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(TlsError::NoCertificate { path: path.into() });
            }
            for cert in certs {
                roots.add(cert).map_err(|e| TlsError::BadCertificate {
                    path: path.into(),
                    reason: e.to_string(),
                })?;
            }
            ca_pem = Some(pem);
        }
        None => {
            // Unreadable system certificates are skipped: a missing root shows up as a
            // handshake error naming the server, which says more than a start-up failure.
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Trust {
        ca_file: ca_file.map(Path::to_path_buf),
        config: Arc::new(config),
        ca_pem,
    })
}

/// Sets the process's trust: the CA in `ca_file`, or the system's roots. Checked at start-up, so
/// a bad file stops the role before it binds a port. Setting the same again is a no-op.
pub fn trust(ca_file: Option<&Path>) -> Result<(), TlsError> {
    if let Some(t) = TRUST.get() {
        return if t.ca_file.as_deref() == ca_file {
            Ok(())
        } else {
            Err(TlsError::AlreadySet {
                already: describe(t.ca_file.as_deref()),
                wanted: describe(ca_file),
            })
        };
    }
    let loaded = load(ca_file)?;
    let _ = TRUST.set(loaded);
    trust(ca_file)
}

/// [`trust`] with the file named by [`ENV_CA_FILE`], if set.
pub fn trust_from_env() -> Result<(), TlsError> {
    trust(std::env::var_os(ENV_CA_FILE).map(PathBuf::from).as_deref())
}

fn describe(ca_file: Option<&Path>) -> String {
    ca_file.map_or("the system's roots".into(), |p| p.display().to_string())
}

fn current() -> &'static Trust {
    TRUST.get_or_init(|| load(None).expect("the system's roots never fail to load"))
}

/// The PostgreSQL connector under the process's trust.
pub fn postgres() -> MakeRustlsConnect {
    MakeRustlsConnect {
        config: current().config.clone(),
    }
}

/// A TLS client connection to `host` over `stream`, under the process's trust: for the few
/// HTTPS requests a role makes itself (an identity provider's key set).
pub async fn connect<S>(
    stream: S,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<S>, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ClientTrust::process().connect(stream, host).await
}

/// A trust for HTTPS clients: the process's, or one of its own beside it (a rehearsal trusts
/// the target's CA for its load balancers, while its database connections keep the process's).
#[derive(Clone)]
pub struct ClientTrust(Arc<rustls::ClientConfig>);

impl ClientTrust {
    pub fn process() -> Self {
        Self(current().config.clone())
    }

    /// The CA in `ca_file`, or the system's roots.
    pub fn load(ca_file: Option<&Path>) -> Result<Self, TlsError> {
        Ok(Self(load(ca_file)?.config))
    }

    pub async fn connect<S>(
        &self,
        stream: S,
        host: &str,
    ) -> Result<tokio_rustls::client::TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| TlsError::ServerName(host.into()))?;
        tokio_rustls::TlsConnector::from(self.0.clone())
            .connect(name, stream)
            .await
            .map_err(|source| TlsError::Handshake {
                server: host.into(),
                source,
            })
    }
}

impl PartialEq for ClientTrust {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ClientTrust {}

impl std::fmt::Debug for ClientTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTrust")
    }
}

/// A Redis client for `url` under the process's trust (used when the URL is `rediss://`).
pub fn redis_client(url: &str) -> redis::RedisResult<redis::Client> {
    if !url.starts_with("rediss://") {
        return redis::Client::open(url);
    }
    let _ = provider();
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: current().ca_pem.clone(),
        },
    )
}

/// What to add to a Redis connection error on a `redis://` URL: a TLS-only server resets a
/// plain connection without a word.
pub fn redis_hint(url: &str) -> &'static str {
    if url.starts_with("redis://") {
        " (if this server takes only TLS, its URL must start with rediss://)"
    } else {
        ""
    }
}

/// `url` with its password, if any, replaced by `***`: for error messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}{path}")
        }
        None => url.to_string(),
    }
}

#[derive(Clone)]
pub struct MakeRustlsConnect {
    config: Arc<rustls::ClientConfig>,
}

impl<S> MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = TlsError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, TlsError> {
        let name = ServerName::try_from(domain.to_string())
            .map_err(|_| TlsError::ServerName(domain.into()))?;
        Ok(RustlsConnect {
            connector: tokio_rustls::TlsConnector::from(self.config.clone()),
            name,
        })
    }
}

pub struct RustlsConnect {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, TlsError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let server = self.name.to_str().into_owned();
            self.connector
                .connect(self.name, stream)
                .await
                .map(RustlsStream)
                .map_err(|source| TlsError::Handshake { server, source })
        })
    }
}

pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM's channel binding is an extra we do not offer; password auth still works.
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_ca_files_are_refused_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = load(Some(&missing)).err().unwrap().to_string();
        assert!(
            err.contains("cannot read the CA file") && err.contains("missing.pem"),
            "{err}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = load(Some(&empty)).err().unwrap().to_string();
        assert!(err.contains("holds no PEM certificate"), "{err}");
    }

    #[test]
    fn passwords_are_redacted_and_nothing_else() {
        assert_eq!(
            redact("redis://tally-ingest:s3cr%40t@10.0.0.1:6379/"),
            "redis://tally-ingest:***@10.0.0.1:6379/"
        );
        assert_eq!(redact("rediss://:pw@h:1"), "rediss://:***@h:1");
        assert_eq!(
            redact("postgres://tally_reader@h/tally?sslmode=require"),
            "postgres://tally_reader@h/tally?sslmode=require"
        );
        assert_eq!(redact("redis://h:1/"), "redis://h:1/");
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn the_hint_is_given_only_for_plain_urls() {
        assert!(redis_hint("redis://127.0.0.1:1/").contains("rediss://"));
        assert_eq!(redis_hint("rediss://127.0.0.1:1/"), "");
    }
}
