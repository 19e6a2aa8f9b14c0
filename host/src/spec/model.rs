//! The spec documents. Kubernetes-style: `apiVersion`, `kind`, `metadata`, `spec`; field names
//! in camelCase; unknown fields are errors.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The only accepted `apiVersion`.
pub const API_VERSION: &str = "feature-host/v1";

/// Any spec document.
#[allow(clippy::large_enum_variant)] // parsed once per file; boxing would only add noise
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum Document {
    FeatureGroup(FeatureGroupDoc),
    Ingestion(IngestionDoc),
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FeatureGroupDoc {
    /// Must be `feature-host/v1`.
    pub api_version: String,
    pub metadata: Metadata,
    pub spec: FeatureGroupSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngestionDoc {
    /// Must be `feature-host/v1`.
    pub api_version: String,
    pub metadata: Metadata,
    pub spec: IngestionSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    /// Unique among documents of the same kind. Lowercase letters, digits and `-`.
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    pub name: String,
    /// Free-form labels (owner team, surface, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A group of features of one entity type, computed by one plugin from one or more topics.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FeatureGroupSpec {
    /// The entity type the features describe (`user`, `item`, ...).
    pub entity: String,
    /// Free text for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The features a plugin may write; a write to an undeclared feature or of the wrong type
    /// dead-letters the event.
    #[schemars(length(min = 1))]
    pub features: Vec<FeatureSpec>,
    pub plugin: PluginSpec,
    /// Kafka topics the group consumes. Many groups may name the same topic.
    #[serde(default)]
    pub sources: Vec<SourceSpec>,
    #[serde(default)]
    pub store: StoreSpec,
    #[serde(default)]
    pub cache: CacheSpec,
    /// Which events may be processed concurrently within a partition.
    #[serde(default)]
    pub ordering: Ordering,
    #[serde(default)]
    pub retry: RetrySpec,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FeatureSpec {
    /// Letters, digits and `_`, starting with a letter.
    #[schemars(regex(pattern = r"^[A-Za-z][A-Za-z0-9_]{0,127}$"))]
    pub name: String,
    #[serde(rename = "type")]
    pub ty: FeatureType,
    /// For `vector`: the required dimension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub dim: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Feature value types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureType {
    Bool,
    Int,
    Float,
    String,
    Bytes,
    IntList,
    FloatList,
    StringList,
    Vector,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginSpec {
    /// The component file, relative to the plugin directory (no `..`, not absolute: a spec
    /// loads only plugins the operator's plugin directory holds).
    #[schemars(regex(pattern = r"\.wasm$"))]
    pub wasm: String,
    /// The SHA-256 (64 hex digits) of the reviewed build. Set, the host refuses any other
    /// file under this name — at validation, at start and on every reload — so a plugin
    /// directory that changes (a sync from a bucket) cannot swap in an unreviewed build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
    /// Passed to the plugin's init call as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    #[serde(default)]
    pub limits: PluginLimits,
    /// Golden events: a JSON-lines file (relative to this spec file, inside its directory) of sample events with
    /// the writes they must produce. A plugin version that disagrees is refused, at start
    /// and on every reload. `feature-host plugin test --golden` writes such a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub golden: Option<String>,
}

/// Sandbox limits per plugin call / instance.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginLimits {
    /// Wall-clock CPU deadline per batch call, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    #[schemars(range(min = 1, max = 600000))]
    pub timeout_ms: u64,
    /// Linear memory cap per instance, in MiB.
    #[serde(default = "default_memory_mb")]
    #[schemars(range(min = 1, max = 4096))]
    pub memory_mb: u64,
    /// An instance whose memory grew past this many MiB is replaced after its call instead
    /// of being reused (wasm memory never shrinks). Default: half of `memoryMb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub recycle_mb: Option<u64>,
    /// What one batch call may return, in MiB, counted as the host copies it out of the
    /// instance (every string and list, each time a write names it). A call over it fails;
    /// the batch is split in halves down to the event that returns too much alone, which is
    /// dead-lettered. Without it, results whose strings all point at one guest buffer make
    /// the host copy that buffer once per write.
    #[serde(default = "default_output_mb")]
    #[schemars(range(min = 1, max = 1024))]
    pub output_mb: u64,
}

fn default_timeout_ms() -> u64 {
    2_000
}
fn default_memory_mb() -> u64 {
    64
}
fn default_output_mb() -> u64 {
    16
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            timeout_ms: default_timeout_ms(),
            memory_mb: default_memory_mb(),
            recycle_mb: None,
            output_mb: default_output_mb(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceSpec {
    /// Kafka topic name.
    #[schemars(length(min = 1, max = 249))]
    pub topic: String,
    /// Only events matching the filter reach this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<FilterSpec>,
}

/// Match on a header or a payload field (a JSON pointer such as `/type`): the value must be
/// one of `in`. Exactly one of `header` and `field` must be given.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilterSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// JSON pointer into a JSON payload, e.g. `/type` or `/after/status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"))]
    pub field: Option<String>,
    #[serde(rename = "in")]
    #[schemars(length(min = 1))]
    pub values: Vec<String>,
}

/// The durable online store (DynamoDB, or the embedded store).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoreSpec {
    /// Table name; several groups may share a table.
    #[serde(default = "default_table")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_.-]{3,255}$"))]
    pub table: String,
    /// Item time-to-live after its last write (`30d`, `12h`; at most `3650d`); absent: never
    /// expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

fn default_table() -> String {
    "features".into()
}

impl Default for StoreSpec {
    fn default() -> Self {
        StoreSpec {
            table: default_table(),
            ttl: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheSpec {
    #[serde(default)]
    pub strategy: CacheStrategy,
    /// Cache entry time-to-live (`1h`, `10m`; at most `3650d`).
    #[serde(default = "default_cache_ttl")]
    pub ttl: String,
}

fn default_cache_ttl() -> String {
    "1h".into()
}

impl Default for CacheSpec {
    fn default() -> Self {
        CacheSpec {
            strategy: CacheStrategy::default(),
            ttl: default_cache_ttl(),
        }
    }
}

/// How writes reach the store and the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CacheStrategy {
    /// Store, then cache the store's resulting value.
    #[default]
    WriteThrough,
    /// Store, then invalidate the cache entry.
    WriteAround,
    /// Cache only (high-cardinality, short-lived features).
    CacheOnly,
    /// Store only.
    StoreOnly,
}

/// Ordering of processing within a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Ordering {
    /// Same key in order, different keys in parallel.
    #[default]
    Key,
    /// Any order.
    Unordered,
    /// Strict partition order.
    Partition,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts before an event is dead-lettered.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: u32,
    /// First backoff (`1s`); grows per attempt.
    #[serde(default = "default_backoff")]
    pub backoff: String,
    /// Retry topic; default `<group>.retry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Dead-letter topic; default `<group>.dlq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
    /// Partitions of the retry and dead-letter topics when the host creates them; default:
    /// as many as the group's largest source topic. Existing topics are left as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub partitions: Option<u32>,
    /// Replication factor of the retry and dead-letter topics when the host creates them;
    /// default: the cluster's `default.replication.factor`. The host refuses to start when a
    /// hand-off topic's replication factor is below its `min.insync.replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 32))]
    pub replication_factor: Option<u16>,
}

fn default_max_attempts() -> u32 {
    5
}
fn default_backoff() -> String {
    "1s".into()
}

impl Default for RetrySpec {
    fn default() -> Self {
        RetrySpec {
            max_attempts: default_max_attempts(),
            backoff: default_backoff(),
            topic: None,
            dead_letter_topic: None,
            partitions: None,
            replication_factor: None,
        }
    }
}

/// A batch ingestion: a bulk source run through a group's plugin, on demand or on a schedule.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngestionSpec {
    /// The FeatureGroup whose plugin and stores are used.
    pub feature_group: String,
    pub source: BatchSourceSpec,
    /// Cron expression (5 fields, or 6 with seconds), UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Ingestions that must succeed (same schedule tick) before this one runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub parallelism: Parallelism,
    #[serde(default)]
    pub engine: Engine,
    /// Let backfilled values replace newer ones (explicit override of event-time ordering).
    #[serde(default)]
    pub overwrite: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BatchSourceSpec {
    /// A local path (relative to this spec file) or `s3://bucket/key`, with globs (`*`, `**`,
    /// `?`, `[…]`) and a `{date}` placeholder (`dt={date}`: each day of a backfill's range, or
    /// the day before a scheduled tick).
    #[schemars(length(min = 1))]
    pub uri: String,
    pub format: BatchFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BatchFormat {
    /// One JSON object per line; each line is the plugin's payload.
    Jsonl,
    /// A header row, then records; each becomes a JSON object keyed by the header.
    Csv,
    /// Each row becomes a JSON object; row groups are the unit of sharding.
    Parquet,
}

/// `auto` (computed from the source's size) or a shard count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Parallelism {
    #[default]
    #[serde(with = "auto_literal")]
    #[schemars(with = "AutoLiteral")]
    Auto,
    Shards(#[schemars(range(min = 1, max = 10000))] u32),
}

#[derive(JsonSchema)]
#[allow(dead_code)]
enum AutoLiteral {
    #[serde(rename = "auto")]
    Auto,
}

mod auto_literal {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("auto")
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
        match String::deserialize(d)?.as_str() {
            "auto" => Ok(()),
            other => Err(serde::de::Error::custom(format!(
                "expected \"auto\" or a number, got {other:?}"
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// Shards run on the host's worker pool.
    #[default]
    Local,
    /// One AWS Batch array job per run (array index = shard).
    AwsBatch,
}

impl FeatureGroupSpec {
    /// The declared feature named `name`.
    pub fn feature(&self, name: &str) -> Option<&FeatureSpec> {
        self.features.iter().find(|f| f.name == name)
    }
}
