//! What a plugin instance can see and use: an empty WASI context (no preopened directories,
//! no environment, no arguments, no network, no stdio), a clock stopped at the Unix epoch,
//! randomness seeded from a host secret and the plugin's version, a memory cap, and a log routed into the
//! host's logs.

use super::bindings::feature_host::plugin::{log as wit_log, types as wit};
use rand::SeedableRng as _;
use std::time::Duration;
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Core instances, tables and memories one plugin instance may create: a Rust component
/// needs a handful of each (its module, the canonical-ABI shims), these leave room for
/// components from other toolchains.
const MAX_INSTANCES: usize = 16;
const MAX_TABLES: usize = 64;
const MAX_MEMORIES: usize = 4;
/// Elements of any one table (a function table of a large component holds tens of
/// thousands).
const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// Live WASI resources (streams, pollables) of one instance; wasmtime's default is a million.
const MAX_RESOURCES: usize = 1024;
/// The longest log message kept, and how many messages one call may log: the `log` import is
/// the one way a plugin reaches the host's log pipeline, and a loop over it would flood it.
pub(super) const MAX_LOG_BYTES: usize = 4096;
pub(super) const MAX_LOGS_PER_CALL: u32 = 100;

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
    /// Messages logged in the current call, and how many of them were dropped.
    logs: u32,
    dropped_logs: u32,
}

impl HostState {
    /// `seed`: the guest's randomness (and std's hash keys) for this version, from the
    /// engine's secret (see `PluginEngine::seed`): the same in every instance of the version
    /// within a host, unpredictable outside it.
    pub(super) fn new(group: &str, version: &str, memory_bytes: usize, seed: u64) -> HostState {
        HostState {
            wasi: WasiCtx::builder()
                .wall_clock(FrozenClock)
                .monotonic_clock(FrozenClock)
                .secure_random(rand::rngs::StdRng::seed_from_u64(seed))
                .insecure_random(rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed))
                .insecure_random_seed(u128::from(seed))
                .build(),
            table: {
                let mut t = wasmtime::component::ResourceTable::new();
                t.set_max_capacity(MAX_RESOURCES);
                t
            },
            limiter: MemoryLimiter::new(memory_bytes),
            group: group.into(),
            version: version.into(),
            last_error: None,
            logs: 0,
            dropped_logs: 0,
        }
    }

    /// A call starts: its log budget is whole again. Says how many messages the previous
    /// call had dropped, once.
    pub(super) fn start_call(&mut self) {
        if self.dropped_logs > 0 {
            tracing::warn!(plugin = %self.group, version = %self.version, dropped = self.dropped_logs,
                limit = MAX_LOGS_PER_CALL, "a plugin call logged more than its limit; the rest were dropped");
        }
        self.logs = 0;
        self.dropped_logs = 0;
        self.last_error = None;
    }
}

/// The store's memory cap — over all its memories together, so a component that declares
/// several cannot have the cap once per memory — remembering the largest total: an instance
/// whose memory ballooned once keeps that memory for ever (linear memory never shrinks), so
/// it is recycled instead of reused.
pub(super) struct MemoryLimiter {
    /// Counts of instances, tables and memories, and table sizes.
    limits: StoreLimits,
    cap: usize,
    /// Bytes of all memories now (as approved; a grow that then failed stays counted).
    total: usize,
    pub(super) high_water: usize,
}

impl MemoryLimiter {
    pub(super) fn new(cap: usize) -> MemoryLimiter {
        MemoryLimiter {
            limits: StoreLimitsBuilder::new()
                .memory_size(cap)
                .instances(MAX_INSTANCES)
                .tables(MAX_TABLES)
                .memories(MAX_MEMORIES)
                .table_elements(MAX_TABLE_ELEMENTS)
                .build(),
            cap,
            total: 0,
            high_water: 0,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if !self.limits.memory_growing(current, desired, maximum)? {
            return Ok(false);
        }
        let total = (self.total - current.min(self.total)).saturating_add(desired);
        if total > self.cap {
            return Ok(false);
        }
        self.total = total;
        self.high_water = self.high_water.max(total);
        Ok(true)
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
    fn log(&mut self, level: wit_log::Level, mut message: String) {
        crate::text::cut(&mut message, MAX_LOG_BYTES);
        if self.logs >= MAX_LOGS_PER_CALL {
            self.dropped_logs += 1;
            // Still the reason a trap reports: the SDK logs a panic just before trapping.
            if matches!(level, wit_log::Level::Error) {
                self.last_error = Some(message);
            }
            return;
        }
        self.logs += 1;
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

#[cfg(test)]
mod tests {
    use super::*;
    use wit_log::Host as _;

    /// A component may declare several memories; the cap holds for all of them together.
    #[test]
    fn the_memory_cap_covers_every_memory_together() {
        let mib = 1 << 20;
        let mut l = MemoryLimiter::new(64 * mib);
        assert!(l.memory_growing(0, 40 * mib, None).unwrap(), "first memory");
        assert!(
            !l.memory_growing(0, 40 * mib, None).unwrap(),
            "a second memory of 40 MiB would make 80 MiB"
        );
        assert!(l.memory_growing(0, 24 * mib, None).unwrap(), "24 MiB fits");
        assert!(!l.memory_growing(40 * mib, 41 * mib, None).unwrap());
        assert_eq!(l.high_water, 64 * mib);
        assert!(!l.table_growing(0, MAX_TABLE_ELEMENTS + 1, None).unwrap());
    }

    /// A plugin cannot flood the host's logs: messages are cut, and a call's excess dropped.
    #[test]
    fn logs_are_bounded_in_size_and_count_per_call() {
        let mut s = HostState::new("g", "v", 1 << 20, 0);
        s.log(wit_log::Level::Error, "x".repeat(1 << 20));
        let kept = s.last_error.clone().unwrap();
        assert!(
            kept.len() <= MAX_LOG_BYTES + '…'.len_utf8(),
            "{}",
            kept.len()
        );
        for i in 0..MAX_LOGS_PER_CALL + 50 {
            s.log(wit_log::Level::Error, format!("m{i}"));
        }
        assert_eq!(s.dropped_logs, 51);
        assert_eq!(
            s.last_error.as_deref(),
            Some("m149"),
            "a dropped error is still what a trap reports"
        );
        s.start_call();
        assert_eq!(
            (s.logs, s.dropped_logs, s.last_error.is_none()),
            (0, 0, true)
        );
        s.log(wit_log::Level::Error, "again".into());
        assert_eq!(s.last_error.as_deref(), Some("again"));
    }
}
