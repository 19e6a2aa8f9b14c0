//! Process settings. Every setting is a flag with an environment variable (`FH_*`), so the
//! same binary is configured by flags locally and by env in Kubernetes. `feature-host run
//! --help` lists them all; the README's configuration table mirrors this file.

use crate::text::Secret;
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// `dynamodb` when `FH_DYNAMODB_ENDPOINT` is set, else `embedded`.
    Auto,
    /// A redb file under the data directory: no services needed.
    Embedded,
    /// DynamoDB (credentials and region from the AWS default chain).
    Dynamodb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CacheKind {
    /// `redis` when `FH_REDIS_URL` is set, else `memory`.
    Auto,
    /// In-process cache: no services needed.
    Memory,
    Redis,
}

/// How the Kafka clients authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KafkaAuth {
    /// Whatever `FH_KAFKA_PROPERTIES` says (plaintext, TLS, SASL/SCRAM, mutual TLS).
    Properties,
    /// Amazon MSK IAM: SASL_SSL + OAUTHBEARER, tokens signed from the AWS default
    /// credential chain (IRSA on EKS).
    MskIam,
    /// OAUTHBEARER with unsigned tokens (`alg: none`) for `FH_KAFKA_OAUTH_PRINCIPAL`, as
    /// Kafka's default unsecured validator accepts: local brokers and tests only.
    OauthUnsecured,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where specs and plugins are, and which stores to use.
#[derive(Debug, Clone, Args)]
pub struct StoreSettings {
    /// Directory of FeatureGroup / Ingestion specs (YAML, recursive).
    #[arg(long, env = "FH_SPEC_DIR", default_value = "specs")]
    pub spec_dir: PathBuf,

    /// Directory that `plugin.wasm` paths in specs are relative to.
    #[arg(long, env = "FH_PLUGIN_DIR", default_value = "plugins/dist")]
    pub plugin_dir: PathBuf,

    #[command(flatten)]
    pub sources: ScopeSettings,

    /// Local state: the embedded store file and the local dead-letter file.
    #[arg(long, env = "FH_DATA_DIR", default_value = ".feature-host")]
    pub data_dir: PathBuf,

    /// Largest the local dead-letter file may grow, in MiB; past it, writes that would
    /// dead-letter fail (and are retried by their caller) instead of filling the disk.
    #[arg(long, env = "FH_DEAD_LETTER_MAX_MB", default_value_t = crate::stream::dead_letter::DEFAULT_LIMIT_MB)]
    pub dead_letter_max_mb: u64,

    /// The durable online store.
    #[arg(long, env = "FH_STORE", value_enum, default_value_t = StoreKind::Auto)]
    pub store: StoreKind,

    /// DynamoDB endpoint override (DynamoDB Local); unset = the AWS regional endpoint.
    #[arg(long, env = "FH_DYNAMODB_ENDPOINT")]
    pub dynamodb_endpoint: Option<String>,

    /// Create missing DynamoDB tables (with TTL enabled) at startup.
    #[arg(long, env = "FH_CREATE_TABLES", default_value_t = true, action = clap::ArgAction::Set)]
    pub create_tables: bool,

    /// The cache.
    #[arg(long, env = "FH_CACHE", value_enum, default_value_t = CacheKind::Auto)]
    pub cache: CacheKind,

    /// Redis URL, e.g. `redis://127.0.0.1:6379/0`.
    #[arg(long, env = "FH_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<Secret>,

    /// How long an entity keeps a batch run's position entry (its exactly-once record) after
    /// the run last wrote it. Bounds the item: one entry per run × shard that wrote it within
    /// this time. A run can be resumed, re-run or taken over within half of it after it
    /// first started; later it is refused. Every host writing the tables must use the same value.
    #[arg(long, env = "FH_BATCH_POSITION_RETENTION", default_value = "7d", value_parser = parse_retention)]
    pub batch_position_retention: Duration,
}

impl StoreSettings {
    /// The local dead-letter file, `<data dir>/dead-letters.jsonl`.
    pub fn dead_letters(&self) -> crate::stream::dead_letter::DeadLetterFile {
        crate::stream::dead_letter::DeadLetterFile::new(self.data_dir.join("dead-letters.jsonl"))
            .with_limit_mb(self.dead_letter_max_mb)
    }

    pub fn store_kind(&self) -> StoreKind {
        match self.store {
            StoreKind::Auto if self.dynamodb_endpoint.is_some() => StoreKind::Dynamodb,
            StoreKind::Auto => StoreKind::Embedded,
            k => k,
        }
    }

    pub fn cache_kind(&self) -> CacheKind {
        match self.cache {
            CacheKind::Auto if self.redis_url.is_some() => CacheKind::Redis,
            CacheKind::Auto => CacheKind::Memory,
            k => k,
        }
    }

    /// Where Ingestions may read.
    pub fn source_scope(&self) -> anyhow::Result<crate::spec::SpecScope> {
        self.sources.scope(&self.spec_dir)
    }

    pub fn embedded_path(&self) -> PathBuf {
        self.data_dir.join("store.redb")
    }
}

/// What specs may name: where Ingestions read, which tables and topics groups use (the
/// operator's allow-lists, [`SpecScope`]).
///
/// [`SpecScope`]: crate::spec::SpecScope
#[derive(Debug, Clone, Default, Args)]
pub struct ScopeSettings {
    /// Directories that Ingestions on local paths may read, comma-separated (symlinks are
    /// resolved before the check); unset = the spec directory.
    #[arg(long, env = "FH_SOURCE_ROOTS", value_delimiter = ',')]
    pub source_roots: Vec<PathBuf>,

    /// `s3://bucket/prefix` entries that Ingestions on S3 may read, comma-separated; unset =
    /// any object the host's credentials can read. Set it on a host shared by several teams.
    #[arg(long, env = "FH_SOURCE_S3", value_delimiter = ',')]
    pub source_s3: Option<Vec<String>>,

    /// Prefixes a group's store table must start with, comma-separated (e.g. `team-a-`,
    /// matching the IAM policy's `table/team-a-*`); unset = any table.
    #[arg(long, env = "FH_TABLE_PREFIXES", value_delimiter = ',')]
    pub table_prefixes: Option<Vec<String>>,

    /// Prefixes every topic a group reads or hands off through (source, retry, dead-letter)
    /// must start with, comma-separated, as Kafka PREFIXED ACLs grant; unset = any topic.
    #[arg(long, env = "FH_TOPIC_PREFIXES", value_delimiter = ',')]
    pub topic_prefixes: Option<Vec<String>>,
}

impl ScopeSettings {
    /// The scope for specs in `spec_dir`.
    pub fn scope(&self, spec_dir: &std::path::Path) -> anyhow::Result<crate::spec::SpecScope> {
        let roots = if self.source_roots.is_empty() {
            &[spec_dir.to_path_buf()][..]
        } else {
            &self.source_roots[..]
        };
        crate::spec::SpecScope::new(roots, self.source_s3.as_deref())?.with_prefixes(
            self.table_prefixes.as_deref(),
            self.topic_prefixes.as_deref(),
        )
    }
}

/// Event sources and processing.
#[derive(Debug, Clone, Args)]
pub struct RunSettings {
    /// Kafka bootstrap servers; unset = no Kafka (local sources only).
    #[arg(long, env = "FH_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// Kafka consumer group id.
    #[arg(long, env = "FH_KAFKA_GROUP_ID", default_value = "feature-host")]
    pub kafka_group_id: String,

    /// Extra librdkafka properties, `key=value` separated by commas (e.g. TLS/SASL settings).
    #[arg(
        long,
        env = "FH_KAFKA_PROPERTIES",
        default_value = "",
        hide_env_values = true
    )]
    pub kafka_properties: Secret,

    /// Kafka authentication: `properties` (as FH_KAFKA_PROPERTIES says), `msk-iam`, or
    /// `oauth-unsecured` (local brokers only).
    #[arg(long, env = "FH_KAFKA_AUTH", value_enum, default_value_t = KafkaAuth::Properties)]
    pub kafka_auth: KafkaAuth,

    /// With `FH_KAFKA_AUTH=oauth-unsecured`: the principal (`sub`) of the tokens.
    #[arg(long, env = "FH_KAFKA_OAUTH_PRINCIPAL", default_value = "feature-host")]
    pub kafka_oauth_principal: String,

    /// With `FH_KAFKA_AUTH=oauth-unsecured`: how long each token is valid (librdkafka asks
    /// for the next one at 80 % of it).
    #[arg(long, env = "FH_KAFKA_OAUTH_LIFETIME", default_value = "1h", value_parser = humantime::parse_duration)]
    pub kafka_oauth_lifetime: Duration,

    /// Events per processing batch of a local events file.
    #[arg(long, env = "FH_BATCH_SIZE", default_value_t = 500)]
    pub batch_size: usize,

    /// Kafka: messages taken from the client per poll round before they are dispatched.
    #[arg(long, env = "FH_FETCH_SIZE", default_value_t = 500)]
    pub fetch_size: usize,

    /// Kafka: events of one partition processed concurrently; fetching pauses at the bound.
    #[arg(long, env = "FH_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: usize,

    /// Kafka: offsets of one partition from the lowest unfinished to the highest read;
    /// reading pauses at the bound, so one stuck event cannot grow the window (and every
    /// entity's applied-offset list) without limit.
    #[arg(long, env = "FH_MAX_OFFSET_SPAN", default_value_t = 10_000)]
    pub max_offset_span: u64,

    /// Kafka: payload bytes of one partition in flight; fetching pauses at the bound.
    #[arg(long, env = "FH_MAX_BUFFERED_BYTES", default_value_t = 64 << 20)]
    pub max_buffered_bytes: usize,

    /// Kafka: how often finished offsets are committed (also on revoke and shutdown).
    #[arg(long, env = "FH_COMMIT_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub commit_interval: Duration,

    /// Kafka: how long a revoked partition's running work may take before it is fenced
    /// (match the pod's terminationGracePeriodSeconds to it).
    #[arg(long, env = "FH_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Kafka: the transactional id of this host's hand-off producer; unique per live host.
    /// A stable one (a StatefulSet pod's name) lets a restarted host abort its predecessor's
    /// open transaction at once instead of after FH_KAFKA_TRANSACTION_TIMEOUT. Default:
    /// `feature-host-<group id>-<random>`.
    #[arg(long, env = "FH_KAFKA_TRANSACTIONAL_ID")]
    pub kafka_transactional_id: Option<String>,

    /// Kafka: how long the broker lets a hand-off transaction stay open before aborting it
    /// (a crashed host's: retries and dead letters behind it are read up to this late, unless
    /// a host with the same FH_KAFKA_TRANSACTIONAL_ID starts first). At least twice
    /// FH_COMMIT_INTERVAL; at most the brokers' transaction.max.timeout.ms (15 min).
    #[arg(long, env = "FH_KAFKA_TRANSACTION_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub kafka_transaction_timeout: Duration,

    /// Kafka: attempts of a failing store write (in place, 100 ms backoff doubling) before
    /// the event goes to the retry topic.
    #[arg(long, env = "FH_STORE_ATTEMPTS", default_value_t = 3)]
    pub store_attempts: u32,

    /// JSON-lines file of events to ingest (see README "Local events").
    #[arg(long, env = "FH_EVENTS_FILE")]
    pub events: Option<PathBuf>,

    /// Exit once the events file is ingested, instead of serving until SIGTERM.
    #[arg(long)]
    pub once: bool,

    /// Admin HTTP address (health, features, and the event push endpoint without Kafka).
    #[arg(long, env = "FH_ADMIN_ADDR", default_value = "127.0.0.1:8080")]
    pub admin_addr: String,

    /// Bearer token (32+ bytes) the admin API's writes require, and its reads too unless it
    /// listens on loopback; unset: those calls are refused.
    #[arg(long, env = "FH_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,

    #[command(flatten)]
    pub admin_limits: AdminLimits,

    #[command(flatten)]
    pub plugins: PluginSettings,
}

/// How long and how many callers the admin API serves (see `admin::serve`).
#[derive(Debug, Clone, Args)]
pub struct AdminLimits {
    /// A connection must send a request's headers within this, also between keep-alive
    /// requests (an idle connection is closed after it).
    #[arg(long, env = "FH_ADMIN_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub admin_header_timeout: std::time::Duration,

    /// A request, its body included, must be answered within this; 408 after. Long calls
    /// (a dead-letter replay, a large push) must fit in it.
    #[arg(long, env = "FH_ADMIN_REQUEST_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub admin_request_timeout: std::time::Duration,

    /// Longest a connection is kept, however busy: then it is closed after its request in
    /// flight (clients reconnect).
    #[arg(long, env = "FH_ADMIN_CONNECTION_LIFETIME", default_value = "60s", value_parser = humantime::parse_duration)]
    pub admin_connection_lifetime: std::time::Duration,

    /// Connections served at once; one more is answered 503 (a few more are kept for
    /// probes).
    #[arg(long, env = "FH_ADMIN_MAX_CONNECTIONS", default_value_t = 128)]
    pub admin_max_connections: usize,

    /// Connections served at once from one address; one more is answered 503.
    #[arg(long, env = "FH_ADMIN_MAX_CONNECTIONS_PER_PEER", default_value_t = 16)]
    pub admin_max_connections_per_peer: usize,
}

impl AdminLimits {
    pub fn limits(&self) -> anyhow::Result<crate::admin::ServeLimits> {
        for (name, d) in [
            ("FH_ADMIN_HEADER_TIMEOUT", self.admin_header_timeout),
            ("FH_ADMIN_REQUEST_TIMEOUT", self.admin_request_timeout),
            (
                "FH_ADMIN_CONNECTION_LIFETIME",
                self.admin_connection_lifetime,
            ),
        ] {
            anyhow::ensure!(!d.is_zero(), "{name} is 0: no request could be served");
        }
        Ok(crate::admin::ServeLimits {
            header_timeout: self.admin_header_timeout,
            request_timeout: self.admin_request_timeout,
            connection_lifetime: self.admin_connection_lifetime,
            max_connections: self.admin_max_connections,
            max_connections_per_peer: self.admin_max_connections_per_peer,
        })
    }
}

/// The plugin runtime and hot reload.
#[derive(Debug, Clone, Args)]
pub struct PluginSettings {
    /// Watch the spec and plugin directories and swap changed plugins live.
    #[arg(long, env = "FH_RELOAD", default_value_t = true, action = clap::ArgAction::Set)]
    pub reload: bool,

    /// Quiet time after a file change before reloading (writers rename into place).
    #[arg(long, env = "FH_RELOAD_DEBOUNCE", default_value = "50ms", value_parser = humantime::parse_duration)]
    pub reload_debounce: Duration,

    /// Full rescan interval, for file systems without change events.
    #[arg(long, env = "FH_RELOAD_POLL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub reload_poll: Duration,

    /// Plugin instances that may exist at once (pooling allocator slots; 0 = allocate on
    /// demand).
    #[arg(long, env = "FH_PLUGIN_MAX_INSTANCES", default_value_t = 1000)]
    pub max_instances: u32,

    /// Precompiled plugin artifacts (default: `<data dir>/plugin-cache`; `off` disables).
    #[arg(long, env = "FH_PLUGIN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Longest a plugin's compile may take (in a child process; the plugin is refused after).
    #[arg(long, env = "FH_PLUGIN_COMPILE_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub compile_timeout: Duration,

    /// Address space the compiling child process may map, in MiB. The child counts against
    /// the pod's memory limit: keep this plus the host's own memory under it.
    #[arg(long, env = "FH_PLUGIN_COMPILE_MEMORY_MB", default_value_t = 1024)]
    pub compile_memory_mb: u64,

    /// Largest the precompiled-artifact cache may grow, in MiB; past it, the artifacts used
    /// least recently are deleted.
    #[arg(long, env = "FH_PLUGIN_CACHE_MAX_MB", default_value_t = 512)]
    pub cache_max_mb: u64,

    /// Secret (32+ bytes) guest randomness is derived from, with the plugin version. Give
    /// every replica the same one so a plugin that draws random numbers (or iterates a
    /// hash map) writes alike wherever, and whenever, an event is processed; unset: each
    /// process has its own.
    #[arg(long, env = "FH_PLUGIN_SEED_SECRET", hide_env_values = true)]
    pub seed_secret: Option<Secret>,
}

impl PluginSettings {
    /// The engine of a serving host: it compiles plugins in a bounded child process, the
    /// running binary (see `plugin::compiler`).
    pub fn engine(
        &self,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<crate::plugin::EngineSettings> {
        if let Some(secret) = &self.seed_secret {
            let n = secret.expose().len();
            anyhow::ensure!(
                n >= 32,
                "FH_PLUGIN_SEED_SECRET is {n} bytes; it must be at least 32 (e.g. `openssl rand -hex 32`)"
            );
        }
        let exe = std::env::current_exe().map_err(|e| {
            anyhow::anyhow!("cannot find the running binary to compile plugins with: {e}")
        })?;
        Ok(crate::plugin::EngineSettings {
            max_instances: self.max_instances,
            cache_dir: match &self.cache_dir {
                Some(p) if p.as_os_str() == "off" => None,
                Some(p) => Some(p.clone()),
                None => Some(data_dir.join("plugin-cache")),
            },
            compiler: Some(crate::plugin::compiler::CompilerSettings {
                exe,
                timeout: self.compile_timeout,
                memory_bytes: self.compile_memory_mb.saturating_mul(1 << 20),
            }),
            cache_max_bytes: self.cache_max_mb.saturating_mul(1 << 20),
            seed_secret: self.seed_secret.clone(),
        })
    }
}

/// Batch ingestion: job state, workers, write rate, alerts, AWS Batch and S3.
#[derive(Debug, Clone, Args)]
pub struct BatchSettings {
    /// DynamoDB table of job state (runs, shards, checkpoints, the scheduler lease).
    #[arg(long, env = "FH_JOBS_TABLE", default_value = "feature-host-jobs")]
    pub jobs_table: String,

    /// Shards one process runs at once (local engine).
    #[arg(long, env = "FH_BATCH_WORKERS", default_value_t = 4)]
    pub workers: usize,

    /// Rows per plugin call and store batch.
    #[arg(long, env = "FH_BATCH_ROWS", default_value_t = 1000)]
    pub rows_per_batch: usize,

    /// Rows per second one process may write from backfills (0: no limit). Keeps a backfill
    /// from starving the stream's writes to the same tables.
    #[arg(long, env = "FH_BATCH_MAX_ROWS_PER_SEC", default_value_t = 0)]
    pub max_rows_per_sec: u64,

    /// `parallelism: auto`: one shard per this many rows (when the source says its row
    /// count, as Parquet does)...
    #[arg(long, env = "FH_BATCH_SHARD_ROWS", default_value_t = 1_000_000)]
    pub shard_rows: u64,

    /// ...or per this many bytes, whichever gives more shards.
    #[arg(long, env = "FH_BATCH_SHARD_BYTES", default_value_t = 256 << 20)]
    pub shard_bytes: u64,

    /// Starts of a failing shard (each from its checkpoint) before its run fails.
    #[arg(long, env = "FH_BATCH_SHARD_ATTEMPTS", default_value_t = 3)]
    pub shard_attempts: u32,

    /// A run whose owner has not written a heartbeat for this long is taken over (resumed
    /// from its checkpoints) by the scheduling replica.
    #[arg(long, env = "FH_BATCH_RUN_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub run_lease: Duration,

    /// Run cron schedules and pick up submitted runs in this process.
    #[arg(long, env = "FH_SCHEDULER", default_value_t = true, action = clap::ArgAction::Set)]
    pub scheduler: bool,

    /// The scheduler lease: only its holder schedules; a holder silent for this long is
    /// replaced.
    #[arg(long, env = "FH_SCHEDULER_LEASE", default_value = "15s", value_parser = humantime::parse_duration)]
    pub scheduler_lease: Duration,

    /// Alert when a run or shard waits (SUBMITTED, PENDING, RUNNABLE) longer than this.
    #[arg(long, env = "FH_BATCH_STUCK_AFTER", default_value = "15m", value_parser = humantime::parse_duration)]
    pub stuck_after: Duration,

    /// How often the monitor looks at runs.
    #[arg(long, env = "FH_BATCH_MONITOR_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub monitor_interval: Duration,

    /// POST alerts as JSON (`{"text": …}`, Slack-compatible) to this http:// URL.
    #[arg(long, env = "FH_ALERT_WEBHOOK", hide_env_values = true)]
    pub alert_webhook: Option<Secret>,

    /// Base URL of this host's admin API, for links in local jobs' alerts (default:
    /// `http://<FH_ADMIN_ADDR>`).
    #[arg(long, env = "FH_ADMIN_URL")]
    pub admin_url: Option<String>,

    /// S3 endpoint override (moto, MinIO): path-style addressing.
    #[arg(long, env = "FH_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// AWS Batch endpoint override (moto).
    #[arg(long, env = "FH_AWS_BATCH_ENDPOINT")]
    pub aws_batch_endpoint: Option<String>,

    /// AWS Batch job queue for `engine: aws-batch`.
    #[arg(long, env = "FH_AWS_BATCH_JOB_QUEUE")]
    pub aws_batch_job_queue: Option<String>,

    /// AWS Batch job definition (its image's entrypoint is this `feature-host` binary).
    #[arg(long, env = "FH_AWS_BATCH_JOB_DEFINITION")]
    pub aws_batch_job_definition: Option<String>,

    /// How often an aws-batch run's job status is polled (DescribeJobs).
    #[arg(long, env = "FH_AWS_BATCH_POLL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub aws_batch_poll: Duration,
}

impl BatchSettings {
    pub fn shard_target(&self) -> crate::batch::plan::ShardTarget {
        crate::batch::plan::ShardTarget {
            rows: self.shard_rows.max(1),
            bytes: self.shard_bytes.max(1),
            ..Default::default()
        }
    }
}

/// A position retention: whole seconds, at least one (a shorter one would drop an entry in
/// the very write that makes it).
fn parse_retention(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) {
        return Err(format!(
            "{s:?} is under one second; positions must outlive their write"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn settings_print_without_their_secrets() {
        use clap::Parser as _;
        let secrets = [
            "token-hunter1-0123456789abcdef0123456789",
            "hunter2",
            "hunter3",
            "hunter4",
        ];
        let cli = crate::cli::Cli::try_parse_from([
            "feature-host",
            "run",
            "--admin-token",
            secrets[0],
            "--redis-url",
            "redis://:hunter2@cache.example:6379/0",
            "--kafka-properties",
            "sasl.password=hunter3",
            "--alert-webhook",
            "https://hooks.example/services/hunter4",
        ])
        .unwrap();
        // What a `debug!(?settings)` or a panic message would print.
        let shown = format!("{cli:?}");
        for secret in secrets {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }
}
