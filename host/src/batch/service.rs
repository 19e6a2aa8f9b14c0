//! Batch work inside a running host: every second, the scheduler pass (lease, cron ticks),
//! then — on the replica holding the lease — executing claimable runs and, every
//! `FH_BATCH_MONITOR_INTERVAL`, the monitor.

use super::BatchContext;
use super::executor::{claim, execute};
use super::monitor::Monitor;
use super::scheduler::{Clock, Scheduler};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub fn scheduler(ctx: &BatchContext, clock: Arc<dyn Clock>) -> Scheduler {
    Scheduler {
        jobs: ctx.jobs.clone(),
        specs: ctx.specs.clone(),
        owner: ctx.owner.clone(),
        clock,
        lease: ctx.settings.scheduler_lease,
        metrics: Some(ctx.pipeline.metrics().clone()),
    }
}

pub fn monitor(ctx: &BatchContext) -> Monitor {
    Monitor {
        jobs: ctx.jobs.clone(),
        stuck_after: ctx.settings.stuck_after,
        webhook: ctx
            .settings
            .alert_webhook
            .as_ref()
            .map(|w| w.expose().to_owned()),
        admin_url: ctx.admin_url.clone(),
        region: super::aws_batch::region(),
        metrics: Some(ctx.pipeline.metrics().clone()),
    }
}

/// Run until `ctx.stop`; returns once this process's runs have stopped at their checkpoints.
pub async fn serve(ctx: BatchContext, clock: Arc<dyn Clock>) {
    let scheduler = scheduler(&ctx, clock.clone());
    let monitor = monitor(&ctx);
    let running: Arc<Mutex<HashSet<String>>> = Default::default();
    let mut tasks = tokio::task::JoinSet::new();
    let mut stop = ctx.stop.clone();
    let mut last_monitor = i64::MIN;
    loop {
        let leader = scheduler.hold_lease().await.unwrap_or_else(|e| {
            tracing::warn!(error = %format!("{e:#}"), "cannot take or renew the scheduler lease");
            false
        });
        if leader {
            scheduler.schedule_due().await;
            match scheduler.claimable_runs(ctx.settings.run_lease).await {
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot list runs"),
                Ok(ids) => {
                    for id in ids {
                        if running.lock().expect("not poisoned").contains(&id) {
                            continue;
                        }
                        match claim(&ctx, &id).await {
                            Ok(true) => {
                                running.lock().expect("not poisoned").insert(id.clone());
                                let (ctx, running) = (ctx.clone(), running.clone());
                                tasks.spawn(async move {
                                    if let Err(e) = execute(&ctx, &id).await {
                                        tracing::error!(run = %id, error = %format!("{e:#}"), "run execution failed");
                                    }
                                    running.lock().expect("not poisoned").remove(&id);
                                });
                            }
                            Ok(false) => {}
                            Err(e) => {
                                tracing::warn!(run = %id, error = %format!("{e:#}"), "cannot claim run")
                            }
                        }
                    }
                }
            }
            let now = clock.now_ms();
            if now.saturating_sub(last_monitor) >= ctx.settings.monitor_interval.as_millis() as i64
            {
                last_monitor = now;
                if let Err(e) = monitor.check(now).await {
                    tracing::warn!(error = %format!("{e:#}"), "batch monitor pass failed");
                }
            }
        }
        while tasks.try_join_next().is_some() {}
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    while tasks.join_next().await.is_some() {}
}
