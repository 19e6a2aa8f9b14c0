//! `feature-host bench plugin`: what the WASM sandbox costs, and how fast a reload lands.
//! No services: the stores are in-process.
//!
//! 1. **Per-event cost** of the user-activity plugin as WASM against the same crate compiled
//!    natively into this binary, same run, same ~300-byte JSON events, at batch sizes 1, 64
//!    and 512. Both paths include the conversions the host does (its event in, its writes
//!    out), so the ratio is the sandbox's overhead as the pipeline sees it.
//! 2. **Hot reload latency**: a running [`Reloader`] watching a plugin directory, batches
//!    flowing through the pipeline; a new version is renamed into place and the time to the
//!    first batch completed by it is recorded. Each version is new bytes (a custom section
//!    appended), so every reload compiles. p50 / p99 over `--reloads`.
//! 3. **Memory**: process RSS before and after loading `--instances` plugin instances (one
//!    group each, one warm instance each, every one called once).

use super::Report;
use crate::config::StoreSettings;
use crate::dispatch::Router;
use crate::event::Event;
use crate::feature::{Op, Value, Write};
use crate::pipeline::Pipeline;
use crate::plugin::reload::{Reloader, build_runtime};
use crate::plugin::{EngineSettings, Plugin, PluginEngine};
use crate::sink::memory_cache::MemoryCache;
use crate::sink::writer::FeatureWriter;
use crate::spec::{PluginLimits, load_dir};
use anyhow::Context as _;
use feature_host_plugin_sdk::Plugin as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct PluginBenchArgs {
    /// Events per batch size for the per-event cost.
    #[arg(long, default_value_t = 200_000)]
    pub events: usize,
    /// Hot reloads to time.
    #[arg(long, default_value_t = 20)]
    pub reloads: usize,
    /// Plugin instances for the memory figure.
    #[arg(long, default_value_t = 50)]
    pub instances: usize,
    #[command(flatten)]
    pub stores: StoreSettings,
}

pub async fn run(args: PluginBenchArgs) -> anyhow::Result<Report> {
    let wasm = args.stores.plugin_dir.join("user_activity.wasm");
    anyhow::ensure!(
        wasm.is_file(),
        "{} not found: run scripts/build-plugins",
        wasm.display()
    );
    let mut report = Report::default();
    let (w, r) = (wasm.clone(), args.clone());
    let cost = tokio::task::spawn_blocking(move || per_event_cost(&w, r.events)).await??;
    for (name, v) in cost {
        report.add(&name, v);
    }
    reload_latency(&wasm, args.reloads, &mut report).await?;
    let (w, n) = (wasm, args.instances);
    let rss = tokio::task::spawn_blocking(move || memory(&w, n)).await??;
    for (name, v) in rss {
        report.add(&name, v);
    }
    Ok(report)
}

/// ~300-byte interaction events, views and clicks over 1,000 users.
fn events(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let kind = if i % 4 == 0 { "click" } else { "view" };
            let payload = format!(
                r#"{{"type":"{kind}","user_id":"user-{:06}","item_id":"item-{:08}","ts":{},"session_id":"{:032x}","page":"/catalog/category/electronics/item-{:08}","referrer":"https://www.example.com/search?q=headphones","device":"ios-app-7.12.3"}}"#,
                i % 1000,
                i * 7919 % 100_000_000,
                1_764_028_800_000_i64 + i as i64,
                (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                i % 100_000_000,
            );
            Event {
                topic: "web-events".into(),
                partition: 0,
                offset: i as i64,
                key: Some(format!("user-{:06}", i % 1000).into_bytes()),
                timestamp_ms: 1_764_028_800_000 + i as i64,
                headers: vec![("source".into(), b"bench".to_vec())],
                payload: payload.into_bytes(),
                position: None,
            }
        })
        .collect()
}

fn user_activity_config() -> serde_json::Value {
    serde_json::json!({"entity_field": "user_id", "list_field": "item_id", "list_feature": "last_viewed", "last_k": 20})
}

/// The native path: the host's event → the SDK's event → the plugin → the host's writes.
fn native_batch(plugin: &mut user_activity::UserActivity, batch: &[Event]) -> usize {
    use feature_host_plugin_sdk as sdk;
    let mut n = 0;
    for e in batch {
        let event = sdk::Event {
            source: e.topic.clone(),
            partition: e.partition,
            offset: e.offset,
            key: e.key.clone(),
            timestamp_ms: e.timestamp_ms,
            headers: e
                .headers
                .iter()
                .map(|(k, v)| sdk::Header {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            payload: e.payload.clone(),
        };
        if let Ok(writes) = plugin.run(&event) {
            let host: Vec<Write> = writes.into_iter().map(native_write).collect();
            n += std::hint::black_box(host).len();
        }
    }
    n
}

fn native_value(v: feature_host_plugin_sdk::Value) -> Value {
    use feature_host_plugin_sdk::Value as V;
    match v {
        V::Bool(b) => Value::Bool(b),
        V::Int(i) => Value::Int(i),
        V::Float(f) => Value::Float(f),
        V::Text(s) => Value::String(s),
        V::Bytes(b) => Value::Bytes(b),
        V::IntList(l) => Value::IntList(l),
        V::FloatList(l) => Value::FloatList(l),
        V::TextList(l) => Value::StringList(l),
        V::Vector(v) => Value::Vector(v),
    }
}

fn native_write(w: feature_host_plugin_sdk::Write) -> Write {
    use feature_host_plugin_sdk::Op as O;
    let op = match w.op {
        O::Set(v) => Op::Set(native_value(v)),
        O::Incr(v) => Op::Incr(native_value(v)),
        O::Max(v) => Op::Max(native_value(v)),
        O::Min(v) => Op::Min(native_value(v)),
        O::Append { item, cap } => Op::Append {
            item: native_value(item),
            cap,
        },
        O::Delete => Op::Delete,
    };
    Write {
        entity: w.entity,
        feature: w.feature,
        op,
        event_time_ms: w.event_time_ms,
    }
}

fn per_event_cost(wasm: &Path, n: usize) -> anyhow::Result<Vec<(String, f64)>> {
    eprintln!("per-event cost: user-activity, WASM vs native, {n} events per batch size");
    let config = user_activity_config();
    let plugin = PluginEngine::new()?.load(
        "bench",
        wasm,
        Some(&config),
        &PluginLimits {
            timeout_ms: 60_000,
            ..PluginLimits::default()
        },
    )?;
    let mut native = user_activity::UserActivity::new(Some(serde_json::from_value(config)?))
        .map_err(anyhow::Error::msg)?;
    let all = events(n);
    let mut out = Vec::new();
    for batch in [1usize, 64, 512] {
        // Warm both paths (instance pool, caches) before timing.
        let _ = plugin.process_blocking(&all[..batch])?;
        native_batch(&mut native, &all[..batch]);
        let start = Instant::now();
        for chunk in all.chunks(batch) {
            std::hint::black_box(plugin.process_blocking(chunk)?);
        }
        let wasm_ns = start.elapsed().as_nanos() as f64 / n as f64;
        let start = Instant::now();
        for chunk in all.chunks(batch) {
            std::hint::black_box(native_batch(&mut native, chunk));
        }
        let native_ns = start.elapsed().as_nanos() as f64 / n as f64;
        out.push((format!("plugin_wasm_ns_per_event_batch{batch}"), wasm_ns));
        out.push((
            format!("plugin_native_ns_per_event_batch{batch}"),
            native_ns,
        ));
        out.push((
            format!("plugin_wasm_vs_native_batch{batch}"),
            wasm_ns / native_ns,
        ));
    }
    Ok(out)
}

/// `bytes` with a custom section appended: the same program, a new version.
fn new_version(bytes: &[u8], n: usize) -> Vec<u8> {
    let leb = |v: usize, out: &mut Vec<u8>| crate::stream::offset_map::leb128(v as u64, out);
    let name = b"fh-bench";
    let payload = n.to_le_bytes();
    let mut body = Vec::new();
    leb(name.len(), &mut body);
    body.extend_from_slice(name);
    body.extend_from_slice(&payload);
    let mut out = bytes.to_vec();
    out.push(0); // custom section id
    leb(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn reload_latency(wasm: &Path, reloads: usize, report: &mut Report) -> anyhow::Result<()> {
    eprintln!("hot reload: {reloads} reloads under continuous batches");
    let dir = std::env::temp_dir().join(format!("fh-bench-reload-{}", super::unique()));
    let (spec_dir, plugin_dir) = (dir.join("specs"), dir.join("plugins"));
    std::fs::create_dir_all(&spec_dir)?;
    std::fs::create_dir_all(&plugin_dir)?;
    let original = std::fs::read(wasm)?;
    let live = plugin_dir.join("user_activity.wasm");
    std::fs::write(&live, &original)?;
    std::fs::write(
        spec_dir.join("bench.yaml"),
        "apiVersion: feature-host/v1\nkind: FeatureGroup\nmetadata: {name: bench}\nspec:\n  entity: user\n  features: [{name: clicks, type: int}, {name: views, type: int}, {name: last_viewed, type: string-list}]\n  plugin: {wasm: user_activity.wasm, config: {last_k: 20}}\n  sources: [{topic: web-events}]\n  cache: {strategy: cache-only}\n",
    )?;
    let specs = load_dir(&spec_dir, &plugin_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let engine = PluginEngine::with_settings(&EngineSettings::default())?;
    let def = specs.groups.values().next().context("bench group")?.clone();
    let e = engine.clone();
    let runtime = tokio::task::spawn_blocking(move || build_runtime(&e, &def)).await??;
    let cache = Arc::new(MemoryCache::new());
    let pipeline = Arc::new(Pipeline::new(
        vec![runtime],
        Router::new(&specs),
        FeatureWriter::new(cache.clone(), cache),
    ));
    let reloader = Reloader::new(
        pipeline.clone(),
        engine,
        &spec_dir,
        &plugin_dir,
        specs.sources.clone(),
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(reloader.clone().watch(
        Duration::from_millis(50),
        Duration::from_secs(3600),
        stop_rx,
    )?);
    let batch = Arc::new(events(64));
    let pairs = pipeline.route(&batch);
    let mut took = Vec::new();
    for n in 0..reloads {
        let bytes = new_version(&original, n);
        let version = crate::plugin::content_version(&bytes);
        let tmp = live.with_extension("tmp");
        std::fs::write(&tmp, &bytes)?;
        let start = Instant::now();
        std::fs::rename(&tmp, &live)?;
        loop {
            let serving = pipeline
                .runtime(crate::dispatch::GroupId::new(0))
                .plugin
                .version()
                .to_owned();
            pipeline.process(&batch, &pairs, false).await;
            if serving == version {
                break;
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(30),
                "reload {n} not served after 30 s: {:?}",
                reloader.status()
            );
        }
        took.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = stop_tx.send(true);
    let _ = watcher.await;
    let _ = std::fs::remove_dir_all(&dir);
    took.sort_by(f64::total_cmp);
    report.add("reload_to_first_batch_ms_p50", percentile(&took, 0.5));
    report.add("reload_to_first_batch_ms_p99", percentile(&took, 0.99));
    report.add("reload_to_first_batch_ms_max", took[took.len() - 1]);
    Ok(())
}

fn rss_kib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0.0)
}

fn memory(wasm: &Path, n: usize) -> anyhow::Result<Vec<(String, f64)>> {
    eprintln!("memory: {n} plugin instances");
    let engine = PluginEngine::with_settings(&EngineSettings::default())?;
    let config = user_activity_config();
    let before = rss_kib();
    let batch = events(64);
    let mut loaded: Vec<Plugin> = Vec::new();
    for i in 0..n {
        let p = engine.load(
            &format!("group-{i}"),
            &PathBuf::from(wasm),
            Some(&config),
            &PluginLimits::default(),
        )?;
        p.process_blocking(&batch)?;
        loaded.push(p);
    }
    let after = rss_kib();
    Ok(vec![
        ("rss_before_plugins_mib".into(), before / 1024.0),
        (format!("rss_with_{n}_instances_mib"), after / 1024.0),
        ("rss_per_instance_kib".into(), (after - before) / n as f64),
    ])
}
