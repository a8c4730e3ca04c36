//! A fake Mistral moderation API: a real HTTP/1.1 server (keep-alive, Content-Length bodies) on
//! `127.0.0.1:0`, in its own thread with its own tokio runtime (so it works under any test
//! runtime), stopped on drop. It follows the documented contract (SPEC "Remote moderation"):
//!
//! - `POST /v1/moderations` (`input`: a string or a list of strings) and
//!   `POST /v1/chat/moderations` (`input`: a conversation or a list of conversations; the last
//!   message's content of each is moderated); `Authorization: Bearer <key>` required (401 without).
//! - 200: `{"id", "model", "results": [...]}` with every category of the model's set; a
//!   category's score is 0.97 when the text holds the marker `#cat:<category>`, else 0.01, and
//!   its boolean is `score >= 0.5`.
//!
//! Behaviour: a default plus a FIFO of one-shot behaviours for the next requests (a request with
//! a refused or missing key is answered 401 without taking one). Every request is recorded.

use super::loopback::{Loopback, Reader, Request};
use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The categories of `mistral-moderation-2411`.
pub const CATEGORIES_2411: &[&str] = &[
    "sexual",
    "hate_and_discrimination",
    "violence_and_threats",
    "dangerous_and_criminal_content",
    "selfharm",
    "health",
    "financial",
    "law",
    "pii",
];

/// The categories of `mistral-moderation-2603`.
pub const CATEGORIES_2603: &[&str] = &[
    "sexual",
    "hate_and_discrimination",
    "violence_and_threats",
    "dangerous",
    "criminal",
    "selfharm",
    "health",
    "financial",
    "law",
    "pii",
    "jailbreaking",
];

/// How the fake answers one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Behaviour {
    /// 200, model `mistral-moderation-2411`.
    Ok,
    /// 200, model `mistral-moderation-2603` and its categories.
    Ok2603,
    /// That status with a JSON body `{"message": ..., "request_id": ...}`.
    Status(u16),
    /// 422 with `{"detail": [{"loc", "msg", "type"}]}`.
    Unprocessable,
    /// 429 with `Retry-After: <seconds>`.
    TooMany { retry_after: u64 },
    /// 429 with `Retry-After` as an HTTP date this many seconds ahead.
    TooManyDate { in_secs: u64 },
    /// 503 with `Retry-After: <seconds>`.
    Unavailable { retry_after: u64 },
    /// 422 (as [`Behaviour::Unprocessable`]) when any input holds this string, else as
    /// [`Behaviour::Ok`]: an API that refuses one text and fails its whole batch.
    RejectText(String),
    /// Waits, then answers as [`Behaviour::Ok`].
    Slow(Duration),
    /// Closes the connection abruptly (RST), without an answer.
    Reset,
    /// 200 with a body that is not JSON.
    Malformed,
    /// 200 with one result too few.
    WrongLength,
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub path: String,
    /// The bearer key, if any.
    pub key: Option<String>,
    /// The parsed JSON body (`Null` when it did not parse).
    pub body: serde_json::Value,
    /// The number of inputs (texts or conversations).
    pub inputs: usize,
    /// The moderated texts (for chat: each conversation's last message).
    pub texts: Vec<String>,
}

struct State {
    default: Behaviour,
    queue: VecDeque<Behaviour>,
    refused: HashSet<String>,
    refuse_all: bool,
    requests: Vec<Recorded>,
}

/// The fake API. `url` is the base URL (`http://127.0.0.1:<port>`, no `/v1`).
pub struct FakeMistral {
    pub url: String,
    state: Arc<Mutex<State>>,
    _server: Loopback,
}

impl FakeMistral {
    /// Starts the server (behaviour Ok, every key accepted).
    pub fn start() -> FakeMistral {
        let state = Arc::new(Mutex::new(State {
            default: Behaviour::Ok,
            queue: VecDeque::new(),
            refused: HashSet::new(),
            refuse_all: false,
            requests: Vec::new(),
        }));
        let st = state.clone();
        let server = Loopback::start("the fake API", move |s| serve(s, st.clone()));
        FakeMistral {
            url: server.url.clone(),
            state,
            _server: server,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The behaviour when no one-shot is queued.
    pub fn set_default(&self, b: Behaviour) {
        self.lock().default = b;
    }

    /// Queues a one-shot behaviour for a next request.
    pub fn push(&self, b: Behaviour) {
        self.lock().queue.push_back(b);
    }

    /// That key gets 401 from now on.
    pub fn refuse_key(&self, key: &str) {
        self.lock().refused.insert(key.to_string());
    }

    /// That key is accepted again.
    pub fn accept_key(&self, key: &str) {
        self.lock().refused.remove(key);
    }

    /// Every key gets 401 (`true`) or the per-key list applies again (`false`).
    pub fn refuse_all_keys(&self, on: bool) {
        self.lock().refuse_all = on;
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// How many requests were received.
    pub fn count(&self) -> usize {
        self.lock().requests.len()
    }

    /// Forgets the requests received.
    pub fn clear(&self) {
        self.lock().requests.clear();
    }
}

/// The categories marked in a text: `#cat:<name>`.
fn markers(text: &str) -> BTreeSet<String> {
    text.split("#cat:")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|m| !m.is_empty())
        .collect()
}

fn result_of(text: &str, cats: &[&str]) -> serde_json::Value {
    let marked = markers(text);
    let mut categories = serde_json::Map::new();
    let mut scores = serde_json::Map::new();
    for c in cats {
        let score = if marked.contains(*c) { 0.97 } else { 0.01 };
        categories.insert(c.to_string(), serde_json::json!(score >= 0.5));
        scores.insert(c.to_string(), serde_json::json!(score));
    }
    serde_json::json!({"categories": categories, "category_scores": scores})
}

/// The texts of a request body, or `None` when the input is not of the documented shape.
fn texts_of(path: &str, body: &serde_json::Value) -> Option<Vec<String>> {
    let input = body.get("input")?;
    let last_content = |conv: &serde_json::Value| -> Option<String> {
        let msgs = conv.as_array()?;
        let last = msgs.last()?;
        Some(last.get("content")?.as_str()?.to_string())
    };
    match path {
        "/v1/moderations" => match input {
            serde_json::Value::String(s) => Some(vec![s.clone()]),
            serde_json::Value::Array(a) if !a.is_empty() => {
                a.iter().map(|v| v.as_str().map(String::from)).collect()
            }
            _ => None,
        },
        "/v1/chat/moderations" => {
            let a = input.as_array()?;
            match a.first()? {
                serde_json::Value::Object(_) => Some(vec![last_content(input)?]),
                serde_json::Value::Array(_) => a.iter().map(last_content).collect(),
                _ => None,
            }
        }
        _ => None,
    }
}

async fn respond(
    s: &mut TcpStream,
    code: u16,
    extra: &[(&str, String)],
    body: &str,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    };
    let mut head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.flush().await
}

fn error_body(message: &str) -> String {
    serde_json::json!({"object": "error", "message": message, "type": "fake_error", "request_id": "fake-req-1"})
        .to_string()
}

async fn serve(mut s: TcpStream, state: Arc<Mutex<State>>) {
    let mut reader = Reader::default();
    while let Some(Request {
        method: _,
        path,
        key,
        body,
    }) = reader.next(&mut s).await
    {
        let texts = texts_of(&path, &body);
        let inputs = texts.as_ref().map_or(0, Vec::len);
        let behaviour = {
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            st.requests.push(Recorded {
                path: path.clone(),
                key: key.clone(),
                body: body.clone(),
                inputs,
                texts: texts.clone().unwrap_or_default(),
            });
            let refused = match &key {
                None => true,
                Some(k) => st.refuse_all || st.refused.contains(k),
            };
            if refused {
                None
            } else {
                Some(st.queue.pop_front().unwrap_or_else(|| st.default.clone()))
            }
        };
        let Some(mut behaviour) = behaviour else {
            let b = serde_json::json!({"message": "Unauthorized", "request_id": "fake-req-401"})
                .to_string();
            if respond(&mut s, 401, &[], &b).await.is_err() {
                return;
            }
            continue;
        };
        if path != "/v1/moderations" && path != "/v1/chat/moderations" {
            if respond(&mut s, 404, &[], &error_body("Not Found"))
                .await
                .is_err()
            {
                return;
            }
            continue;
        }
        let Some(texts) = texts else {
            let b = serde_json::json!({"detail": [{"loc": ["body", "input"], "msg": "input is not of the documented shape", "type": "value_error"}]}).to_string();
            if respond(&mut s, 422, &[], &b).await.is_err() {
                return;
            }
            continue;
        };
        if let Behaviour::Slow(d) = behaviour {
            tokio::time::sleep(d).await;
            behaviour = Behaviour::Ok;
        }
        let ok = |model: &str, cats: &[&str], n: usize| {
            let results: Vec<serde_json::Value> =
                texts.iter().take(n).map(|t| result_of(t, cats)).collect();
            serde_json::json!({"id": "fake-mod-1", "model": model, "object": "moderation", "results": results})
                .to_string()
        };
        if let Behaviour::RejectText(bad) = &behaviour {
            behaviour = if texts.iter().any(|t| t.contains(bad.as_str())) {
                Behaviour::Unprocessable
            } else {
                Behaviour::Ok
            };
        }
        let r = match behaviour {
            Behaviour::Ok | Behaviour::Slow(_) | Behaviour::RejectText(_) => {
                respond(
                    &mut s,
                    200,
                    &[],
                    &ok("mistral-moderation-2411", CATEGORIES_2411, texts.len()),
                )
                .await
            }
            Behaviour::Ok2603 => {
                respond(
                    &mut s,
                    200,
                    &[],
                    &ok("mistral-moderation-2603", CATEGORIES_2603, texts.len()),
                )
                .await
            }
            Behaviour::WrongLength => {
                respond(
                    &mut s,
                    200,
                    &[],
                    &ok(
                        "mistral-moderation-2411",
                        CATEGORIES_2411,
                        texts.len().saturating_sub(1),
                    ),
                )
                .await
            }
            Behaviour::Malformed => {
                respond(&mut s, 200, &[], "{\"id\": \"fake\", \"results\": [tru").await
            }
            Behaviour::Status(code) => {
                respond(
                    &mut s,
                    code,
                    &[],
                    &error_body(&format!("fake status {code}")),
                )
                .await
            }
            Behaviour::Unprocessable => {
                let b = serde_json::json!({"detail": [{"loc": ["body", "input"], "msg": "Input should be a valid string", "type": "value_error"}]}).to_string();
                respond(&mut s, 422, &[], &b).await
            }
            Behaviour::TooMany { retry_after } => {
                respond(
                    &mut s,
                    429,
                    &[("retry-after", retry_after.to_string())],
                    &error_body("Requests rate limit exceeded"),
                )
                .await
            }
            Behaviour::TooManyDate { in_secs } => {
                let date =
                    httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(in_secs));
                respond(
                    &mut s,
                    429,
                    &[("retry-after", date)],
                    &error_body("Requests rate limit exceeded"),
                )
                .await
            }
            Behaviour::Unavailable { retry_after } => {
                respond(
                    &mut s,
                    503,
                    &[("retry-after", retry_after.to_string())],
                    &error_body("Service unavailable"),
                )
                .await
            }
            Behaviour::Reset => {
                #[allow(deprecated)]
                let _ = s.set_linger(Some(Duration::ZERO));
                drop(s);
                return;
            }
        };
        if r.is_err() {
            return;
        }
    }
}
