//! One loaded plugin version: its cached `InstancePre`, its config, and a small pool of
//! initialized instances reused across calls.

use super::bindings;
use super::convert::{from_wit_result, to_wit_event};
use super::sandbox::HostState;
use super::{EPOCH_TICK, EventResult, PluginError};
use crate::event::Event;
use crate::spec::PluginLimits;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use wasmtime::{Engine, Store, Trap};

/// Instances kept warm per plugin version: enough for the concurrent batches of a busy
/// partition set, few enough that 50 groups stay small.
const POOL_SIZE: usize = 8;

/// One loaded plugin version. Cheap to clone.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<PluginInner>,
}

struct PluginInner {
    engine: Engine,
    group: String,
    version: String,
    seed: u64,
    pre: bindings::FeaturePluginPre<HostState>,
    config_json: String,
    limits: PluginLimits,
    recycle_bytes: usize,
    pool: Mutex<Vec<Instance>>,
    /// Instances dropped after a call (memory high-water mark, trap, timeout) since the
    /// last [`Plugin::take_recycled`].
    recycled: AtomicU64,
}

struct Instance {
    store: Store<HostState>,
    bindings: bindings::FeaturePlugin,
}

impl Plugin {
    /// Initialize one instance right away, so a plugin that rejects its config (or traps in
    /// init) is refused at load time, not on the hot path.
    pub(super) fn new(
        engine: Engine,
        group: &str,
        version: String,
        pre: bindings::FeaturePluginPre<HostState>,
        config_json: String,
        limits: PluginLimits,
    ) -> Result<Plugin, PluginError> {
        let seed = u64::from_str_radix(&version, 16).unwrap_or(0);
        let recycle_mb = limits.recycle_mb.unwrap_or(limits.memory_mb / 2).max(1);
        let plugin = Plugin {
            inner: Arc::new(PluginInner {
                engine,
                group: group.into(),
                version,
                seed,
                pre,
                config_json,
                recycle_bytes: (recycle_mb as usize) << 20,
                limits,
                pool: Mutex::new(Vec::new()),
                recycled: AtomicU64::new(0),
            }),
        };
        let instance = plugin.inner.new_instance()?;
        plugin.inner.pool.lock().expect("pool lock").push(instance);
        Ok(plugin)
    }

    /// The group this plugin serves.
    pub fn group(&self) -> &str {
        &self.inner.group
    }

    /// Content hash (first 16 hex digits of SHA-256) of the component.
    pub fn version(&self) -> &str {
        &self.inner.version
    }

    /// Instances kept warm right now.
    pub fn pooled_instances(&self) -> usize {
        self.inner.pool.lock().expect("pool lock").len()
    }

    /// Instances replaced since the last call of this method (for the recycle metric).
    pub fn take_recycled(&self) -> u64 {
        self.inner.recycled.swap(0, Ordering::Relaxed)
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

    /// Drop every warm instance (`fresh`: and start one new one). Used after the golden
    /// events ran, so no synthetic event's state reaches live traffic, and on a version that
    /// stopped serving, so a kept rollback target holds no instances.
    pub fn reset_pool(&self, fresh: bool) -> Result<(), PluginError> {
        self.inner.pool.lock().expect("pool lock").clear();
        if fresh {
            self.warm(1)?;
        }
        Ok(())
    }

    /// Initialize `n` more instances now (e.g. to measure their footprint).
    pub fn warm(&self, n: usize) -> Result<(), PluginError> {
        for _ in 0..n {
            let i = self.inner.new_instance()?;
            self.inner.pool.lock().expect("pool lock").push(i);
        }
        Ok(())
    }
}

impl PluginInner {
    fn tag(&self) -> String {
        format!("{}@{}", self.group, self.version)
    }

    fn new_instance(&self) -> Result<Instance, PluginError> {
        let state = HostState::new(
            &self.group,
            &self.version,
            (self.limits.memory_mb as usize) << 20,
            self.seed,
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
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
        let input: Vec<_> = events.iter().map(to_wit_event).collect();
        self.arm_deadline(&mut instance.store);
        instance.store.data_mut().last_error = None;
        // On any failure the instance is dropped, not returned to the pool: its state may be
        // corrupt after a trap.
        let output = match instance.bindings.call_process(&mut instance.store, &input) {
            Ok(out) => out,
            Err(e) => {
                self.recycled.fetch_add(1, Ordering::Relaxed);
                return Err(self.call_error(&mut instance.store, e));
            }
        };
        if output.len() != events.len() {
            self.recycled.fetch_add(1, Ordering::Relaxed);
            return Err(PluginError::ResultCount {
                plugin: self.tag(),
                expected: events.len(),
                got: output.len(),
            });
        }
        if instance.store.data().limiter.high_water > self.recycle_bytes {
            self.recycled.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(plugin = %self.tag(), high_water = instance.store.data().limiter.high_water, "recycling a plugin instance past its memory high-water mark");
        } else {
            let mut pool = self.pool.lock().expect("pool lock");
            if pool.len() < POOL_SIZE {
                pool.push(instance);
            }
        }
        Ok(output.into_iter().map(from_wit_result).collect())
    }
}
