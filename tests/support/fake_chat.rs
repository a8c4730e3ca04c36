//! A fake Mistral chat completions API, for the client examples (`tests/examples.rs`): a real
//! HTTP/1.1 server (keep-alive, Content-Length request bodies) on `127.0.0.1:0`, in its own
//! thread with its own tokio runtime, stopped on drop. It answers what the official SDKs
//! (`mistralai` for Python, `@mistralai/mistralai` for TypeScript) and a hand-written client
//! parse:
//!
//! - `POST /v1/chat/completions` with `Authorization: Bearer <key>` (401 without);
//! - `"stream": true`: 200 `text/event-stream` (chunked transfer encoding), one
//!   `data: {chat.completion.chunk}\n\n` event per programmed piece of text (the first with the
//!   role, the last with `finish_reason: "stop"` and `usage`), then `data: [DONE]\n\n`;
//! - otherwise: 200 `application/json`, a `chat.completion` whose message holds the programmed
//!   `tool_calls` (`finish_reason: "tool_calls"`) when the request sent `tools`, else the
//!   programmed text (`finish_reason: "stop"`), with `usage`.
//!
//! Every request is recorded.

use super::loopback::{Loopback, Reader, Request};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// What the fake answers.
#[derive(Clone, Debug, Default)]
pub struct Script {
    /// The streamed completion, one SSE event per piece.
    pub chunks: Vec<String>,
    /// The tool calls of a non-streamed completion asked with `tools`: (function name, arguments
    /// as a JSON string).
    pub tool_calls: Vec<(String, String)>,
    /// The pause before each streamed event.
    pub pause: Duration,
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub path: String,
    /// The bearer key, if any.
    pub key: Option<String>,
    /// The parsed JSON body (`Null` when it did not parse).
    pub body: serde_json::Value,
}

impl Recorded {
    pub fn streamed(&self) -> bool {
        self.body.get("stream").and_then(|s| s.as_bool()) == Some(true)
    }

    /// The content of the request's last message.
    pub fn last_content(&self) -> String {
        self.body
            .get("messages")
            .and_then(|m| m.as_array())
            .and_then(|m| m.last())
            .and_then(|m| m.get("content"))
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string()
    }

    /// The names of the functions the request offered as `tools`.
    pub fn tool_names(&self) -> Vec<String> {
        self.body
            .get("tools")
            .and_then(|t| t.as_array())
            .map(|tools| {
                tools
                    .iter()
                    .filter_map(|t| t.pointer("/function/name")?.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }
}

struct State {
    script: Script,
    requests: Vec<Recorded>,
}

/// The fake API. `url` is the base URL (`http://127.0.0.1:<port>`, no `/v1`), what the SDKs
/// take as their server URL.
pub struct FakeChat {
    pub url: String,
    state: Arc<Mutex<State>>,
    _server: Loopback,
}

impl FakeChat {
    pub fn start(script: Script) -> FakeChat {
        let state = Arc::new(Mutex::new(State {
            script,
            requests: Vec::new(),
        }));
        let st = state.clone();
        let server = Loopback::start("the fake chat API", move |s| serve(s, st.clone()));
        FakeChat {
            url: server.url.clone(),
            state,
            _server: server,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }
}

const MODEL: &str = "mistral-small-latest";
const CREATED: u64 = 1_767_225_600;

fn usage() -> serde_json::Value {
    serde_json::json!({"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46})
}

/// One `chat.completion.chunk` event.
fn chunk(i: usize, content: &str, last: bool) -> String {
    let mut delta = serde_json::json!({"content": content});
    if i == 0 {
        delta["role"] = "assistant".into();
    }
    let mut v = serde_json::json!({
        "id": "fake-chat-stream-1",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": [{
            "index": 0,
            "delta": delta,
            "finish_reason": if last { serde_json::json!("stop") } else { serde_json::Value::Null },
        }],
    });
    if last {
        v["usage"] = usage();
    }
    format!("data: {v}\n\n")
}

/// A non-streamed `chat.completion`.
fn completion(script: &Script, with_tools: bool) -> String {
    let message = if with_tools && !script.tool_calls.is_empty() {
        let calls: Vec<serde_json::Value> = script
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, (name, args))| {
                serde_json::json!({
                    "id": format!("call{i:05}"),
                    "type": "function",
                    "index": i,
                    "function": {"name": name, "arguments": args},
                })
            })
            .collect();
        serde_json::json!({"role": "assistant", "content": "", "tool_calls": calls})
    } else {
        serde_json::json!({"role": "assistant", "content": script.chunks.concat(), "tool_calls": null})
    };
    let finish = if message["tool_calls"].is_array() {
        "tool_calls"
    } else {
        "stop"
    };
    serde_json::json!({
        "id": "fake-chat-1",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage(),
    })
    .to_string()
}

async fn respond(s: &mut TcpStream, code: u16, reason: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.flush().await
}

/// Streams the events with chunked transfer encoding, one HTTP chunk per event.
async fn stream(s: &mut TcpStream, script: &Script) -> std::io::Result<()> {
    s.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .await?;
    s.flush().await?;
    let n = script.chunks.len();
    let mut events: Vec<String> = script
        .chunks
        .iter()
        .enumerate()
        .map(|(i, c)| chunk(i, c, i + 1 == n))
        .collect();
    events.push("data: [DONE]\n\n".to_string());
    for e in events {
        if !script.pause.is_zero() {
            tokio::time::sleep(script.pause).await;
        }
        s.write_all(format!("{:x}\r\n{e}\r\n", e.len()).as_bytes())
            .await?;
        s.flush().await?;
    }
    s.write_all(b"0\r\n\r\n").await?;
    s.flush().await
}

async fn serve(mut s: TcpStream, state: Arc<Mutex<State>>) {
    let mut reader = Reader::default();
    while let Some(Request {
        method,
        path,
        key,
        body,
    }) = reader.next(&mut s).await
    {
        let rec = Recorded {
            path: path.clone(),
            key: key.clone(),
            body,
        };
        let script = {
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            st.requests.push(rec.clone());
            st.script.clone()
        };
        let path_only = path.split('?').next().unwrap_or_default();
        let r = if key.as_deref().is_none_or(str::is_empty) {
            respond(
                &mut s,
                401,
                "Unauthorized",
                r#"{"message":"Unauthorized","request_id":"fake-chat-401"}"#,
            )
            .await
        } else if method != "POST" || path_only != "/v1/chat/completions" {
            respond(
                &mut s,
                404,
                "Not Found",
                r#"{"object":"error","message":"Not Found","type":"fake_error"}"#,
            )
            .await
        } else if rec.streamed() {
            stream(&mut s, &script).await
        } else {
            let with_tools = rec
                .body
                .get("tools")
                .and_then(|t| t.as_array())
                .is_some_and(|t| !t.is_empty());
            respond(&mut s, 200, "OK", &completion(&script, with_tools)).await
        };
        if r.is_err() {
            return;
        }
    }
}
