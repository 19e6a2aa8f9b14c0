//! Handing a failed event to its group's retry or dead-letter topic, inside the consumer's
//! open transaction ([`super::transaction`]), with the fallbacks that keep one unpublishable
//! event from holding its partition forever.
//!
//! **Guarantee.** When [`hand_off`] returns [`HandOff::Done`], the broker acknowledged a
//! record for the event in the open transaction — in the retry topic, else in the
//! dead-letter topic, else (a payload the dead-letter topic refuses as too large) a *stub*
//! there: the event's key, headers and source position with an empty payload and
//! `fh-payload-dropped-bytes`, so an operator can find the original in its source topic.
//! Only then may the source offset finish; the record and the commit that finishes it are
//! committed together.
//!
//! **A refusal outlives the transaction it broke.** Kafka cannot drop one record from a
//! transaction: a record the broker refuses fails the whole transaction
//! ([`HandOff::Abort`]), which is aborted and redone from the last commit. The refusal is
//! kept in [`Refusals`] by group and event, so when the event comes back it goes straight
//! to its fallback and the next transaction succeeds.
//!
//! **Limit.** A dead-letter topic that refuses even the stub (the host is not authorized to
//! write it, say) is tried again with a growing backoff (5 s doubling to 5 minutes):
//! nothing is dropped, the partition's low watermark waits, reading stops at the in-flight
//! bounds, and each try that the broker refuses aborts the open transaction (every
//! partition redoes what it did since its last commit; the stores deduplicate it).
//! `fh_handoff_refusals_total` counts every permanent refusal; `fh_retries_total` and
//! `fh_dead_letters_total` count hand-offs when their transaction commits.

use super::envelope::{self, Envelope};
use super::kafka::{Published, Republisher, too_large};
use crate::event::Event;
use crate::metrics::{GroupLabels, Metrics};
use crate::spec::GroupDef;
use rdkafka::error::RDKafkaErrorCode;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where the event goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Retry,
    DeadLetter,
}

/// How a hand-off ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandOff {
    /// A record for the event is in the open transaction.
    Done,
    /// The partition was revoked first: nothing may finish.
    GaveUp,
    /// The open transaction failed (this reason) and must be aborted.
    Abort(String),
    /// The dead-letter topic refuses this event; try again after this long.
    Wait(Duration),
}

/// Header carrying the size of a payload left out of a dead-letter stub.
pub const PAYLOAD_DROPPED: &str = "fh-payload-dropped-bytes";

/// Refusals remembered past the entries' transactions; more are not kept (forgetting one
/// costs one more aborted transaction, not an event).
const MAX_REMEMBERED: usize = 10_000;

type EventKey = (String, String, i32, i64);

/// What the brokers refused, per group and event, until the event's hand-off is committed.
#[derive(Debug, Default)]
pub struct Refusals {
    events: Mutex<HashMap<EventKey, Refused>>,
    /// Handed off in the open transaction, and where to: counted and their refusals
    /// forgotten when it commits; if it aborts the events come back, and their fallbacks
    /// must not be learnt again.
    handed_off: Mutex<Vec<(EventKey, Destination)>>,
}

#[derive(Debug, Clone, Default)]
struct Refused {
    /// The retry topic refused it: dead-letter it instead.
    retry: Option<RDKafkaErrorCode>,
    /// The dead-letter topic refused its payload as too large: send the stub.
    too_large: Option<RDKafkaErrorCode>,
    /// The dead-letter topic refuses it altogether: not before `next`.
    blocked: Option<Blocked>,
}

#[derive(Debug, Clone, Copy)]
struct Blocked {
    code: RDKafkaErrorCode,
    next: Instant,
    backoff: Duration,
}

impl Refusals {
    fn get(&self, key: &EventKey) -> Refused {
        self.lock().get(key).cloned().unwrap_or_default()
    }

    fn update(&self, key: &EventKey, f: impl FnOnce(&mut Refused)) {
        let mut events = self.lock();
        if events.len() >= MAX_REMEMBERED && !events.contains_key(key) {
            events.clear();
        }
        f(events.entry(key.clone()).or_default());
    }

    fn handed_off(&self, key: &EventKey, to: Destination) {
        self.handed_off
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((key.clone(), to));
    }

    /// The open transaction committed: its events' refusals are history. Returns each
    /// hand-off's group and destination.
    pub fn committed(&self) -> Vec<(String, Destination)> {
        let done = std::mem::take(&mut *self.handed_off.lock().unwrap_or_else(|p| p.into_inner()));
        let mut events = self.lock();
        done.into_iter()
            .map(|(key, to)| {
                events.remove(&key);
                (key.0, to)
            })
            .collect()
    }

    /// The open transaction aborted: its events come back, with what was learnt.
    pub fn aborted(&self) {
        self.handed_off
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<EventKey, Refused>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Publish `event` with `env` to `first`, falling back as the module docs say.
#[allow(clippy::too_many_arguments)]
pub async fn hand_off(
    republisher: &Republisher,
    refusals: &Refusals,
    metrics: &Metrics,
    def: &GroupDef,
    event: &Event,
    mut env: Envelope,
    first: Destination,
    fenced: &impl Fn() -> bool,
) -> HandOff {
    let key: EventKey = (
        def.name.clone(),
        event.topic.clone(),
        event.partition,
        event.offset,
    );
    let known = refusals.get(&key);
    let labels = GroupLabels::new(&def.name);
    let refused = || metrics.handoff_refusals.get_or_create(&labels).inc();
    if first == Destination::Retry {
        let mut retry_refusal = known.retry;
        if retry_refusal.is_none() {
            let headers = envelope::wrap(event, &env);
            match republisher
                .publish(&def.retry_topic, event, &headers, fenced)
                .await
            {
                Published::Acknowledged => {
                    metrics.transaction_pending_records.inc();
                    refusals.handed_off(&key, Destination::Retry);
                    return HandOff::Done;
                }
                Published::GaveUp => return HandOff::GaveUp,
                Published::Refused(code) => {
                    refused();
                    retry_refusal = Some(code);
                }
                Published::Aborts {
                    refused: Some(code),
                    reason,
                } => {
                    refused();
                    refusals.update(&key, |r| r.retry = Some(code));
                    return HandOff::Abort(reason);
                }
                Published::Aborts { reason, .. } => return HandOff::Abort(reason),
            }
        }
        if let Some(code) = retry_refusal {
            env.due_ms = None;
            env.error = format!(
                "{} (dead-lettered: the retry topic {} refused it: {code})",
                env.error, def.retry_topic
            );
            tracing::warn!(group = %def.name, topic = %event.topic, partition = event.partition,
                offset = event.offset, %code, "retry topic refused the hand-off; dead-lettering");
        }
    }
    if let Some(b) = known.blocked {
        let left = b.next.saturating_duration_since(Instant::now());
        if !left.is_zero() {
            tracing::debug!(group = %def.name, topic = %def.dead_letter_topic, code = %b.code, ?left,
                "the dead-letter topic refused this event; waiting before the next try");
            return HandOff::Wait(left);
        }
    }
    let mut too_large_code = known.too_large;
    loop {
        let stub = too_large_code.map(|code| {
            (
                Event {
                    payload: Vec::new(),
                    ..event.clone()
                },
                code,
            )
        });
        let mut env = env.clone();
        let record = match &stub {
            Some((s, code)) => {
                env.error = format!(
                    "{}; payload of {} bytes left out: the dead-letter topic {} refused it ({code}); the original is at its source position",
                    env.error,
                    event.payload.len(),
                    def.dead_letter_topic
                );
                s
            }
            None => event,
        };
        let mut headers = envelope::wrap(record, &env);
        if stub.is_some() {
            headers.push((
                PAYLOAD_DROPPED.to_owned(),
                event.payload.len().to_string().into_bytes(),
            ));
        }
        let block = |code: RDKafkaErrorCode| {
            let mut backoff = Duration::from_secs(5);
            refusals.update(&key, |r| {
                if let Some(b) = r.blocked {
                    backoff = (b.backoff * 2).min(Duration::from_secs(300));
                }
                r.blocked = Some(Blocked {
                    code,
                    next: Instant::now() + backoff,
                    backoff,
                });
            });
            tracing::error!(group = %def.name, topic = %def.dead_letter_topic, %code, retry_in = ?backoff,
                "the dead-letter topic refuses the hand-off; trying again later (the source offset stays uncommitted)");
            backoff
        };
        match republisher
            .publish(&def.dead_letter_topic, record, &headers, fenced)
            .await
        {
            Published::Acknowledged => {
                metrics.transaction_pending_records.inc();
                refusals.handed_off(&key, Destination::DeadLetter);
                return HandOff::Done;
            }
            Published::GaveUp => return HandOff::GaveUp,
            Published::Refused(code) if stub.is_none() && too_large(code) => {
                refused();
                too_large_code = Some(code);
            }
            Published::Aborts {
                refused: Some(code),
                reason,
            } if stub.is_none() && too_large(code) => {
                refused();
                refusals.update(&key, |r| r.too_large = Some(code));
                return HandOff::Abort(reason);
            }
            Published::Refused(code) => {
                refused();
                return HandOff::Wait(block(code));
            }
            Published::Aborts {
                refused: Some(code),
                reason,
            } => {
                refused();
                block(code);
                return HandOff::Abort(reason);
            }
            Published::Aborts { reason, .. } => return HandOff::Abort(reason),
        }
    }
}
