//! The scheduler: one replica at a time (a lease in job state) turns cron ticks into runs,
//! hands submitted and abandoned runs to executors, and runs the monitor.
//!
//! - **Each tick runs once.** A tick's run id is `<ingestion>-<tick time>` and is created
//!   with a put-if-absent, so even two schedulers that both believe they hold the lease
//!   (a clock jump, a paused process) create it once.
//! - **Missed ticks** (the host was down, or no replica held the lease): only the most
//!   recent missed tick runs, once; older ones are skipped, logged and counted in
//!   `fh_batch_missed_ticks_total`. A first start does not backfill history: scheduling
//!   starts at the next tick.
//! - **DAG:** a tick's run of an ingestion with `dependsOn` names its parents' runs of the
//!   same tick; a parent without that tick of its own (another or no schedule) gets one
//!   created, so the whole DAG runs per tick.
//! - `{date}` in a scheduled source is the UTC day before the tick (the last complete day).

use super::executor::{Request, claimable, new_run};
use super::jobs::Jobs;
use super::run::{RUN_PK, Trigger, run_id};
use crate::spec::SpecSet;
use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// Time, injectable for tests.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        super::run::now_ms()
    }
}

/// A clock tests move by hand.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(ms: i64) -> ManualClock {
        ManualClock(AtomicI64::new(ms))
    }
    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Lease {
    owner: String,
    expires_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ScheduleState {
    /// The last tick handled (run or skipped).
    last_tick_ms: i64,
}

const LEASE_PK: &str = "lease";
const LEASE_SK: &str = "scheduler";
const SCHEDULE_PK: &str = "schedule";

pub struct Scheduler {
    pub jobs: Jobs,
    pub specs: Arc<SpecSet>,
    pub owner: String,
    pub clock: Arc<dyn Clock>,
    pub lease: Duration,
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Scheduler {
    /// Take or renew the lease. `Ok(true)` while this scheduler holds it.
    pub async fn hold_lease(&self) -> anyhow::Result<bool> {
        let now = self.clock.now_ms();
        let lease = Lease {
            owner: self.owner.clone(),
            expires_ms: now + self.lease.as_millis() as i64,
        };
        let expected = match self.jobs.get::<Lease>(LEASE_PK, LEASE_SK).await? {
            None => 0,
            Some(s) if s.value.owner == self.owner || s.value.expires_ms <= now => s.version,
            Some(_) => return Ok(false),
        };
        let held = self
            .jobs
            .put(LEASE_PK, LEASE_SK, &lease, expected)
            .await?
            .is_some();
        if held && expected == 0 {
            tracing::info!(owner = %self.owner, "scheduler lease taken");
        }
        Ok(held)
    }

    /// One scheduling pass: if this replica holds the lease, create the runs of every due
    /// tick. Returns the ids of the runs it created.
    pub async fn tick(&self) -> anyhow::Result<Vec<String>> {
        if !self.hold_lease().await? {
            return Ok(Vec::new());
        }
        Ok(self.schedule_due().await)
    }

    /// Create the runs of every due tick; the caller holds the lease. One ingestion's problem
    /// (its source, job state) is logged and does not stop the others.
    pub async fn schedule_due(&self) -> Vec<String> {
        let now = self.clock.now_ms();
        let mut created = Vec::new();
        for def in self.specs.ingestions.values() {
            match self.tick_one(def, now).await {
                Ok(ids) => created.extend(ids),
                Err(e) => {
                    tracing::error!(ingestion = %def.name, error = %format!("{e:#}"), "cannot schedule ingestion")
                }
            }
        }
        created
    }

    async fn tick_one(
        &self,
        def: &crate::spec::IngestionDef,
        now: i64,
    ) -> anyhow::Result<Vec<String>> {
        let Some(expr) = &def.spec.schedule else {
            return Ok(Vec::new());
        };
        let cron: croner::Cron = expr
            .parse()
            .with_context(|| format!("ingestion {}: schedule {expr:?}", def.name))?;
        let state = self
            .jobs
            .get::<ScheduleState>(SCHEDULE_PK, &def.name)
            .await?;
        let Some(state) = state else {
            // First sight: start at the next tick.
            self.jobs
                .put(
                    SCHEDULE_PK,
                    &def.name,
                    &ScheduleState { last_tick_ms: now },
                    0,
                )
                .await?;
            return Ok(Vec::new());
        };
        let due = due_ticks(&cron, state.value.last_tick_ms, now);
        let Some(&latest) = due.last() else {
            return Ok(Vec::new());
        };
        if due.len() > 1 {
            tracing::warn!(ingestion = %def.name, skipped = due.len() - 1, "missed schedule ticks: running only the latest");
            if let Some(m) = &self.metrics {
                m.batch_missed_ticks
                    .get_or_create(&crate::metrics::IngestionLabels::new(&def.name))
                    .inc_by(due.len() as u64 - 1);
            }
        }
        // Runs first (put-if-absent, so a retry after a crash here is harmless), then the
        // tick: a tick is never marked handled without its run.
        let created = self.create_tick_runs(&def.name, latest).await?;
        self.jobs
            .put(
                SCHEDULE_PK,
                &def.name,
                &ScheduleState {
                    last_tick_ms: latest,
                },
                state.version,
            )
            .await?;
        Ok(created)
    }

    /// Create `ingestion`'s run of `tick` and, recursively, its parents' runs of the tick.
    async fn create_tick_runs(&self, ingestion: &str, tick: i64) -> anyhow::Result<Vec<String>> {
        let mut created = Vec::new();
        let mut stack = vec![ingestion.to_owned()];
        let mut seen = std::collections::BTreeSet::new();
        while let Some(name) = stack.pop() {
            if !seen.insert(name.clone()) {
                continue;
            }
            let def = self
                .specs
                .ingestions
                .get(&name)
                .with_context(|| format!("unknown ingestion {name}"))?;
            let parents: Vec<String> = def
                .spec
                .depends_on
                .iter()
                .map(|p| run_id(p, tick, None))
                .collect();
            stack.extend(def.spec.depends_on.iter().cloned());
            let day = chrono::DateTime::from_timestamp_millis(tick)
                .unwrap_or_default()
                .date_naive()
                .pred_opt();
            let req = Request {
                ingestion: name.clone(),
                from: day,
                to: day,
                ..Default::default()
            };
            let id = run_id(&name, tick, None);
            let run = new_run(
                &self.specs,
                &req,
                Trigger::Schedule { tick_ms: tick },
                id.clone(),
                self.clock.now_ms(),
                parents,
            )?;
            if self.jobs.put(RUN_PK, &id, &run, 0).await?.is_some() {
                tracing::info!(run = %id, "scheduled run created");
                created.push(id);
            }
        }
        Ok(created)
    }

    /// Runs this replica should execute now: submitted ones, and ones whose owner went
    /// quiet (crashed) — they resume from their checkpoints.
    pub async fn claimable_runs(&self, run_lease: Duration) -> anyhow::Result<Vec<String>> {
        let now = self.clock.now_ms();
        Ok(super::run::list_runs(&self.jobs)
            .await?
            .into_iter()
            .filter(|r| claimable(r, now, run_lease))
            .map(|r| r.id)
            .collect())
    }
}

/// The ticks of `cron` in `(after, until]`, oldest first (at most the last 1000).
pub fn due_ticks(cron: &croner::Cron, after: i64, until: i64) -> Vec<i64> {
    let mut ticks = std::collections::VecDeque::new();
    let Some(mut t) = chrono::DateTime::from_timestamp_millis(after) else {
        return Vec::new();
    };
    while let Ok(next) = cron.find_next_occurrence(&t, false) {
        let ms = next.timestamp_millis();
        if ms > until {
            break;
        }
        ticks.push_back(ms);
        if ticks.len() > 1000 {
            ticks.pop_front();
        }
        t = next;
    }
    ticks.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    #[test]
    fn due_ticks_are_the_ticks_in_the_window() {
        let cron: croner::Cron = "0 * * * *".parse().unwrap();
        let base = 1_764_000_000_000; // 16:00:00 UTC
        assert_eq!(due_ticks(&cron, base, base + HOUR - 1), Vec::<i64>::new());
        assert_eq!(due_ticks(&cron, base, base + HOUR), vec![base + HOUR]);
        assert_eq!(
            due_ticks(&cron, base + 1, base + 3 * HOUR + 5),
            vec![base + HOUR, base + 2 * HOUR, base + 3 * HOUR]
        );
        // The tick at `after` itself was handled already.
        assert_eq!(due_ticks(&cron, base, base), Vec::<i64>::new());
    }
}
