//! A fake HTTP server's plumbing: a listener on 127.0.0.1:0 served in its own thread with its
//! own tokio runtime (so it works under any test runtime), stopped and joined on drop. The fakes
//! (`fake_mistral`, `fake_chat`) give it their per-connection handler.

use std::future::Future;
use std::thread::JoinHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Loopback {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Loopback {
    /// Binds a free loopback port and serves each connection with `serve`.
    pub fn start<F, Fut>(what: &str, serve: F) -> Loopback
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("bind {what}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                let accept = async {
                    loop {
                        if let Ok((s, _)) = listener.accept().await {
                            tokio::spawn(serve(s));
                        }
                    }
                };
                tokio::select! {
                    _ = stopped => {}
                    _ = accept => {}
                }
            });
        });
        Loopback {
            url: format!("http://{addr}"),
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The first position of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One HTTP/1.1 request, as the fakes need it.
pub struct Request {
    pub method: String,
    pub path: String,
    /// The bearer key, if any.
    pub key: Option<String>,
    /// The JSON body (`Null` when it did not parse).
    pub body: serde_json::Value,
}

/// Reads the requests of one keep-alive connection (Content-Length bodies; `Expect:
/// 100-continue` answered).
#[derive(Default)]
pub struct Reader {
    buf: Vec<u8>,
}

impl Reader {
    /// The next request; `None` when the connection ends.
    pub async fn next(&mut self, s: &mut TcpStream) -> Option<Request> {
        let mut tmp = vec![0u8; 16 * 1024];
        let head_end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p;
            }
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let mut parts = lines.next().unwrap_or_default().split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let (mut length, mut key, mut expect_continue) = (0usize, None, false);
        for l in lines {
            let Some((name, value)) = l.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("authorization") {
                key = value.strip_prefix("Bearer ").map(|k| k.trim().to_string());
            } else if name.eq_ignore_ascii_case("expect") {
                expect_continue = value.eq_ignore_ascii_case("100-continue");
            }
        }
        if expect_continue && s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
            return None;
        }
        let start = head_end + 4;
        while self.buf.len() < start + length {
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
        let body = serde_json::from_slice(&self.buf[start..start + length])
            .unwrap_or(serde_json::Value::Null);
        self.buf.drain(..start + length);
        Some(Request {
            method,
            path,
            key,
            body,
        })
    }
}
