//! What every `mistguard.v1.Guard` call goes through before and after its handler:
//! authentication, the statuses of requests the client got wrong, and counting.
//!
//! - **Authentication.** With `auth_tokens_file`, a call needs `authorization: Bearer <token>`;
//!   the scheme is case-insensitive (RFC 7235), the token is compared in constant time with every
//!   configured token. The tokens sit behind an [`ArcSwap`] that SIGHUP replaces.
//! - **Client errors.** tonic answers a unary request that does not decode with INTERNAL and an
//!   oversized one with OUT_OF_RANGE, before the handler runs; they become INVALID_ARGUMENT and
//!   RESOURCE_EXHAUSTED (what gRPC specifies), as on streams, whose task maps them itself.
//! - **Counting.** Every answered call is counted once in `mistguard_requests_total{rpc, code}`
//!   and timed in `mistguard_request_duration_seconds`, whoever answered it: this layer
//!   (UNAUTHENTICATED), tonic (a message that does not decode), or the handler. The code is read
//!   from the response: its headers for an error without a body, else its trailers; a call whose
//!   response is dropped before its trailers (the client went away) counts as CANCELLED.

use arc_swap::ArcSwap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use subtle::ConstantTimeEq;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::{Code, Status};

/// The bearer tokens, replaced whole on reload.
pub type Tokens = Arc<ArcSwap<Vec<Vec<u8>>>>;

/// Wraps the Guard service; see the module documentation.
#[derive(Clone)]
pub struct Front<S> {
    pub inner: S,
    /// `max_message_bytes`, for the RESOURCE_EXHAUSTED message.
    pub limit: usize,
    /// `None`: no authentication.
    pub tokens: Option<Tokens>,
}

impl<S: NamedService> NamedService for Front<S> {
    const NAME: &'static str = S::NAME;
}

/// The RPC's name in metrics and logs, from the request path (a bounded set).
pub fn rpc_name(path: &str) -> &'static str {
    match path.rsplit('/').next() {
        Some("Classify") => "classify",
        Some("ClassifyStream") => "classify_stream",
        Some("Ping") => "ping",
        Some("ProtectText") => "protect_text",
        Some("AuthorizeToolCall") => "authorize_tool_call",
        _ => "unknown",
    }
}

pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// Counts one answered call.
pub fn observe(rpc: &'static str, code: Code, started: Instant) {
    metrics::counter!("mistguard_requests_total", "rpc" => rpc, "code" => code_label(code))
        .increment(1);
    metrics::histogram!("mistguard_request_duration_seconds", "rpc" => rpc)
        .record(started.elapsed().as_secs_f64());
}

/// Counts and logs a call refused before or instead of a decision: one INFO line, target
/// `mistguard::rejected`, metadata only (the RPC, the reason, the status code).
pub fn rejected(rpc: &'static str, reason: &'static str, code: Code) {
    metrics::counter!("mistguard_rejected_total", "reason" => reason).increment(1);
    tracing::info!(
        target: "mistguard::rejected",
        rpc,
        reason,
        code = code_label(code),
        "call rejected"
    );
}

/// What the `authorization` header held, for the log line (never the header itself).
fn check_bearer(tokens: &[Vec<u8>], header: Option<&[u8]>) -> Result<(), &'static str> {
    let Some(value) = header else {
        return Err("missing");
    };
    let Some(split) = value.iter().position(|b| *b == b' ') else {
        return Err("malformed");
    };
    let (scheme, rest) = value.split_at(split);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err("not_bearer");
    }
    let presented = rest.trim_ascii();
    if presented.is_empty() {
        return Err("malformed");
    }
    // Compare against every token so the time does not tell which one nearly matched.
    let mut ok = subtle::Choice::from(0u8);
    for t in tokens {
        ok |= t.as_slice().ct_eq(presented);
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err("unknown")
    }
}

const MALFORMED: &str = "malformed message (invalid protobuf or UTF-8)";

impl<S, B> Service<http::Request<B>> for Front<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let rpc = rpc_name(req.uri().path());
        if let Some(tokens) = &self.tokens {
            let header = req.headers().get("authorization").map(|v| v.as_bytes());
            if let Err(credentials) = check_bearer(&tokens.load(), header) {
                metrics::counter!("mistguard_rejected_total", "reason" => "unauthenticated")
                    .increment(1);
                tracing::info!(
                    target: "mistguard::rejected",
                    rpc,
                    reason = "unauthenticated",
                    code = "unauthenticated",
                    credentials,
                    "call rejected"
                );
                observe(rpc, Code::Unauthenticated, started);
                let status = Status::unauthenticated("missing or unknown bearer token");
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        let fut = self.inner.call(req);
        let limit = self.limit;
        Box::pin(async move {
            let mut resp = fut.await?;
            let headers = resp.headers_mut();
            let status = headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(Code::from);
            let message = headers
                .get("grpc-message")
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            let too_large = status == Some(Code::OutOfRange)
                && message.starts_with(b"Error,%20decoded%20message%20length%20too%20large");
            let undecodable = status == Some(Code::Internal)
                && (message.starts_with(b"failed%20to%20decode")
                    || message.windows(6).any(|w| w == b"decode"));
            let replacement = if too_large {
                rejected(rpc, "message_too_large", Code::ResourceExhausted);
                Some(Status::resource_exhausted(format!(
                    "message larger than {limit} bytes (max_message_bytes)"
                )))
            } else if undecodable {
                rejected(rpc, "malformed", Code::InvalidArgument);
                Some(Status::invalid_argument(MALFORMED))
            } else {
                None
            };
            if let Some(status) = &replacement {
                headers.remove("grpc-message");
                let _ = status.add_header(headers);
            }
            if let Some(code) = replacement.map(|s| s.code()).or(status) {
                // An error without a body (trailers-only): the call is answered.
                observe(rpc, code, started);
                return Ok(resp);
            }
            let (parts, body) = resp.into_parts();
            let body = tonic::body::Body::new(Counted {
                inner: body,
                rpc,
                started,
                done: false,
            });
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

/// A response body that counts its call when the trailers (the status) go out, or as CANCELLED
/// when it is dropped before.
struct Counted {
    inner: tonic::body::Body,
    rpc: &'static str,
    started: Instant,
    done: bool,
}

impl Counted {
    fn finish(&mut self, code: Code) {
        if !self.done {
            self.done = true;
            observe(self.rpc, code, self.started);
        }
    }
}

impl http_body::Body for Counted {
    type Data = tonic::codegen::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = trailers
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map_or(Code::Unknown, Code::from);
                    self.finish(code);
                }
            }
            Poll::Ready(Some(Err(status))) => {
                let code = status.code();
                self.finish(code);
            }
            Poll::Ready(None) => self.finish(Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_tokens_exact() {
        let tokens = vec![b"token-aaaaaaaaaaaaaaaa".to_vec()];
        for ok in [
            &b"Bearer token-aaaaaaaaaaaaaaaa"[..],
            b"bearer token-aaaaaaaaaaaaaaaa",
            b"BEARER  token-aaaaaaaaaaaaaaaa",
        ] {
            assert_eq!(check_bearer(&tokens, Some(ok)), Ok(()));
        }
        assert_eq!(check_bearer(&tokens, None), Err("missing"));
        assert_eq!(
            check_bearer(&tokens, Some(b"Basic token-aaaaaaaaaaaaaaaa")),
            Err("not_bearer")
        );
        assert_eq!(check_bearer(&tokens, Some(b"Bearer ")), Err("malformed"));
        assert_eq!(
            check_bearer(&tokens, Some(b"Bearer token-aaaaaaaaaaaaaaab")),
            Err("unknown")
        );
        assert_eq!(
            check_bearer(&tokens, Some(b"Bearer TOKEN-aaaaaaaaaaaaaaaa")),
            Err("unknown")
        );
    }

    #[test]
    fn rpc_names_are_bounded() {
        assert_eq!(rpc_name("/mistguard.v1.Guard/Classify"), "classify");
        assert_eq!(
            rpc_name("/mistguard.v1.Guard/ClassifyStream"),
            "classify_stream"
        );
        assert_eq!(rpc_name("/mistguard.v1.Guard/Ping"), "ping");
        assert_eq!(rpc_name("/mistguard.v1.Guard/Whatever"), "unknown");
    }
}
