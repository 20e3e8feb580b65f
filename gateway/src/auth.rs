//! Client tokens: HS256 JWTs with `sub` (a user id) and `exp`.
//!
//! Owns verification only. Any other algorithm, `alg: none` included, is
//! refused because the validation accepts HS256 alone.

use std::sync::Arc;

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use shared::ids::UserId;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Who a verified token speaks for, and until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
}

/// Checks tokens. Cloning shares the key and the validation rules (the
/// routes clone it for every request).
#[derive(Clone)]
pub struct Verifier(Arc<Keys>);

struct Keys {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn new(secret: &str) -> Verifier {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        // The contract uses `sub` and `exp` only. jsonwebtoken would refuse
        // any token carrying `aud` unless the gateway named an audience, so
        // a token minted for several services would fail here.
        validation.validate_aud = false;
        Verifier(Arc::new(Keys {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }))
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data =
            decode::<Claims>(token, &self.0.key, &self.0.validation).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let user = data
            .claims
            .sub
            .parse()
            .map_err(|_| AuthError::Invalid("sub is not a UUID".into()))?;
        Ok(Identity {
            user,
            exp: data.claims.exp,
        })
    }
}

/// The token of a request: `Authorization: Bearer` first, then `?token=`
/// (browsers cannot set headers on a WebSocket handshake). A non-Bearer
/// `Authorization` header (say, a proxy's Basic auth) does not hide the query.
pub fn token_from(header: Option<&str>, query_token: Option<&str>) -> Result<String, AuthError> {
    if let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")) {
        return Ok(token.trim().to_string());
    }
    match (query_token, header) {
        (Some(token), _) => Ok(token.to_string()),
        (None, Some(_)) => Err(AuthError::Invalid("Authorization must be `Bearer <token>`".into())),
        (None, None) => Err(AuthError::Missing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef";

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn token(alg: Algorithm, claims: serde_json::Value) -> String {
        encode(&Header::new(alg), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
    }

    #[test]
    fn a_valid_token_names_its_user() {
        let user = uuid::Uuid::new_v4();
        let id = Verifier::new(SECRET)
            .verify(&token(Algorithm::HS256, json!({"sub": user, "exp": now() + 60})))
            .unwrap();
        assert_eq!(id.user, user);
    }

    #[test]
    fn claims_beyond_sub_and_exp_are_ignored() {
        let user = uuid::Uuid::new_v4();
        let claims = json!({"sub": user, "exp": now() + 60, "aud": "chat", "iss": "auth", "iat": now()});
        let id = Verifier::new(SECRET).verify(&token(Algorithm::HS256, claims)).unwrap();
        assert_eq!(id.user, user);
    }

    #[test]
    fn expired_other_algorithms_and_alg_none_are_refused() {
        let v = Verifier::new(SECRET);
        let user = uuid::Uuid::new_v4();
        assert!(v
            .verify(&token(Algorithm::HS256, json!({"sub": user, "exp": now() - 1})))
            .is_err());
        assert!(v
            .verify(&token(Algorithm::HS384, json!({"sub": user, "exp": now() + 60})))
            .is_err());
        // alg: none, unsigned.
        use base64_like::b64;
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(format!(r#"{{"sub":"{user}","exp":{}}}"#, now() + 60).as_bytes())
        );
        assert!(v.verify(&none).is_err());
        assert!(v
            .verify(&token(Algorithm::HS256, json!({"sub": "bob", "exp": now() + 60})))
            .is_err());
    }

    mod base64_like {
        /// base64url without padding, enough to forge an `alg: none` token.
        pub fn b64(data: &[u8]) -> String {
            const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let mut out = String::new();
            for chunk in data.chunks(3) {
                let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
                let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
                for i in 0..=chunk.len() {
                    out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
                }
            }
            out
        }
    }
}
