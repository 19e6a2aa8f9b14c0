//! Article state from database change-data-capture events (Debezium's envelope).
//!
//! Input payload: `{"before": {...} | null, "after": {...} | null, "op": "c" | "u" | "d" | "r",
//! "ts_ms": 1700000000000}`, optionally wrapped as `{"payload": {...}}` (Debezium's JSON
//! converter with schemas enabled). A Kafka tombstone (empty payload, sent after a delete
//! for log compaction) writes nothing.
//!
//! Writes, for the entity named by the row's `id_field` (default `id`):
//! - create / update / snapshot read (`c`, `u`, `r`): `price` (float), `status` and
//!   `category` (strings) from `after`, at the change's `ts_ms`; a column that is null
//!   deletes its feature;
//! - delete (`d`): deletes all three (tombstones, so a late update cannot resurrect them).
//!
//! Event time is the database commit time (`ts_ms`), so replays and out-of-order delivery
//! settle on the newest row state.

use feature_host_plugin_sdk::prelude::*;
use serde::Deserialize;
use serde_json::Value as Json;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Primary-key column of the articles table.
    pub id_field: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            id_field: "id".into(),
        }
    }
}

pub struct ArticleCdc {
    config: Config,
}

#[derive(Deserialize)]
struct Change {
    #[serde(default)]
    before: Option<serde_json::Map<String, Json>>,
    #[serde(default)]
    after: Option<serde_json::Map<String, Json>>,
    op: String,
    #[serde(default)]
    ts_ms: Option<i64>,
}

/// The features this plugin maintains.
const FEATURES: [&str; 3] = ["price", "status", "category"];

impl ArticleCdc {
    fn id(&self, row: &serde_json::Map<String, Json>) -> Result<String, EventError> {
        match row.get(&self.config.id_field) {
            Some(Json::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Json::Number(n)) => Ok(n.to_string()),
            other => Err(EventError::invalid(format!(
                "row key `{}` must be a string or number, got {}",
                self.config.id_field,
                other.map_or("nothing".into(), Json::to_string)
            ))),
        }
    }
}

impl Plugin for ArticleCdc {
    type Config = Option<Config>;

    fn new(config: Option<Config>) -> Result<Self, String> {
        let config = config.unwrap_or_default();
        if config.id_field.is_empty() {
            return Err("id_field must not be empty".into());
        }
        Ok(ArticleCdc { config })
    }

    fn process(&mut self, event: &Event, out: &mut Writes) -> Result<(), EventError> {
        if event.payload.is_empty() {
            return Ok(()); // compaction tombstone
        }
        let mut body: Json = event.json()?;
        if let Some(inner) = body.get_mut("payload").map(Json::take) {
            body = inner;
        }
        let change: Change = serde_json::from_value(body)
            .map_err(|e| EventError::invalid(format!("not a Debezium change event: {e}")))?;
        if let Some(ts) = change.ts_ms {
            out.at(ts);
        }
        match change.op.as_str() {
            "c" | "u" | "r" => {
                let row = change.after.ok_or_else(|| {
                    EventError::invalid(format!("op {:?} without `after`", change.op))
                })?;
                let id = self.id(&row)?;
                let mut w = out.entity(&id);
                w = match row.get("price") {
                    Some(Json::Number(n)) => w.set("price", n.as_f64().unwrap_or_default()),
                    // Decimal columns often arrive as strings.
                    Some(Json::String(s)) => w.set(
                        "price",
                        s.parse::<f64>().map_err(|_| {
                            EventError::invalid(format!("price {s:?} is not a number"))
                        })?,
                    ),
                    Some(Json::Null) | None => w.delete("price"),
                    Some(other) => {
                        return Err(EventError::invalid(format!(
                            "price must be a number, got {other}"
                        )));
                    }
                };
                for f in ["status", "category"] {
                    w = match row.get(f) {
                        Some(Json::String(s)) => w.set(f, s.as_str()),
                        Some(Json::Null) | None => w.delete(f),
                        Some(other) => {
                            return Err(EventError::invalid(format!(
                                "{f} must be a string, got {other}"
                            )));
                        }
                    };
                }
                Ok(())
            }
            "d" => {
                let row = change
                    .before
                    .ok_or_else(|| EventError::invalid("delete without `before`"))?;
                let id = self.id(&row)?;
                let mut w = out.entity(&id);
                for f in FEATURES {
                    w = w.delete(f);
                }
                Ok(())
            }
            "t" => Ok(()), // truncate: no row to act on
            other => Err(EventError::invalid(format!("unknown op {other:?}"))),
        }
    }
}

export_plugin!(ArticleCdc);

#[cfg(test)]
mod tests {
    use super::*;

    fn run(payload: &str) -> Result<Vec<Write>, EventError> {
        ArticleCdc::new(None)
            .unwrap()
            .run(&Event::for_test(payload.as_bytes()).at(1))
    }

    #[test]
    fn update_sets_columns_at_commit_time() {
        let w = run(r#"{"op":"u","ts_ms":42,"before":null,"after":{"id":7,"price":"9.50","status":"live","category":null}}"#).unwrap();
        assert_eq!(w.len(), 3);
        assert!(w.iter().all(|w| w.entity == "7" && w.event_time_ms == 42));
        assert_eq!(w[0].op, Op::Set(Value::Float(9.5)));
        assert_eq!(w[1].op, Op::Set("live".into()));
        assert_eq!(w[2].op, Op::Delete);
    }

    #[test]
    fn delete_tombstones_every_feature_and_envelopes_unwrap() {
        let w =
            run(r#"{"payload":{"op":"d","ts_ms":5,"before":{"id":"a1"},"after":null}}"#).unwrap();
        assert_eq!(w.len(), 3);
        assert!(w.iter().all(|w| w.op == Op::Delete && w.entity == "a1"));
        assert!(run("").unwrap().is_empty());
    }

    #[test]
    fn malformed_changes_are_invalid() {
        for bad in [
            "not json",
            r#"{"op":"x","after":{"id":1}}"#,
            r#"{"op":"c"}"#,
            r#"{"op":"c","after":{"price":1}}"#,
            r#"{"op":"c","after":{"id":1,"price":"cheap"}}"#,
        ] {
            assert!(matches!(run(bad), Err(EventError::Invalid(_))), "{bad}");
        }
    }
}
