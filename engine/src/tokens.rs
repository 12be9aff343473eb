//! Tokens: fan identity (the dev provider's HS256 tokens, or an external provider's HS256 /
//! RS256 JWTs) and admission tokens (HMAC-SHA256, signed by the waiting room, verified by
//! booking-api without a Redis round trip).

use std::collections::HashMap;
use std::sync::Mutex;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{AdmissionConfig, IdentityConfig};
use crate::error::{Code, Error, Result};
use crate::ids::{DropId, FanId};
use crate::queue::SessionEnds;

type HmacSha256 = Hmac<Sha256>;

pub fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    #[cfg(feature = "testing")]
    let now = now + CLOCK_SKEW_MS.load(std::sync::atomic::Ordering::Relaxed);
    now
}

/// How far a test has moved this process's wall clock as [`now_ms`] reads it.
#[cfg(feature = "testing")]
static CLOCK_SKEW_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Moves this process's wall clock (as [`now_ms`] reads it) by `ms`: a server whose clock is
/// wrong, for the tests that deadlines set on Redis' clock never meet it. Process-wide, so such a
/// test runs in a test binary of its own. Only in builds with the `testing` feature.
#[cfg(feature = "testing")]
pub fn skew_clock_ms(ms: i64) {
    CLOCK_SKEW_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
}

/// SHA-256 of `bytes`, hex-encoded (API key hashes, seed commitments, request-body hashes).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A random secret, hex-encoded (dev secrets are made, never written in the code).
pub fn random_secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

#[derive(Debug, Serialize, Deserialize)]
struct FanClaims {
    sub: String,
    exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<i64>,
}

/// Verifies fan tokens; signs them too when the dev identity provider is on.
pub struct FanAuth {
    dev: Option<(EncodingKey, DecodingKey)>,
    dev_ttl_s: i64,
    external: Option<(DecodingKey, Validation)>,
    /// Verified tokens by SHA-256: (fan, exp). Bounded; cleared whole when full (cheap and safe:
    /// a miss only costs a verify).
    cache: Mutex<HashMap<[u8; 32], (FanId, i64)>>,
    cache_entries: usize,
}

impl FanAuth {
    pub fn new(cfg: &IdentityConfig) -> Result<FanAuth> {
        let dev = cfg.dev.then(|| {
            let secret = if cfg.dev_secret.is_empty() {
                random_secret()
            } else {
                cfg.dev_secret.clone()
            };
            (
                EncodingKey::from_secret(secret.as_bytes()),
                DecodingKey::from_secret(secret.as_bytes()),
            )
        });
        let external = if !cfg.jwt_rs256_public_key_pem.is_empty() {
            let key = DecodingKey::from_rsa_pem(cfg.jwt_rs256_public_key_pem.as_bytes())
                .map_err(|e| Error::invalid(format!("identity.jwt_rs256_public_key_pem: {e}")))?;
            Some((key, Validation::new(Algorithm::RS256)))
        } else if !cfg.jwt_hs256_secret.is_empty() {
            Some((
                DecodingKey::from_secret(cfg.jwt_hs256_secret.as_bytes()),
                Validation::new(Algorithm::HS256),
            ))
        } else {
            None
        };
        let external = external.map(|(key, mut v)| {
            v.leeway = 5;
            if !cfg.jwt_issuer.is_empty() {
                v.set_issuer(&[&cfg.jwt_issuer]);
            }
            if cfg.jwt_audience.is_empty() {
                v.validate_aud = false;
            } else {
                v.set_audience(&[&cfg.jwt_audience]);
            }
            (key, v)
        });
        Ok(FanAuth {
            dev,
            dev_ttl_s: cfg.dev_token_ttl_s as i64,
            external,
            cache: Mutex::new(HashMap::new()),
            cache_entries: cfg.cache_entries,
        })
    }

    pub fn dev_enabled(&self) -> bool {
        self.dev.is_some()
    }

    /// The dev identity provider: a token for any fan name.
    pub fn issue_dev(&self, fan: &FanId) -> Result<String> {
        let (enc, _) = self
            .dev
            .as_ref()
            .ok_or_else(|| Error::new(Code::NotFound))?;
        let now = now_s();
        let claims = FanClaims {
            sub: fan.to_string(),
            exp: now + self.dev_ttl_s,
            iat: Some(now),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, enc).map_err(Error::internal)
    }

    pub fn verify(&self, token: &str) -> Result<FanId> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = now_s();
        if let Ok(cache) = self.cache.lock() {
            if let Some((fan, exp)) = cache.get(&digest) {
                if *exp > now {
                    return Ok(fan.clone());
                }
            }
        }
        let unauthorized = || {
            Error::msg(
                Code::Unauthorized,
                "The fan token is missing, malformed, forged or expired.",
            )
        };
        let mut claims = None;
        if let Some((_, dec)) = &self.dev {
            let v = Validation::new(Algorithm::HS256);
            claims = jsonwebtoken::decode::<FanClaims>(token, dec, &v)
                .ok()
                .map(|d| d.claims);
        }
        if claims.is_none() {
            if let Some((dec, v)) = &self.external {
                claims = jsonwebtoken::decode::<FanClaims>(token, dec, v)
                    .ok()
                    .map(|d| d.claims);
            }
        }
        let claims = claims.ok_or_else(unauthorized)?;
        let fan = FanId::parse(&claims.sub).map_err(|_| unauthorized())?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= self.cache_entries {
                cache.clear();
            }
            cache.insert(digest, (fan.clone(), claims.exp));
        }
        Ok(fan)
    }
}

/// What an admission token says: this fan, at this place in this drop's line, was admitted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionClaims {
    pub drop: String,
    pub fan: String,
    pub place: i64,
    pub iat: i64,
    pub exp: i64,
    pub jti: String,
    /// The session's ends (lua/admit.lua); absent in tokens minted before sessions had ends,
    /// which expire within `admission.token_ttl_s` of their issue anyway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shop_end_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_end_ms: Option<i64>,
}

impl AdmissionClaims {
    /// The session's ends the token carries, if it carries both.
    pub fn session(&self) -> Option<SessionEnds> {
        Some(SessionEnds {
            shop_end_ms: self.shop_end_ms?,
            hard_end_ms: self.hard_end_ms?,
        })
    }
}

/// Signs and verifies admission tokens: `v1.<base64url claims>.<base64url HMAC-SHA256>`.
/// The first secret signs; every secret verifies, so a rotation runs with two for a while.
pub struct AdmissionKeys {
    secrets: Vec<Vec<u8>>,
    /// Place receipts' keys, one derived from each secret (the first signs).
    receipt_keys: Vec<Vec<u8>>,
    pub token_ttl_s: i64,
}

impl AdmissionKeys {
    pub fn new(cfg: &AdmissionConfig) -> AdmissionKeys {
        let mut secrets: Vec<Vec<u8>> = cfg
            .secrets
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| s.as_bytes().to_vec())
            .collect();
        if secrets.is_empty() {
            tracing::warn!("no admission.secrets configured: generated one; only this process can verify its tokens");
            secrets.push(random_secret().into_bytes());
        }
        AdmissionKeys {
            receipt_keys: secrets.iter().map(|s| receipt_key(s)).collect(),
            secrets,
            token_ttl_s: cfg.token_ttl_s as i64,
        }
    }

    fn mac(secret: &[u8], payload: &str) -> Vec<u8> {
        // HMAC takes keys of any length; this can't fail.
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length");
        mac.update(payload.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    pub fn sign(&self, claims: &AdmissionClaims) -> String {
        let payload = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
        let sig = B64.encode(Self::mac(&self.secrets[0], &payload));
        format!("v1.{payload}.{sig}")
    }

    /// A token for `fan` in `drop`, issued now and valid for the configured TTL, or until the
    /// session's hard end if that comes first: no token outlives its session.
    pub fn issue(
        &self,
        drop: &DropId,
        fan: &FanId,
        place: i64,
        session: Option<SessionEnds>,
    ) -> (String, AdmissionClaims) {
        let now = now_s();
        let mut exp = now + self.token_ttl_s;
        if let Some(s) = session {
            exp = exp.min(s.hard_end_ms.div_euclid(1000));
        }
        let claims = AdmissionClaims {
            drop: drop.to_string(),
            fan: fan.to_string(),
            place,
            iat: now,
            exp,
            jti: hex::encode(rand::random::<[u8; 8]>()),
            shop_end_ms: session.map(|s| s.shop_end_ms),
            hard_end_ms: session.map(|s| s.hard_end_ms),
        };
        (self.sign(&claims), claims)
    }

    /// Checks signature, expiry, drop and fan. Every failure is the same 403 `not_admitted`.
    pub fn verify(&self, token: &str, drop: &DropId, fan: &FanId) -> Result<AdmissionClaims> {
        let refuse = |why: &str| {
            Error::msg(
                Code::NotAdmitted,
                format!("Admission token refused: {why}."),
            )
        };
        let claims: AdmissionClaims = opened("v1", &self.secrets, token).map_err(refuse)?;
        if claims.exp <= now_s() {
            return Err(refuse("expired"));
        }
        if claims.drop != drop.as_str() {
            return Err(refuse("issued for another drop"));
        }
        if claims.fan != fan.as_str() {
            return Err(refuse("issued to another fan"));
        }
        Ok(claims)
    }

    /// A place receipt for a fan in a drop's line (see [`ReceiptClaims`]), signed with the
    /// receipts' own key.
    pub fn issue_receipt(&self, drop: &DropId, fan: &FanId, place: i64) -> String {
        let claims = ReceiptClaims {
            typ: RECEIPT_TYPE.into(),
            drop: drop.to_string(),
            fan: fan.to_string(),
            place,
            iat_ms: now_ms(),
        };
        let payload = B64.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let sig = B64.encode(Self::mac(&self.receipt_keys[0], &payload));
        format!("r1.{payload}.{sig}")
    }

    /// Checks a place receipt's signature, type, drop and fan: 422 `invalid_request` otherwise
    /// (a receipt doesn't expire; what it is still good for, lua/join.lua decides).
    pub fn verify_receipt(
        &self,
        receipt: &str,
        drop: &DropId,
        fan: &FanId,
    ) -> Result<ReceiptClaims> {
        let refuse = |why: &str| Error::invalid(format!("The place receipt is refused: {why}."));
        let claims: ReceiptClaims = opened("r1", &self.receipt_keys, receipt).map_err(refuse)?;
        if claims.typ != RECEIPT_TYPE {
            return Err(refuse("not a place receipt"));
        }
        if claims.drop != drop.as_str() || claims.fan != fan.as_str() {
            return Err(refuse("issued for another drop or fan"));
        }
        Ok(claims)
    }
}

/// The type tag every place receipt carries: a token of another kind never passes for one.
const RECEIPT_TYPE: &str = "place";

/// What a place receipt says: this fan held this place in this drop's line at `iat_ms` (the
/// server's clock). The waiting room hands a fresh one with each standing it tells a waiter; after
/// Redis lost the line the fan's page presents it, and the place comes back (lua/join.lua).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptClaims {
    pub typ: String,
    pub drop: String,
    pub fan: String,
    pub place: i64,
    pub iat_ms: i64,
}

/// The receipts' key from an admission secret: its own key (a receipt signed with it is no
/// admission token, and the other way round), derived, so every instance with the same secrets
/// agrees without another setting.
fn receipt_key(secret: &[u8]) -> Vec<u8> {
    AdmissionKeys::mac(secret, "floodgate place receipt key v1")
}

/// The claims of `<prefix>.<base64url JSON>.<base64url HMAC-SHA256>` signed with any of `keys`.
fn opened<T: serde::de::DeserializeOwned>(
    prefix: &str,
    keys: &[Vec<u8>],
    token: &str,
) -> std::result::Result<T, &'static str> {
    let mut parts = token.split('.');
    let (Some(p), Some(payload), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed");
    };
    if p != prefix {
        return Err("malformed");
    }
    let sig = B64.decode(sig).map_err(|_| "malformed")?;
    let signed = keys.iter().any(|key| {
        // HMAC takes keys of any length; this can't fail.
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
        mac.update(payload.as_bytes());
        mac.verify_slice(&sig).is_ok()
    });
    if !signed {
        return Err("bad signature");
    }
    serde_json::from_slice(&B64.decode(payload).map_err(|_| "malformed")?).map_err(|_| "malformed")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(secrets: &[&str]) -> AdmissionKeys {
        AdmissionKeys::new(&AdmissionConfig {
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            token_ttl_s: 60,
        })
    }

    #[test]
    fn admission_token_is_bound_to_drop_and_fan() {
        let k = keys(&["s1"]);
        let drop = DropId::generate();
        let fan = FanId::parse("alice").unwrap();
        let (token, _) = k.issue(&drop, &fan, 7, None);
        assert_eq!(k.verify(&token, &drop, &fan).unwrap().place, 7);
        assert!(k.verify(&token, &DropId::generate(), &fan).is_err());
        assert!(k
            .verify(&token, &drop, &FanId::parse("bob").unwrap())
            .is_err());
        let mut forged = token.clone();
        forged.pop();
        forged.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(k.verify(&forged, &drop, &fan).is_err());
    }

    #[test]
    fn admission_token_carries_the_session_and_never_outlives_it() {
        let k = keys(&["s1"]);
        let drop = DropId::generate();
        let fan = FanId::parse("alice").unwrap();
        let session = SessionEnds {
            shop_end_ms: (now_s() + 5) * 1000,
            hard_end_ms: (now_s() + 20) * 1000 + 999,
        };
        let (token, claims) = k.issue(&drop, &fan, 7, Some(session));
        assert_eq!(
            claims.exp,
            now_s() + 20,
            "capped at the hard end, not the 60 s TTL"
        );
        let verified = k.verify(&token, &drop, &fan).unwrap();
        assert_eq!(verified.session(), Some(session));
        let (_, claims) = k.issue(&drop, &fan, 7, None);
        assert_eq!((claims.exp - claims.iat, claims.session()), (60, None));
    }

    #[test]
    fn a_place_receipt_is_bound_to_drop_and_fan_and_is_no_admission_token() {
        let k = keys(&["s1"]);
        let drop = DropId::generate();
        let fan = FanId::parse("alice").unwrap();
        let receipt = k.issue_receipt(&drop, &fan, 42);
        let claims = k.verify_receipt(&receipt, &drop, &fan).unwrap();
        assert_eq!((claims.place, claims.typ.as_str()), (42, "place"));
        assert!(k
            .verify_receipt(&receipt, &DropId::generate(), &fan)
            .is_err());
        assert!(k
            .verify_receipt(&receipt, &drop, &FanId::parse("bob").unwrap())
            .is_err());
        assert!(keys(&["s2"]).verify_receipt(&receipt, &drop, &fan).is_err());
        // Neither passes for the other, even re-labelled: the keys differ.
        let (token, _) = k.issue(&drop, &fan, 42, None);
        assert!(k.verify_receipt(&token, &drop, &fan).is_err());
        assert!(k
            .verify_receipt(&token.replacen("v1.", "r1.", 1), &drop, &fan)
            .is_err());
        assert!(k.verify(&receipt, &drop, &fan).is_err());
        assert!(k
            .verify(&receipt.replacen("r1.", "v1.", 1), &drop, &fan)
            .is_err());
    }

    #[test]
    fn rotation_accepts_old_and_new_secret() {
        let old = keys(&["old"]);
        let rotating = keys(&["new", "old"]);
        let drop = DropId::generate();
        let fan = FanId::parse("alice").unwrap();
        let (token, _) = old.issue(&drop, &fan, 1, None);
        assert!(rotating.verify(&token, &drop, &fan).is_ok());
        let (token, _) = rotating.issue(&drop, &fan, 1, None);
        assert!(old.verify(&token, &drop, &fan).is_err());
    }

    #[test]
    fn expired_admission_token_is_refused() {
        let k = keys(&["s"]);
        let drop = DropId::generate();
        let fan = FanId::parse("alice").unwrap();
        let claims = AdmissionClaims {
            drop: drop.to_string(),
            fan: fan.to_string(),
            place: 1,
            iat: now_s() - 100,
            exp: now_s() - 1,
            jti: "x".into(),
            ..Default::default()
        };
        assert_eq!(
            k.verify(&k.sign(&claims), &drop, &fan).unwrap_err().code,
            Code::NotAdmitted
        );
    }
}
