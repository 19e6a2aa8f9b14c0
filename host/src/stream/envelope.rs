//! What the host adds to an event it republishes to a retry or dead-letter topic, and how a
//! retry worker reads it back.
//!
//! The republished message keeps the original key, payload and headers, plus `fh-*` headers:
//! the group it failed for, the error, the attempt count, the first failure time, when it is
//! due again, the original topic/partition/offset and the event time. A plugin processing a
//! retried event sees the original headers plus `fh-attempts`, and the original timestamp.
//!
//! **Why the event time is a header.** The republished record is stamped with the time of
//! the hand-off, not the event's: Kafka's time-based retention (`retention.ms`) goes by record
//! timestamps, so a dead letter or retry of an event older than the topic's retention — a
//! replay of history, a CDC snapshot, a lagging producer — would be deleted as soon as its
//! segment rolls, after its source offset was committed.

use crate::event::Event;
use crate::retry::FailureKind;

/// Header names.
pub mod headers {
    pub const GROUP: &str = "fh-group";
    pub const ERROR: &str = "fh-error";
    pub const ERROR_KIND: &str = "fh-error-kind";
    /// Failed attempts so far.
    pub const ATTEMPTS: &str = "fh-attempts";
    pub const FIRST_FAILURE_MS: &str = "fh-first-failure-ms";
    /// Retry topic only: not to be processed before (ms since the epoch).
    pub const DUE_MS: &str = "fh-due-ms";
    pub const SOURCE_TOPIC: &str = "fh-source-topic";
    pub const SOURCE_PARTITION: &str = "fh-source-partition";
    pub const SOURCE_OFFSET: &str = "fh-source-offset";
    /// The event's own timestamp (ms since the epoch); the record's is the hand-off time.
    pub const EVENT_TIME_MS: &str = "fh-event-time-ms";
    /// A dead letter re-injected by `dlq replay`: `<topic>/<partition>/<offset>` of the dead
    /// letter. Kept through later retries; the event's position for exactly-once effect.
    pub const REPLAY_OF: &str = "fh-replay-of";
}

/// Headers the host owns; stripped from an event before it is wrapped again (except the
/// replay identity, which stays with the event).
const PREFIX: &str = "fh-";

fn host_owned(name: &str) -> bool {
    name.starts_with(PREFIX) && name != headers::REPLAY_OF
}

/// Remove every `fh-*` header from an event read from a source (a source topic, a file, an
/// HTTP push). Those headers are the host's: on a source event they are forged, and a forged
/// `fh-replay-of` would give the event a dead letter's replay position — taking that dead
/// letter's place, so its real replay is dropped as already applied — and make every
/// distinct value a new entry in the entity's applied positions. Returns how many were
/// removed.
pub fn strip_host_headers(headers: &mut Vec<(String, Vec<u8>)>) -> usize {
    let before = headers.len();
    headers.retain(|(k, _)| !k.starts_with(PREFIX));
    before - headers.len()
}

/// [`strip_host_headers`] of a consumed source message, cloned only when it has some.
pub fn from_source(event: &std::sync::Arc<Event>) -> std::sync::Arc<Event> {
    if !event.headers.iter().any(|(k, _)| k.starts_with(PREFIX)) {
        return event.clone();
    }
    let mut clean = (**event).clone();
    let removed = strip_host_headers(&mut clean.headers);
    tracing::debug!(topic = %event.topic, partition = event.partition, offset = event.offset,
        removed, "a source event carried fh-* headers; they were removed");
    std::sync::Arc::new(clean)
}

/// Why and how often an event failed for one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub group: String,
    pub kind: FailureKind,
    pub error: String,
    pub attempts: u32,
    pub first_failure_ms: i64,
    pub due_ms: Option<i64>,
}

/// The longest `fh-error` a hand-off carries: reasons come from plugins and stores, and a
/// header without a bound could push a record past the topic's size limit.
pub const MAX_ERROR_BYTES: usize = 1024;

pub use crate::text::truncate;

/// The headers of the republished message.
pub fn wrap(event: &Event, env: &Envelope) -> Vec<(String, Vec<u8>)> {
    let mut h: Vec<(String, Vec<u8>)> = event
        .headers
        .iter()
        .filter(|(k, _)| !host_owned(k))
        .cloned()
        .collect();
    let mut put = |k: &str, v: String| h.push((k.to_owned(), v.into_bytes()));
    put(headers::GROUP, env.group.clone());
    put(headers::ERROR, truncate(&env.error, MAX_ERROR_BYTES));
    put(headers::ERROR_KIND, env.kind.as_str().to_owned());
    put(headers::ATTEMPTS, env.attempts.to_string());
    put(headers::FIRST_FAILURE_MS, env.first_failure_ms.to_string());
    if let Some(due) = env.due_ms {
        put(headers::DUE_MS, due.to_string());
    }
    put(headers::SOURCE_TOPIC, event.topic.clone());
    put(headers::SOURCE_PARTITION, event.partition.to_string());
    put(headers::SOURCE_OFFSET, event.offset.to_string());
    put(headers::EVENT_TIME_MS, event.timestamp_ms.to_string());
    h
}

/// Read a republished message back: the original event (original topic, partition, offset
/// and headers, plus `fh-attempts`) and its envelope. `message` is the message as consumed
/// from the retry topic; the caller sets the returned event's position.
pub fn unwrap(message: &Event) -> Result<(Event, Envelope), String> {
    let text = |k: &str| -> Result<&str, String> {
        let v = message
            .header(k)
            .ok_or_else(|| format!("missing header {k}"))?;
        std::str::from_utf8(v).map_err(|_| format!("header {k} is not UTF-8"))
    };
    let num = |k: &str| -> Result<i64, String> {
        text(k)?
            .parse()
            .map_err(|e| format!("header {k} is not a number: {e}"))
    };
    let kind = match text(headers::ERROR_KIND)? {
        "invalid" => FailureKind::Invalid,
        "retryable" => FailureKind::Retryable,
        other => {
            return Err(format!(
                "header {} has unknown kind {other:?}",
                headers::ERROR_KIND
            ));
        }
    };
    let env = Envelope {
        group: text(headers::GROUP)?.to_owned(),
        kind,
        error: text(headers::ERROR)?.to_owned(),
        attempts: u32::try_from(num(headers::ATTEMPTS)?)
            .map_err(|_| format!("header {} out of range", headers::ATTEMPTS))?,
        first_failure_ms: num(headers::FIRST_FAILURE_MS)?,
        due_ms: message
            .header(headers::DUE_MS)
            .map(|_| num(headers::DUE_MS))
            .transpose()?,
    };
    let mut original_headers: Vec<(String, Vec<u8>)> = message
        .headers
        .iter()
        .filter(|(k, _)| !host_owned(k))
        .cloned()
        .collect();
    original_headers.push((
        headers::ATTEMPTS.to_owned(),
        env.attempts.to_string().into_bytes(),
    ));
    let event = Event {
        topic: text(headers::SOURCE_TOPIC)?.to_owned(),
        partition: i32::try_from(num(headers::SOURCE_PARTITION)?)
            .map_err(|_| format!("header {} out of range", headers::SOURCE_PARTITION))?,
        offset: num(headers::SOURCE_OFFSET)?,
        key: message.key.clone(),
        // Hand-offs written before the header existed carry the event time as their own.
        timestamp_ms: message
            .header(headers::EVENT_TIME_MS)
            .map(|_| num(headers::EVENT_TIME_MS))
            .transpose()?
            .unwrap_or(message.timestamp_ms),
        headers: original_headers,
        payload: message.payload.clone(),
        position: None,
    };
    Ok((event, env))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event {
            topic: "web".into(),
            partition: 3,
            offset: 42,
            key: Some(b"u1".to_vec()),
            timestamp_ms: 1_700_000_000_000,
            headers: vec![("type".into(), b"click".to_vec())],
            payload: b"{}".to_vec(),
            position: None,
        }
    }

    #[test]
    fn a_source_event_keeps_none_of_the_hosts_headers() {
        let mut e = event();
        e.headers.extend([
            (headers::REPLAY_OF.into(), b"g.dlq/0/5".to_vec()),
            (headers::ATTEMPTS.into(), b"7".to_vec()),
            ("fh-anything".into(), vec![]),
        ]);
        let clean = from_source(&std::sync::Arc::new(e));
        assert_eq!(clean.headers, vec![("type".into(), b"click".to_vec())]);
        let plain = std::sync::Arc::new(event());
        assert!(std::sync::Arc::ptr_eq(&from_source(&plain), &plain));
    }

    #[test]
    fn wrap_then_unwrap_round_trips() {
        let env = Envelope {
            group: "users".into(),
            kind: FailureKind::Retryable,
            error: "store down".into(),
            attempts: 2,
            first_failure_ms: 5,
            due_ms: Some(9),
        };
        let mut msg = event();
        msg.topic = "users.retry".into();
        msg.offset = 7;
        msg.timestamp_ms = 1_800_000_000_000; // the hand-off's time, not the event's
        msg.headers = wrap(&event(), &env);
        let (back, env2) = unwrap(&msg).unwrap();
        assert_eq!(env2, env);
        assert_eq!(
            back.timestamp_ms,
            event().timestamp_ms,
            "the event time is restored"
        );
        assert_eq!(
            (back.topic.as_str(), back.partition, back.offset),
            ("web", 3, 42)
        );
        assert_eq!(back.header("type"), Some(&b"click"[..]));
        assert_eq!(back.header(headers::ATTEMPTS), Some(&b"2"[..]));
        assert_eq!(
            back.header(headers::ERROR),
            None,
            "host headers are not passed on"
        );
        // Wrapping again replaces the host headers instead of piling them up.
        let again = wrap(&back, &Envelope { attempts: 3, ..env });
        assert_eq!(
            again.iter().filter(|(k, _)| k == headers::ATTEMPTS).count(),
            1
        );
    }

    #[test]
    fn hand_offs_written_without_the_event_time_header_keep_their_record_time() {
        let env = Envelope {
            group: "g".into(),
            kind: FailureKind::Retryable,
            error: "e".into(),
            attempts: 1,
            first_failure_ms: 0,
            due_ms: None,
        };
        let mut msg = event();
        msg.headers = wrap(&event(), &env);
        msg.headers.retain(|(k, _)| k != headers::EVENT_TIME_MS);
        msg.timestamp_ms = 123;
        assert_eq!(unwrap(&msg).unwrap().0.timestamp_ms, 123);
        msg.headers
            .push((headers::EVENT_TIME_MS.into(), b"soon".to_vec()));
        assert!(unwrap(&msg).unwrap_err().contains(headers::EVENT_TIME_MS));
    }

    #[test]
    fn a_long_reason_is_cut_to_a_bounded_header() {
        let env = Envelope {
            group: "g".into(),
            kind: FailureKind::Invalid,
            error: "é".repeat(5_000),
            attempts: 1,
            first_failure_ms: 0,
            due_ms: None,
        };
        let h = wrap(&event(), &env);
        let error = &h.iter().find(|(k, _)| k == headers::ERROR).unwrap().1;
        assert!(error.len() <= MAX_ERROR_BYTES, "{}", error.len());
        let text = std::str::from_utf8(error).expect("cut on a character boundary");
        assert!(text.ends_with('…'));
        assert_eq!(truncate("short", 10), "short");
    }

    #[test]
    fn unwrap_names_the_bad_header() {
        let mut msg = event();
        assert!(
            unwrap(&msg)
                .unwrap_err()
                .contains("missing header fh-error-kind")
        );
        msg.headers = wrap(
            &event(),
            &Envelope {
                group: "g".into(),
                kind: FailureKind::Retryable,
                error: "e".into(),
                attempts: 1,
                first_failure_ms: 0,
                due_ms: None,
            },
        );
        for (k, v) in msg.headers.iter_mut() {
            if k == headers::SOURCE_OFFSET {
                *v = b"x".to_vec();
            }
        }
        assert!(
            unwrap(&msg)
                .unwrap_err()
                .contains("fh-source-offset is not a number")
        );
    }
}
