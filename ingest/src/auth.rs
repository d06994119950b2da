//! JWT voters: RS256/ES256 tokens checked against the identity provider's key set, an issuer and
//! an audience, with `exp` and `nbf` enforced. The voter is the token's `sub`.
//!
//! A token once verified is remembered until it expires, keyed by a SHA-256 of the whole token, so
//! a voter who votes again pays no signature check. The key set is replaced as a whole whenever
//! [`crate::jwks`] fetches it; a token naming a key the set lacks asks for a fetch at once.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use lru::LruCache;
use model::VoterId;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::identity::JwtConfig;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("token algorithm must be RS256 or ES256")]
    Algorithm,
    #[error("token key id is not in the identity provider's key set")]
    UnknownKey,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token subject is not a valid voter id")]
    Subject,
    #[error("the identity provider's keys are not loaded yet")]
    NoKeys,
}

#[derive(Debug, thiserror::Error)]
pub enum KeySetError {
    #[error("{source_name}: {reason}")]
    Bad { source_name: String, reason: String },
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// The keys tokens are checked against, by key id.
#[derive(Default)]
pub struct Keys {
    by_kid: HashMap<String, DecodingKey>,
    /// The one key of a set that holds only one, for tokens that name none.
    only: Option<DecodingKey>,
    /// The document's SHA-256: an unchanged set fetched again changes nothing.
    document: [u8; 32],
}

impl Keys {
    /// Keys from a JWKS document; a set without a usable key is refused, so a broken fetch never
    /// replaces good keys with none.
    pub fn from_jwks(text: &[u8], source_name: &str) -> Result<Self, KeySetError> {
        let bad = |reason: String| KeySetError::Bad {
            source_name: source_name.to_string(),
            reason,
        };
        let set: JwkSet = serde_json::from_slice(text).map_err(|e| bad(e.to_string()))?;
        let mut keys = Keys::default();
        let mut usable = Vec::new();
        keys.document = Sha256::digest(text).into();
        for jwk in &set.keys {
            // Only RSA and EC keys sign what we take; others (shared secrets, encryption keys)
            // are skipped, so no token can be checked against them.
            if !matches!(
                jwk.algorithm,
                AlgorithmParameters::RSA(_) | AlgorithmParameters::EllipticCurve(_)
            ) {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            if let Some(kid) = &jwk.common.key_id {
                keys.by_kid.insert(kid.clone(), key.clone());
            }
            usable.push(key);
        }
        if usable.is_empty() {
            return Err(bad("no usable signing key".into()));
        }
        if usable.len() == 1 {
            keys.only = usable.pop();
        }
        Ok(keys)
    }

    pub fn kids(&self) -> Vec<&str> {
        let mut kids: Vec<&str> = self.by_kid.keys().map(String::as_str).collect();
        kids.sort_unstable();
        kids
    }

    fn find(&self, kid: Option<&str>) -> Option<&DecodingKey> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            None => self.only.as_ref(),
        }
    }
}

/// Verifies tokens; shared by every request and the key set's refresh loop.
pub struct Verifier {
    config: JwtConfig,
    keys: ArcSwap<Keys>,
    loaded: AtomicBool,
    /// Raised by a token with an unknown key; the refresh loop fetches at once, at most once per
    /// `unknown_key_refetch`.
    pub(crate) wanted: Notify,
    /// Told when a fetch has ended, well or not.
    pub(crate) fetched: Notify,
    cache: TokenCache,
}

impl Verifier {
    pub fn new(config: JwtConfig) -> Arc<Self> {
        Arc::new(Self {
            cache: TokenCache::new(config.cache_entries),
            config,
            keys: ArcSwap::from_pointee(Keys::default()),
            loaded: AtomicBool::new(false),
            wanted: Notify::new(),
            fetched: Notify::new(),
        })
    }

    pub fn config(&self) -> &JwtConfig {
        &self.config
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Relaxed)
    }

    /// Replaces the key set. Remembered tokens are forgotten when a key they may have been signed
    /// with is gone: a key the provider withdrew signs nothing any more.
    pub fn set_keys(&self, keys: Keys) {
        let old = self.keys.load();
        if old.document == keys.document {
            self.loaded.store(true, Ordering::Relaxed);
            return;
        }
        let withdrawn = old.kids().iter().any(|k| !keys.by_kid.contains_key(*k))
            || (old.only.is_some() && old.by_kid.is_empty());
        if withdrawn {
            self.cache.clear();
        }
        self.keys.store(Arc::new(keys));
        self.loaded.store(true, Ordering::Relaxed);
    }

    /// The voter a bearer token speaks for. A token naming a key the set lacks waits for one
    /// fetch of the set, unless one ran too recently; then it is refused.
    pub async fn voter(&self, authorization: Option<&str>) -> Result<VoterId, AuthError> {
        let token = authorization
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .ok_or(AuthError::Missing)?
            .trim();
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = unix_now();
        if let Some(voter) = self.cache.get(&digest, now) {
            return Ok(voter);
        }
        if !self.is_loaded() {
            return Err(AuthError::NoKeys);
        }
        let header = decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(AuthError::Algorithm);
        }
        let mut keys = self.keys.load_full();
        if keys.find(header.kid.as_deref()).is_none() {
            // Told before asking, so a fetch that ends in between is not missed.
            let fetched = self.fetched.notified();
            self.wanted.notify_one();
            let _ = tokio::time::timeout(FETCH_WAIT, fetched).await;
            keys = self.keys.load_full();
        }
        let key = keys
            .find(header.kid.as_deref())
            .ok_or(AuthError::UnknownKey)?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = self.config.leeway.as_secs();
        let data = decode::<Claims>(token, key, &validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let voter = VoterId::new(data.claims.sub).map_err(|_| AuthError::Subject)?;
        self.cache.put(
            digest,
            voter.clone(),
            data.claims.exp + self.config.leeway.as_secs(),
        );
        Ok(voter)
    }
}

/// How long a token with an unknown key waits for the key set to be fetched again.
const FETCH_WAIT: Duration = Duration::from_secs(3);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Verified tokens by the SHA-256 of the whole token, until they expire; at most `capacity`,
/// in shards of their own lock, each dropping its least recently used token when full: a voter
/// who keeps voting stays, and a token forgotten is only verified again.
struct TokenCache {
    shards: Vec<Mutex<VerdictLru>>,
}

/// A token's SHA-256 to the voter it named and when it expires.
type VerdictLru = LruCache<[u8; 32], (VoterId, u64)>;

const CACHE_SHARDS: usize = 16;

impl TokenCache {
    fn new(capacity: usize) -> Self {
        let per_shard =
            NonZeroUsize::new(capacity.div_ceil(CACHE_SHARDS).max(1)).expect("at least one");
        Self {
            shards: (0..CACHE_SHARDS)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
        }
    }

    fn shard(
        &self,
        digest: &[u8; 32],
    ) -> std::sync::MutexGuard<'_, LruCache<[u8; 32], (VoterId, u64)>> {
        self.shards[digest[0] as usize % CACHE_SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, digest: &[u8; 32], now: u64) -> Option<VoterId> {
        self.shard(digest)
            .get(digest)
            .filter(|(_, expires)| *expires > now)
            .map(|(voter, _)| voter.clone())
    }

    fn put(&self, digest: [u8; 32], voter: VoterId, expires: u64) {
        self.shard(&digest).put(digest, (voter, expires));
    }

    fn clear(&self) {
        for s in &self.shards {
            s.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_the_recently_used_tokens() {
        let cache = TokenCache::new(16);
        let now = unix_now();
        let voter = VoterId::new("v").unwrap();
        // One shard of one entry: the second token pushes the first out, unless it was used.
        let (a, b, c) = ([0u8; 32], [16u8; 32], [32u8; 32]);
        cache.put(a, voter.clone(), now + 600);
        cache.put(b, voter.clone(), now + 600);
        assert_eq!(cache.get(&a, now), None);
        assert!(cache.get(&b, now).is_some());
        cache.put(c, voter.clone(), now + 600);
        assert!(cache.get(&c, now).is_some() && cache.get(&b, now).is_none());
    }

    #[test]
    fn the_cache_holds_at_most_its_capacity_and_forgets_expired_tokens() {
        let cache = TokenCache::new(64);
        let now = unix_now();
        let voter = VoterId::new("v").unwrap();
        for i in 0..1000u32 {
            let mut d = [0u8; 32];
            d[..4].copy_from_slice(&i.to_be_bytes());
            d[0] = (i % 251) as u8;
            cache.put(d, voter.clone(), now + 600);
        }
        assert!(cache.len() <= 64, "{} entries", cache.len());
        let d = [9u8; 32];
        cache.put(d, voter.clone(), now - 1);
        assert_eq!(cache.get(&d, now), None, "an expired token is not taken");
        cache.put(d, voter.clone(), now + 5);
        assert_eq!(cache.get(&d, now), Some(voter));
    }

    #[test]
    fn a_key_set_without_a_usable_key_is_refused() {
        assert!(Keys::from_jwks(br#"{"keys":[]}"#, "t").is_err());
        assert!(Keys::from_jwks(b"not json", "t").is_err());
        let err = Keys::from_jwks(br#"{"keys":[{"kty":"oct","k":"AAAA"}]}"#, "t")
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "t: no usable signing key");
    }
}
