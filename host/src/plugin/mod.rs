//! The WASM plugin runtime: compiling components, sandboxing them, calling them with
//! batches, and replacing them live.
//!
//! - [`engine`]: one wasmtime engine for the process (pooling allocator, epoch ticker for
//!   CPU deadlines, compiled-component caches; [`artifacts`] keeps machine code on disk);
//! - [`loaded`]: one compiled, interface-checked plugin version (`InstancePre` cached) with a
//!   small pool of initialized instances, recycled past a memory high-water mark;
//! - [`sandbox`]: what an instance may see (nothing but its input and a log);
//! - [`golden`]: a spec's golden events, checked before a version may serve;
//! - [`reload`]: watching the plugin and spec directories and swapping versions live.
//!
//! Calls run on tokio's blocking pool, never on the async workers that drive consumers.

pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "../plugin-sdk/wit",
        world: "feature-plugin",
    });
}

mod artifacts;
pub mod compiler;
mod convert;
pub mod engine;
pub mod golden;
pub mod loaded;
pub mod reload;
mod sandbox;
pub mod test_cmd;

pub use engine::{ComponentBytes, EngineSettings, PluginEngine, content_version};
pub use loaded::{Isolated, Plugin};

use crate::feature::Write;
use std::time::Duration;

/// Granularity of CPU deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Why a plugin could not be loaded or called.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot read plugin {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "plugin {path} is larger than {limit} bytes; a component that large is not compiled \
         (it would hold the compiler's time and memory)"
    )]
    TooLarge { path: String, limit: u64 },
    #[error(
        "plugin {path} is not the build its spec pins: the spec pins {pinned}, the plugin \
         file's SHA-256 is {actual}; ship the reviewed build, or update spec.plugin.sha256"
    )]
    Pinned {
        path: String,
        pinned: String,
        actual: String,
    },
    #[error(
        "plugin {path} did not compile within {} (FH_PLUGIN_COMPILE_TIMEOUT); the compile \
         was stopped and the loaded version keeps serving", humantime::format_duration(*limit)
    )]
    CompileTimeout {
        path: String,
        limit: std::time::Duration,
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
    #[error(
        "plugin {plugin} returned more than {limit_mb} MiB from one call \
         (plugin.limits.outputMb); its writes were refused"
    )]
    OutputTooLarge { plugin: String, limit_mb: u64 },
    #[error("plugin {plugin} returned {got} results for {expected} events")]
    ResultCount {
        plugin: String,
        expected: usize,
        got: usize,
    },
    #[error("plugin {plugin} failed its golden events: {message}")]
    Golden { plugin: String, message: String },
    #[error("plugin call was cancelled: {0}")]
    Cancelled(String),
}

impl PluginError {
    /// Whether calling again with the same input fails the same way: the event can then
    /// only be dead-lettered. A trap or a timeout may depend on the instance's state or the
    /// machine's load, so those are retried.
    pub fn is_deterministic(&self) -> bool {
        matches!(self, PluginError::OutputTooLarge { .. })
    }
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
