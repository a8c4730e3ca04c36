//! The review console (`console_listen`): one static page and a small JSON API for the people
//! who decide tool-call approvals and review Level-2 suspensions. Off by default.
//!
//! - Every `/api/*` call needs an admin token (`admin_tokens_file`) as `Authorization: Bearer`;
//!   without a valid one: 401 with `WWW-Authenticate`. The page itself loads without one (it is
//!   the login form) and keeps the token in `sessionStorage`.
//! - The actions (`POST`) also need `X-CSRF-Token`: a keyed BLAKE3 MAC of the token under a
//!   secret drawn at start (`GET /api/session` hands it out), `Content-Type: application/json`,
//!   and, when the browser sends them, a same-origin `Origin` and `Sec-Fetch-Site`; else 403.
//! - Approvals and suspensions go through the same code as the gRPC `mistguard.v1.Admin` service
//!   (the calls are made on [`AdminService`] with the request's token): the same checks, the same
//!   log lines with the admin's name.
//! - Every response has a strict Content-Security-Policy (no inline script or style), `nosniff`,
//!   `no-referrer` and `no-store`. Nothing shown holds text content: records hold none.
//!
//! Served over HTTPS when TLS is configured, with the same certified key as gRPC (swapped by the
//! same SIGHUP), ALPN `http/1.1`.

// The handlers' helpers return the error response itself (`Result<_, Response>`): it is the
// answer, built once per refused request, not an error carried up a hot path.
#![allow(clippy::result_large_err)]

use super::admin::{AdminService, AdminTokens};
use super::approvals::{find_admin, Approver};
use super::pb::{self, admin_server::Admin};
use super::service::Shared;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use dashmap::DashMap;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_rustls::rustls;

const INDEX_HTML: &str = include_str!("console/index.html");
const CONSOLE_JS: &str = include_str!("console/console.js");
const CONSOLE_CSS: &str = include_str!("console/console.css");

/// The Content-Security-Policy of every response.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// At most this many distinct rules are counted (rule ids come from the rulesets and policies;
/// the bound only matters across many reloads that rename rules).
const MAX_COUNTED_RULES: usize = 1000;

/// Decisions since start, by rule and action (a decision with several rules counts for each; one
/// with none counts under `""`). Fed where decision records are written.
#[derive(Default)]
pub struct DecisionCounts(DashMap<String, Vec<(&'static str, u64)>>);

impl DecisionCounts {
    pub fn count(&self, rules: &[&str], action: &'static str) {
        let bump = |counts: &mut Vec<(&'static str, u64)>| match counts
            .iter_mut()
            .find(|(a, _)| *a == action)
        {
            Some((_, n)) => *n += 1,
            None => counts.push((action, 1)),
        };
        let one = |rule: &str| {
            // No allocation for a rule already counted.
            if let Some(mut e) = self.0.get_mut(rule) {
                bump(&mut e);
            } else if self.0.len() < MAX_COUNTED_RULES {
                bump(&mut self.0.entry(rule.to_string()).or_default());
            }
        };
        if rules.is_empty() {
            one("");
        }
        for r in rules {
            one(r);
        }
    }

    /// (rule, [(action, count)]), by rule.
    pub fn snapshot(&self) -> Vec<(String, Vec<(&'static str, u64)>)> {
        let mut v: Vec<_> = self
            .0
            .iter()
            .map(|e| {
                let mut counts = e.value().clone();
                counts.sort_unstable();
                (e.key().clone(), counts)
            })
            .collect();
        v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// What the console's handlers share.
pub struct Console {
    shared: Arc<Shared>,
    admin: AdminService,
    tokens: AdminTokens,
    /// Key of the CSRF values, drawn at start: a restart logs every console out of its actions.
    csrf_key: [u8; 32],
    https: bool,
    records_dir: Option<PathBuf>,
    level2_window: std::time::Duration,
}

impl Console {
    /// # Errors
    /// When the random source fails.
    pub fn new(
        shared: Arc<Shared>,
        tokens: AdminTokens,
        https: bool,
        records_dir: Option<PathBuf>,
        level2_window: std::time::Duration,
    ) -> Result<Console, String> {
        let mut csrf_key = [0u8; 32];
        getrandom::fill(&mut csrf_key).map_err(|e| format!("random source: {e}"))?;
        Ok(Console {
            admin: AdminService::new(shared.clone(), Some(tokens.clone())),
            shared,
            tokens,
            csrf_key,
            https,
            records_dir,
            level2_window,
        })
    }

    fn csrf(&self, token: &[u8]) -> String {
        blake3::keyed_hash(&self.csrf_key, token)
            .to_hex()
            .to_string()
    }
}

/// The rustls configuration of the console: the gRPC one (same resolver, so the same certified
/// key and the same reloads) with ALPN `http/1.1`.
pub fn tls_config(grpc: &rustls::ServerConfig) -> Arc<rustls::ServerConfig> {
    let mut c = grpc.clone();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

/// Serves the console on `listener` (TLS when `tls` is set) until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    console: Arc<Console>,
) {
    let addr = listener.local_addr().ok();
    let (incoming, acceptor) = super::tls::incoming(listener, tls);
    let conns = Conns {
        rx: incoming.into_inner(),
        addr,
        _acceptor: AbortOnDrop(acceptor),
    };
    let _ = axum::serve(conns, router(console)).await;
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The accepted (and, with TLS, handshaken) connections, as axum's listener.
struct Conns {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<super::tls::Conn>>,
    addr: Option<std::net::SocketAddr>,
    _acceptor: AbortOnDrop,
}

impl axum::serve::Listener for Conns {
    type Io = super::tls::Conn;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.rx.recv().await {
                Some(Ok(c)) => {
                    let addr = self
                        .addr
                        .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
                    return (c, addr);
                }
                Some(Err(_)) => continue,
                // The acceptor ended (shutdown): accept nothing more.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.addr
            .ok_or_else(|| std::io::Error::other("no local address"))
    }
}

/// The console's routes.
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { page("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/console.js",
            get(|| async { page("text/javascript; charset=utf-8", CONSOLE_JS) }),
        )
        .route(
            "/console.css",
            get(|| async { page("text/css; charset=utf-8", CONSOLE_CSS) }),
        )
        .route("/api/session", get(session))
        .route("/api/approvals", get(approvals))
        .route("/api/approvals/{id}/decide", post(decide))
        .route("/api/reviews", get(reviews))
        .route("/api/reviews/{subject}/lift", post(lift))
        .route("/api/alerts", get(alerts))
        .route("/api/decisions", get(decisions))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such page") })
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(console)
}

async fn secure_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

fn page(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    json_response(status, &json!({ "error": message }))
}

fn unauthorized() -> Response {
    let mut r = error(StatusCode::UNAUTHORIZED, "an admin token is required");
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"mistguard console\""),
    );
    r
}

/// The bearer token of the request.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The admin whose token the request carries, and the token; else the 401.
fn authenticate(c: &Console, headers: &HeaderMap) -> Result<(Approver, String), Response> {
    let token = bearer(headers).ok_or_else(unauthorized)?;
    let current = c.tokens.load();
    let admin = find_admin(&current, token.as_bytes())
        .cloned()
        .ok_or_else(unauthorized)?;
    Ok((admin, token.to_string()))
}

/// The checks of an action (after [`authenticate`]): JSON body, same origin, CSRF value.
fn check_action(c: &Console, headers: &HeaderMap, token: &str) -> Result<(), Response> {
    let forbidden = |why: &str| Err(error(StatusCode::FORBIDDEN, why));
    let json_body = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if !json_body {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "an action's body must be application/json",
        ));
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        if !matches!(site.to_str(), Ok("same-origin") | Ok("none")) {
            return forbidden("cross-site request refused");
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let scheme = if c.https { "https" } else { "http" };
        let same =
            host.is_some_and(|h| origin.to_str().ok() == Some(format!("{scheme}://{h}").as_str()));
        if !same {
            return forbidden("cross-origin request refused");
        }
    }
    let expected = c.csrf(token.as_bytes());
    let sent = headers
        .get("x-csrf-token")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let ok: bool = subtle::ConstantTimeEq::ct_eq(sent, expected.as_bytes()).into();
    if !ok {
        return forbidden("missing or wrong X-CSRF-Token (reload the console)");
    }
    Ok(())
}

/// A request to the Admin service carrying the console request's token.
fn admin_request<T>(msg: T, token: &str) -> Result<tonic::Request<T>, Response> {
    let mut r = tonic::Request::new(msg);
    let v = format!("Bearer {token}")
        .parse()
        .map_err(|_| unauthorized())?;
    r.metadata_mut().insert("authorization", v);
    Ok(r)
}

fn status_response(s: &tonic::Status) -> Response {
    use tonic::Code as C;
    let code = match s.code() {
        C::Unauthenticated => return unauthorized(),
        C::NotFound => StatusCode::NOT_FOUND,
        C::FailedPrecondition => StatusCode::CONFLICT,
        C::PermissionDenied => StatusCode::FORBIDDEN,
        C::InvalidArgument => StatusCode::BAD_REQUEST,
        C::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(code, s.message())
}

fn state_name(state: i32) -> &'static str {
    match pb::ApprovalState::try_from(state) {
        Ok(pb::ApprovalState::Pending) => "pending",
        Ok(pb::ApprovalState::Approved) => "approved",
        Ok(pb::ApprovalState::Denied) => "denied",
        Ok(pb::ApprovalState::Consumed) => "consumed",
        Ok(pb::ApprovalState::Expired) => "expired",
        _ => "unknown",
    }
}

fn approval_json(a: &pb::Approval) -> Value {
    json!({
        "approval_id": a.approval_id,
        "tool": a.tool,
        "policy": a.policy,
        "reason": a.reason,
        "approvers": a.approvers,
        "state": state_name(a.state),
        "subject_hash": a.subject_hash,
        "call_hash": a.call_hash,
        "policy_version": a.policy_version,
        "created_unix_ms": a.created_unix_ms,
        "expires_unix_ms": a.expires_unix_ms,
        "decided_by": a.decided_by,
        "decided_unix_ms": a.decided_unix_ms,
        "note": a.note,
    })
}

fn now_ms() -> u64 {
    super::state::now_ms()
}

/// What a handler answers: an error is a response too (401, 403, ...), so `?` ends the call.
type Answer = Result<Response, Response>;

async fn session(State(c): State<Arc<Console>>, headers: HeaderMap) -> Answer {
    let (admin, token) = authenticate(&c, &headers)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "admin": admin.name,
            "groups": admin.groups,
            "csrf": c.csrf(token.as_bytes()),
            "now_unix_ms": now_ms(),
            "https": c.https,
        }),
    ))
}

async fn approvals(State(c): State<Arc<Console>>, headers: HeaderMap) -> Answer {
    let (_, token) = authenticate(&c, &headers)?;
    let req = admin_request(pb::ListApprovalsRequest { limit: 500 }, &token)?;
    let list = c
        .admin
        .list_approvals(req)
        .await
        .map_err(|s| status_response(&s))?;
    let list: Vec<Value> = list.get_ref().approvals.iter().map(approval_json).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "now_unix_ms": now_ms(), "approvals": list }),
    ))
}

/// The body of an action: `{"approve": bool, "note": "..."}` (decide) or `{"note": "..."}`.
#[derive(serde::Deserialize, Default)]
struct ActionBody {
    #[serde(default)]
    approve: Option<bool>,
    #[serde(default)]
    note: String,
}

fn action_body(body: &[u8]) -> Result<ActionBody, Response> {
    if body.is_empty() {
        return Ok(ActionBody::default());
    }
    serde_json::from_slice(body).map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object like {\"approve\": true, \"note\": \"...\"}",
        )
    })
}

async fn decide(
    State(c): State<Arc<Console>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let (_, token) = authenticate(&c, &headers)?;
    check_action(&c, &headers, &token)?;
    let b = action_body(&body)?;
    let approve = b.approve.ok_or_else(|| {
        error(
            StatusCode::BAD_REQUEST,
            "the body must say {\"approve\": true} or {\"approve\": false}",
        )
    })?;
    let req = admin_request(
        pb::DecideApprovalRequest {
            approval_id: id,
            approve,
            note: b.note,
        },
        &token,
    )?;
    let a = c
        .admin
        .decide_approval(req)
        .await
        .map_err(|s| status_response(&s))?;
    Ok(json_response(StatusCode::OK, &approval_json(a.get_ref())))
}

/// `mistguard records query` from a while before the suspension: its decisions are in there.
fn records_hint(c: &Console, suspended_unix_ms: u64) -> Option<String> {
    let dir = c.records_dir.as_ref()?;
    let since_ms = suspended_unix_ms.saturating_sub(c.level2_window.as_millis() as u64 + 60_000);
    let t = time::OffsetDateTime::from_unix_timestamp((since_ms / 1000) as i64).ok()?;
    let since = t
        .format(&time::format_description::well_known::Rfc3339)
        .ok()?;
    Some(format!(
        "mistguard records query {} --since {since}",
        dir.display()
    ))
}

async fn reviews(State(c): State<Arc<Console>>, headers: HeaderMap) -> Answer {
    let (_, token) = authenticate(&c, &headers)?;
    let req = admin_request(pb::ListReviewsRequest { limit: 500 }, &token)?;
    let list = c
        .admin
        .list_reviews(req)
        .await
        .map_err(|s| status_response(&s))?;
    let list: Vec<Value> = list
        .get_ref()
        .reviews
        .iter()
        .map(|r| {
            json!({
                "subject_hash": r.subject_hash,
                "rules": r.rules.iter().map(|x| json!({"rule": x.rule_id, "count": x.count})).collect::<Vec<_>>(),
                "suspended_unix_ms": r.suspended_unix_ms,
                "until_unix_ms": r.until_unix_ms,
                "decision_ids": r.record_ids,
                "records_query": records_hint(&c, r.suspended_unix_ms),
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "now_unix_ms": now_ms(), "reviews": list }),
    ))
}

async fn lift(
    State(c): State<Arc<Console>>,
    Path(subject): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let (_, token) = authenticate(&c, &headers)?;
    check_action(&c, &headers, &token)?;
    let b = action_body(&body)?;
    let req = admin_request(
        pb::LiftSuspensionRequest {
            subject_hash: subject,
            note: b.note,
        },
        &token,
    )?;
    let r = c
        .admin
        .lift_suspension(req)
        .await
        .map_err(|s| status_response(&s))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "lifted": r.get_ref().lifted }),
    ))
}

async fn alerts(State(c): State<Arc<Console>>, headers: HeaderMap) -> Answer {
    authenticate(&c, &headers)?;
    let list: Vec<Value> = c
        .shared
        .state
        .alerts()
        .recent()
        .into_iter()
        .map(|a| {
            json!({
                "unix_ms": a.unix_ms,
                "cause": a.cause,
                "count": a.count,
                "window_s": a.window_s,
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "now_unix_ms": now_ms(), "alerts": list }),
    ))
}

async fn decisions(State(c): State<Arc<Console>>, headers: HeaderMap) -> Answer {
    authenticate(&c, &headers)?;
    let rows: Vec<Value> = c
        .shared
        .decision_counts
        .snapshot()
        .into_iter()
        .map(|(rule, counts)| {
            let by_action: serde_json::Map<String, Value> = counts
                .into_iter()
                .map(|(a, n)| (a.to_string(), json!(n)))
                .collect();
            json!({ "rule": rule, "actions": by_action })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "now_unix_ms": now_ms(), "rules": rows }),
    ))
}
