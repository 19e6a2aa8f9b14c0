//! `feature-host bench …`: measurements that live with the code. Each bench prints progress
//! on stderr and ends with one `name=value` line per figure on stdout, so runs can be
//! compared by a script. Every ratio is against a baseline measured in the same run.

pub mod backfill;
pub mod delay;
pub mod parallel_consumer;
pub mod plugin;
pub mod sinks;
pub mod stream;

use crate::config::StoreSettings;
use crate::spec::{SpecSet, load_dir};
use std::path::PathBuf;

/// Figures of one bench run, in the order measured.
#[derive(Debug, Default)]
pub struct Report {
    figures: Vec<(String, f64)>,
}

impl Report {
    pub fn add(&mut self, name: &str, value: f64) {
        eprintln!("  {name} = {value:.2}");
        self.figures.push((name.to_owned(), value));
    }

    /// `name=value` lines.
    pub fn render(&self) -> String {
        self.figures
            .iter()
            .map(|(n, v)| format!("{n}={v:.2}\n"))
            .collect()
    }
}

fn unique() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// The benches' feature group `name`: the user-activity plugin writing table `name`, reading
/// `topic` if given.
fn group_yaml(name: &str, topic: Option<&str>, strategy: &str) -> String {
    let sources = topic.map_or(String::new(), |t| format!("  sources:\n    - topic: {t}\n"));
    format!(
        "apiVersion: feature-host/v1
kind: FeatureGroup
metadata:
  name: {name}
spec:
  entity: user
  features:
    - {{name: clicks, type: int}}
    - {{name: views, type: int}}
    - {{name: last_viewed, type: string-list}}
  plugin:
    wasm: user_activity.wasm
    config: {{entity_field: user_id, list_field: item_id, last_k: 10}}
{sources}  store: {{table: {name}, ttl: 1d}}
  cache: {{strategy: {strategy}, ttl: 10m}}
"
    )
}

/// A one-group spec set for benches: the user-activity plugin on `topic`, writing to table
/// `bench-<id>` with the given cache strategy. Returns the temporary spec directory too.
fn bench_specs(
    stores: &StoreSettings,
    id: &str,
    topic: &str,
    strategy: &str,
) -> anyhow::Result<(PathBuf, SpecSet)> {
    let dir = std::env::temp_dir().join(format!("fh-bench-{id}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("bench.yaml"),
        group_yaml(&format!("bench-{id}"), Some(topic), strategy),
    )?;
    let specs = load_dir(&dir, &stores.plugin_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((dir, specs))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_bench_group_parses_with_and_without_a_topic() {
        for topic in [Some("t"), None] {
            let yaml = super::group_yaml("bench-x", topic, "store-only");
            let doc: crate::spec::Document = serde_norway::from_str(&yaml).unwrap();
            let crate::spec::Document::FeatureGroup(g) = doc else {
                panic!("not a group")
            };
            assert_eq!(g.spec.sources.len(), usize::from(topic.is_some()));
            assert_eq!(g.spec.store.table, "bench-x");
        }
    }
}
