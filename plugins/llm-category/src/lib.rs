//! Category predictions from an LLM classification service, passed through when the model
//! is confident enough.
//!
//! Input payload: `{"item_id": "i1", "category": "sports", "confidence": 0.91,
//! "model": "gpt-x-2025-06", "ts": 1700000000000}` (`ts` optional).
//!
//! Writes, for the entity named by `entity_field`: `category`, `category_confidence` and
//! `category_model` — only when `confidence >= min_confidence`. A prediction below the
//! threshold is not an error (the model said "not sure"): it writes nothing and keeps the
//! previous category. A label outside `labels` (when configured) or a confidence outside
//! 0..=1 is invalid: the service is misbehaving and a human should look at the dead letter.

use feature_host_plugin_sdk::prelude::*;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Lowest confidence written.
    pub min_confidence: f64,
    /// Payload field holding the entity id.
    #[serde(default = "default_entity_field")]
    pub entity_field: String,
    /// The taxonomy; empty accepts any label.
    #[serde(default)]
    pub labels: Vec<String>,
}

fn default_entity_field() -> String {
    "item_id".into()
}

#[derive(Deserialize)]
struct Prediction {
    category: String,
    confidence: f64,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    ts: Option<i64>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

pub struct LlmCategory {
    config: Config,
}

impl Plugin for LlmCategory {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if !(0.0..=1.0).contains(&config.min_confidence) {
            return Err(format!(
                "min_confidence must be within 0..=1, got {}",
                config.min_confidence
            ));
        }
        Ok(LlmCategory { config })
    }

    fn process(&mut self, event: &Event, out: &mut Writes) -> Result<(), EventError> {
        let p: Prediction = event.json()?;
        let entity = match p.rest.get(&self.config.entity_field) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            _ => {
                return Err(EventError::invalid(format!(
                    "missing string field `{}`",
                    self.config.entity_field
                )));
            }
        };
        if !(0.0..=1.0).contains(&p.confidence) {
            return Err(EventError::invalid(format!(
                "confidence {} is outside 0..=1",
                p.confidence
            )));
        }
        if !self.config.labels.is_empty() && !self.config.labels.contains(&p.category) {
            return Err(EventError::invalid(format!(
                "category {:?} is not in the taxonomy",
                p.category
            )));
        }
        if p.confidence < self.config.min_confidence {
            feature_host_plugin_sdk::log::debug(&format!(
                "{entity}: {} at {:.2} is below {:.2}, not written",
                p.category, p.confidence, self.config.min_confidence
            ));
            return Ok(());
        }
        if let Some(ts) = p.ts {
            out.at(ts);
        }
        let mut w = out
            .entity(&entity)
            .set("category", p.category)
            .set("category_confidence", p.confidence);
        if let Some(model) = p.model {
            w = w.set("category_model", model);
        }
        let _ = w;
        Ok(())
    }
}

export_plugin!(LlmCategory);

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin() -> LlmCategory {
        LlmCategory::new(Config {
            min_confidence: 0.8,
            entity_field: "item_id".into(),
            labels: vec!["sports".into(), "news".into()],
        })
        .unwrap()
    }

    #[test]
    fn confident_predictions_are_written_others_skipped() {
        let ok = Event::for_test(br#"{"item_id":"i1","category":"news","confidence":0.9,"ts":3}"#);
        let w = plugin().run(&ok).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].op, Op::Set("news".into()));
        assert_eq!(w[1].op, Op::Set(Value::Float(0.9)));
        let unsure = Event::for_test(br#"{"item_id":"i1","category":"news","confidence":0.5}"#);
        assert!(plugin().run(&unsure).unwrap().is_empty());
    }

    #[test]
    fn off_taxonomy_or_out_of_range_is_invalid() {
        for bad in [
            &br#"{"item_id":"i1","category":"cats","confidence":0.9}"#[..],
            br#"{"item_id":"i1","category":"news","confidence":1.5}"#,
            br#"{"category":"news","confidence":0.9}"#,
        ] {
            assert!(matches!(
                plugin().run(&Event::for_test(bad)),
                Err(EventError::Invalid(_))
            ));
        }
        assert!(
            LlmCategory::new(Config {
                min_confidence: 2.0,
                entity_field: "x".into(),
                labels: vec![]
            })
            .is_err()
        );
    }
}
