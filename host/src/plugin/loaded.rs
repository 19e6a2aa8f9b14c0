//! One loaded plugin version: its cached `InstancePre`, its config, and a small pool of
//! initialized instances reused across calls.

use super::bindings;
use super::convert::{from_wit_result, to_wit_event};
use super::sandbox::HostState;
use super::{EPOCH_TICK, EventResult, PluginError};
use crate::event::Event;
use crate::spec::PluginLimits;
use crate::text::cut;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use wasmtime::{Engine, Store, Trap};

/// How Wasmtime's error for a call over its hostcall fuel reads (its type is private). The
/// output-bound test pins it: a Wasmtime upgrade that rewords it fails there.
const HOSTCALL_FUEL_EXHAUSTED: &str = "fuel allocated for hostcalls has been exhausted";

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
    /// SHA-256 of the component, lowercase hex; its first 16 digits are the version.
    sha256: String,
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
        seed: u64,
        sha256: String,
        pre: bindings::FeaturePluginPre<HostState>,
        config_json: String,
        limits: PluginLimits,
    ) -> Result<Plugin, PluginError> {
        let recycle_mb = limits.recycle_mb.unwrap_or(limits.memory_mb / 2).max(1);
        let plugin = Plugin {
            inner: Arc::new(PluginInner {
                engine,
                group: group.into(),
                sha256,
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
        self.inner.version()
    }

    /// The compiled component the plugin instantiates.
    pub(super) fn component(&self) -> &wasmtime::component::Component {
        self.inner.pre.instance_pre().component()
    }

    /// The component's whole SHA-256 (lowercase hex): what tells two builds apart.
    pub fn sha256(&self) -> &str {
        &self.inner.sha256
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

    /// [`process`](Self::process), but a call that traps or times out does not fail its
    /// whole batch: the failed batch is split in halves and each half called again, down to
    /// single events, so only the offending events fail — each with its own reason. The
    /// other events of a failed call run once more (on a fresh instance: plugins keep no
    /// state between calls, it lives in the stores). One bad event in a batch of n costs
    /// about 2·log2(n) extra calls; a plugin that fails every event, 2n − 1 calls.
    pub async fn process_isolating(&self, events: Arc<Vec<Event>>) -> Isolated {
        let inner = self.inner.clone();
        let n = events.len();
        tokio::task::spawn_blocking(move || {
            let (results, failed_calls) = bisect(n, |range| inner.call(&events[range]));
            Isolated {
                results,
                failed_calls,
            }
        })
        .await
        .unwrap_or_else(|e| Isolated {
            results: (0..n)
                .map(|_| Err(PluginError::Cancelled(e.to_string())))
                .collect(),
            failed_calls: 1,
        })
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

/// The outcome of [`Plugin::process_isolating`].
#[derive(Debug)]
pub struct Isolated {
    /// One per event: the plugin's result, or why the call that was down to this event
    /// failed.
    pub results: Vec<Result<EventResult, PluginError>>,
    /// Calls that failed (trap, timeout, wrong result count) on the way.
    pub failed_calls: u64,
}

/// Call `call` on `0..n`; on failure split the range in halves and call each, down to
/// single items, which then carry the error. Results stay in index order.
fn bisect<R, E>(
    n: usize,
    mut call: impl FnMut(std::ops::Range<usize>) -> Result<Vec<R>, E>,
) -> (Vec<Result<R, E>>, u64) {
    let mut out: Vec<Option<Result<R, E>>> = (0..n).map(|_| None).collect();
    let mut failed = 0;
    let mut todo: Vec<std::ops::Range<usize>> = Vec::new();
    todo.push(0..n);
    while let Some(range) = todo.pop() {
        if range.is_empty() {
            continue;
        }
        match call(range.clone()) {
            Ok(results) => {
                for (slot, r) in out[range].iter_mut().zip(results) {
                    *slot = Some(Ok(r));
                }
            }
            Err(e) => {
                failed += 1;
                if range.len() == 1 {
                    out[range.start] = Some(Err(e));
                } else {
                    let mid = range.start + range.len() / 2;
                    todo.push(mid..range.end);
                    todo.push(range.start..mid);
                }
            }
        }
    }
    let results = out
        .into_iter()
        .map(|r| r.expect("bisect covers every index"))
        .collect();
    (results, failed)
}

impl PluginInner {
    fn version(&self) -> &str {
        &self.sha256[..16]
    }

    fn tag(&self) -> String {
        format!("{}@{}", self.group, self.version())
    }

    fn new_instance(&self) -> Result<Instance, PluginError> {
        let state = HostState::new(
            &self.group,
            self.version(),
            (self.limits.memory_mb as usize) << 20,
            self.seed,
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        // Wasmtime charges every byte it copies out of the instance against this, whatever
        // the guest's memory: a result's strings may all alias one buffer.
        store.set_hostcall_fuel((self.limits.output_mb as usize) << 20);
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
        if e.root_cause().to_string().contains(HOSTCALL_FUEL_EXHAUSTED) {
            return PluginError::OutputTooLarge {
                plugin: self.tag(),
                limit_mb: self.limits.output_mb,
            };
        }
        let mut message = trap_message(&e);
        if let Some(panic) = store.data_mut().last_error.take() {
            // One line: a panic message is `panicked at file:line:\nmessage`; and short, since
            // it travels in every retry header.
            let panic = panic.split_whitespace().collect::<Vec<_>>().join(" ");
            let mut panic = panic;
            cut(&mut panic, 512);
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
        instance.store.data_mut().start_call();
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

/// A trap's reason on one line: what trapped and the innermost frames that have names
/// (`file:line` where the module kept debug info) — never the whole backtrace of
/// `<unknown>!<wasm function N>` frames, which would travel in every retry header.
fn trap_message(e: &wasmtime::Error) -> String {
    const MAX: usize = 300;
    let what = e.root_cause().to_string();
    let frames: Vec<String> = e
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .map(|bt| {
            bt.frames()
                .iter()
                .filter_map(|f| {
                    let located = f.symbols().iter().find_map(|s| {
                        Some(format!(
                            "{} ({}:{})",
                            s.name().unwrap_or("?"),
                            s.file()?,
                            s.line().unwrap_or(0)
                        ))
                    });
                    located.or_else(|| f.func_name().map(str::to_owned))
                })
                .take(3)
                .collect()
        })
        .unwrap_or_default();
    let mut message = if frames.is_empty() {
        what
    } else {
        format!("{what}; at {}", frames.join(" < "))
    };
    cut(&mut message, MAX);
    message
}

#[cfg(test)]
mod tests {
    use super::bisect;

    /// A call over a range that fails when it holds a "poisoned" index.
    fn run(n: usize, poison: &[usize]) -> (Vec<Result<usize, String>>, u64, usize) {
        let mut calls = 0;
        let (out, failed) = bisect(n, |r: std::ops::Range<usize>| {
            calls += 1;
            match r.clone().find(|i| poison.contains(i)) {
                Some(bad) => Err(format!("trap at {bad}")),
                None => Ok(r.map(|i| i * 10).collect()),
            }
        });
        (out, failed, calls)
    }

    #[test]
    fn only_the_poisoned_events_fail_each_with_its_own_reason() {
        let (out, failed, calls) = run(8, &[5]);
        for (i, r) in out.iter().enumerate() {
            if i == 5 {
                assert_eq!(r, &Err("trap at 5".to_string()));
            } else {
                assert_eq!(r, &Ok(i * 10), "event {i}");
            }
        }
        assert_eq!(failed, 4, "8 → 4 → 2 → 1");
        assert_eq!(calls, 7, "one call per level for each half");

        let (out, _, _) = run(5, &[0, 4]);
        assert_eq!(out[0], Err("trap at 0".into()));
        assert_eq!(out[4], Err("trap at 4".into()));
        assert!(out[1..4].iter().all(Result::is_ok));
    }

    #[test]
    fn a_healthy_batch_is_one_call_and_a_hopeless_one_is_bounded() {
        assert_eq!(run(64, &[]).2, 1);
        let all: Vec<usize> = (0..64).collect();
        let (out, failed, calls) = run(64, &all);
        assert!(out.iter().all(Result::is_err));
        assert_eq!((failed, calls), (127, 127), "2n − 1");
        assert!(run(0, &[]).0.is_empty());
    }
}
