//! The process-wide wasmtime engine: compiler and allocator configuration, the CPU-deadline
//! ticker, the linker with the imports a plugin may use, and the compiled-component caches.

use super::artifacts::ArtifactCache;
use super::bindings;
use super::compiler::{CompilerSettings, compile_in_child};
use super::loaded::Plugin;
use super::sandbox::HostState;
use super::{EPOCH_TICK, PluginError};
use crate::spec::PluginLimits;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Engine-wide settings (from the environment, see `config.rs`).
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Plugin instances that may exist at once, across all groups and versions. With the
    /// pooling allocator their memory is reserved up front (virtual address space only) and
    /// instantiation is a few microseconds; 0 selects on-demand allocation.
    pub max_instances: u32,
    /// Where precompiled artifacts are kept; `None`: compile on every start.
    pub cache_dir: Option<PathBuf>,
    /// Largest the artifact cache may grow (the artifacts used least recently go first).
    pub cache_max_bytes: u64,
    /// Compile in a bounded child process (a serving host); `None`: in this process (tools,
    /// tests, benches).
    pub compiler: Option<CompilerSettings>,
    /// Guest randomness (and std's hash keys) derive from this and the plugin version
    /// (`FH_PLUGIN_SEED_SECRET`): replicas given the same secret draw the same numbers for a
    /// version, so a plugin whose output depends on them writes alike after a rebalance or
    /// a restart. `None`: a secret of this process's own, so draws differ between hosts.
    pub seed_secret: Option<crate::text::Secret>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            max_instances: 1000,
            cache_dir: None,
            cache_max_bytes: 512 << 20,
            compiler: None,
            seed_secret: None,
        }
    }
}

/// Largest linear memory a plugin may be granted (`limits.memoryMb` is capped at 4096).
const MAX_MEMORY_BYTES: usize = 4 << 30;
/// A Rust `wasm32-wasip2` component holds a handful of core instances (the program, the
/// WASI adapter shims); leave room for larger toolchains' output.
const CORE_INSTANCES_PER_COMPONENT: u32 = 16;

/// Process-wide wasmtime engine and linker. Cheap to clone.
#[derive(Clone)]
pub struct PluginEngine {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    /// Compiled components by SHA-256: groups sharing a module compile it once, and a
    /// reload back to an earlier version (a rollback) compiles nothing.
    compiled: Arc<Mutex<Compiled>>,
    artifacts: Option<ArtifactCache>,
    /// SHA-256s of components compiled here (not loaded from the artifact cache) whose
    /// plugin has not been accepted yet: written to the cache by [`PluginEngine::keep`] only
    /// once it is, so a refused candidate leaves nothing on disk. The last few only.
    fresh: Arc<Mutex<std::collections::VecDeque<String>>>,
    pooling: bool,
    compiler: Option<CompilerSettings>,
    /// Set once the host serves: compiles then use one thread (see [`PluginEngine::serving`]).
    serving: Arc<AtomicBool>,
    /// Seeds guest randomness ([`PluginEngine::seed`]); never leaves the process.
    secret: [u8; 32],
}

/// The engine configuration every compile and every instance shares (the child compiler's
/// included: an artifact loads only into an engine configured alike). `parallel`: compile a
/// component's functions on several threads.
pub(super) fn base_config(parallel: bool) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.parallel_compilation(parallel);
    config
}

impl PluginEngine {
    /// An engine with the default settings and no artifact cache on disk.
    pub fn new() -> anyhow::Result<PluginEngine> {
        PluginEngine::with_settings(&EngineSettings::default())
    }

    pub fn with_settings(settings: &EngineSettings) -> anyhow::Result<PluginEngine> {
        let mut config = base_config(true);
        let pooling = settings.max_instances > 0;
        if pooling {
            let n = settings.max_instances;
            let mut pool = PoolingAllocationConfig::new();
            pool.total_component_instances(n)
                .total_core_instances(n.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
                .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
                .total_memories(n.saturating_mul(2))
                .max_memories_per_component(4)
                .total_tables(n.saturating_mul(4))
                .max_tables_per_component(CORE_INSTANCES_PER_COMPONENT)
                .max_memory_size(MAX_MEMORY_BYTES)
                // Keep a slot's first MiB resident between instances: recycling a small
                // instance then costs no page faults for its stack and data.
                .linear_memory_keep_resident(1 << 20);
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        }
        // No silent fallback to on-demand allocation: the operator chose the pool (and its
        // instantiation cost); running otherwise is their call, made with the setting.
        let engine = Engine::new(&config).map_err(|e| {
            if pooling {
                anyhow::anyhow!(
                    "cannot reserve the plugin instance pool ({} instance slots, each up to {} GiB \
                     of address space): {e:#}. Raise the address-space limit (ulimit -v), lower \
                     FH_PLUGIN_MAX_INSTANCES, or set FH_PLUGIN_MAX_INSTANCES=0 for on-demand \
                     allocation (slower to instantiate; the same sandbox limits)",
                    settings.max_instances,
                    MAX_MEMORY_BYTES >> 30
                )
            } else {
                anyhow::anyhow!("cannot create the plugin engine: {e:#}")
            }
        })?;
        let mut linker = Linker::<HostState>::new(&engine);
        // The WASI imports Rust's std links; what they can reach is decided by the context
        // each instance gets (see `sandbox`).
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        bindings::FeaturePlugin::add_to_linker::<HostState, HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )?;
        let artifacts = match &settings.cache_dir {
            Some(dir) => match ArtifactCache::open(dir, &engine, settings.cache_max_bytes) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "plugin artifact cache unavailable; compiling on every start");
                    None
                }
            },
            None => None,
        };
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
            artifacts,
            fresh: Default::default(),
            pooling,
            compiler: settings.compiler.clone(),
            serving: Arc::default(),
            secret: match &settings.seed_secret {
                Some(s) => Sha256::new()
                    .chain_update(b"feature-host guest seed\0")
                    .chain_update(s.expose().as_bytes())
                    .finalize()
                    .into(),
                None => rand::random(),
            },
        })
    }

    /// The host now serves: compiles from here on (reloads) run on one thread, leaving the
    /// other cores to the stream.
    pub fn serving(&self) {
        self.serving.store(true, Ordering::Relaxed);
    }

    /// Whether instances come from the pooling allocator.
    pub fn pooling(&self) -> bool {
        self.pooling
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
        let file = read_component(path)?;
        self.load_bytes(group, &path.display().to_string(), &file, config, limits)
    }

    /// As [`PluginEngine::load`], from a component's bytes.
    pub fn load_bytes(
        &self,
        group: &str,
        path: &str,
        file: &ComponentBytes,
        config: Option<&serde_json::Value>,
        limits: &PluginLimits,
    ) -> Result<Plugin, PluginError> {
        let component = self.component(file.sha256(), path, file.bytes())?;
        let interface = |e: wasmtime::Error| PluginError::Interface {
            path: path.into(),
            message: format!("{e:#}"),
        };
        let pre = self.linker.instantiate_pre(&component).map_err(interface)?;
        let pre = bindings::FeaturePluginPre::new(pre).map_err(interface)?;
        Plugin::new(
            self.engine.clone(),
            group,
            self.seed(file.version()),
            file.sha256().to_owned(),
            pre,
            config.map_or_else(|| "null".into(), |c| c.to_string()),
            limits.clone(),
        )
    }

    /// The seed of a version's guest randomness: from this engine's secret, so producers
    /// cannot predict a plugin's hash keys, and the same for every instance of the version
    /// (they agree on hash order) — and on every host sharing `FH_PLUGIN_SEED_SECRET`.
    fn seed(&self, version: &str) -> u64 {
        let mut h = Sha256::new();
        h.update(self.secret);
        h.update(version.as_bytes());
        u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
    }

    /// The compiled component of `bytes`, whose SHA-256 is `sha256`.
    fn component(&self, sha256: &str, path: &str, bytes: &[u8]) -> Result<Component, PluginError> {
        if let Some(c) = self.compiled.lock().expect("compiled lock").get(sha256) {
            return Ok(c);
        }
        let cached = self
            .artifacts
            .as_ref()
            .and_then(|a| a.get(&self.engine, sha256));
        let component = match cached {
            Some(c) => c,
            None => {
                let c = match &self.compiler {
                    Some(compiler) => {
                        let parallel = !self.serving.load(Ordering::Relaxed);
                        let artifact = compile_in_child(compiler, path, bytes, parallel)?;
                        // SAFETY: the artifact came from the child's stdout (never a file
                        // anyone else could write), produced by this binary with this
                        // engine's configuration; wasmtime also checks the engine matches.
                        unsafe { Component::deserialize(&self.engine, &artifact) }
                    }
                    None => Component::new(&self.engine, bytes),
                }
                .map_err(|e| PluginError::Compile {
                    path: path.into(),
                    message: format!("{e:#}"),
                })?;
                if self.artifacts.is_some() {
                    let mut fresh = self.fresh.lock().expect("fresh lock");
                    if fresh.len() == COMPILED_KEPT {
                        fresh.pop_front();
                    }
                    fresh.push_back(sha256.to_owned());
                }
                c
            }
        };
        self.compiled
            .lock()
            .expect("compiled lock")
            .insert(sha256, &component);
        Ok(component)
    }
}

impl PluginEngine {
    /// `plugin` was accepted (it passed its checks and serves): keep its compiled component
    /// in the artifact cache (written if it was compiled here, renewed if it came from
    /// there), sparing the recently compiled components when the cache is pruned.
    pub fn keep(&self, plugin: &Plugin) {
        let fresh = {
            let mut fresh = self.fresh.lock().expect("fresh lock");
            let at = fresh.iter().position(|d| d == plugin.sha256());
            at.and_then(|i| fresh.remove(i)).is_some()
        };
        let Some(a) = &self.artifacts else { return };
        if fresh {
            let recent: Vec<String> = {
                let compiled = self.compiled.lock().expect("compiled lock");
                compiled.by_version.keys().cloned().collect()
            };
            let mut in_use: Vec<&str> = recent.iter().map(String::as_str).collect();
            in_use.push(plugin.sha256());
            a.put(plugin.sha256(), plugin.component(), &in_use);
        } else {
            a.renew(plugin.sha256());
        }
    }
}

/// Recently compiled components, bounded: every reload adds a version, and a long-running
/// host must not keep all of their machine code. Versions in use stay alive through their
/// plugins regardless.
#[derive(Default)]
struct Compiled {
    by_version: HashMap<String, Component>,
    order: std::collections::VecDeque<String>,
}

const COMPILED_KEPT: usize = 32;

impl Compiled {
    fn get(&self, version: &str) -> Option<Component> {
        self.by_version.get(version).cloned()
    }

    fn insert(&mut self, version: &str, c: &Component) {
        if self.by_version.insert(version.into(), c.clone()).is_none() {
            self.order.push_back(version.into());
        }
        while self.order.len() > COMPILED_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.by_version.remove(&old);
            }
        }
    }
}

/// The largest component file compiled: Rust plugins are a few MiB, interpreters packed as
/// components (Python, JavaScript) tens of MiB.
pub const MAX_COMPONENT_BYTES: u64 = 128 << 20;

/// A component's bytes and their SHA-256 (computed once: the version, the spec's pin and
/// the caches all use it).
pub struct ComponentBytes {
    bytes: Vec<u8>,
    sha256: String,
}

impl ComponentBytes {
    pub fn new(bytes: Vec<u8>) -> ComponentBytes {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        ComponentBytes { bytes, sha256 }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The whole digest, lowercase hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The plugin version these bytes are (see [`content_version`]).
    pub fn version(&self) -> &str {
        &self.sha256[..VERSION_DIGITS]
    }
}

/// A component file's bytes, refused before reading past [`MAX_COMPONENT_BYTES`] (the file
/// may still grow while it is read).
pub fn read_component(path: &Path) -> Result<ComponentBytes, PluginError> {
    use std::io::Read as _;
    let display = || path.display().to_string();
    let read = |source| PluginError::Read {
        path: display(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut bytes = Vec::new();
    file.take(MAX_COMPONENT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_COMPONENT_BYTES {
        return Err(PluginError::TooLarge {
            path: display(),
            limit: MAX_COMPONENT_BYTES,
        });
    }
    Ok(ComponentBytes::new(bytes))
}

/// Hex digits of a plugin version.
const VERSION_DIGITS: usize = 16;

/// A plugin version: the first 16 hex digits of the SHA-256 of its bytes (what operators
/// read; caches key by the whole digest).
pub fn content_version(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))[..VERSION_DIGITS].to_owned()
}
