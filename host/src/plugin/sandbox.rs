//! What a plugin instance can see and use: an empty WASI context (no preopened directories,
//! no environment, no arguments, no network, no stdio), a clock stopped at the Unix epoch,
//! randomness seeded from the plugin's version, a memory cap, and a log routed into the
//! host's logs.

use super::bindings::feature_host::plugin::{log as wit_log, types as wit};
use rand::SeedableRng as _;
use std::time::Duration;
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Per-store state of one plugin instance.
pub(super) struct HostState {
    wasi: WasiCtx,
    table: wasmtime::component::ResourceTable,
    pub(super) limiter: MemoryLimiter,
    group: String,
    version: String,
    /// The last error-level message, which the SDK's panic hook uses for panics: attached
    /// to the trap so the host error says what panicked where.
    pub(super) last_error: Option<String>,
}

impl HostState {
    /// `seed` makes the plugin's randomness reproducible: the same version fed the same
    /// events computes the same writes, so replays and backfills agree with live traffic.
    pub(super) fn new(group: &str, version: &str, memory_bytes: usize, seed: u64) -> HostState {
        HostState {
            wasi: WasiCtx::builder()
                .wall_clock(FrozenClock)
                .monotonic_clock(FrozenClock)
                .secure_random(rand::rngs::StdRng::seed_from_u64(seed))
                .insecure_random(rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed))
                .insecure_random_seed(u128::from(seed))
                .build(),
            table: wasmtime::component::ResourceTable::new(),
            limiter: MemoryLimiter {
                limits: StoreLimitsBuilder::new()
                    .memory_size(memory_bytes)
                    .instances(16)
                    .build(),
                high_water: 0,
            },
            group: group.into(),
            version: version.into(),
            last_error: None,
        }
    }
}

/// The store's memory cap, remembering the largest size any memory grew to: an instance
/// whose memory ballooned once keeps that memory for ever (linear memory never shrinks),
/// so it is recycled instead of reused.
pub(super) struct MemoryLimiter {
    limits: StoreLimits,
    pub(super) high_water: usize,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = self.limits.memory_growing(current, desired, maximum)?;
        if ok {
            self.high_water = self.high_water.max(desired);
        }
        Ok(ok)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
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
