//! Content embeddings computed by an upstream model service, passed through as a vector
//! feature (for retrieval and ranking models that read them at serving time).
//!
//! Input payload: `{"content_id": "c1", "model": "e5-small-v2", "embedding": [0.1, ...],
//! "ts": 1700000000000}` (`ts` optional: the event's timestamp is used without it).
//!
//! Writes, for the entity named by `entity_field`: `embedding` (a vector of exactly `dim`
//! floats, L2-normalized when `normalize` is set) and `embedding_model`. A vector of the
//! wrong dimension, or with NaN / infinite components, is invalid: a wrong embedding
//! silently served is worse than none.

use feature_host_plugin_sdk::prelude::*;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Required vector dimension (must match the spec's `dim`).
    pub dim: usize,
    /// Payload field holding the entity id.
    #[serde(default = "default_entity_field")]
    pub entity_field: String,
    /// Scale vectors to unit length.
    #[serde(default)]
    pub normalize: bool,
}

fn default_entity_field() -> String {
    "content_id".into()
}

#[derive(Deserialize)]
struct Input {
    embedding: Vec<f32>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    ts: Option<i64>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

pub struct ContentEmbedding {
    config: Config,
}

impl Plugin for ContentEmbedding {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.dim == 0 || config.dim > 65536 {
            return Err(format!("dim must be within 1..=65536, got {}", config.dim));
        }
        Ok(ContentEmbedding { config })
    }

    fn process(&mut self, event: &Event, out: &mut Writes) -> Result<(), EventError> {
        let input: Input = event.json()?;
        let entity = match input.rest.get(&self.config.entity_field) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            _ => {
                return Err(EventError::invalid(format!(
                    "missing string field `{}`",
                    self.config.entity_field
                )));
            }
        };
        let mut v = input.embedding;
        if v.len() != self.config.dim {
            return Err(EventError::invalid(format!(
                "embedding has {} dimensions, expected {}",
                v.len(),
                self.config.dim
            )));
        }
        if v.iter().any(|x| !x.is_finite()) {
            return Err(EventError::invalid(
                "embedding has NaN or infinite components",
            ));
        }
        if self.config.normalize {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm == 0.0 {
                return Err(EventError::invalid("cannot normalize a zero vector"));
            }
            v.iter_mut().for_each(|x| *x /= norm);
        }
        if let Some(ts) = input.ts {
            out.at(ts);
        }
        let mut w = out.entity(&entity).set("embedding", v);
        if let Some(model) = input.model {
            w = w.set("embedding_model", model);
        }
        let _ = w;
        Ok(())
    }
}

export_plugin!(ContentEmbedding);

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(normalize: bool) -> ContentEmbedding {
        ContentEmbedding::new(Config {
            dim: 2,
            entity_field: "content_id".into(),
            normalize,
        })
        .unwrap()
    }

    #[test]
    fn passes_vectors_through_optionally_normalized() {
        let e = Event::for_test(br#"{"content_id":"c1","model":"m","embedding":[3,4],"ts":9}"#);
        let w = plugin(false).run(&e).unwrap();
        assert_eq!(w[0].op, Op::Set(Value::Vector(vec![3.0, 4.0])));
        assert_eq!(w[0].event_time_ms, 9);
        assert_eq!(w[1].op, Op::Set("m".into()));
        let w = plugin(true).run(&e).unwrap();
        assert_eq!(w[0].op, Op::Set(Value::Vector(vec![0.6, 0.8])));
    }

    #[test]
    fn wrong_dimension_or_missing_id_is_invalid() {
        for bad in [
            &br#"{"content_id":"c1","embedding":[1,2,3]}"#[..],
            br#"{"embedding":[1,2]}"#,
            br#"{"content_id":"c1","embedding":[0,0]}"#,
        ] {
            let r = plugin(true).run(&Event::for_test(bad));
            assert!(matches!(r, Err(EventError::Invalid(_))), "{r:?}");
        }
        assert!(
            ContentEmbedding::new(Config {
                dim: 0,
                entity_field: "x".into(),
                normalize: false
            })
            .is_err()
        );
    }
}
