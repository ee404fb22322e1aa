//! Who is calling: JWTs (HS256 with a shared secret, RS256 with a public key; `exp` required,
//! `nbf` honoured, optional audience, bounded clock skew) and static API keys, checked with the
//! `jsonwebtoken` crate and in constant time. The caller's user id (`sub`, or the key's user)
//! owns the sessions and history entries it creates.
//!
//! With nothing configured, auth is off and every caller is the same anonymous user. Session
//! calls are always authorised by the session's own token (`X-Session-Token`), not by these.

use crate::error::ApiError;
use jsonwebtoken::{decode, errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// Most clock skew the server may be told to accept, in seconds.
pub const MAX_LEEWAY_S: u64 = 300;

/// The JWT claims voxpoll reads.
#[derive(Debug, Deserialize)]
struct Claims {
    /// User id.
    sub: String,
}

/// One static API key: its user and the SHA-256 of the key.
struct ApiKey {
    user: String,
    sha256: [u8; 32],
}

/// The configured ways to authenticate. Cheap to share behind an `Arc`.
pub struct Authenticator {
    hs256: Option<(DecodingKey, Validation)>,
    rs256: Option<(DecodingKey, Validation)>,
    api_keys: Vec<ApiKey>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("hs256", &self.hs256.is_some())
            .field("rs256", &self.rs256.is_some())
            .field("api_keys", &self.api_keys.len())
            .finish()
    }
}

/// Settings for [`Authenticator::new`] (from `Config`).
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    /// HS256 shared secret.
    pub jwt_hs256_secret: Option<Secret>,
    /// RS256 public key, PEM.
    pub jwt_rs256_public_key_pem: Option<String>,
    /// Required `aud`, when set.
    pub jwt_audience: Option<String>,
    /// Clock skew accepted on `exp`/`nbf`, seconds (≤ [`MAX_LEEWAY_S`]).
    pub jwt_leeway_s: u64,
    /// `user:key` pairs, comma-separated.
    pub api_keys: Option<Secret>,
}

impl Authenticator {
    /// Builds the checks.
    ///
    /// # Errors
    /// A leeway over [`MAX_LEEWAY_S`], an unparseable RSA key, a malformed API key list.
    pub fn new(s: &AuthSettings) -> anyhow::Result<Self> {
        anyhow::ensure!(
            s.jwt_leeway_s <= MAX_LEEWAY_S,
            "--jwt-leeway-s must be at most {MAX_LEEWAY_S}"
        );
        let validation = |alg| {
            let mut v = Validation::new(alg);
            v.leeway = s.jwt_leeway_s;
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp", "sub"]);
            match &s.jwt_audience {
                Some(aud) => v.set_audience(&[aud]),
                None => v.validate_aud = false,
            }
            v
        };
        let hs256 = s
            .jwt_hs256_secret
            .as_ref()
            .filter(|k| !k.expose().is_empty())
            .map(|k| {
                (
                    DecodingKey::from_secret(k.expose().as_bytes()),
                    validation(Algorithm::HS256),
                )
            });
        let rs256 = match &s.jwt_rs256_public_key_pem {
            Some(pem) => Some((
                DecodingKey::from_rsa_pem(pem.as_bytes())
                    .map_err(|e| anyhow::anyhow!("RS256 public key: {e}"))?,
                validation(Algorithm::RS256),
            )),
            None => None,
        };
        let mut api_keys = Vec::new();
        if let Some(list) = &s.api_keys {
            for entry in list
                .expose()
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
            {
                let (user, key) = entry
                    .split_once(':')
                    .filter(|(u, k)| !u.is_empty() && k.len() >= 16)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "API keys are `user:key` pairs with keys of at least 16 characters"
                        )
                    })?;
                api_keys.push(ApiKey {
                    user: user.to_string(),
                    sha256: Sha256::digest(key.as_bytes()).into(),
                });
            }
        }
        Ok(Self {
            hs256,
            rs256,
            api_keys,
        })
    }

    /// True when any credential kind is configured (callers must then present one).
    pub fn enabled(&self) -> bool {
        self.hs256.is_some() || self.rs256.is_some() || !self.api_keys.is_empty()
    }

    /// The caller's user id: `None` when auth is off.
    ///
    /// # Errors
    /// 401 `missing_credentials` without `Authorization: Bearer` or `X-Api-Key` (an API key
    /// may also come as `Authorization: Bearer <key>`, as OpenAI SDKs send it); 401
    /// `invalid_token` for a JWT that is expired, not yet valid, for another audience, signed
    /// with another key or algorithm, or malformed; 401 `invalid_api_key`.
    pub fn caller(
        &self,
        authorization: Option<&str>,
        api_key: Option<&str>,
    ) -> Result<Option<String>, ApiError> {
        if !self.enabled() {
            return Ok(None);
        }
        if let Some(key) = api_key {
            return self.api_key_user(key).map(Some);
        }
        let Some(token) = authorization.and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        }) else {
            return Err(unauthorized(
                "missing_credentials",
                "send Authorization: Bearer <JWT> or X-Api-Key".into(),
            ));
        };
        let token = token.trim();
        // OpenAI SDKs send their API key as a bearer token: one that is not a JWT (three
        // dot-separated parts) is taken as an API key when keys are configured.
        if token.split('.').count() != 3 && !self.api_keys.is_empty() {
            return self.api_key_user(token).map(Some);
        }
        self.jwt_user(token).map(Some)
    }

    fn api_key_user(&self, key: &str) -> Result<String, ApiError> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        // Every key is compared, in constant time, so timing does not tell which one is close.
        let mut found = None;
        for k in &self.api_keys {
            if bool::from(k.sha256.ct_eq(&digest)) {
                found = Some(k.user.clone());
            }
        }
        found.ok_or_else(|| unauthorized("invalid_api_key", "unknown API key".into()))
    }

    fn jwt_user(&self, token: &str) -> Result<String, ApiError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| unauthorized("invalid_token", format!("malformed JWT: {e}")))?;
        let checker = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::RS256 => self.rs256.as_ref(),
            _ => None,
        };
        let Some((key, validation)) = checker else {
            return Err(unauthorized(
                "invalid_token",
                format!("JWT algorithm {:?} is not accepted here", header.alg),
            ));
        };
        match decode::<Claims>(token, key, validation) {
            Ok(data) => Ok(data.claims.sub),
            Err(e) => Err(unauthorized(
                "invalid_token",
                match e.kind() {
                    ErrorKind::ExpiredSignature => "JWT expired (exp)".into(),
                    ErrorKind::ImmatureSignature => "JWT not valid yet (nbf)".into(),
                    ErrorKind::InvalidAudience => "JWT audience (aud) is not this service".into(),
                    ErrorKind::InvalidSignature => "JWT signature does not verify".into(),
                    ErrorKind::MissingRequiredClaim(c) => format!("JWT lacks the {c} claim"),
                    _ => format!("invalid JWT: {e}"),
                },
            )),
        }
    }
}

fn unauthorized(code: &'static str, message: String) -> ApiError {
    ApiError::Unauthorized { code, message }
}
