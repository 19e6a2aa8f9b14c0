//! Wiring: specs + plugins + stores → a ready [`Pipeline`].

use crate::batch::jobs::{DynamoJobs, EmbeddedJobs, Jobs};
use crate::config::{CacheKind, StoreKind, StoreSettings};
use crate::dispatch::Router;
use crate::pipeline::Pipeline;
use crate::plugin::PluginEngine;
use crate::plugin::reload::build_runtime;
use crate::sink::Store;
use crate::sink::dynamo::DynamoStore;
use crate::sink::embedded::EmbeddedStore;
use crate::sink::memory_cache::MemoryCache;
use crate::sink::redis_cache::RedisCache;
use crate::sink::writer::{CacheStore, FeatureWriter, GroupSink};
use crate::spec::{CacheStrategy, SpecSet, load_dir_in};
use anyhow::Context as _;
use std::collections::BTreeSet;
use std::sync::Arc;

/// The AWS SDK configuration every client shares: the default chain (env, profile, IRSA),
/// with `us-east-1` when no region is configured.
pub async fn aws_config() -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none()
    {
        loader = loader.region(aws_config::Region::new("us-east-1"));
    }
    loader.load().await
}

/// Load and validate the spec directory, or fail listing every problem.
pub fn load_specs(settings: &StoreSettings) -> anyhow::Result<SpecSet> {
    let scope = settings.source_scope()?;
    load_dir_in(&settings.spec_dir, &settings.plugin_dir, &scope)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Connect the configured store and cache.
pub async fn connect_writer(settings: &StoreSettings) -> anyhow::Result<FeatureWriter> {
    Ok(connect(settings, None).await?.0)
}

/// Connect the configured store and cache, and (given its table) the batch job state, which
/// lives in the same backend: a DynamoDB table, or the embedded store's file.
pub async fn connect(
    settings: &StoreSettings,
    jobs_table: Option<&str>,
) -> anyhow::Result<(FeatureWriter, Option<Jobs>)> {
    let (store, jobs): (Arc<dyn Store>, Option<Jobs>) = match settings.store_kind() {
        StoreKind::Dynamodb => {
            let store = DynamoStore::connect(settings.dynamodb_endpoint.as_deref()).await;
            let jobs = match jobs_table {
                Some(t) => {
                    let jobs = DynamoJobs::new(store.client().clone(), t);
                    if settings.create_tables {
                        jobs.ensure_table().await?;
                    }
                    Some(Jobs::new(Arc::new(jobs)))
                }
                None => None,
            };
            (Arc::new(store), jobs)
        }
        _ => {
            let store = EmbeddedStore::open(&settings.embedded_path())?;
            let jobs = match jobs_table {
                Some(_) => Some(Jobs::new(Arc::new(EmbeddedJobs::new(store.database())?))),
                None => None,
            };
            (Arc::new(store), jobs)
        }
    };
    let cache: Arc<dyn CacheStore> = match settings.cache_kind() {
        CacheKind::Redis => {
            let url = settings
                .redis_url
                .as_ref()
                .map(|u| u.expose())
                .context("FH_CACHE=redis needs FH_REDIS_URL")?;
            Arc::new(RedisCache::connect(url).await?)
        }
        _ => Arc::new(MemoryCache::new()),
    };
    tracing::info!(
        store = store.backend(),
        cache = crate::sink::Cache::backend(&*cache),
        "stores connected"
    );
    let writer = FeatureWriter::new(store, cache)
        .with_batch_position_retention(settings.batch_position_retention);
    Ok((writer, jobs))
}

/// Create the store tables the groups use (idempotent).
pub async fn ensure_tables(writer: &FeatureWriter, specs: &SpecSet) -> anyhow::Result<()> {
    let tables: BTreeSet<&str> = specs
        .groups
        .values()
        .filter(|g| g.spec.cache.strategy != CacheStrategy::CacheOnly)
        .map(|g| g.spec.store.table.as_str())
        .collect();
    for t in tables {
        writer
            .store()
            .ensure_table(t)
            .await
            .with_context(|| format!("cannot create table {t}"))?;
    }
    Ok(())
}

/// Compile and initialize every group's plugin (off the async workers) and build the pipeline.
pub async fn build_pipeline(specs: &SpecSet, writer: FeatureWriter) -> anyhow::Result<Pipeline> {
    build_pipeline_with(&PluginEngine::new()?, specs, writer).await
}

/// As [`build_pipeline`], on a given engine (the one hot reload will use). Every plugin
/// passes the same gate as a reload: compile, interface check, init, golden events.
pub async fn build_pipeline_with(
    engine: &PluginEngine,
    specs: &SpecSet,
    writer: FeatureWriter,
) -> anyhow::Result<Pipeline> {
    let mut groups = Vec::new();
    for def in specs.groups.values() {
        let (engine, d) = (engine.clone(), def.clone());
        let runtime = tokio::task::spawn_blocking(move || build_runtime(&engine, &d))
            .await?
            .with_context(|| format!("feature group {} ({})", def.name, def.file.display()))?;
        tracing::info!(group = %def.name, version = runtime.plugin.version(), "plugin loaded");
        groups.push(runtime);
    }
    Ok(Pipeline::new(groups, Router::new(specs), writer))
}

/// The sink settings of a group, for reads outside a running pipeline.
pub fn group_sink(specs: &SpecSet, group: &str) -> anyhow::Result<GroupSink> {
    let def = specs.groups.get(group).with_context(|| {
        format!(
            "unknown feature group {group:?}; known: {}",
            specs.groups.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    Ok(GroupSink::from_def(def))
}

/// Render an entity for humans and tests.
pub fn entity_json(
    sink: &GroupSink,
    entity: &str,
    found: &crate::feature::Versioned,
    only: &[String],
) -> serde_json::Value {
    let keep = |name: &str| only.is_empty() || only.iter().any(|f| f == name);
    let features: serde_json::Map<String, serde_json::Value> = found
        .state
        .values()
        .filter(|(n, _)| keep(n))
        .map(|(n, v)| (n.to_owned(), v.to_json()))
        .collect();
    let times: serde_json::Map<String, serde_json::Value> = found
        .state
        .features
        .iter()
        .filter(|(n, c)| keep(n) && c.value.is_some())
        .map(|(n, c)| (n.clone(), c.event_time_ms.into()))
        .collect();
    serde_json::json!({
        "group": sink.target.group,
        "entity": entity,
        "version": found.version,
        "features": features,
        "event_time_ms": times,
    })
}
