//! The process-wide wasmtime engine: compiler and allocator configuration, the CPU-deadline
//! ticker, the linker with the imports a plugin may use, and the compiled-component caches.

use super::artifacts::ArtifactCache;
use super::bindings;
use super::loaded::Plugin;
use super::sandbox::HostState;
use super::{EPOCH_TICK, PluginError};
use crate::spec::PluginLimits;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
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
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            max_instances: 1000,
            cache_dir: None,
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
    /// Compiled components by content hash: groups sharing a module compile it once, and a
    /// reload back to an earlier version (a rollback) compiles nothing.
    compiled: Arc<Mutex<Compiled>>,
    artifacts: Option<ArtifactCache>,
    pooling: bool,
}

impl PluginEngine {
    /// An engine with the default settings and no artifact cache on disk.
    pub fn new() -> anyhow::Result<PluginEngine> {
        PluginEngine::with_settings(&EngineSettings::default())
    }

    pub fn with_settings(settings: &EngineSettings) -> anyhow::Result<PluginEngine> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        let mut pooling = settings.max_instances > 0;
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
        let engine = match Engine::new(&config) {
            Ok(e) => e,
            Err(e) if pooling => {
                // E.g. a container with a low virtual-memory ulimit: run, just slower to
                // instantiate.
                tracing::warn!(error = %e, "pooling allocator unavailable; using on-demand instance allocation");
                pooling = false;
                config.allocation_strategy(InstanceAllocationStrategy::OnDemand);
                Engine::new(&config)?
            }
            Err(e) => return Err(e.into()),
        };
        let mut linker = Linker::<HostState>::new(&engine);
        // The WASI imports Rust's std links; what they can reach is decided by the context
        // each instance gets (see `sandbox`).
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        bindings::FeaturePlugin::add_to_linker::<HostState, HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )?;
        let artifacts = match &settings.cache_dir {
            Some(dir) => match ArtifactCache::open(dir, &engine) {
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
            pooling,
        })
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
        let bytes = read_component(path)?;
        self.load_bytes(group, &path.display().to_string(), &bytes, config, limits)
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
        let version = content_version(bytes);
        let component = self.component(&version, path, bytes)?;
        let interface = |e: wasmtime::Error| PluginError::Interface {
            path: path.into(),
            message: format!("{e:#}"),
        };
        let pre = self.linker.instantiate_pre(&component).map_err(interface)?;
        let pre = bindings::FeaturePluginPre::new(pre).map_err(interface)?;
        Plugin::new(
            self.engine.clone(),
            group,
            version,
            pre,
            config.map_or_else(|| "null".into(), |c| c.to_string()),
            limits.clone(),
        )
    }

    fn component(&self, version: &str, path: &str, bytes: &[u8]) -> Result<Component, PluginError> {
        if let Some(c) = self.compiled.lock().expect("compiled lock").get(version) {
            return Ok(c);
        }
        let cached = self
            .artifacts
            .as_ref()
            .and_then(|a| a.get(&self.engine, version));
        let component = match cached {
            Some(c) => c,
            None => {
                let c = Component::new(&self.engine, bytes).map_err(|e| PluginError::Compile {
                    path: path.into(),
                    message: format!("{e:#}"),
                })?;
                if let Some(a) = &self.artifacts {
                    a.put(version, &c);
                }
                c
            }
        };
        self.compiled
            .lock()
            .expect("compiled lock")
            .insert(version, &component);
        Ok(component)
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

/// A component file's bytes, refused before reading past [`MAX_COMPONENT_BYTES`] (the file
/// may still grow while it is read).
pub fn read_component(path: &Path) -> Result<Vec<u8>, PluginError> {
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
    Ok(bytes)
}

/// A plugin version: the first 16 hex digits of the SHA-256 of its bytes.
pub fn content_version(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}
