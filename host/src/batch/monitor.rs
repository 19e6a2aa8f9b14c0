//! Alerts on batch runs: a run waiting (SUBMITTED, PENDING, RUNNABLE) longer than
//! `FH_BATCH_STUCK_AFTER`, or one that failed or was blocked. Each alert is raised once per run
//! and kind across all replicas (a put-if-absent in job state), as a log line, a metric
//! (`fh_batch_alerts_total`) and, if configured, a webhook POST. Its text links straight to
//! the job: the AWS console for aws-batch runs, the admin API for local ones.

use super::jobs::Jobs;
use super::run::{RunRecord, Status, list_runs};
use crate::metrics::{AlertLabels, Metrics, RunStateLabels};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub run: String,
    pub ingestion: String,
    /// `stuck`, `stuck-shards` or `failed`.
    pub kind: String,
    pub text: String,
    pub link: String,
    pub at_ms: i64,
}

pub struct Monitor {
    pub jobs: Jobs,
    pub stuck_after: Duration,
    pub webhook: Option<String>,
    /// Base URL of the admin API (links for local runs).
    pub admin_url: String,
    pub region: String,
    pub metrics: Option<Arc<Metrics>>,
}

const ALERT_PK: &str = "alert";

impl Monitor {
    /// The link an alert about `run` carries.
    pub fn link(&self, run: &RunRecord) -> String {
        match &run.aws_job_id {
            Some(id) => super::aws_batch::console_url(&self.region, id),
            None => format!(
                "{}/v1/jobs/{}",
                self.admin_url.trim_end_matches('/'),
                run.id
            ),
        }
    }

    /// Look at every run once; raise the alerts that are due and not raised yet.
    pub async fn check(&self, now_ms: i64) -> anyhow::Result<Vec<Alert>> {
        let runs = list_runs(&self.jobs).await?;
        if let Some(m) = &self.metrics {
            let mut counts: BTreeMap<(String, Status), i64> = BTreeMap::new();
            for r in &runs {
                *counts.entry((r.ingestion.clone(), r.status)).or_default() += 1;
            }
            m.batch_runs.clear();
            for ((ingestion, status), n) in counts {
                m.batch_runs
                    .get_or_create(&RunStateLabels {
                        ingestion,
                        status: status.as_str().into(),
                    })
                    .set(n);
            }
        }
        let mut raised = Vec::new();
        for run in &runs {
            let since = run.status_since_ms();
            let (kind, text) = if run.status.is_waiting()
                && now_ms - since > self.stuck_after.as_millis() as i64
            {
                (
                    "stuck",
                    format!(
                        "batch run {} ({}) has been {} for {}",
                        run.id,
                        run.ingestion,
                        run.status,
                        humantime::format_duration(Duration::from_secs(
                            ((now_ms - since) / 1000).max(0) as u64
                        ))
                    ),
                )
            } else if let Some(text) = self.stuck_shards(run, now_ms).await? {
                ("stuck-shards", text)
            } else if matches!(run.status, Status::Failed | Status::Blocked) {
                (
                    "failed",
                    format!(
                        "batch run {} ({}) {}: {}",
                        run.id,
                        run.ingestion,
                        run.status,
                        run.reason.as_deref().unwrap_or("no reason recorded")
                    ),
                )
            } else {
                continue;
            };
            let link = self.link(run);
            let alert = Alert {
                run: run.id.clone(),
                ingestion: run.ingestion.clone(),
                kind: kind.into(),
                text: format!("{text} — {link}"),
                link,
                at_ms: now_ms,
            };
            let key = format!("{}#{kind}", run.id);
            if self.jobs.put(ALERT_PK, &key, &alert, 0).await?.is_none() {
                continue; // raised before (here or by another replica)
            }
            tracing::error!(run = %alert.run, kind, link = %alert.link, "ALERT: {}", alert.text);
            if let Some(m) = &self.metrics {
                m.batch_alerts
                    .get_or_create(&AlertLabels {
                        ingestion: alert.ingestion.clone(),
                        kind: kind.into(),
                    })
                    .inc();
            }
            if let Some(url) = &self.webhook
                && let Err(e) = post_json(
                    url,
                    &serde_json::json!({ "text": alert.text, "alert": &alert }),
                )
                .await
            {
                tracing::warn!(url = %crate::text::redact_url(url), error = %format!("{e:#}"), "cannot deliver the alert to the webhook");
            }
            raised.push(alert);
        }
        Ok(raised)
    }

    /// Shards of a running run that have waited for a worker past the threshold.
    async fn stuck_shards(&self, run: &RunRecord, now_ms: i64) -> anyhow::Result<Option<String>> {
        if run.status != Status::Running || run.aws_job_id.is_some() {
            return Ok(None);
        }
        let limit = self.stuck_after.as_millis() as i64;
        let waiting: Vec<String> = super::run::list_shards(&self.jobs, &run.id)
            .await?
            .into_iter()
            .filter(|s| s.value.status.is_waiting() && now_ms - s.value.updated_ms > limit)
            .map(|s| s.value.index.to_string())
            .collect();
        Ok((!waiting.is_empty()).then(|| {
            format!(
                "batch run {} ({}) is RUNNING but shards {} have waited for a worker for over {} (FH_BATCH_WORKERS)",
                run.id,
                run.ingestion,
                waiting.join(", "),
                humantime::format_duration(self.stuck_after)
            )
        }))
    }

    /// Every alert raised so far.
    pub async fn alerts(jobs: &Jobs) -> anyhow::Result<Vec<Alert>> {
        Ok(jobs
            .list::<Alert>(ALERT_PK)
            .await?
            .into_iter()
            .map(|s| s.value)
            .collect())
    }
}

/// POST a JSON body to an `http://` URL.
async fn post_json(url: &str, body: &serde_json::Value) -> anyhow::Result<()> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("alert webhook {}: only http:// URLs are supported (put a relay in front of https endpoints)", crate::text::redact_url(url)))?;
    let (addr, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    // The URL is a credential: errors name it redacted, never by the address sent to.
    let shown = || crate::text::redact_url(url);
    let (status, answer) = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        crate::admin_client::send(addr, "POST", &path, None, Some(&body.to_string())),
    )
    .await
    .map_err(|_| anyhow::anyhow!("alert webhook {}: no answer within 5 s", shown()))?
    .map_err(|e| {
        let why = e
            .root_cause()
            .downcast_ref::<std::io::Error>()
            .map_or_else(|| "cannot send".to_owned(), |io| io.to_string());
        anyhow::anyhow!("alert webhook {}: {why}", shown())
    })?;
    anyhow::ensure!(
        (200..300).contains(&status),
        "webhook answered {status}: {answer}"
    );
    Ok(())
}
