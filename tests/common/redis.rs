//! A private `redis-server` on a free loopback port, which a test (or the benchmark, which
//! includes this file) may kill, freeze and restart. Only std and fred: no dev-dependencies.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fred::prelude::*;

/// A loopback port free right now, for a server started next (and restarted on it later).
///
/// It comes from below the kernel's ephemeral range: a port from inside it (what binding port 0
/// gives) can be taken as the local port of any outgoing connection (the tests open hundreds)
/// between this check and the server's bind, or while a test has the server stopped. Never
/// the same port twice in one process, so parallel tests do not pick each other's.
pub fn free_port() -> u16 {
    use std::{
        collections::BTreeSet,
        hash::{BuildHasher, RandomState},
        sync::Mutex,
    };
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|&low| low > 20_000)
        .unwrap_or(32_768);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let random = RandomState::new();
    let span = u64::from(ephemeral_start - 10_000);
    for attempt in 0..10_000u64 {
        let port = 10_000 + (random.hash_one(attempt) % span) as u16;
        if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("no free loopback port between 10000 and {ephemeral_start}")
}

/// A private redis-server without persistence, killed when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// Redis' working directory (it writes nothing there with persistence off).
    dir: PathBuf,
    /// Also listening on a Unix socket (in `dir`), for `unix_url`.
    unix_socket: bool,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_listening(false)
    }

    /// A redis-server that also listens on a Unix socket (see `unix_url`).
    pub fn start_with_unix_socket() -> Self {
        Self::start_listening(true)
    }

    fn start_listening(unix_socket: bool) -> Self {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("latchkey-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir for redis");
        let mut server = Self {
            port,
            child: None,
            dir,
            unix_socket,
        };
        server.spawn();
        server
    }

    fn socket_path(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(if self.unix_socket {
                vec!["--unixsocket".into(), self.socket_path().into_os_string()]
            } else {
                Vec::new()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (the test command installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers_ping() {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers_ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The Unix-socket URL of a server started with `start_with_unix_socket`.
    pub fn unix_url(&self) -> String {
        assert!(self.unix_socket, "this redis-server listens on TCP only");
        format!("redis+unix://{}", self.socket_path().display())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis is running").id()
    }

    /// `kill -9`: Redis dies at once, and with persistence off, its data is gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a fresh, empty redis-server on the same port.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// A plain client for looking behind latchkey's back.
    pub async fn client(&self) -> Client {
        let client = Client::new(Config::from_url(&self.url()).unwrap(), None, None, None);
        client.init().await.expect("connect to the test redis");
        client
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
