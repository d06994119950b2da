//! A small identity provider of our own, as a real one serves it: an ES256 signing key, its
//! public half in a JWKS document served over HTTP, and the tokens it signs for voters. The local
//! stack runs it (`tally idp`), the load gives every simulated voter a token from it, and tests
//! rotate its keys under a running ingest. Not a mock: ingest fetches and verifies as it would
//! from Auth0.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

/// The issuer and audience of the local stack's tokens.
pub const LOCAL_ISSUER: &str = "https://idp.tally.local/";
pub const LOCAL_AUDIENCE: &str = "tally";

/// One signing key of an issuer.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Issuer {
    pub kid: String,
    pub issuer: String,
    pub audience: String,
    /// `ES256` (cheap to sign: the local stack mints a token a simulated voter) or `RS256`
    /// (cheap to verify, and what Auth0 issues by default).
    #[serde(default = "es256")]
    pub alg: String,
    /// The private key in base64: PKCS#8 DER for ES256, PKCS#1 DER for RS256.
    pkcs8: String,
}

fn es256() -> String {
    "ES256".into()
}

impl Issuer {
    /// A new P-256 key.
    pub fn generate(kid: &str, issuer: &str, audience: &str) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("generating a P-256 key");
        Self {
            kid: kid.into(),
            issuer: issuer.into(),
            audience: audience.into(),
            alg: es256(),
            pkcs8: STANDARD.encode(pkcs8.as_ref()),
        }
    }

    /// A new RSA-2048 key, made by `openssl` (ring does not generate RSA keys).
    pub fn generate_rsa(kid: &str, issuer: &str, audience: &str) -> anyhow::Result<Self> {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-outform",
                "DER",
            ])
            .output()
            .context("running openssl to make an RSA key")?;
        anyhow::ensure!(
            out.status.success(),
            "openssl genpkey: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Self {
            kid: kid.into(),
            issuer: issuer.into(),
            audience: audience.into(),
            alg: "RS256".into(),
            pkcs8: STANDARD.encode(&out.stdout),
        })
    }

    fn algorithm(&self) -> jsonwebtoken::Algorithm {
        if self.alg == "RS256" {
            jsonwebtoken::Algorithm::RS256
        } else {
            jsonwebtoken::Algorithm::ES256
        }
    }

    fn encoding_key(&self) -> jsonwebtoken::EncodingKey {
        match self.algorithm() {
            jsonwebtoken::Algorithm::RS256 => jsonwebtoken::EncodingKey::from_rsa_der(&self.der()),
            _ => jsonwebtoken::EncodingKey::from_ec_der(&self.der()),
        }
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Written readable by its owner only: it signs any voter's token.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("writing {}", path.display()))?;
        f.write_all(&serde_json::to_vec(self)?)?;
        Ok(())
    }

    fn der(&self) -> Vec<u8> {
        STANDARD.decode(&self.pkcs8).expect("a key we encoded")
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> serde_json::Value {
        if self.algorithm() == jsonwebtoken::Algorithm::RS256 {
            let pair = ring::rsa::KeyPair::from_der(&self.der()).expect("a key we made");
            let public: ring::rsa::PublicKeyComponents<Vec<u8>> = pair.public().into();
            return serde_json::json!({
                "kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid,
                "n": URL_SAFE_NO_PAD.encode(&public.n),
                "e": URL_SAFE_NO_PAD.encode(&public.e),
            });
        }
        let rng = ring::rand::SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &self.der(), &rng)
            .expect("a key we generated");
        // Uncompressed point: 0x04, then x and y.
        let point = pair.public_key().as_ref();
        serde_json::json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        })
    }

    /// A token for `voter`, valid for `ttl_secs` from now.
    pub fn token(&self, voter: &str, ttl_secs: u64) -> String {
        let now = unix_now();
        self.sign(serde_json::json!({
            "sub": voter, "iss": self.issuer, "aud": self.audience,
            "iat": now, "nbf": now, "exp": now + ttl_secs,
        }))
    }

    /// A token with exactly these claims, signed by this key.
    pub fn sign(&self, claims: serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(self.algorithm());
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding_key())
            .expect("signing with a good key")
    }
}

/// A JWKS document holding these keys' public halves.
pub fn jwks(issuers: &[&Issuer]) -> String {
    serde_json::json!({ "keys": issuers.iter().map(|i| i.jwk()).collect::<Vec<_>>() }).to_string()
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Serves a JWKS document on `/.well-known/jwks.json` (and `/`), counting fetches. The document
/// can be replaced while it runs: a key rotation at the provider.
pub struct JwksServer {
    pub addr: SocketAddr,
    document: Arc<Mutex<String>>,
    fetches: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    pub async fn start(document: String) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let document = Arc::new(Mutex::new(document));
        let fetches = Arc::new(AtomicU64::new(0));
        let (d, f) = (document.clone(), fetches.clone());
        let task = tokio::spawn(serve(
            listener,
            Arc::new(move || {
                f.fetch_add(1, Ordering::Relaxed);
                Some(d.lock().unwrap_or_else(PoisonError::into_inner).clone())
            }),
        ));
        Ok(Self {
            addr,
            document,
            fetches,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    pub fn set(&self, document: String) {
        *self.document.lock().unwrap_or_else(PoisonError::into_inner) = document;
    }

    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers `GET /.well-known/jwks.json` with what `document` gives (503 when it gives nothing),
/// and the probes every process of the local stack answers, until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    document: Arc<dyn Fn() -> Option<String> + Send + Sync>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let document = document.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let document = document.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/healthz" | "/readyz" => {
                            (StatusCode::OK, r#"{"status":"ok"}"#.to_string())
                        }
                        "/" | "/.well-known/jwks.json" => match document() {
                            Some(d) => (StatusCode::OK, d),
                            None => (StatusCode::SERVICE_UNAVAILABLE, "{}".to_string()),
                        },
                        _ => (StatusCode::NOT_FOUND, "{}".to_string()),
                    };
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_of_both_kinds_of_key_verify_against_their_jwks() {
        for issuer in [
            Issuer::generate("ec", "https://i/", "a"),
            Issuer::generate_rsa("rsa", "https://i/", "a").expect("openssl makes an RSA key"),
        ] {
            let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&jwks(&[&issuer])).unwrap();
            let key = jsonwebtoken::DecodingKey::from_jwk(&set.keys[0]).unwrap();
            let token = issuer.token("alice", 60);
            let header = jsonwebtoken::decode_header(&token).unwrap();
            assert_eq!(header.kid.as_deref(), Some(issuer.kid.as_str()));
            let mut v = jsonwebtoken::Validation::new(header.alg);
            v.set_audience(&["a"]);
            v.set_issuer(&["https://i/"]);
            let claims = jsonwebtoken::decode::<serde_json::Value>(&token, &key, &v).unwrap();
            assert_eq!(claims.claims["sub"], "alice");
        }
    }
}
