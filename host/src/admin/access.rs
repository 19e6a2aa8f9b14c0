//! Who may call which admin route.
//!
//! Three classes, each a property of the route, never of the caller's claims:
//!
//! - **open** (`/healthz`, `/readyz`, `/metrics`): kubelet probes and the Prometheus scrape
//!   carry no token;
//! - **read** (features, plugins, jobs): they show another team's features and run errors, so
//!   they need the bearer token unless the API listens on loopback only (then whoever can
//!   reach it already runs on the host's machine);
//! - **write** (rollback, backfills, replay, push): always the token.
//!
//! On a loopback address every request must also name a loopback host (`Host: localhost`,
//! `127.0.0.1`, `[::1]`, with any port): a web page whose name an attacker re-points at
//! 127.0.0.1 (DNS rebinding) sends its own name, and is refused before any route runs.

use crate::text::Secret;
use axum::http::{HeaderMap, StatusCode, header};
use std::net::{IpAddr, SocketAddr};

/// What a route needs from its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Open,
    Read,
    Write,
}

/// The shortest admin token the host accepts: a guessable token is no token.
pub const MIN_TOKEN_BYTES: usize = 32;

/// Refuse a token too short to resist guessing.
pub fn check_token(token: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        token.len() >= MIN_TOKEN_BYTES,
        "FH_ADMIN_TOKEN is {} bytes; it must be at least {MIN_TOKEN_BYTES} (e.g. `openssl rand -hex 32`)",
        token.len()
    );
    Ok(())
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// Not a loopback host name, on a loopback address.
    Host,
    /// No token, a wrong one, or none configured.
    Token,
}

impl RefusalKind {
    /// The `reason` label of `fh_admin_refusals_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::Host => "host",
            RefusalKind::Token => "token",
        }
    }
}

/// A refused request: why, its status and the message the caller gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub status: StatusCode,
    pub message: String,
}

/// The checks for one listening address.
#[derive(Debug, Clone)]
pub struct Guard {
    token: Option<Secret>,
    loopback: bool,
}

impl Guard {
    /// For an API listening on `addr`, with the configured token.
    pub fn new(token: Option<Secret>, addr: SocketAddr) -> Guard {
        Guard {
            token,
            loopback: addr.ip().is_loopback(),
        }
    }

    /// Whether reads are served without a token.
    pub fn open_reads(&self) -> bool {
        self.loopback
    }

    /// `Ok` when a request with `headers` may call a route of class `access`.
    pub fn check(&self, access: Access, headers: &HeaderMap) -> Result<(), Refusal> {
        if self.loopback {
            let named = headers.get(header::HOST);
            if !named.is_some_and(|h| h.to_str().is_ok_and(is_loopback_host)) {
                let named = named.map_or("no Host header".into(), |h| {
                    format!("Host {:?}", String::from_utf8_lossy(h.as_bytes()))
                });
                return Err(Refusal {
                    kind: RefusalKind::Host,
                    status: StatusCode::FORBIDDEN,
                    message: format!(
                        "{named}: this admin API listens on loopback and answers only requests \
                         to localhost, 127.0.0.1 or [::1]"
                    ),
                });
            }
        }
        match access {
            Access::Open => Ok(()),
            Access::Read if self.loopback => Ok(()),
            Access::Read | Access::Write => self.bearer(access, headers),
        }
    }

    fn bearer(&self, access: Access, headers: &HeaderMap) -> Result<(), Refusal> {
        let Some(token) = &self.token else {
            let what = match access {
                Access::Write => "calls that change state are disabled",
                _ => "reads are disabled on a non-loopback address",
            };
            return Err(Refusal {
                kind: RefusalKind::Token,
                status: StatusCode::FORBIDDEN,
                message: format!("{what}: start the host with FH_ADMIN_TOKEN set"),
            });
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // The token must not leak through response timing, its length included.
        if given.is_some_and(|g| token_matches(g, token.expose())) {
            Ok(())
        } else {
            Err(Refusal {
                kind: RefusalKind::Token,
                status: StatusCode::UNAUTHORIZED,
                message: "missing or wrong bearer token (Authorization: Bearer <FH_ADMIN_TOKEN>)"
                    .into(),
            })
        }
    }
}

/// Whether a `Host` header value names this machine: `localhost`, a 127/8 address or `::1`,
/// with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((ip, "")) => ip,
            Some((ip, rest)) if rest.strip_prefix(':').is_some_and(is_port) => ip,
            _ => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return false,
            None => host,
        },
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn is_port(s: &str) -> bool {
    s.parse::<u16>().is_ok()
}

/// Whether `given` is `token`, in time that depends on neither: both are hashed first, so
/// the comparison runs over 32 bytes whatever their lengths.
fn token_matches(given: &str, token: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(given), Sha256::digest(token));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_guard_prints_without_its_token() {
        let token = "guard-token-0123456789abcdef0123456789";
        let guard = super::Guard::new(Some(token.into()), "127.0.0.1:80".parse().unwrap());
        let shown = format!("{guard:?}");
        assert!(!shown.contains(token), "{shown}");
    }

    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.clone(), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn tokens_match_exactly_and_short_ones_are_refused() {
        assert!(check_token(TOKEN).is_ok());
        let e = check_token("secret").unwrap_err().to_string();
        assert!(e.contains("is 6 bytes; it must be at least 32"), "{e}");
        assert!(token_matches(TOKEN, TOKEN));
        for wrong in [
            "",
            "0123456789abcdef0123456789abcdee",
            "0123",
            &format!("{TOKEN}x"),
        ] {
            assert!(!token_matches(wrong, TOKEN), "{wrong:?}");
        }
    }

    #[test]
    fn loopback_host_names() {
        for ok in [
            "localhost",
            "LOCALHOST:8080",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.1.2.3:1",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for foreign in [
            "attacker.example",
            "attacker.example:8080",
            "localhost.attacker.example",
            "127.0.0.1.attacker.example:80",
            "10.0.0.1:8080",
            "[::2]:80",
            "[::1]x",
            "localhost:",
            "localhost:http",
            "localhost:99999",
            "",
        ] {
            assert!(!is_loopback_host(foreign), "{foreign}");
        }
    }

    #[test]
    fn routes_need_what_their_class_says() {
        let public = Guard::new(Some(TOKEN.into()), "0.0.0.0:80".parse().unwrap());
        let local = Guard::new(Some(TOKEN.into()), "127.0.0.1:80".parse().unwrap());
        let none = headers(&[]);
        let good = headers(&[(header::AUTHORIZATION, &format!("Bearer {TOKEN}"))]);
        let bad = headers(&[(header::AUTHORIZATION, "Bearer nope")]);
        let status = |g: &Guard, a, h: &HeaderMap| g.check(a, h).err().map(|r| r.status);
        assert_eq!(status(&public, Access::Open, &none), None);
        assert_eq!(
            status(&public, Access::Read, &none),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            status(&public, Access::Read, &bad),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(status(&public, Access::Read, &good), None);
        assert_eq!(status(&public, Access::Write, &good), None);
        let named = headers(&[(header::HOST, "127.0.0.1:80")]);
        assert_eq!(status(&local, Access::Read, &named), None);
        assert_eq!(
            status(&local, Access::Write, &named),
            Some(StatusCode::UNAUTHORIZED)
        );
        // On loopback a request must name the host; one that names none is refused.
        assert_eq!(
            status(&local, Access::Open, &none),
            Some(StatusCode::FORBIDDEN)
        );
        let tokenless = Guard::new(None, "0.0.0.0:80".parse().unwrap());
        assert_eq!(
            status(&tokenless, Access::Read, &good),
            Some(StatusCode::FORBIDDEN)
        );
        // A foreign name is refused on loopback, even for open routes and with the token.
        let rebound = headers(&[
            (header::HOST, "attacker.example"),
            (header::AUTHORIZATION, &format!("Bearer {TOKEN}")),
        ]);
        assert_eq!(
            status(&local, Access::Open, &rebound),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(status(&public, Access::Read, &rebound), None);
    }
}
