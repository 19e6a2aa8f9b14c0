//! The admin HTTP API: health, readiness, feature lookup, plugin versions, and (without
//! Kafka) the event push endpoint.

use crate::pipeline::Pipeline;
use crate::stream::dead_letter::DeadLetterFile;
use crate::stream::local::{IngestSummary, ingest, parse_event};
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
}

pub fn router(state: AdminState) -> Router {
    let mut r = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/plugins", get(plugins))
        .route("/v1/features/{group}/{entity}", get(features));
    if state.push.is_some() {
        r = r.route("/v1/events", post(push));
    }
    r.with_state(state)
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn ready(State(s): State<AdminState>) -> Response {
    Json(serde_json::json!({ "ready": true, "groups": s.pipeline.groups().len() })).into_response()
}

async fn metrics(State(s): State<AdminState>) -> Response {
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
    let out: BTreeMap<&str, serde_json::Value> = s
        .pipeline
        .groups()
        .iter()
        .map(|g| {
            (
                g.def.name.as_str(),
                serde_json::json!({ "version": g.plugin.version(), "wasm": g.def.plugin_path }),
            )
        })
        .collect();
    Json(out).into_response()
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
        match parse_event(line, None, None) {
            Ok(e) => events.push(e),
            Err(reason) => {
                unparsed.push((line.to_owned(), format!("request line {}: {reason}", n + 1)))
            }
        }
    }
    match ingest(&s.pipeline, events, unparsed, dead_letters).await {
        Ok(summary) => Json::<IngestSummary>(summary).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}
