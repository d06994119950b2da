//! JWT voters: RS256/ES256 tokens checked against a JWKS, an issuer and an audience. The voter
//! is the token's `sub`.

use std::path::Path;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use model::VoterId;

#[derive(Clone)]
pub struct AuthConfig {
    pub jwks: JwkSet,
    pub issuer: String,
    pub audience: String,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("keys", &self.jwks.keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the JWKS file {path}: {reason}")]
    Jwks { path: String, reason: String },
    #[error("missing bearer token")]
    Missing,
    #[error("token algorithm must be RS256 or ES256")]
    Algorithm,
    #[error("token key id is not in the key set")]
    UnknownKey,
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("token subject is not a valid voter id")]
    Subject,
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
}

impl AuthConfig {
    pub fn from_file(path: &Path, issuer: String, audience: String) -> Result<Self, AuthError> {
        let bad = |reason: String| AuthError::Jwks {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let jwks: JwkSet = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if jwks.keys.is_empty() {
            return Err(bad("no keys".into()));
        }
        Ok(Self {
            jwks,
            issuer,
            audience,
        })
    }

    /// The voter a bearer token speaks for.
    pub fn voter(&self, authorization: Option<&str>) -> Result<VoterId, AuthError> {
        let token = authorization
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .ok_or(AuthError::Missing)?
            .trim();
        let header = decode_header(token)?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(AuthError::Algorithm);
        }
        let jwk = match &header.kid {
            Some(kid) => self.jwks.find(kid),
            None if self.jwks.keys.len() == 1 => self.jwks.keys.first(),
            None => None,
        }
        .ok_or(AuthError::UnknownKey)?;
        let key = DecodingKey::from_jwk(jwk)?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        let data = decode::<Claims>(token, &key, &validation)?;
        VoterId::new(data.claims.sub).map_err(|_| AuthError::Subject)
    }
}
