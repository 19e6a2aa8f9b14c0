//! Kafka plumbing shared by the consumer, the bench and the tests: client configuration,
//! topic creation, message conversion, and acknowledged republishing (retry and dead-letter
//! topics). The consumer itself is [`super::consumer`].

use super::oauth::{TokenCounters, TokenSource};
use crate::config::{KafkaAuth, RunSettings};
use crate::event::Event;
use crate::feature::Position;
use anyhow::Context as _;
use rdkafka::admin::AdminClient;
use rdkafka::client::{ClientContext, OAuthToken};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::sync::Arc;
use std::time::Duration;

/// Client settings and what every client needs besides them (the OAUTHBEARER tokens).
#[derive(Clone)]
pub struct KafkaClient {
    pub cfg: ClientConfig,
    pub tokens: Option<Arc<Tokens>>,
}

/// OAUTHBEARER tokens and their counters.
#[derive(Debug)]
pub struct Tokens {
    pub source: TokenSource,
    pub counters: TokenCounters,
}

impl From<ClientConfig> for KafkaClient {
    fn from(cfg: ClientConfig) -> KafkaClient {
        KafkaClient { cfg, tokens: None }
    }
}

impl KafkaClient {
    /// From the process settings: `FH_KAFKA_PROPERTIES`, and with `FH_KAFKA_AUTH=msk-iam`
    /// SASL_SSL + OAUTHBEARER with tokens from the AWS default credential chain (with
    /// `oauth-unsecured`, OAUTHBEARER with unsigned tokens: local brokers only). `counters`
    /// count the tokens handed to librdkafka.
    pub async fn from_settings(
        settings: &RunSettings,
        brokers: &str,
        counters: TokenCounters,
    ) -> anyhow::Result<KafkaClient> {
        let mut cfg = client_config(settings, brokers)?;
        let source = match settings.kafka_auth {
            KafkaAuth::Properties => None,
            KafkaAuth::MskIam => {
                cfg.set("security.protocol", "SASL_SSL")
                    .set("sasl.mechanism", "OAUTHBEARER");
                Some(TokenSource::MskIam(
                    super::msk_iam::MskIam::from_env().await?,
                ))
            }
            KafkaAuth::OauthUnsecured => {
                if cfg.get("security.protocol").is_none() {
                    cfg.set("security.protocol", "SASL_PLAINTEXT");
                }
                cfg.set("sasl.mechanism", "OAUTHBEARER");
                Some(TokenSource::Unsecured {
                    principal: settings.kafka_oauth_principal.clone(),
                    lifetime: settings.kafka_oauth_lifetime,
                })
            }
        };
        Ok(KafkaClient {
            cfg,
            tokens: source.map(|source| Arc::new(Tokens { source, counters })),
        })
    }

    pub fn context(&self) -> KafkaContext {
        KafkaContext {
            tokens: self.tokens.clone(),
            last_error: Arc::default(),
        }
    }

    /// An admin client that can authenticate.
    ///
    /// rust-rdkafka's `AdminClient` never serves librdkafka's OAUTHBEARER refresh requests
    /// (its poll thread reads only the admin results; fede1024/rust-rdkafka#757), so with
    /// OAUTHBEARER (MSK IAM) it would never authenticate. It gets one token here instead,
    /// set on its handle: enough for the host's admin calls, which take seconds (a token
    /// lives 15 minutes on MSK).
    pub fn admin(&self) -> anyhow::Result<AdminClient<KafkaContext>> {
        let admin: AdminClient<KafkaContext> = self
            .cfg
            .create_with_context(self.context())
            .context("cannot create a Kafka admin client")?;
        if let Some(tokens) = &self.tokens {
            let token = oauth_token(Some(tokens))
                .map_err(|e| anyhow::anyhow!("cannot make an OAUTHBEARER token: {e}"))?;
            set_token(admin.inner().native_ptr(), &token)?;
        }
        Ok(admin)
    }
}

/// `rd_kafka_oauthbearer_set_token` on a client handle.
fn set_token(rk: *mut rdkafka::bindings::rd_kafka_t, token: &OAuthToken) -> anyhow::Result<()> {
    use std::ffi::{CStr, CString};
    let value = CString::new(token.token.as_str()).context("token holds a NUL byte")?;
    let principal =
        CString::new(token.principal_name.as_str()).context("principal holds a NUL byte")?;
    let mut err = [0 as std::ffi::c_char; 512];
    // SAFETY: `rk` is a live client handle (the admin client owns it for the whole call),
    // the strings are NUL-terminated and outlive the call, no extensions are passed, and
    // `err` is a writable buffer of the given size.
    let code = unsafe {
        rdkafka::bindings::rd_kafka_oauthbearer_set_token(
            rk,
            value.as_ptr(),
            token.lifetime_ms,
            principal.as_ptr(),
            std::ptr::null_mut(),
            0,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if code != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        // SAFETY: librdkafka wrote a NUL-terminated message into `err`.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) };
        anyhow::bail!(
            "librdkafka refused the OAUTHBEARER token: {}",
            msg.to_string_lossy()
        );
    }
    Ok(())
}

/// The context of the host's producers, admin clients and side consumers: answers
/// librdkafka's OAUTHBEARER token refreshes, and keeps the last client error so that a
/// failed call can say why (an authentication failure, say) instead of only "transport
/// failure".
#[derive(Clone, Default)]
pub struct KafkaContext {
    tokens: Option<Arc<Tokens>>,
    last_error: Arc<std::sync::Mutex<Option<String>>>,
}

impl KafkaContext {
    /// The last error librdkafka reported for this client, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ClientContext for KafkaContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        _config: Option<&str>,
    ) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        oauth_token(self.tokens.as_deref())
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::error!(target: "librdkafka", %error, "{reason}");
        // "All brokers down" follows the error that says why (authentication, TLS, refused).
        if error.rdkafka_error_code() != Some(rdkafka::error::RDKafkaErrorCode::AllBrokersDown) {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_owned());
        }
    }
}

impl ConsumerContext for KafkaContext {}

/// For handles that only read metadata (nothing is delivered through them).
impl rdkafka::producer::ProducerContext for KafkaContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}

/// A token for librdkafka, or why there is none (librdkafka retries, and reports it as a
/// client error).
pub fn oauth_token(tokens: Option<&Tokens>) -> Result<OAuthToken, Box<dyn std::error::Error>> {
    let tokens = tokens.ok_or(
        "OAUTHBEARER needs FH_KAFKA_AUTH=msk-iam or oauth-unsecured (or a sasl.oauthbearer.config)",
    )?;
    match tokens.source.token() {
        Ok(t) => {
            tokens.counters.issued.inc();
            tracing::debug!(principal = %t.principal, expires_ms = t.expires_ms, "OAUTHBEARER token issued");
            Ok(OAuthToken {
                token: t.value,
                principal_name: t.principal,
                lifetime_ms: t.expires_ms,
            })
        }
        Err(e) => {
            tokens.counters.failed.inc();
            tracing::warn!(error = %format!("{e:#}"), "cannot issue an OAUTHBEARER token; the client retries");
            Err(format!("{e:#}").into())
        }
    }
}

/// Client configuration shared by the consumer, producer and admin client.
pub fn client_config(settings: &RunSettings, brokers: &str) -> anyhow::Result<ClientConfig> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers);
    for (n, kv) in settings
        .kafka_properties
        .expose()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .enumerate()
    {
        // Never echoed: an entry may be (part of) a password.
        let (k, v) = kv.split_once('=').with_context(|| {
            format!(
                "FH_KAFKA_PROPERTIES entry {} is not key=value (entries are separated by commas; values are not shown)",
                n + 1
            )
        })?;
        cfg.set(k.trim(), v.trim());
    }
    Ok(cfg)
}

/// The host's event for a consumed message; its position is the message's own.
pub fn to_event(m: &BorrowedMessage<'_>) -> Event {
    Event {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
        headers: m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default(),
        payload: m.payload().unwrap_or_default().to_vec(),
        position: Some(Position::sequential(m.topic(), m.partition(), m.offset())),
    }
}

/// Publishes events to retry and dead-letter topics and waits for the acknowledgement —
/// inside the consumer's open transaction ([`super::transaction`]) or, for `dlq replay`,
/// on its own.
#[derive(Clone)]
pub struct Republisher {
    producer: FutureProducer<KafkaContext>,
    transactional: bool,
}

impl Republisher {
    /// A plain idempotent producer: each record is acknowledged on its own.
    pub fn new(client: &KafkaClient) -> anyhow::Result<Republisher> {
        Republisher::create(client.cfg.clone(), client, false, Duration::from_secs(30))
    }

    /// A transactional producer with `transactional_id` whose transactions the broker aborts
    /// `timeout` after they were opened unless committed (a crashed host's open one included).
    /// [`super::transaction::Transactions::start`] opens the first transaction.
    pub fn transactional(
        client: &KafkaClient,
        transactional_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<Republisher> {
        let mut cfg = client.cfg.clone();
        cfg.set("transactional.id", transactional_id)
            .set("transaction.timeout.ms", timeout.as_millis().to_string());
        Republisher::create(cfg, client, true, timeout)
    }

    /// `delivery_timeout`: how long the client tries to deliver a record (librdkafka
    /// requires at most the transaction timeout).
    fn create(
        mut cfg: ClientConfig,
        client: &KafkaClient,
        transactional: bool,
        delivery_timeout: Duration,
    ) -> anyhow::Result<Republisher> {
        let producer = cfg
            // Idempotent: the client's own resends after a lost acknowledgement are not
            // appended twice (acks=all comes with it).
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set(
                "message.timeout.ms",
                delivery_timeout
                    .min(Duration::from_secs(30))
                    .as_millis()
                    .to_string(),
            )
            .create_with_context(client.context())
            .context("cannot create Kafka producer")?;
        Ok(Republisher {
            producer,
            transactional,
        })
    }

    pub fn producer(&self) -> &FutureProducer<KafkaContext> {
        &self.producer
    }

    /// Publish `event`'s key and payload with `headers` to `topic`, stamped with the time of
    /// the hand-off (the event time travels in `headers`: see [`super::envelope`]).
    ///
    /// A permanent refusal ([`permanent`]: too large for the topic, not authorized, an
    /// invalid record) returns at once — resending would never succeed and would hold the
    /// partition's low watermark forever. Otherwise a plain producer retries with backoff
    /// until the broker acknowledges, or `give_up` turns true (the partition was revoked and
    /// will be re-read). A transactional one makes one attempt: a failed delivery fails the
    /// whole transaction, which is aborted and redone ([`Published::Aborts`]).
    pub async fn publish(
        &self,
        topic: &str,
        event: &Event,
        headers: &[(String, Vec<u8>)],
        give_up: impl Fn() -> bool,
    ) -> Published {
        let mut h = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut record = FutureRecord::to(topic)
                .payload(&event.payload)
                .timestamp(crate::sink::unix_now_ms())
                .headers(h.clone());
            if let Some(k) = &event.key {
                record = record.key(k);
            }
            // Refused when queued (the client's own size check, say): nothing entered the
            // transaction, so a fallback may follow in it.
            let delivery = match self.producer.send_result(record) {
                Ok(d) => d,
                Err((e, _)) => match e.rdkafka_error_code().filter(|c| permanent(*c)) {
                    Some(code) => {
                        tracing::error!(error = %e, topic, "the client refused the republish for good");
                        return Published::Refused(code);
                    }
                    // A transaction that takes no more records (it failed, or the producer
                    // is fenced) or a full queue behind one: waiting would hold the
                    // transaction's gate for ever; it is aborted and redone instead.
                    None if self.transactional => {
                        tracing::error!(error = %e, topic, "republish not queued; its transaction is aborted and redone");
                        return Published::Aborts {
                            refused: None,
                            reason: e.to_string(),
                        };
                    }
                    None => {
                        tracing::warn!(error = %e, topic, "republish not queued; retrying");
                        if give_up() {
                            return Published::GaveUp;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        continue;
                    }
                },
            };
            let failed = match delivery.await {
                Ok(Ok(_)) => return Published::Acknowledged,
                Ok(Err((e, _))) => e,
                Err(_canceled) => rdkafka::error::KafkaError::Canceled,
            };
            let code = failed.rdkafka_error_code();
            let refused = code.filter(|c| permanent(*c));
            if self.transactional {
                tracing::error!(error = %failed, topic, "republish failed; its transaction is aborted and redone");
                return Published::Aborts {
                    refused,
                    reason: failed.to_string(),
                };
            }
            if let Some(code) = refused {
                tracing::error!(error = %failed, topic, "the broker refused the republish for good");
                return Published::Refused(code);
            }
            tracing::error!(error = %failed, topic, "republish failed; retrying (the source offset stays uncommitted)");
            if give_up() {
                return Published::GaveUp;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}

/// How a republish ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    Acknowledged,
    /// The caller stopped waiting (revoke): nothing is known about the message.
    GaveUp,
    /// The broker (or the client, for an oversized record) will never accept it; nothing
    /// else was affected.
    Refused(RDKafkaErrorCode),
    /// Transactional only: the delivery failed, and with it the open transaction, which must
    /// be aborted. `refused`: the broker will never accept this record.
    Aborts {
        refused: Option<RDKafkaErrorCode>,
        reason: String,
    },
}

/// Produce errors that no resend can cure.
pub fn permanent(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::PolicyViolation
    )
}

/// Refusals a smaller record would not get: the payload is what is too large.
pub fn too_large(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(code, C::MessageSizeTooLarge | C::InvalidMessageSize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        run: RunSettings,
    }

    #[test]
    fn only_refusals_no_resend_can_cure_are_permanent() {
        use RDKafkaErrorCode as C;
        for code in [
            C::MessageSizeTooLarge,
            C::TopicAuthorizationFailed,
            C::InvalidRecord,
        ] {
            assert!(permanent(code), "{code:?}");
        }
        for code in [
            C::NotEnoughReplicas,
            C::LeaderNotAvailable,
            C::MessageTimedOut,
            C::RequestTimedOut,
            C::UnknownTopicOrPartition,
        ] {
            assert!(!permanent(code), "{code:?} is worth resending");
        }
        assert!(too_large(C::MessageSizeTooLarge) && !too_large(C::TopicAuthorizationFailed));
    }

    #[tokio::test]
    async fn msk_iam_turns_on_sasl_oauthbearer_and_properties_pass_through() {
        let w = Wrapper::parse_from([
            "x",
            "--kafka-auth",
            "msk-iam",
            "--kafka-properties",
            "client.id=fh, socket.timeout.ms=5000",
        ]);
        let c = KafkaClient::from_settings(&w.run, "b-1:9098", TokenCounters::default())
            .await
            .unwrap();
        assert_eq!(c.cfg.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(c.cfg.get("sasl.mechanism"), Some("OAUTHBEARER"));
        assert_eq!(c.cfg.get("client.id"), Some("fh"));
        assert_eq!(c.cfg.get("bootstrap.servers"), Some("b-1:9098"));
        assert!(matches!(
            c.tokens.as_deref().map(|t| &t.source),
            Some(TokenSource::MskIam(_))
        ));

        let plain = Wrapper::parse_from(["x"]);
        let c = KafkaClient::from_settings(&plain.run, "k:9092", TokenCounters::default())
            .await
            .unwrap();
        assert_eq!(c.cfg.get("sasl.mechanism"), None);
        let refused = oauth_token(None).err().unwrap().to_string();
        assert!(refused.contains("FH_KAFKA_AUTH=msk-iam"), "{refused}");
        let bad = Wrapper::parse_from(["x", "--kafka-properties", "novalue"]);
        let e = KafkaClient::from_settings(&bad.run, "k:9092", TokenCounters::default())
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("not key=value"), "{e}");
    }
}
