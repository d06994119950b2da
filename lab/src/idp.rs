//! The local stack's identity provider, `tally idp`: its signing keys live in the stack's
//! `idp/` directory (one file a key, the newest signs), their public halves are served as a JWKS
//! document that ingest fetches as it would Auth0's, and [`Tokens`] mints each simulated voter's
//! token once. Rotating is adding a key file: the JWKS is read from the directory on every fetch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context;
use harness::idp::{Issuer, LOCAL_AUDIENCE, LOCAL_ISSUER};

/// How long a simulated voter's token is good for: longer than any load or drill runs.
pub const TOKEN_TTL_SECS: u64 = 6 * 3600;

/// The environment variable naming the key directory `tally idp` serves.
pub const ENV_IDP_KEYS: &str = "TALLY_IDP_KEYS";

/// Every key file in `dir`, oldest first (by name: `key-<unix seconds>.json`).
fn key_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    Ok(files)
}

/// Every key in `dir`, oldest first.
pub fn keys(dir: &Path) -> anyhow::Result<Vec<Issuer>> {
    key_files(dir)?.iter().map(|f| Issuer::load(f)).collect()
}

/// The file of the key that signs: the newest.
pub fn signing_key_file(dir: &Path) -> anyhow::Result<PathBuf> {
    key_files(dir)?
        .pop()
        .with_context(|| format!("no signing key in {}", dir.display()))
}

/// The key that signs: the newest.
pub fn signing_key(dir: &Path) -> anyhow::Result<Issuer> {
    Issuer::load(&signing_key_file(dir)?)
}

/// Makes sure `dir` holds a signing key, and returns the one that signs.
pub fn ensure_key(dir: &Path) -> anyhow::Result<Issuer> {
    std::fs::create_dir_all(dir)?;
    if let Ok(key) = signing_key(dir) {
        return Ok(key);
    }
    rotate(dir)
}

/// Adds a new signing key; the old ones stay in the key set, so tokens they signed stay good
/// until they expire.
pub fn rotate(dir: &Path) -> anyhow::Result<Issuer> {
    let now = harness::idp::unix_now();
    let kid = format!("local-{now}-{:04x}", rand::random::<u16>());
    let key = Issuer::generate(&kid, LOCAL_ISSUER, LOCAL_AUDIENCE);
    key.save(&dir.join(format!("key-{now:012}-{kid}.json")))?;
    Ok(key)
}

/// The JWKS document of every key in `dir`.
pub fn jwks(dir: &Path) -> anyhow::Result<String> {
    let keys = keys(dir)?;
    Ok(harness::idp::jwks(&keys.iter().collect::<Vec<_>>()))
}

/// Serves `dir`'s key set until the task ends.
pub async fn serve(listener: tokio::net::TcpListener, dir: PathBuf) {
    harness::idp::serve(
        listener,
        Arc::new(move || match jwks(&dir) {
            Ok(doc) => Some(doc),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the key set");
                None
            }
        }),
    )
    .await;
}

/// Each simulated voter's `Authorization` header, minted on its first vote and kept.
pub struct Tokens {
    key: Issuer,
    minted: Mutex<HashMap<String, Arc<str>>>,
}

impl Tokens {
    pub fn new(key: Issuer) -> Self {
        Self {
            key,
            minted: Mutex::default(),
        }
    }

    pub fn bearer(&self, voter: &str) -> Arc<str> {
        let mut minted = self.minted.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = minted.get(voter) {
            return t.clone();
        }
        let t: Arc<str> = format!("Bearer {}", self.key.token(voter, TOKEN_TTL_SECS)).into();
        minted.insert(voter.to_string(), t.clone());
        t
    }
}
