//! `feature-host plugin test`: run a plugin over sample events and print the writes, checked
//! against the spec's features. Nothing is stored.

use super::{EventFailure, PluginEngine};
use crate::feature::check_write;
use crate::spec::{Document, load::load_files};
use anyhow::Context as _;
use std::path::Path;
use std::process::ExitCode;

pub async fn run(
    wasm: &Path,
    spec_file: &Path,
    events_file: &Path,
    golden: bool,
) -> anyhow::Result<ExitCode> {
    let plugin_dir = wasm.parent().unwrap_or(Path::new("."));
    // The spec's own `plugin.wasm` is irrelevant here (the component under test is `wasm`),
    // and so is its golden file, which this command may be generating.
    let group = match load_files(&[spec_file.to_path_buf()], plugin_dir, &Default::default()) {
        Ok(set) => set.groups.into_values().next(),
        Err(errors) => {
            let real: Vec<_> = errors
                .0
                .iter()
                .filter(|e| e.field != "spec.plugin.wasm" && e.field != "spec.plugin.golden")
                .collect();
            if !real.is_empty() {
                anyhow::bail!("{errors}");
            }
            let text = std::fs::read_to_string(spec_file)?;
            match serde_norway::from_str::<Document>(&text)? {
                Document::FeatureGroup(d) => Some(crate::spec::load::GroupDef {
                    name: d.metadata.name.clone(),
                    file: spec_file.to_path_buf(),
                    plugin_path: wasm.to_path_buf(),
                    store_ttl: None,
                    cache_ttl: std::time::Duration::from_secs(1),
                    retry_backoff: std::time::Duration::from_secs(1),
                    retry_topic: String::new(),
                    dead_letter_topic: String::new(),
                    golden: Vec::new(),
                    spec: d.spec,
                }),
                Document::Ingestion(_) => None,
            }
        }
    }
    .with_context(|| format!("{} holds no FeatureGroup", spec_file.display()))?;

    let text = std::fs::read_to_string(events_file)
        .with_context(|| format!("cannot read {}", events_file.display()))?;
    let mut events = Vec::new();
    let mut lines = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let e = crate::stream::local::parse_event(line, Some(n as i64 + 1), None)
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", events_file.display(), n + 1))?;
        events.push(e);
        lines.push(serde_json::from_str::<serde_json::Value>(line).unwrap_or_default());
    }
    let (wasm, name, config, limits) = (
        wasm.to_path_buf(),
        group.name.clone(),
        group.spec.plugin.config.clone(),
        group.spec.plugin.limits.clone(),
    );
    let results = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let plugin = PluginEngine::new()?.load(&name, &wasm, config.as_ref(), &limits)?;
        eprintln!("plugin {} version {}", plugin.group(), plugin.version());
        Ok(plugin.process_blocking(&events).map(|r| (events, r))?)
    })
    .await??;
    let (events, results) = results;
    let mut failed = false;
    for ((event, result), original) in events.iter().zip(results).zip(&lines) {
        if golden {
            let checked = result.map(|writes| {
                writes
                    .into_iter()
                    .filter_map(|w| match check_write(&group.spec, w) {
                        Ok(w) => Some(w),
                        Err(e) => {
                            failed = true;
                            eprintln!("offset {}: {e}", event.offset);
                            None
                        }
                    })
                    .collect()
            });
            println!("{}", super::golden::case_line(original, &checked));
            continue;
        }
        let line = match result {
            Ok(writes) => {
                let checked: Vec<serde_json::Value> = writes
                    .into_iter()
                    .map(|w| match check_write(&group.spec, w.clone()) {
                        Ok(w) => serde_json::to_value(&w).unwrap_or_default(),
                        Err(e) => {
                            failed = true;
                            serde_json::json!({ "write": w, "error": e.to_string() })
                        }
                    })
                    .collect();
                serde_json::json!({ "offset": event.offset, "writes": checked })
            }
            Err(EventFailure::Invalid(m)) => {
                serde_json::json!({ "offset": event.offset, "invalid": m })
            }
            Err(EventFailure::Retryable(m)) => {
                serde_json::json!({ "offset": event.offset, "retryable": m })
            }
        };
        println!("{line}");
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
