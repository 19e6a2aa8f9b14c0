//! The check step: what one event's plugin call gave, as store mutations or a failure.
//!
//! Pure — no plugin runs and no store is touched here — so every rule is unit-tested. An event
//! is applied entirely or not at all: one bad write rejects the whole event, and the failure's
//! kind says whether trying it again can help (a plugin's own verdict, a trap or timeout that
//! may pass on another instance, or a write the spec forbids, which never will).

use crate::event::Event;
use crate::feature::{Mutation, Write, check_write};
use crate::plugin::{EventFailure, EventResult, PluginError};
use crate::retry::{Cause, FailureKind};
use crate::spec::FeatureGroupSpec;
use std::collections::BTreeMap;

/// Writes one event may produce: each becomes a store operation, and an event is applied
/// entirely or not at all, so one event must stay one bounded store transaction.
pub const MAX_WRITES_PER_EVENT: usize = 10_000;

/// Why one event failed before reaching the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub kind: FailureKind,
    pub cause: Cause,
    pub reason: String,
}

impl Rejected {
    fn plugin(kind: FailureKind, reason: String) -> Rejected {
        Rejected {
            kind,
            cause: Cause::Plugin,
            reason,
        }
    }
}

/// One mutation per entity the event writes, in entity order, each carrying the event's
/// position; or why the event fails.
pub type Checked = Result<Vec<(String, Mutation)>, Rejected>;

/// Check the result of the plugin call for `event` against the group's `spec`.
/// `overwrite` lets the writes replace newer values (a backfill's explicit override).
pub fn check_event(
    spec: &FeatureGroupSpec,
    event: &Event,
    called: Result<EventResult, PluginError>,
    overwrite: bool,
) -> Checked {
    let writes = match called {
        Ok(Ok(writes)) => writes,
        Err(e) => {
            let kind = if e.is_deterministic() {
                FailureKind::Invalid
            } else {
                FailureKind::Retryable
            };
            return Err(Rejected::plugin(kind, e.to_string()));
        }
        Ok(Err(EventFailure::Invalid(m))) => {
            return Err(Rejected::plugin(
                FailureKind::Invalid,
                format!("plugin rejected the event: {m}"),
            ));
        }
        Ok(Err(EventFailure::Retryable(m))) => {
            return Err(Rejected::plugin(
                FailureKind::Retryable,
                format!("plugin asked to retry: {m}"),
            ));
        }
    };
    to_mutations(spec, event, writes, overwrite).map_err(|reason| Rejected {
        kind: FailureKind::Invalid,
        cause: Cause::Check,
        reason,
    })
}

fn to_mutations(
    spec: &FeatureGroupSpec,
    event: &Event,
    writes: Vec<Write>,
    overwrite: bool,
) -> Result<Vec<(String, Mutation)>, String> {
    if writes.len() > MAX_WRITES_PER_EVENT {
        return Err(format!(
            "plugin produced {} writes for one event; at most {MAX_WRITES_PER_EVENT} are taken",
            writes.len()
        ));
    }
    let mut by_entity: BTreeMap<String, Mutation> = BTreeMap::new();
    for w in writes {
        let w = check_write(spec, w).map_err(|e| format!("plugin produced a bad write: {e}"))?;
        by_entity
            .entry(w.entity)
            .or_insert_with(|| Mutation {
                position: event.position.clone(),
                ops: Vec::new(),
                overwrite,
            })
            .ops
            .push((w.feature, w.op, w.event_time_ms));
    }
    Ok(by_entity.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feature::{Op, Position, Value};

    fn spec() -> FeatureGroupSpec {
        serde_json::from_value(serde_json::json!({
            "entity": "user",
            "features": [{"name": "clicks", "type": "int"}, {"name": "country", "type": "string"}],
            "plugin": {"wasm": "p.wasm"},
        }))
        .unwrap()
    }

    fn event() -> Event {
        Event {
            topic: "t".into(),
            partition: 0,
            offset: 7,
            key: None,
            timestamp_ms: 0,
            headers: vec![],
            payload: vec![],
            position: Some(Position::sequential("t#0", 0, 7)),
        }
    }

    fn write(entity: &str, feature: &str, op: Op) -> Write {
        Write {
            entity: entity.into(),
            feature: feature.into(),
            op,
            event_time_ms: 5,
        }
    }

    fn rejected(checked: Checked) -> Rejected {
        checked.expect_err("the event fails")
    }

    #[test]
    fn writes_become_one_mutation_per_entity_carrying_the_position() {
        let ok = check_event(
            &spec(),
            &event(),
            Ok(Ok(vec![
                write("u2", "clicks", Op::Incr(Value::Int(1))),
                write("u1", "clicks", Op::Incr(Value::Int(2))),
                write("u2", "country", Op::Set(Value::String("de".into()))),
            ])),
            true,
        )
        .unwrap();
        let entities: Vec<&str> = ok.iter().map(|(e, _)| e.as_str()).collect();
        assert_eq!(entities, ["u1", "u2"]);
        let (_, u2) = &ok[1];
        assert_eq!(u2.position, event().position);
        assert!(u2.overwrite);
        let features: Vec<&str> = u2.ops.iter().map(|(f, _, _)| f.as_str()).collect();
        assert_eq!(features, ["clicks", "country"], "in the plugin's order");
    }

    #[test]
    fn one_bad_write_rejects_the_whole_event() {
        let r = rejected(check_event(
            &spec(),
            &event(),
            Ok(Ok(vec![
                write("u1", "clicks", Op::Incr(Value::Int(1))),
                write("u1", "nope", Op::Incr(Value::Int(1))),
            ])),
            false,
        ));
        assert_eq!((r.kind, r.cause), (FailureKind::Invalid, Cause::Check));
        assert!(
            r.reason.contains("bad write") && r.reason.contains("nope"),
            "{r:?}"
        );
    }

    #[test]
    fn too_many_writes_are_refused_with_the_count() {
        let many = vec![write("u", "clicks", Op::Incr(Value::Int(1))); MAX_WRITES_PER_EVENT + 1];
        let r = rejected(check_event(&spec(), &event(), Ok(Ok(many)), false));
        assert_eq!((r.kind, r.cause), (FailureKind::Invalid, Cause::Check));
        assert!(r.reason.contains("10001 writes"), "{}", r.reason);
    }

    #[test]
    fn the_plugins_verdict_decides_the_kind() {
        let invalid = rejected(check_event(
            &spec(),
            &event(),
            Ok(Err(EventFailure::Invalid("no user".into()))),
            false,
        ));
        assert_eq!(
            invalid,
            Rejected::plugin(
                FailureKind::Invalid,
                "plugin rejected the event: no user".into()
            )
        );
        let retry = rejected(check_event(
            &spec(),
            &event(),
            Ok(Err(EventFailure::Retryable("later".into()))),
            false,
        ));
        assert_eq!(
            retry,
            Rejected::plugin(
                FailureKind::Retryable,
                "plugin asked to retry: later".into()
            )
        );
    }

    /// A trap may pass on a fresh instance; output over the limit never will.
    #[test]
    fn a_failed_call_is_retried_unless_it_would_fail_the_same_way() {
        let trap = PluginError::Trap {
            plugin: "p@1".into(),
            message: "unreachable".into(),
        };
        let r = rejected(check_event(&spec(), &event(), Err(trap), false));
        assert_eq!((r.kind, r.cause), (FailureKind::Retryable, Cause::Plugin));
        let big = PluginError::OutputTooLarge {
            plugin: "p@1".into(),
            limit_mb: 4,
        };
        let r = rejected(check_event(&spec(), &event(), Err(big), false));
        assert_eq!((r.kind, r.cause), (FailureKind::Invalid, Cause::Plugin));
    }

    #[test]
    fn no_writes_is_no_mutation() {
        assert_eq!(
            check_event(&spec(), &event(), Ok(Ok(vec![])), false),
            Ok(vec![])
        );
    }
}
