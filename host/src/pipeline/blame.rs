//! The blame step: from the entities whose store write failed back to the events that wrote
//! them.
//!
//! The writer coalesces a batch's events per entity, so a store failure names an entity, not
//! an event. An event fails if any entity it wrote failed; its other entities did apply, and
//! when the event is tried again they find its position already applied, so nothing counts
//! twice — for events with a position: an HTTP push has none, and a retry re-applies its
//! other entities (pushes are at least once). Pure, so the rules are unit-tested.

use crate::dispatch::GroupId;
use crate::event::EventIdx;
use crate::retry::{Cause, Failure, FailureKind};
use crate::sink::SinkError;
use std::collections::{BTreeMap, HashMap};

/// The failures of group `group`'s events, one per event, in batch order. `failed` are the
/// entities (store keys) whose write failed; `writers`, the events that wrote each entity.
/// An event named by several failures takes the first that cannot succeed, if any
/// (retrying it would only delay its dead letter), else the first.
pub fn blame(
    group: GroupId,
    failed: &[(String, SinkError)],
    writers: &HashMap<String, Vec<EventIdx>>,
) -> Vec<Failure> {
    let mut by_event: BTreeMap<EventIdx, (FailureKind, &SinkError)> = BTreeMap::new();
    for (key, e) in failed {
        let kind = match e {
            SinkError::Rejected { .. } => FailureKind::Invalid,
            _ => FailureKind::Retryable,
        };
        for &i in writers.get(key).into_iter().flatten() {
            let slot = by_event.entry(i).or_insert((kind, e));
            if kind == FailureKind::Invalid && slot.0 != FailureKind::Invalid {
                *slot = (kind, e);
            }
        }
    }
    by_event
        .into_iter()
        .map(|(event, (kind, e))| Failure {
            event,
            group,
            kind,
            cause: Cause::Store,
            reason: format!("store write failed: {e}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: GroupId = GroupId::new(3);

    fn down() -> SinkError {
        SinkError::Unavailable {
            backend: "dynamodb",
            message: "timed out".into(),
        }
    }

    fn refused() -> SinkError {
        SinkError::Rejected {
            backend: "dynamodb",
            message: "item too large".into(),
        }
    }

    fn writers(of: &[(&str, &[usize])]) -> HashMap<String, Vec<EventIdx>> {
        of.iter()
            .map(|(k, es)| {
                (
                    k.to_string(),
                    es.iter().copied().map(EventIdx::new).collect(),
                )
            })
            .collect()
    }

    fn summary(failures: &[Failure]) -> Vec<(usize, FailureKind)> {
        failures.iter().map(|f| (f.event.index(), f.kind)).collect()
    }

    #[test]
    fn every_writer_of_a_failed_entity_fails_and_only_they() {
        let w = writers(&[("a", &[0, 2]), ("b", &[1])]);
        let f = blame(G, &[("a".into(), down())], &w);
        assert_eq!(
            summary(&f),
            [(0, FailureKind::Retryable), (2, FailureKind::Retryable)]
        );
        assert!(f.iter().all(|f| f.group == G && f.cause == Cause::Store));
        assert!(f[0].reason.contains("timed out"), "{}", f[0].reason);
        assert!(f[0].is_outage(), "waited out, never out of attempts");
    }

    #[test]
    fn an_event_fails_once_and_a_refusal_outranks_an_outage() {
        // Event 0 wrote both entities; the refusal comes second.
        let w = writers(&[("a", &[0]), ("b", &[0, 1])]);
        let f = blame(G, &[("a".into(), down()), ("b".into(), refused())], &w);
        assert_eq!(
            summary(&f),
            [(0, FailureKind::Invalid), (1, FailureKind::Invalid)]
        );
        assert!(f[0].reason.contains("item too large"), "{}", f[0].reason);
        // In the other order, the refusal stays.
        let f = blame(G, &[("b".into(), refused()), ("a".into(), down())], &w);
        assert_eq!(f[0].kind, FailureKind::Invalid);
    }

    /// Which item to look at is the first refused one's: the dead letter names one entity.
    #[test]
    fn of_two_refusals_the_first_is_named() {
        let other = SinkError::Rejected {
            backend: "dynamodb",
            message: "unreadable item".into(),
        };
        let w = writers(&[("a", &[0]), ("b", &[0])]);
        let f = blame(G, &[("a".into(), refused()), ("b".into(), other)], &w);
        assert_eq!(summary(&f), [(0, FailureKind::Invalid)]);
        assert!(f[0].reason.contains("item too large"), "{}", f[0].reason);
    }

    #[test]
    fn a_failure_of_an_entity_nobody_wrote_blames_nobody() {
        assert!(blame(G, &[("z".into(), down())], &writers(&[("a", &[0])])).is_empty());
        assert!(blame(G, &[], &writers(&[("a", &[0])])).is_empty());
    }
}
