//! Amazon MSK IAM authentication: SASL/OAUTHBEARER with a token signed (SigV4, service
//! `kafka-cluster`) from the AWS default credential chain — environment, profile, or the
//! pod's IRSA role. librdkafka asks for a new token before the current one expires
//! ([`crate::stream::kafka::KafkaContext`] answers it from here).
//!
//! The token is the base64url (unpadded) form of a presigned
//! `https://kafka.<region>.amazonaws.com/?Action=kafka-cluster%3AConnect` URL valid for 15
//! minutes, as MSK and AWS's own signer libraries expect.

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials as _, SharedCredentialsProvider};
use aws_sigv4::http_request::{
    SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign,
};
use aws_sigv4::sign::v4;
use base64::Engine as _;
use std::time::{Duration, SystemTime};

/// How long a signed token is valid.
const LIFETIME: Duration = Duration::from_secs(900);

/// Signs MSK IAM tokens with the credentials the AWS default chain resolves.
pub struct MskIam {
    region: String,
    credentials: SharedCredentialsProvider,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for MskIam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MskIam")
            .field("region", &self.region)
            .finish()
    }
}

impl MskIam {
    /// From the AWS default chain (region from `AWS_REGION`, else `us-east-1`).
    pub async fn from_env() -> anyhow::Result<MskIam> {
        let config = crate::app::aws_config().await;
        let credentials = config.credentials_provider().ok_or_else(|| {
            anyhow::anyhow!("FH_KAFKA_AUTH=msk-iam: no AWS credentials provider is configured")
        })?;
        Ok(MskIam {
            region: config
                .region()
                .map_or_else(|| "us-east-1".to_owned(), |r| r.to_string()),
            credentials,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// A fresh token: `(token, principal, expiry in ms since the epoch)`. Called from
    /// librdkafka's thread (not a tokio worker), so it may wait for the credentials.
    pub fn token(&self) -> anyhow::Result<(String, String, i64)> {
        let creds = self
            .runtime
            .block_on(self.credentials.provide_credentials())
            .map_err(|e| anyhow::anyhow!("cannot resolve AWS credentials for MSK IAM: {e}"))?;
        let now = SystemTime::now();
        let token = sign_token(&creds, &self.region, now)?;
        let expires = now + LIFETIME;
        let ms = expires
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Ok((token, creds.access_key_id().to_owned(), ms))
    }
}

/// The MSK IAM token for `creds` in `region` at `now`.
pub fn sign_token(creds: &Credentials, region: &str, now: SystemTime) -> anyhow::Result<String> {
    let url = format!("https://kafka.{region}.amazonaws.com/?Action=kafka-cluster%3AConnect");
    let host = format!("kafka.{region}.amazonaws.com");
    let identity = creds.clone().into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(LIFETIME);
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("kafka-cluster")
        .time(now)
        .settings(settings)
        .build()?
        .into();
    let request = SignableRequest::new(
        "GET",
        url.as_str(),
        std::iter::once(("host", host.as_str())),
        SignableBody::Bytes(&[]),
    )?;
    let (instructions, _) = sign(request, &params)?.into_parts();
    let mut signed = url.clone();
    for (name, value) in instructions.params() {
        signed.push('&');
        signed.push_str(name);
        signed.push('=');
        signed.push_str(&percent_encode(value));
    }
    signed.push_str("&User-Agent=feature-host");
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signed))
}

/// RFC 3986 unreserved characters stay; everything else is %-encoded (as SigV4 canonical
/// query strings are).
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_a_presigned_connect_url() {
        let creds = Credentials::new(
            "AKIDEXAMPLE",
            "secret",
            Some("session".into()),
            None,
            "test",
        );
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_000_000);
        let token = sign_token(&creds, "eu-west-1", at).unwrap();
        assert!(!token.contains('=') && !token.contains('+') && !token.contains('/'));
        let url = String::from_utf8(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(&token)
                .unwrap(),
        )
        .unwrap();
        assert!(
            url.starts_with(
                "https://kafka.eu-west-1.amazonaws.com/?Action=kafka-cluster%3AConnect&"
            ),
            "{url}"
        );
        for part in [
            "X-Amz-Algorithm=AWS4-HMAC-SHA256",
            "X-Amz-Credential=AKIDEXAMPLE%2F20251124%2Feu-west-1%2Fkafka-cluster%2Faws4_request",
            "X-Amz-Date=20251124T160000Z",
            "X-Amz-Expires=900",
            "X-Amz-SignedHeaders=host",
            "X-Amz-Security-Token=session",
            "User-Agent=feature-host",
        ] {
            assert!(url.contains(part), "{part} missing from {url}");
        }
        let sig = url.split("X-Amz-Signature=").nth(1).unwrap();
        let sig = sig.split('&').next().unwrap();
        assert_eq!(sig.len(), 64);
        assert!(sig.bytes().all(|b| b.is_ascii_hexdigit()));
        // Deterministic for the same inputs; a different secret signs differently.
        assert_eq!(token, sign_token(&creds, "eu-west-1", at).unwrap());
        let other = Credentials::new("AKIDEXAMPLE", "other", Some("session".into()), None, "t");
        assert_ne!(token, sign_token(&other, "eu-west-1", at).unwrap());
    }
}
