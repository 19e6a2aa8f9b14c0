//! The admin API's accept loop, with the bounds a shared service needs.
//!
//! `axum::serve` reads headers without a deadline and accepts without a cap, so a caller
//! that opens connections and never finishes a request holds memory and tasks for as long
//! as it likes. Here:
//!
//! - a connection must deliver a request's headers within `header_timeout`, also between
//!   keep-alive requests (an idle connection is closed after it);
//! - a request, its body included, must be answered within `request_timeout` (408 after);
//! - a connection lives at most `connection_lifetime`: then it is closed after the request
//!   in flight (whose answer gets `request_timeout` more to be written), so a caller that
//!   keeps a connection busy, or never reads its answers, holds it for at most the two;
//! - at most `max_connections` are served at once, and at most `max_connections_per_peer`
//!   from one address, so one caller cannot take them all; past either, a connection is
//!   answered 503 and closed, so a flood degrades into quick refusals rather than a queue;
//! - [`PROBE_CONNECTIONS`] more are kept for kubelet's probes, for a caller past either cap
//!   (kubelet probes from the node's address, which other processes there share): they
//!   answer `/healthz` and `/readyz` only, one request each.
//!
//! The limit: many peers together can still take every connection, probes' included — for
//! `header_timeout` at a time if they send nothing, for lifetime plus request timeout if they
//! pipeline requests and never read (the NetworkPolicy decides who may connect at all); at
//! most [`REFUSING`] refusals are written at once, and past that a connection is closed
//! unanswered.

use crate::metrics::{Metrics, RefusalLabels};
use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Bounds on the admin API's callers (see the module docs).
#[derive(Debug, Clone)]
pub struct ServeLimits {
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    pub connection_lifetime: Duration,
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
}

/// Connections kept for probes when every other one is taken.
pub const PROBE_CONNECTIONS: usize = 8;
/// Refusals written at once; each takes at most a second.
pub const REFUSING: usize = 64;
/// How long a probe connection may take to send its request.
const PROBE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Open connections per peer address.
#[derive(Default)]
struct Peers(Mutex<HashMap<IpAddr, usize>>);

/// One connection of a peer, counted until dropped.
struct PeerSlot {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Peers {
    fn enter(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<PeerSlot> {
        let mut open = self.0.lock().expect("peers lock");
        let n = open.entry(ip).or_default();
        if *n >= cap.max(1) {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.0.lock().expect("peers lock");
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
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
    // Connections kept for probes, for a caller over either cap: kubelet probes from the
    // node's address, which other processes on the node may share.
    let probes_busy = app.clone().layer(axum::middleware::from_fn_with_state(
        Arc::new((busy(limits.max_connections), "connections", metrics.clone())),
        probes_only,
    ));
    let probes_peer = app.clone().layer(axum::middleware::from_fn_with_state(
        Arc::new((
            busy_peer(limits.max_connections_per_peer),
            "peer",
            metrics.clone(),
        )),
        probes_only,
    ));
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let probe_slots = Arc::new(Semaphore::new(PROBE_CONNECTIONS));
    let refusing = Arc::new(Semaphore::new(REFUSING));
    let peers = Arc::new(Peers::default());
    let mut connections = tokio::task::JoinSet::new();
    // Shutdown as a plain future (its watch guard must not live across an await).
    let mut shutdown = shutdown_rx.clone();
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    tokio::pin!(stop);
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, usually: wait for some to close.
                    tracing::warn!(error = %e, "admin API: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let refuse_with = |stream: TcpStream, reason: &'static str, message: String| {
            refused(&metrics, reason);
            match refusing.clone().try_acquire_owned() {
                Ok(permit) => {
                    tokio::spawn(async move {
                        refuse(stream, message).await;
                        drop(permit);
                    });
                }
                Err(_) => drop(stream), // closed unanswered: refusals are bounded too
            }
        };
        let peer_slot = peers.enter(peer.ip(), limits.max_connections_per_peer);
        let main_slot = match &peer_slot {
            Some(_) => slots.clone().try_acquire_owned().ok(),
            None => None,
        };
        let (slot, service, probe) = match main_slot {
            Some(slot) => (slot, app.clone(), false),
            None => match probe_slots.clone().try_acquire_owned() {
                Ok(slot) if peer_slot.is_none() => (slot, probes_peer.clone(), true),
                Ok(slot) => (slot, probes_busy.clone(), true),
                Err(_) if peer_slot.is_none() => {
                    refuse_with(stream, "peer", busy_peer(limits.max_connections_per_peer));
                    continue;
                }
                Err(_) => {
                    refuse_with(stream, "connections", busy(limits.max_connections));
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(service);
        let mut shutdown = shutdown_rx.clone();
        let limits = limits.clone();
        connections.spawn(async move {
            let _slots = (slot, peer_slot);
            let _ = stream.set_nodelay(true);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new());
            if probe {
                builder
                    .header_read_timeout(PROBE_HEADER_TIMEOUT.min(limits.header_timeout))
                    .keep_alive(false);
            } else {
                builder.header_read_timeout(limits.header_timeout);
            }
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let ending = tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "admin API connection ended");
                    }
                    false
                }
                _ = tokio::time::sleep(limits.connection_lifetime) => true,
                _ = shutdown.wait_for(|s| *s) => true,
            };
            if ending {
                // The request in flight is answered; then the connection closes. An answer
                // the caller does not read is cut off after the request deadline.
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(limits.request_timeout, conn).await;
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

fn busy_peer(cap: usize) -> String {
    format!(
        "the admin API serves {cap} connections at once from one address \
         (FH_ADMIN_MAX_CONNECTIONS_PER_PEER); retry shortly"
    )
}

fn busy(cap: usize) -> String {
    format!(
        "the admin API serves {cap} connections at once (FH_ADMIN_MAX_CONNECTIONS); retry shortly"
    )
}

/// On a connection kept for probes: probes are served, anything else is told to come back
/// (and counted as refused for the cap that sent it here).
async fn probes_only(
    axum::extract::State(refusal): axum::extract::State<Arc<(String, &'static str, Arc<Metrics>)>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match request.uri().path() {
        "/healthz" | "/readyz" => next.run(request).await,
        _ => {
            let (message, reason, metrics) = &*refusal;
            refused(metrics, reason);
            let mut r = super::error(StatusCode::SERVICE_UNAVAILABLE, message.clone());
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
            r.into_response()
        }
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

/// Tell a connection over a cap to come back later, without reading its request: written
/// in one go, then the caller's bytes are drained briefly so that closing does not reset the
/// connection before the answer is read.
async fn refuse(mut stream: TcpStream, message: String) {
    let body = serde_json::json!({ "error": message }).to_string();
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
