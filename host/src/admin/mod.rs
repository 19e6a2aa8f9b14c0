//! The admin HTTP API: health, readiness, feature lookup, plugin versions and reload status,
//! batch runs, plugin rollback and backfills (bearer token), and (without Kafka) the event
//! push endpoint. Who may call what is in [`access`]; how long and how many in [`serve`].

pub mod access;
pub mod serve;

pub use access::{Access, Guard, MIN_TOKEN_BYTES, check_token};
pub use serve::{ServeLimits, serve};

use crate::pipeline::Pipeline;
use crate::plugin::reload::Reloader;
use crate::stream::dead_letter::{DeadLetterError, DeadLetterFile};
use crate::stream::local::{IngestSummary, ingest, parse_source_event};
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Clone)]
pub struct AdminState {
    pub pipeline: Arc<Pipeline>,
    /// Set when events may be pushed over HTTP (no Kafka configured).
    pub push: Option<DeadLetterFile>,
    pub reloader: Option<Arc<Reloader>>,
    /// Batch job state and submission.
    pub batch: Option<crate::batch::BatchContext>,
    /// The Kafka client settings when a consumer runs (readiness waits for it to join its
    /// group; dead-letter replay uses them).
    pub kafka: Option<crate::stream::kafka::KafkaClient>,
}

/// Liveness: the process is up.
pub const HEALTH_PATH: &str = "/healthz";
/// Readiness: see [`ready`].
pub const READY_PATH: &str = "/readyz";
/// Prometheus text.
pub const METRICS_PATH: &str = "/metrics";

/// The routes, each behind the checks of its [`Access`] class.
pub fn router(state: AdminState, guard: Guard) -> Router {
    let metrics = state.pipeline.metrics().clone();
    let class = |access: Access| {
        let (guard, metrics) = (guard.clone(), metrics.clone());
        axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                let checked = guard.check(access, request.headers());
                let metrics = metrics.clone();
                async move {
                    match checked {
                        Ok(()) => next.run(request).await,
                        Err(refusal) => {
                            metrics
                                .admin_refusals
                                .get_or_create(&crate::metrics::RefusalLabels::new(
                                    refusal.kind.as_str(),
                                ))
                                .inc();
                            error(refusal.status, refusal.message)
                        }
                    }
                }
            },
        )
    };
    let open = Router::new()
        .route(HEALTH_PATH, get(|| async { "ok" }))
        .route(READY_PATH, get(ready))
        .route(METRICS_PATH, get(metrics_text))
        .route_layer(class(Access::Open));
    let read = Router::new()
        .route("/v1/plugins", get(plugins))
        .route("/v1/features/{group}/{entity}", get(features))
        .route("/v1/jobs", get(jobs))
        .route("/v1/jobs/{run}", get(job))
        .route_layer(class(Access::Read));
    let mut write = Router::new()
        .route("/v1/plugins/{group}/rollback", post(rollback))
        .route("/v1/backfills", post(backfill))
        .route("/v1/dlq/{group}/replay", post(dlq_replay));
    if state.push.is_some() {
        write = write.route("/v1/events", post(push));
    }
    let write = write.route_layer(class(Access::Write));
    open.merge(read).merge(write).with_state(state)
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// Ready = plugins loaded (the pipeline exists only once every group's plugin passed its
/// gate), the store and the cache answer, and — with Kafka — the consumer has joined its
/// group. 503 with the problems otherwise, so Kubernetes routes nothing to a host that cannot
/// work and a rolling update waits for it.
async fn ready(State(s): State<AdminState>) -> Response {
    let runtimes = s.pipeline.runtimes();
    let table = runtimes
        .iter()
        .find(|g| g.def.spec.cache.strategy != crate::spec::CacheStrategy::CacheOnly)
        .map(|g| g.sink.target.clone());
    let mut problems = s
        .pipeline
        .writer()
        .check(table.as_ref(), std::time::Duration::from_secs(2))
        .await;
    if s.kafka.is_some() && s.pipeline.metrics().consumer_joined.get() == 0 {
        problems.push("kafka: the consumer has not joined its group yet".into());
    }
    let plugins: Vec<_> = runtimes
        .iter()
        .map(|g| serde_json::json!({ "group": g.def.name, "version": g.plugin.version() }))
        .collect();
    if problems.is_empty() {
        Json(serde_json::json!({ "ready": true, "plugins": plugins })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "ready": false, "problems": problems, "plugins": plugins })),
        )
            .into_response()
    }
}

async fn metrics_text(State(s): State<AdminState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.pipeline.metrics().render(),
    )
        .into_response()
}

async fn plugins(State(s): State<AdminState>) -> Response {
    let (groups, notes) = match &s.reloader {
        Some(r) => (
            serde_json::to_value(r.status()).unwrap_or_default(),
            r.notes(),
        ),
        None => (
            s.pipeline
                .runtimes()
                .iter()
                .map(|g| {
                    serde_json::json!({
                        "group": g.def.name,
                        "version": g.plugin.version(),
                        "wasm": g.def.plugin_path,
                        "spec": g.def.file,
                    })
                })
                .collect(),
            Vec::new(),
        ),
    };
    Json(serde_json::json!({ "groups": groups, "notes": notes })).into_response()
}

async fn rollback(State(s): State<AdminState>, Path(group): Path<String>) -> Response {
    let Some(reloader) = &s.reloader else {
        return error(StatusCode::NOT_FOUND, "hot reload is not running".into());
    };
    match reloader.rollback(&group).await {
        Ok(version) => {
            Json(serde_json::json!({ "group": group, "version": version })).into_response()
        }
        Err(e) if s.pipeline.group_id(&group).is_none() => error(StatusCode::NOT_FOUND, e),
        Err(e) => error(StatusCode::CONFLICT, e),
    }
}

async fn features(
    State(s): State<AdminState>,
    Path((group, entity)): Path<(String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let Some(g) = s.pipeline.group(&group) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("unknown feature group {group:?}"),
        );
    };
    let only: Vec<String> = q
        .get("features")
        .map(|f| f.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    match s.pipeline.writer().get(&g.sink, &entity).await {
        Ok(Some(found)) => {
            Json(crate::app::entity_json(&g.sink, &entity, &found, &only)).into_response()
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("no features for entity {entity:?} in group {group:?}"),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Body: JSON lines of local events (see `stream::local`). Responds after the writes land.
/// A write, so it needs the token. A pushed event carries no position
/// (it is applied at least once; a client that retries a push may apply it twice), since a
/// caller that chose one could claim another source's positions — an events file's explicit
/// offsets share its `local:<topic>` space — and have their events dropped as replays.
async fn push(State(s): State<AdminState>, body: String) -> Response {
    let Some(dead_letters) = &s.push else {
        return error(StatusCode::NOT_FOUND, "push disabled".into());
    };
    let mut events = Vec::new();
    let mut unparsed = Vec::new();
    for (n, line) in body
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        match parse_source_event(line, None, None) {
            Ok(e) if e.position.is_some() => unparsed.push((
                line.to_owned(),
                format!(
                    "request line {}: a pushed event cannot choose its position \
                     (`offset`): pushed events carry none, so a push applies each time it is sent; for exactly-once effect, send events \
                     through Kafka or an events file",
                    n + 1
                ),
            )),
            Ok(e) => events.push(e),
            Err(reason) => {
                unparsed.push((line.to_owned(), format!("request line {}: {reason}", n + 1)))
            }
        }
    }
    match ingest(&s.pipeline, events, unparsed, dead_letters).await {
        Ok(summary) => Json::<IngestSummary>(summary).into_response(),
        // Come back later: the caller still has its events.
        Err(e)
            if e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<DeadLetterError>(),
                    Some(DeadLetterError::Full { .. })
                )
            }) =>
        {
            error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}"))
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

async fn jobs(State(s): State<AdminState>) -> Response {
    let Some(b) = &s.batch else {
        return error(
            StatusCode::NOT_FOUND,
            "batch ingestion is not set up".into(),
        );
    };
    match crate::batch::commands::runs_json(&b.jobs).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}

async fn job(State(s): State<AdminState>, Path(run): Path<String>) -> Response {
    let Some(b) = &s.batch else {
        return error(
            StatusCode::NOT_FOUND,
            "batch ingestion is not set up".into(),
        );
    };
    match crate::batch::commands::run_detail(&b.jobs, &run).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no run {run:?}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BackfillBody {
    ingestion: Option<String>,
    #[serde(default)]
    from: Option<chrono::NaiveDate>,
    #[serde(default)]
    to: Option<chrono::NaiveDate>,
    #[serde(default)]
    overwrite: bool,
    #[serde(default)]
    engine: Option<crate::spec::Engine>,
    /// Continue this unfinished run (its owner must have gone quiet).
    #[serde(default)]
    resume: Option<String>,
    /// Run this finished run again from its first row (idempotent).
    #[serde(default)]
    rerun: Option<String>,
}

/// Create a backfill run; the scheduling replica executes it. Answers with the run.
async fn backfill(State(s): State<AdminState>, body: axum::body::Bytes) -> Response {
    let Some(b) = &s.batch else {
        return error(
            StatusCode::NOT_FOUND,
            "batch ingestion is not set up".into(),
        );
    };
    let req: BackfillBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("backfill request: {e}")),
    };
    let retention = b.pipeline.writer().batch_position_retention();
    if let Some(id) = req.rerun {
        return match crate::batch::executor::rerun(&b.jobs, &id, None, retention).await {
            Ok(run) => Json(serde_json::json!({ "run": run })).into_response(),
            Err(e) => error(StatusCode::CONFLICT, format!("{e:#}")),
        };
    }
    if let Some(id) = req.resume {
        // Reopened runs are picked up by the scheduling replica (once their owner is gone).
        return match crate::batch::run::load_run(&b.jobs, &id).await {
            Ok(Some(_)) => {
                match crate::batch::executor::reopen(&b.jobs, &id, None, retention).await {
                    Ok(run) => Json(serde_json::json!({ "run": run })).into_response(),
                    Err(e) => error(StatusCode::CONFLICT, format!("{e:#}")),
                }
            }
            Ok(None) => error(StatusCode::NOT_FOUND, format!("no run {id:?}")),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
        };
    }
    let Some(ingestion) = req.ingestion else {
        return error(
            StatusCode::BAD_REQUEST,
            "backfill request: `ingestion` is required".into(),
        );
    };
    let request = crate::batch::executor::Request {
        ingestion,
        from: req.from,
        to: req.to,
        overwrite: req.overwrite,
        engine: req.engine,
    };
    match crate::batch::executor::submit_backfill(&b.jobs, &b.specs, &request, None).await {
        Ok(run) => Json(serde_json::json!({ "run": run })).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
    }
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    #[serde(default)]
    reason_contains: Option<String>,
    #[serde(default)]
    source_topic: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    dry_run: bool,
}

/// Re-inject a group's dead letters into its retry topic (see `stream::replay`).
async fn dlq_replay(
    State(s): State<AdminState>,
    Path(group): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(client) = &s.kafka else {
        return error(
            StatusCode::NOT_FOUND,
            "no Kafka: dead letters are in the local dead-letter file".into(),
        );
    };
    let Some(g) = s.pipeline.group(&group) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("unknown feature group {group:?}"),
        );
    };
    let req: ReplayBody = if body.is_empty() {
        ReplayBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("replay request: {e}")),
        }
    };
    let filter = crate::stream::replay::ReplayFilter {
        reason_contains: req.reason_contains,
        source_topic: req.source_topic,
        limit: req.limit,
    };
    match crate::stream::replay::replay(
        client,
        &g.def.name,
        &g.def.dead_letter_topic,
        &g.def.retry_topic,
        &filter,
        req.dry_run,
    )
    .await
    {
        Ok(summary) => Json(summary).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}
