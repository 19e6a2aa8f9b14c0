//! The WASM plugin runtime: compiling components, sandboxing them, calling them with batches.
//!
//! - [`PluginEngine`]: one wasmtime engine for the process (epoch ticker for CPU deadlines);
//! - [`Plugin`]: one compiled, interface-checked plugin version (`InstancePre` cached), with a
//!   small pool of initialized instances;
//! - calls run on tokio's blocking pool, never on the async workers that drive consumers.

mod bindings {
    wasmtime::component::bindgen!({
        path: "../plugin-sdk/wit",
        world: "feature-plugin",
    });
}

pub mod test_cmd;

use crate::event::Event;
use crate::feature::{Op, Value, Write};
use crate::spec::PluginLimits;
use bindings::feature_host::plugin::{log as wit_log, types as wit};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Granularity of CPU deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Instances kept warm per plugin version.
const POOL_SIZE: usize = 8;

/// Why a plugin could not be loaded or called.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot read plugin {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("plugin {path} is not a valid WASM component: {message}")]
    Compile { path: String, message: String },
    #[error("plugin {path} does not implement the feature-host plugin interface: {message}")]
    Interface { path: String, message: String },
    #[error("plugin {plugin} rejected its config: {message}")]
    Init { plugin: String, message: String },
    #[error("plugin {plugin} exceeded its CPU deadline of {timeout_ms} ms")]
    Timeout { plugin: String, timeout_ms: u64 },
    #[error("plugin {plugin} trapped: {message}")]
    Trap { plugin: String, message: String },
    #[error("plugin {plugin} returned {got} results for {expected} events")]
    ResultCount {
        plugin: String,
        expected: usize,
        got: usize,
    },
    #[error("plugin call was cancelled: {0}")]
    Cancelled(String),
}

/// Per-event failure reported by a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventFailure {
    /// Never succeeds: dead-letter.
    Invalid(String),
    /// Transient: retry.
    Retryable(String),
}

/// Result of one event in a batch call.
pub type EventResult = Result<Vec<Write>, EventFailure>;

/// Process-wide wasmtime engine and linker.
#[derive(Clone)]
pub struct PluginEngine {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    /// Compiled components by content hash: groups sharing a module compile it once.
    compiled: Arc<Mutex<std::collections::HashMap<String, Component>>>,
}

impl PluginEngine {
    pub fn new() -> anyhow::Result<PluginEngine> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        let engine = Engine::new(&config)?;
        let mut linker = Linker::<HostState>::new(&engine);
        // The WASI imports Rust's std links are provided with an empty context: no
        // preopened directories, no environment, no arguments, no network, no stdio.
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        bindings::FeaturePlugin::add_to_linker::<HostState, HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;
        Ok(PluginEngine {
            engine,
            linker: Arc::new(linker),
            compiled: Default::default(),
        })
    }

    /// Compile and type-check the component at `path` and initialize one instance with
    /// `config` (so a plugin that rejects its config is refused here, not on the hot path).
    /// Blocking: call from a blocking context.
    pub fn load(
        &self,
        group: &str,
        path: &Path,
        config: Option<&serde_json::Value>,
        limits: &PluginLimits,
    ) -> Result<Plugin, PluginError> {
        let display = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| PluginError::Read {
            path: display.clone(),
            source,
        })?;
        self.load_bytes(group, &display, &bytes, config, limits)
    }

    /// As [`PluginEngine::load`], from bytes.
    pub fn load_bytes(
        &self,
        group: &str,
        path: &str,
        bytes: &[u8],
        config: Option<&serde_json::Value>,
        limits: &PluginLimits,
    ) -> Result<Plugin, PluginError> {
        let version = hex::encode(&Sha256::digest(bytes)[..8]);
        let cached = self
            .compiled
            .lock()
            .expect("compiled lock")
            .get(&version)
            .cloned();
        let component = match cached {
            Some(c) => c,
            None => {
                let c = Component::new(&self.engine, bytes).map_err(|e| PluginError::Compile {
                    path: path.into(),
                    message: format!("{e:#}"),
                })?;
                self.compiled
                    .lock()
                    .expect("compiled lock")
                    .insert(version.clone(), c.clone());
                c
            }
        };
        let interface = |e: wasmtime::Error| PluginError::Interface {
            path: path.into(),
            message: format!("{e:#}"),
        };
        let pre = self.linker.instantiate_pre(&component).map_err(interface)?;
        let pre = bindings::FeaturePluginPre::new(pre).map_err(interface)?;
        let plugin = Plugin {
            inner: Arc::new(PluginInner {
                engine: self.engine.clone(),
                group: group.into(),
                version,
                pre,
                config_json: config.map_or_else(|| "null".into(), |c| c.to_string()),
                limits: limits.clone(),
                pool: Mutex::new(Vec::new()),
            }),
        };
        let instance = plugin.inner.new_instance()?;
        plugin.inner.pool.lock().expect("pool lock").push(instance);
        Ok(plugin)
    }
}

/// One loaded plugin version. Cheap to clone.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<PluginInner>,
}

struct PluginInner {
    engine: Engine,
    group: String,
    version: String,
    pre: bindings::FeaturePluginPre<HostState>,
    config_json: String,
    limits: PluginLimits,
    pool: Mutex<Vec<Instance>>,
}

struct Instance {
    store: Store<HostState>,
    bindings: bindings::FeaturePlugin,
}

struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    group: String,
    version: String,
    /// The last error-level message, which the SDK's panic hook uses for panics: attached
    /// to the trap so the host error says what panicked where.
    last_error: Option<String>,
}

/// The only clock a plugin sees: stopped at the Unix epoch. Time comes from the events'
/// timestamps, so a transform is a function of its input (replays and backfills compute
/// the same writes).
struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wit::Host for HostState {}

impl wit_log::Host for HostState {
    fn log(&mut self, level: wit_log::Level, message: String) {
        let (group, version) = (&self.group, &self.version);
        match level {
            wit_log::Level::Trace => {
                tracing::trace!(plugin = %group, version = %version, "{message}")
            }
            wit_log::Level::Debug => {
                tracing::debug!(plugin = %group, version = %version, "{message}")
            }
            wit_log::Level::Info => {
                tracing::info!(plugin = %group, version = %version, "{message}")
            }
            wit_log::Level::Warn => {
                tracing::warn!(plugin = %group, version = %version, "{message}")
            }
            wit_log::Level::Error => {
                tracing::error!(plugin = %group, version = %version, "{message}");
                self.last_error = Some(message);
            }
        }
    }
}

impl PluginInner {
    fn tag(&self) -> String {
        format!("{}@{}", self.group, self.version)
    }

    fn new_instance(&self) -> Result<Instance, PluginError> {
        let state = HostState {
            wasi: WasiCtx::builder()
                .wall_clock(FrozenClock)
                .monotonic_clock(FrozenClock)
                .build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(self.limits.memory_mb as usize * 1024 * 1024)
                .instances(16)
                .build(),
            group: self.group.clone(),
            version: self.version.clone(),
            last_error: None,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        self.arm_deadline(&mut store);
        let bindings = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| self.call_error(&mut store, e))?;
        match bindings.call_init(&mut store, &self.config_json) {
            Ok(Ok(())) => Ok(Instance { store, bindings }),
            Ok(Err(message)) => Err(PluginError::Init {
                plugin: self.tag(),
                message,
            }),
            Err(e) => Err(self.call_error(&mut store, e)),
        }
    }

    fn arm_deadline(&self, store: &mut Store<HostState>) {
        let ticks = self
            .limits
            .timeout_ms
            .div_ceil(EPOCH_TICK.as_millis() as u64)
            .max(1);
        store.set_epoch_deadline(ticks);
    }

    fn call_error(&self, store: &mut Store<HostState>, e: wasmtime::Error) -> PluginError {
        if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return PluginError::Timeout {
                plugin: self.tag(),
                timeout_ms: self.limits.timeout_ms,
            };
        }
        let mut message = format!("{e:#}");
        if let Some(panic) = store.data_mut().last_error.take() {
            message = format!("{panic} ({message})");
        }
        PluginError::Trap {
            plugin: self.tag(),
            message,
        }
    }

    fn call(&self, events: &[Event]) -> Result<Vec<EventResult>, PluginError> {
        let pooled = self.pool.lock().expect("pool lock").pop();
        let mut instance = match pooled {
            Some(i) => i,
            None => self.new_instance()?,
        };
        let input: Vec<wit::Event> = events.iter().map(to_wit_event).collect();
        self.arm_deadline(&mut instance.store);
        instance.store.data_mut().last_error = None;
        // On any failure the instance is dropped, not returned to the pool: its state may be
        // corrupt after a trap.
        let output = match instance.bindings.call_process(&mut instance.store, &input) {
            Ok(out) => out,
            Err(e) => return Err(self.call_error(&mut instance.store, e)),
        };
        if output.len() != events.len() {
            return Err(PluginError::ResultCount {
                plugin: self.tag(),
                expected: events.len(),
                got: output.len(),
            });
        }
        let mut pool = self.pool.lock().expect("pool lock");
        if pool.len() < POOL_SIZE {
            pool.push(instance);
        }
        drop(pool);
        Ok(output
            .into_iter()
            .map(|r| match r {
                Ok(writes) => Ok(writes.into_iter().map(from_wit_write).collect()),
                Err(wit::EventError::Invalid(m)) => Err(EventFailure::Invalid(m)),
                Err(wit::EventError::Retryable(m)) => Err(EventFailure::Retryable(m)),
            })
            .collect())
    }
}

impl Plugin {
    /// The group this plugin serves.
    pub fn group(&self) -> &str {
        &self.inner.group
    }

    /// Content hash (first 16 hex digits of SHA-256) of the component.
    pub fn version(&self) -> &str {
        &self.inner.version
    }

    /// Run one batch synchronously (blocking the calling thread).
    pub fn process_blocking(&self, events: &[Event]) -> Result<Vec<EventResult>, PluginError> {
        self.inner.call(events)
    }

    /// Run one batch on the blocking pool, so the async consumer threads never stall.
    pub async fn process(&self, events: Arc<Vec<Event>>) -> Result<Vec<EventResult>, PluginError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.call(&events))
            .await
            .map_err(|e| PluginError::Cancelled(e.to_string()))?
    }
}

fn to_wit_event(e: &Event) -> wit::Event {
    wit::Event {
        source: e.topic.clone(),
        partition: e.partition,
        offset: e.offset,
        key: e.key.clone(),
        timestamp_ms: e.timestamp_ms,
        headers: e
            .headers
            .iter()
            .map(|(k, v)| wit::Header {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        payload: e.payload.clone(),
    }
}

fn from_wit_value(v: wit::Value) -> Value {
    match v {
        wit::Value::Boolean(b) => Value::Bool(b),
        wit::Value::Int(i) => Value::Int(i),
        wit::Value::Float(f) => Value::Float(f),
        wit::Value::Text(s) => Value::String(s),
        wit::Value::Bytes(b) => Value::Bytes(b),
        wit::Value::IntList(l) => Value::IntList(l),
        wit::Value::FloatList(l) => Value::FloatList(l),
        wit::Value::TextList(l) => Value::StringList(l),
        wit::Value::Vector(v) => Value::Vector(v),
    }
}

fn from_wit_write(w: wit::Write) -> Write {
    let op = match w.op {
        wit::Op::Set(v) => Op::Set(from_wit_value(v)),
        wit::Op::Incr(v) => Op::Incr(from_wit_value(v)),
        wit::Op::Max(v) => Op::Max(from_wit_value(v)),
        wit::Op::Min(v) => Op::Min(from_wit_value(v)),
        wit::Op::Append(a) => Op::Append {
            item: from_wit_value(a.item),
            cap: a.cap,
        },
        wit::Op::Delete => Op::Delete,
    };
    Write {
        entity: w.entity,
        feature: w.feature,
        op,
        event_time_ms: w.event_time_ms,
    }
}
