//! The admin API's accept loop, with the bounds a shared service needs.
//!
//! `axum::serve` reads headers without a deadline and accepts without a cap, so a caller
//! that opens connections and never finishes a request holds memory and tasks for as long
//! as it likes. Here:
//!
//! - a connection must deliver a request's headers within `header_timeout`, also between
//!   keep-alive requests (an idle connection is closed after it);
//! - a request, its body included, must be answered within `request_timeout` (408 after);
//! - at most `max_connections` are served at once; one more is answered 503 and closed, so
//!   a flood degrades into quick refusals rather than a queue.
//!
//! The limit: the connection cap is shared by everyone, probes included. A caller can hold
//! every slot for `header_timeout` at a time; it cannot hold them longer.

use crate::metrics::{Metrics, RefusalLabels};
use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Bounds on the admin API's callers (see the module docs).
#[derive(Debug, Clone)]
pub struct ServeLimits {
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
}

/// Serve `app` on `listener` until `shutdown` turns true; then let open requests finish (at
/// most `request_timeout`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    metrics: Arc<Metrics>,
    shutdown_rx: tokio::sync::watch::Receiver<bool>,
) {
    let app = app.layer(axum::middleware::from_fn_with_state(
        (limits.request_timeout, metrics.clone()),
        deadline,
    ));
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut connections = tokio::task::JoinSet::new();
    // Shutdown as a plain future (its watch guard must not live across an await).
    let mut shutdown = shutdown_rx.clone();
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    tokio::pin!(stop);
    loop {
        while connections.try_join_next().is_some() {}
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, usually: wait for some to close.
                    tracing::warn!(error = %e, "admin API: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused(&metrics, "connections");
            tokio::spawn(refuse(stream, limits.max_connections));
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let mut shutdown = shutdown_rx.clone();
        let header_timeout = limits.header_timeout;
        connections.spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let stopping = tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "admin API connection ended");
                    }
                    false
                }
                _ = shutdown.wait_for(|s| *s) => true,
            };
            if stopping {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.request_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "admin API: requests still open at shutdown were cut off"
        );
    }
}

/// Answer a request that took longer than `limit` (its body included) with 408, and close.
async fn deadline(
    axum::extract::State((limit, metrics)): axum::extract::State<(Duration, Arc<Metrics>)>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            refused(&metrics, "timeout");
            let message = format!(
                "the request was not complete and answered within {} (FH_ADMIN_REQUEST_TIMEOUT)",
                humantime::format_duration(limit)
            );
            let mut r = super::error(StatusCode::REQUEST_TIMEOUT, message);
            r.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            r.into_response()
        }
    }
}

fn refused(metrics: &Metrics, reason: &str) {
    metrics
        .admin_refusals
        .get_or_create(&RefusalLabels::new(reason))
        .inc();
}

/// Tell a connection over the cap to come back later, without reading its request: written
/// in one go, then the caller's bytes are drained briefly so that closing does not reset the
/// connection before the answer is read.
async fn refuse(mut stream: TcpStream, cap: usize) {
    let body = serde_json::json!({
        "error": format!("the admin API serves {cap} connections at once (FH_ADMIN_MAX_CONNECTIONS); retry shortly")
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left = 64 << 10;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left -= n.min(left),
            }
        }
        std::io::Result::Ok(())
    })
    .await;
}
