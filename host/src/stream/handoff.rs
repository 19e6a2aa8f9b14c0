//! Handing a failed event to its group's retry or dead-letter topic, with the fallbacks that
//! keep one unpublishable event from holding its partition forever.
//!
//! **Guarantee.** When [`hand_off`] returns `true`, the broker acknowledged a record for the
//! event — in the retry topic, else in the dead-letter topic, else (a payload the
//! dead-letter topic refuses as too large) a *stub* there: the event's key, headers and
//! source position with an empty payload and `fh-payload-dropped-bytes`, so an operator can
//! find the original in its source topic. Only then may the source offset finish.
//!
//! **Limit.** A dead-letter topic that refuses even the stub (the host is not authorized to
//! write it, say) is retried with backoff until it accepts or the partition is revoked:
//! nothing is dropped, the partition's low watermark waits, and reading stops at the
//! in-flight bounds. `fh_handoff_refusals_total` counts every permanent refusal.

use super::envelope::{self, Envelope};
use super::kafka::{Published, Republisher, too_large};
use crate::event::Event;
use crate::metrics::{GroupLabels, Metrics};
use crate::spec::GroupDef;
use std::time::Duration;

/// Where the event goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Retry,
    DeadLetter,
}

/// Header carrying the size of a payload left out of a dead-letter stub.
pub const PAYLOAD_DROPPED: &str = "fh-payload-dropped-bytes";

/// Publish `event` with `env` to `first`, falling back as the module docs say. `false` when
/// `fenced` turned true first (the partition was revoked; nothing may finish).
pub async fn hand_off(
    republisher: &Republisher,
    metrics: &Metrics,
    def: &GroupDef,
    event: &Event,
    mut env: Envelope,
    first: Destination,
    fenced: &impl Fn() -> bool,
) -> bool {
    let labels = GroupLabels::new(&def.name);
    let refused = || metrics.handoff_refusals.get_or_create(&labels).inc();
    if first == Destination::Retry {
        match republisher
            .publish(
                &def.retry_topic,
                event,
                &envelope::wrap(event, &env),
                fenced,
            )
            .await
        {
            Published::Acknowledged => {
                metrics.retries.get_or_create(&labels).inc();
                return true;
            }
            Published::GaveUp => return false,
            Published::Refused(code) => {
                refused();
                env.due_ms = None;
                env.error = format!(
                    "{} (dead-lettered: the retry topic {} refused it: {code})",
                    env.error, def.retry_topic
                );
                tracing::warn!(group = %def.name, topic = %event.topic, partition = event.partition,
                    offset = event.offset, %code, "retry topic refused the hand-off; dead-lettering");
            }
        }
    }
    let mut stub: Option<Event> = None;
    let mut backoff = Duration::from_millis(500);
    loop {
        let record = stub.as_ref().unwrap_or(event);
        let mut headers = envelope::wrap(record, &env);
        if stub.is_some() {
            headers.push((
                PAYLOAD_DROPPED.to_owned(),
                event.payload.len().to_string().into_bytes(),
            ));
        }
        match republisher
            .publish(&def.dead_letter_topic, record, &headers, fenced)
            .await
        {
            Published::Acknowledged => {
                metrics.dead_letters.get_or_create(&labels).inc();
                return true;
            }
            Published::GaveUp => return false,
            Published::Refused(code) if stub.is_none() && too_large(code) => {
                refused();
                env.error = format!(
                    "{}; payload of {} bytes left out: the dead-letter topic {} refused it ({code}); the original is at its source position",
                    env.error,
                    event.payload.len(),
                    def.dead_letter_topic
                );
                stub = Some(Event {
                    payload: Vec::new(),
                    ..event.clone()
                });
            }
            Published::Refused(code) => {
                refused();
                tracing::error!(group = %def.name, topic = %def.dead_letter_topic, %code,
                    "the dead-letter topic refuses the hand-off; retrying (the source offset stays uncommitted)");
                if fenced() {
                    return false;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}
