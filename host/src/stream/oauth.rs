//! SASL/OAUTHBEARER tokens for every Kafka client of the host. librdkafka asks for a token
//! when a client starts and again before the current one expires (at 80 % of its lifetime);
//! with the broker's `connections.max.reauth.ms` each connection then re-authenticates with
//! the new one. [`super::kafka::KafkaContext`] answers those requests from a [`TokenSource`].
//!
//! - [`TokenSource::MskIam`]: Amazon MSK IAM, SigV4-signed ([`super::msk_iam`]).
//! - [`TokenSource::Unsecured`]: an unsigned JWS (`alg: none`), what Kafka's default
//!   OAUTHBEARER validator (`OAuthBearerUnsecuredValidatorCallbackHandler`) accepts. For local
//!   development and the tests, which exercise the same refresh path against a real broker;
//!   never point it at a cluster that trusts such tokens in production.

use super::msk_iam::MskIam;
use base64::Engine as _;
use prometheus_client::metrics::counter::Counter;
use std::time::{Duration, SystemTime};

/// Where OAUTHBEARER tokens come from.
#[derive(Debug)]
pub enum TokenSource {
    MskIam(MskIam),
    Unsecured {
        principal: String,
        lifetime: Duration,
    },
}

/// A token for librdkafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub value: String,
    pub principal: String,
    /// Expiry, in ms since the epoch.
    pub expires_ms: i64,
}

impl TokenSource {
    pub fn token(&self) -> anyhow::Result<Token> {
        match self {
            TokenSource::MskIam(iam) => {
                let (value, principal, expires_ms) = iam.token()?;
                Ok(Token {
                    value,
                    principal,
                    expires_ms,
                })
            }
            TokenSource::Unsecured {
                principal,
                lifetime,
            } => Ok(unsecured_token(principal, SystemTime::now(), *lifetime)),
        }
    }
}

/// Tokens handed out and refused, for `fh_kafka_oauth_tokens_total` /
/// `fh_kafka_oauth_token_failures_total`.
#[derive(Debug, Clone, Default)]
pub struct TokenCounters {
    pub issued: Counter,
    pub failed: Counter,
}

/// An unsecured JWS for `principal`, issued at `now`, valid for `lifetime`.
pub fn unsecured_token(principal: &str, now: SystemTime, lifetime: Duration) -> Token {
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let iat = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let exp = iat + lifetime;
    let header = b64(&serde_json::json!({"alg": "none"}));
    let claims = b64(&serde_json::json!({
        "sub": principal,
        "iat": iat.as_secs_f64(),
        "exp": exp.as_secs_f64(),
    }));
    Token {
        value: format!("{header}.{claims}."),
        principal: principal.to_owned(),
        expires_ms: exp.as_millis() as i64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unsecured_token_is_an_unsigned_jws_with_sub_and_expiry() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let t = unsecured_token("feature-host", at, Duration::from_secs(30));
        let parts: Vec<&str> = t.value.split('.').collect();
        assert_eq!(parts.len(), 3, "{}", t.value);
        assert_eq!(parts[2], "", "no signature");
        let decode = |s: &str| -> serde_json::Value {
            serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(s)
                    .unwrap(),
            )
            .unwrap()
        };
        assert_eq!(decode(parts[0]), serde_json::json!({"alg": "none"}));
        let claims = decode(parts[1]);
        assert_eq!(claims["sub"], "feature-host");
        assert_eq!(claims["exp"].as_f64(), Some(1_800_000_030.0));
        assert_eq!(t.expires_ms, 1_800_000_030_000);
        assert_eq!(t.principal, "feature-host");
    }
}
