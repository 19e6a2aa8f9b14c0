//! User activity counters and a last-k list, from JSON interaction events.
//!
//! Input payload: `{"user_id": "u1", "item_id": "i9", "type": "click" | "view", "ts": 1700000000000}`
//! (`ts` optional: the event's timestamp is used without it). Other event types are ignored.
//!
//! Writes, for the entity named by `entity_field`:
//! - `clicks` / `views`: +1 per click / view event;
//! - `<list_feature>` (default `last_viewed`): the last `last_k` values of `list_field`
//!   seen in view events, newest first.
//!
//! The same module serves a user group (`entity_field: user_id`, list of items) and an item
//! group (`entity_field: item_id`, list of viewers) with different configs.

use feature_host_plugin_sdk::prelude::*;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Payload field holding the entity id.
    pub entity_field: String,
    /// Payload field whose values go into the last-k list.
    pub list_field: String,
    /// Name of the last-k list feature.
    pub list_feature: String,
    /// Length of the last-k list.
    pub last_k: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            entity_field: "user_id".into(),
            list_field: "item_id".into(),
            list_feature: "last_viewed".into(),
            last_k: 20,
        }
    }
}

pub struct UserActivity {
    config: Config,
}

impl Plugin for UserActivity {
    type Config = Option<Config>;

    fn new(config: Option<Config>) -> Result<Self, String> {
        let config = config.unwrap_or_default();
        if config.last_k == 0 || config.last_k > 1000 {
            return Err(format!(
                "last_k must be within 1..=1000, got {}",
                config.last_k
            ));
        }
        Ok(UserActivity { config })
    }

    fn process(&mut self, event: &Event, out: &mut Writes) -> Result<(), EventError> {
        let body: serde_json::Map<String, serde_json::Value> = event.json()?;
        let field = |name: &str| -> Result<&str, EventError> {
            match body.get(name) {
                Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s),
                Some(other) => Err(EventError::invalid(format!(
                    "`{name}` must be a non-empty string, got {other}"
                ))),
                None => Err(EventError::invalid(format!("missing field `{name}`"))),
            }
        };
        let kind = field("type")?;
        if kind != "click" && kind != "view" {
            return Ok(());
        }
        let entity = field(&self.config.entity_field)?;
        if let Some(ts) = body.get("ts") {
            let ts = ts.as_i64().ok_or_else(|| {
                EventError::invalid(format!("`ts` must be epoch milliseconds, got {ts}"))
            })?;
            out.at(ts);
        }
        if kind == "click" {
            out.entity(entity).incr("clicks", 1_i64);
        } else {
            let item = field(&self.config.list_field)?.to_owned();
            out.entity(entity).incr("views", 1_i64).append(
                &self.config.list_feature,
                item,
                self.config.last_k,
            );
        }
        Ok(())
    }
}

export_plugin!(UserActivity);

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin() -> UserActivity {
        UserActivity::new(None).unwrap()
    }

    #[test]
    fn view_counts_and_appends() {
        let e = Event::for_test(br#"{"type":"view","user_id":"u1","item_id":"i9"}"#).at(5);
        let w = plugin().run(&e).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].op, Op::Incr(Value::Int(1)));
        assert_eq!(
            w[1].op,
            Op::Append {
                item: "i9".into(),
                cap: 20
            }
        );
        assert!(w.iter().all(|w| w.entity == "u1" && w.event_time_ms == 5));
    }

    #[test]
    fn click_counts_with_payload_time() {
        let e = Event::for_test(br#"{"type":"click","user_id":"u1","ts":99}"#);
        let w = plugin().run(&e).unwrap();
        assert_eq!(
            w,
            vec![Write {
                entity: "u1".into(),
                feature: "clicks".into(),
                op: Op::Incr(1_i64.into()),
                event_time_ms: 99
            }]
        );
    }

    #[test]
    fn other_types_are_ignored_and_garbage_is_invalid() {
        assert!(
            plugin()
                .run(&Event::for_test(br#"{"type":"purchase","user_id":"u1"}"#))
                .unwrap()
                .is_empty()
        );
        assert!(matches!(
            plugin().run(&Event::for_test(b"nope")),
            Err(EventError::Invalid(_))
        ));
        assert!(
            matches!(plugin().run(&Event::for_test(br#"{"type":"view"}"#)), Err(EventError::Invalid(m)) if m.contains("user_id"))
        );
    }

    #[test]
    fn item_config_keys_by_item() {
        let cfg = Config {
            entity_field: "item_id".into(),
            list_field: "user_id".into(),
            list_feature: "last_viewers".into(),
            last_k: 5,
        };
        let mut p = UserActivity::new(Some(cfg)).unwrap();
        let w = p
            .run(&Event::for_test(
                br#"{"type":"view","user_id":"u1","item_id":"i9"}"#,
            ))
            .unwrap();
        assert_eq!(w[1].entity, "i9");
        assert_eq!(w[1].feature, "last_viewers");
    }

    #[test]
    fn rejects_bad_config() {
        assert!(
            UserActivity::new(Some(Config {
                last_k: 0,
                ..Config::default()
            }))
            .is_err()
        );
    }
}
