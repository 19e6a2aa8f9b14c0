//! The `aws-batch` engine: one array job per run (array index = shard; a single job for a
//! one-shard run) from the configured queue and job definition, whose container runs this
//! binary as `feature-host run-shard --run <id>`. Parent runs become `dependsOn` edges, so
//! AWS Batch orders a DAG itself. This process supervises: it polls DescribeJobs and mirrors
//! the job's status into the run record, where the monitor and `feature-host jobs` see it.

use super::BatchContext;
use super::executor::Outcome;
use super::run::{RunRecord, Status, load_run, now_ms, update_run};
use anyhow::Context as _;
use aws_sdk_batch::types::{
    ArrayProperties, ContainerOverrides, JobDependency, KeyValuePair, RetryStrategy,
};
use std::time::Duration;

/// A client for the configured endpoint (moto in tests) and region.
pub async fn client(endpoint: Option<&str>) -> aws_sdk_batch::Client {
    let shared = crate::app::aws_config().await;
    let mut config = aws_sdk_batch::config::Builder::from(&shared);
    if let Some(url) = endpoint {
        config = config.endpoint_url(url);
    }
    aws_sdk_batch::Client::from_conf(config.build())
}

/// The AWS console page of a job.
pub fn console_url(region: &str, job_id: &str) -> String {
    format!(
        "https://{region}.console.aws.amazon.com/batch/home?region={region}#jobs/detail/{job_id}"
    )
}

pub fn region() -> String {
    std::env::var("AWS_REGION")
        .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|_| "us-east-1".into())
}

/// The container command of a run's job: the entrypoint is `feature-host`.
pub fn command(run: &RunRecord) -> Vec<String> {
    vec!["run-shard".into(), "--run".into(), run.id.clone()]
}

/// Submit the run's job (once) and follow it to its end.
pub async fn supervise(ctx: &BatchContext, run: &RunRecord) -> anyhow::Result<Outcome> {
    let s = &ctx.settings;
    let client = client(s.aws_batch_endpoint.as_deref()).await;
    let job_id = match &run.aws_job_id {
        Some(id) => id.clone(),
        None => {
            let queue = s
                .aws_batch_job_queue
                .as_deref()
                .context("engine aws-batch needs a job queue: set FH_AWS_BATCH_JOB_QUEUE")?;
            let definition = s.aws_batch_job_definition.as_deref().context(
                "engine aws-batch needs a job definition: set FH_AWS_BATCH_JOB_DEFINITION",
            )?;
            let mut depends = Vec::new();
            for p in &run.parents {
                let parent = load_run(&ctx.jobs, p)
                    .await?
                    .with_context(|| format!("parent run {p} does not exist"))?
                    .value;
                // A parent that ran elsewhere (local engine) has already succeeded: the
                // executor waited for it.
                if let Some(id) = parent.aws_job_id {
                    depends.push(JobDependency::builder().job_id(id).build());
                }
            }
            let mut req = client
                .submit_job()
                .job_name(job_name(&run.id))
                .job_queue(queue)
                .job_definition(definition)
                .set_depends_on((!depends.is_empty()).then_some(depends))
                .container_overrides(
                    ContainerOverrides::builder()
                        .set_command(Some(command(run)))
                        .environment(
                            KeyValuePair::builder()
                                .name("FH_RUN_ID")
                                .value(&run.id)
                                .build(),
                        )
                        .build(),
                );
            // A lost container (spot reclaim, host failure) restarts its shard from the
            // checkpoint instead of failing the run.
            req = req.retry_strategy(
                RetryStrategy::builder()
                    .attempts(s.shard_attempts.clamp(1, 10) as i32)
                    .build(),
            );
            if run.shards > 1 {
                req = req
                    .array_properties(ArrayProperties::builder().size(run.shards as i32).build());
            }
            let out = req.send().await.map_err(|e| {
                anyhow::anyhow!(
                    "SubmitJob for run {}: {}",
                    run.id,
                    aws_sdk_batch::error::DisplayErrorContext(e)
                )
            })?;
            let id = out
                .job_id()
                .context("SubmitJob answered without a job id")?
                .to_owned();
            let link = console_url(&region(), &id);
            update_run(&ctx.jobs, &run.id, |r| {
                r.aws_job_id = Some(id.clone());
                r.set_status(
                    Status::Submitted,
                    now_ms(),
                    Some(format!("AWS Batch job {id}: {link}")),
                );
            })
            .await?;
            tracing::info!(run = %run.id, job = %id, shards = run.shards, "submitted to AWS Batch");
            id
        }
    };
    let mut stop = ctx.stop.clone();
    loop {
        let out = client
            .describe_jobs()
            .jobs(&job_id)
            .send()
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "DescribeJobs {job_id}: {}",
                    aws_sdk_batch::error::DisplayErrorContext(e)
                )
            });
        match out {
            Ok(out) => {
                let job = out
                    .jobs()
                    .first()
                    .with_context(|| format!("AWS Batch does not know job {job_id}"))?;
                let status = Status::from_aws(job.status().map_or("", |s| s.as_str()))
                    .unwrap_or(Status::Submitted);
                let reason = job.status_reason().map(str::to_owned);
                let summary = job
                    .array_properties()
                    .and_then(|a| a.status_summary())
                    .map(|m| {
                        let mut parts: Vec<String> = m
                            .iter()
                            .filter(|(_, n)| **n > 0)
                            .map(|(k, n)| format!("{k}={n}"))
                            .collect();
                        parts.sort();
                        parts.join(" ")
                    });
                let note = reason.clone().or(summary);
                // Job state unreachable: the job runs on regardless; record it next poll.
                let recorded = update_run(&ctx.jobs, &run.id, |r| {
                    if r.status != status {
                        r.set_status(status, now_ms(), note.clone());
                    }
                })
                .await;
                if let Err(e) = &recorded {
                    tracing::warn!(run = %run.id, error = %format!("{e:#}"), "cannot record the AWS Batch job status");
                }
                match status {
                    _ if recorded.is_err() => {}
                    Status::Succeeded => return Ok(Outcome::Done),
                    Status::Failed => {
                        return Ok(Outcome::Failed(format!(
                            "AWS Batch job {job_id} failed: {}",
                            reason
                                .as_deref()
                                .unwrap_or("no reason given (see the job's log stream)")
                        )));
                    }
                    _ => {}
                }
            }
            Err(e) => tracing::warn!(run = %run.id, error = %e, "cannot poll the AWS Batch job"),
        }
        tokio::select! {
            _ = tokio::time::sleep(ctx.settings.aws_batch_poll.max(Duration::from_millis(100))) => {}
            _ = stop.wait_for(|s| *s) => return Ok(Outcome::Interrupted),
        }
    }
}

/// AWS Batch job names: letters, digits, `-` and `_`, up to 128.
fn job_name(run: &str) -> String {
    let mut n: String = run
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect();
    if n.len() < 2 {
        n.push_str("-run");
    }
    n
}

/// The shard a `run-shard` container runs: its array index (0 for a one-shard job).
pub fn shard_index_from_env() -> anyhow::Result<u32> {
    match std::env::var("AWS_BATCH_JOB_ARRAY_INDEX") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("AWS_BATCH_JOB_ARRAY_INDEX={v:?} is not a shard index")),
        Err(_) => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_and_links() {
        assert_eq!(
            job_name("user-activity-20261125T030000Z"),
            "user-activity-20261125T030000Z"
        );
        assert_eq!(job_name("a.b"), "a-b");
        assert_eq!(job_name("a"), "a-run");
        assert_eq!(
            console_url("eu-west-1", "abc"),
            "https://eu-west-1.console.aws.amazon.com/batch/home?region=eu-west-1#jobs/detail/abc"
        );
    }
}
