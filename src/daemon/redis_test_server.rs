//! A real `redis-server` for tests: started on a free loopback port, stopped (and waited for)
//! when dropped. Tests that need one fail, with how to install it, when `redis-server` is
//! missing: they are never skipped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer PING after it is spawned.
const START_WAIT: Duration = Duration::from_secs(10);

/// A `redis-server` child process on 127.0.0.1.
pub(crate) struct RedisServer {
    child: Option<Child>,
    port: u16,
    /// With `Some`, the server keeps its data in this directory (append-only file, fsync on
    /// every write), so a [`RedisServer::restart`] finds it again.
    dir: Option<tempfile::TempDir>,
}

impl RedisServer {
    /// A server without persistence (`--save "" --appendonly no`) on a free port.
    pub(crate) fn start() -> RedisServer {
        RedisServer::start_with(None)
    }

    /// A server that keeps its data in a temporary directory (`--appendonly yes
    /// --appendfsync always --dir <tempdir>`), so [`RedisServer::restart`] keeps it.
    pub(crate) fn start_persistent() -> RedisServer {
        let dir = tempfile::tempdir().expect("a temporary directory for redis-server");
        RedisServer::start_with(Some(dir))
    }

    /// A server without persistence on this port (a test that made a client first).
    pub(crate) fn start_on(port: u16) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port,
            dir: None,
        };
        if let Err(e) = server.spawn() {
            panic!("redis-server on port {port}: {e}");
        }
        server
    }

    fn start_with(dir: Option<tempfile::TempDir>) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port: 0,
            dir,
        };
        // Another process may take the free port between our probe and redis-server's bind: try
        // a few ports.
        let mut last = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    /// `redis://127.0.0.1:<port>/`.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (SIGTERM, so a persistent one writes its data; SIGKILL after 5 s) and
    /// waits for it. The port and the data directory stay for [`RedisServer::restart`].
    pub(crate) fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: `pid` is our own child, not yet waited for, so the id is still its.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Freezes the server (SIGSTOP): it keeps its connections but answers nothing, as a hung
    /// or unreachable-by-network server would, until [`RedisServer::unpause`].
    pub(crate) fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a paused server go on (SIGCONT).
    pub(crate) fn unpause(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        let child = self.child.as_ref().expect("redis-server is not running");
        let pid = i32::try_from(child.id()).expect("a pid");
        // SAFETY: `pid` is our own child, not yet waited for, so the id is still its.
        unsafe {
            libc::kill(pid, sig);
        }
    }

    /// Stops the server if it runs and starts it again on the same port (and, for a persistent
    /// one, the same directory).
    pub(crate) fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + START_WAIT;
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The old socket may linger for a moment.
                Err(e) if Instant::now() >= deadline => {
                    panic!("redis-server did not restart on port {}: {e}", self.port)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn data_dir(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.path().to_owned())
    }

    /// Spawns redis-server on `self.port` and waits until it answers PING.
    fn spawn(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port, "--bind", "127.0.0.1", "--save", ""]);
        match self.data_dir() {
            Some(dir) => {
                cmd.args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                    .arg(dir);
            }
            None => {
                cmd.args(["--appendonly", "no"]);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed (the Redis approval store tests need a real \
                 server): apt-get install -y redis-server"
            ),
            Err(e) => panic!("cannot run redis-server: {e}"),
        };
        let deadline = Instant::now() + START_WAIT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("redis-server on port {port} exited: {status}"));
            }
            if ping(self.port) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("redis-server on port {port} did not answer PING"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A loopback port nobody listens on right now.
pub(crate) fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// Whether a Redis server on this port answers PING with PONG.
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
