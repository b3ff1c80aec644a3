//! Real servers for tests: a private `redis-server` on a free loopback port (which a test may
//! kill, freeze and restart), a link to it that can drop an answer mid-flight, and latchkey
//! itself on port 0, in process or as a child process.
#![allow(dead_code)] // each test crate uses a different part of this module

pub mod link;
mod postgres;
mod redis;

pub use postgres::PgDatabase;
pub use redis::{RedisServer, free_port};

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use latchkey::grpc::pb::{self, lock_service_client::LockServiceClient};
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// Which stock database a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

/// A private stock database: a SQLite file in a temp dir, or a fresh database on the
/// PostgreSQL server named by LATCHKEY_TEST_DATABASE_URL (started by deploy/test.sh), dropped
/// afterwards.
pub struct TestDb {
    pub kind: DbKind,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    _postgres: Option<PgDatabase>,
}

impl TestDb {
    pub async fn new(kind: DbKind) -> Self {
        match kind {
            DbKind::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir for sqlite");
                let url = format!("sqlite://{}", dir.path().join("latchkey.db").display());
                Self {
                    kind,
                    url,
                    _dir: Some(dir),
                    _postgres: None,
                }
            }
            DbKind::Postgres => {
                let admin = std::env::var("LATCHKEY_TEST_DATABASE_URL").expect(
                    "LATCHKEY_TEST_DATABASE_URL is unset: run the suite with deploy/test.sh, which starts a \
                     private PostgreSQL, or point it at a server where tests may create databases",
                );
                let db = PgDatabase::create(&admin, "latchkey_test")
                    .await
                    .expect("create a test database on the test PostgreSQL");
                Self {
                    kind,
                    url: db.url.clone(),
                    _dir: None,
                    _postgres: Some(db),
                }
            }
        }
    }

    /// A connection pool of the test's own, to look at (and change) the data behind latchkey.
    pub async fn pool(&self) -> sqlx::AnyPool {
        sqlx::any::install_default_drivers();
        sqlx::any::AnyPoolOptions::new()
            .max_connections(2)
            .connect(&self.url)
            .await
            .expect("connect to the test database")
    }
}

/// Settings for tests: short Redis timeout so fault tests finish quickly. The stock database
/// is set by `Latchkey::start*`.
pub fn test_config(redis: &RedisServer) -> latchkey::config::Config {
    let mut config =
        latchkey::config::Config::for_redis("127.0.0.1:0".parse().unwrap(), &redis.url());
    config.redis.redis_timeout = Duration::from_millis(1000);
    config
}

/// `test_config(redis)` with the stock database `db`, for a test that changes more settings.
pub fn test_config_on(redis: &RedisServer, db: &TestDb) -> latchkey::config::Config {
    let mut config = test_config(redis);
    config.stock.database_url = db.url.clone();
    config
}

/// latchkey running in this process on a port-0 listener.
pub struct Latchkey {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The private SQLite database of a server started without one.
    _db: Option<TestDb>,
}

impl Latchkey {
    /// latchkey on `redis` with a private SQLite stock database.
    pub async fn start(redis: &RedisServer) -> Self {
        Self::start_with(test_config(redis)).await
    }

    /// latchkey on `redis` with the stock database `db`.
    pub async fn start_on(redis: &RedisServer, db: &TestDb) -> Self {
        Self::start_with(test_config_on(redis, db)).await
    }

    /// latchkey with `config`; a private SQLite database unless the config names another.
    pub async fn start_with(mut config: latchkey::config::Config) -> Self {
        let mut own_db = None;
        if config.stock.database_url == "sqlite://latchkey.db" {
            let db = TestDb::new(DbKind::Sqlite).await;
            config.stock.database_url = db.url.clone();
            own_db = Some(db);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(latchkey::server::run(config, listener, async move {
            let _ = stopped.await;
        }));
        let mut task = task;
        let mut server = Self {
            addr,
            stop: Some(stop),
            task: None,
            _db: own_db,
        };
        tokio::select! {
            () = server.wait_serving() => {}
            ended = &mut task => panic!("latchkey did not start: {ended:?}"),
        }
        server.task = Some(task);
        server
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to latchkey")
    }

    pub async fn locks(&self) -> LockServiceClient<Channel> {
        LockServiceClient::new(self.channel().await)
    }

    pub async fn stock(&self) -> pb::stock_service_client::StockServiceClient<Channel> {
        pb::stock_service_client::StockServiceClient::new(self.channel().await)
    }

    /// The standard gRPC health status of the whole server.
    pub async fn health(&self) -> i32 {
        let Ok(channel) = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
        else {
            return -1;
        };
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status)
            .unwrap_or(-1)
    }

    /// Waits until health says SERVING (Redis reachable), at most 10 s.
    pub async fn wait_serving(&self) {
        wait_until(Duration::from_secs(10), || async {
            self.health().await
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        })
        .await;
    }

    /// Graceful shutdown, as SIGTERM would do.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for Latchkey {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// How many times Redis has run `command` since it started (INFO commandstats: `evalsha`,
/// `script|load`, ...); 0 when it never has.
pub async fn command_calls(redis: &fred::prelude::Client, command: &str) -> u64 {
    use fred::prelude::ClientLike;
    let stats: String = redis
        .custom(fred::cmd!("INFO"), vec!["commandstats"])
        .await
        .expect("INFO commandstats");
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().expect("a call count"))
}

/// `CLIENT PAUSE` for `for_ms`: Redis holds every client's commands (latchkey's included)
/// unanswered until then, as a stalled Redis would. Returns at once.
pub async fn pause_clients(redis: &fred::prelude::Client, for_ms: u64) {
    use fred::prelude::ClientLike;
    let _: () = redis
        .custom(
            fred::cmd!("CLIENT"),
            vec!["PAUSE".to_owned(), for_ms.to_string()],
        )
        .await
        .expect("CLIENT PAUSE");
}

/// Polls `check` every 20 ms until it holds; panics after `limit`. For test assertions about
/// eventual state only: latchkey itself never polls.
pub async fn wait_until<F, Fut>(limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn dur(d: Duration) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

pub fn std_dur(d: Option<prost_types::Duration>) -> Duration {
    let d = d.unwrap_or_default();
    Duration::new(d.seconds as u64, d.nanos as u32)
}

pub fn acquire(name: &str, lease: Duration, wait: Duration) -> pb::AcquireRequest {
    pb::AcquireRequest {
        name: name.into(),
        lease: dur(lease),
        wait_timeout: dur(wait),
        ..Default::default()
    }
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The README, which the tests that keep it true to the code read.
pub fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read README.md")
}

/// The README's section under the heading line `heading` ("## Configuration", "### Bad
/// input"), up to the next top-level ("## ") heading; None without that heading.
pub fn readme_section<'a>(readme: &'a str, heading: &str) -> Option<&'a str> {
    readme
        .split(&format!("\n{heading}\n"))
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
}

/// The real `latchkey serve` binary as a child process, for what it does at start: `env` on top
/// of port 0 to listen on, its stdout and stderr (where it logs) piped.
pub fn latchkey_serve(env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .arg("serve")
        .env("LATCHKEY_LISTEN", "127.0.0.1:0")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the latchkey binary")
}

/// `latchkey_serve(env)` until it exits by itself; if it still runs after `within`, it is
/// killed and the test fails with `still_running`.
pub fn latchkey_until_exit(
    env: &[(&str, &str)],
    within: Duration,
    still_running: &str,
) -> std::process::Output {
    let mut child = latchkey_serve(env);
    let deadline = Instant::now() + within;
    while child.try_wait().expect("latchkey's status").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{still_running}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("latchkey's output")
}

/// The real `latchkey serve` binary as a child process, for crashes (`kill -9`) and signals.
/// Its log (warnings and errors) goes to a file, shown in the test's output only if the test
/// fails, so the warnings a fault test provokes on purpose do not fill every run's output.
pub struct LatchkeyProcess {
    pub addr: SocketAddr,
    child: Option<Child>,
    /// Its SQLite database and its log.
    dir: tempfile::TempDir,
}

impl LatchkeyProcess {
    pub async fn start(redis: &RedisServer) -> Self {
        Self::start_with_env(redis, &[]).await
    }

    /// With extra settings, e.g. `[("LATCHKEY_DATABASE_URL", url)]`.
    pub async fn start_with_env(redis: &RedisServer, env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let db = tempfile::tempdir().expect("temp dir for sqlite");
        let log = std::fs::File::create(db.path().join(LOG)).expect("create the latchkey log");
        let child = Command::new(env!("CARGO_BIN_EXE_latchkey"))
            .arg("serve")
            .env(
                "LATCHKEY_DATABASE_URL",
                format!("sqlite://{}", db.path().join("latchkey.db").display()),
            )
            .env("LATCHKEY_LISTEN", format!("127.0.0.1:{port}"))
            .env("LATCHKEY_REDIS_URL", redis.url())
            .env("LATCHKEY_REDIS_TIMEOUT", "1s")
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn the latchkey binary");
        let process = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: Some(child),
            dir: db,
        };
        wait_until(Duration::from_secs(15), || async {
            let Ok(channel) = Channel::from_shared(format!("http://{}", process.addr))
                .unwrap()
                .connect()
                .await
            else {
                return false;
            };
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            matches!(
                health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await,
                Ok(r) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            )
        })
        .await;
        process
    }

    pub async fn locks(&self) -> LockServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to latchkey process");
        LockServiceClient::new(channel)
    }

    pub async fn stock(&self) -> pb::stock_service_client::StockServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to latchkey process");
        pb::stock_service_client::StockServiceClient::new(channel)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for the exit, at most `limit`. Returns the exit code.
    pub fn terminate(&mut self, limit: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        signal(child.id(), "TERM");
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for LatchkeyProcess {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join(LOG)).unwrap_or_default();
            eprintln!(
                "--- log of the latchkey process at {} ---\n{log}",
                self.addr
            );
        }
    }
}

/// The file in a `LatchkeyProcess`'s temp dir that its stderr goes to.
const LOG: &str = "latchkey.log";

/// `kill -SIG pid`, e.g. signal(pid, "STOP").
pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

/// A private PostgreSQL cluster (initdb + pg_ctl on a free port, as the `postgres` user when
/// run as root) that a test may stop and start. Removed when dropped.
pub struct PgCluster {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
}

impl PgCluster {
    pub fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed (the test command installs it)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("an initdb under /usr/lib/postgresql/*/bin");
        let dir = tempfile::tempdir().expect("temp dir for PostgreSQL");
        let cluster = Self {
            port: free_port(),
            dir,
            bin,
        };
        if cluster.as_root() {
            let status = Command::new("chown")
                .arg("postgres")
                .arg(cluster.dir.path())
                .status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "chown the cluster dir to postgres"
            );
        }
        let data = cluster.dir.path().join("data");
        let ok = cluster
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "initdb");
        cluster.pg_ctl_start();
        cluster
    }

    fn as_root(&self) -> bool {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0"))
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    fn pg_ctl_start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let ok = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-w", "-l"])
            .arg(self.dir.path().join("log"))
            .args(["-o", &options, "start"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "pg_ctl start");
    }

    /// `pg_ctl stop -m immediate`: the server goes away at once, as in a crash.
    pub fn stop(&self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .status();
    }

    pub fn restart(&self) {
        self.pg_ctl_start();
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The state of lock `name`, as Inspect reports it.
pub async fn inspect(client: &LockServiceClient<Channel>, name: &str) -> pb::InspectResponse {
    client
        .clone()
        .inspect(pb::InspectRequest { name: name.into() })
        .await
        .expect("inspect")
        .into_inner()
}

/// A scenario's opening move: takes lock `name` at once (no wait) with `lease`, and fails the
/// test, naming the lock, unless it was granted.
pub async fn take(
    client: &LockServiceClient<Channel>,
    name: &str,
    lease: Duration,
) -> pb::AcquireResponse {
    let answer = client
        .clone()
        .acquire(acquire(name, lease, Duration::ZERO))
        .await
        .unwrap_or_else(|status| panic!("acquiring {name} failed: {status:?}"))
        .into_inner();
    assert!(
        answer.acquired,
        "{name} was not granted at once: {answer:?}"
    );
    answer
}

/// Releases lock `name` held once under `token`, and fails the test, naming the lock, unless
/// the lock is free now.
pub async fn let_go(client: &LockServiceClient<Channel>, name: &str, token: &str) {
    let answer = client
        .clone()
        .release(pb::ReleaseRequest {
            name: name.into(),
            token: token.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|status| panic!("releasing {name} failed: {status:?}"))
        .into_inner();
    assert!(answer.released, "{name} is still held: {answer:?}");
}

/// Creates `product` or sets its stock to `units`, and fails the test, naming the product,
/// unless latchkey accepted it.
pub async fn set_stock(
    client: &mut pb::stock_service_client::StockServiceClient<Channel>,
    product: &str,
    units: u64,
) {
    client
        .set_stock(pb::SetStockRequest {
            product_id: product.into(),
            stock: units,
        })
        .await
        .unwrap_or_else(|status| panic!("setting the stock of {product} failed: {status:?}"));
}

/// An order `id` for one unit of `product`, waiting at most 5 s for its lock.
pub fn one_unit_order(id: &str, product: &str) -> pb::ReduceStockRequest {
    pb::ReduceStockRequest {
        order_id: id.into(),
        items: vec![pb::StockItem {
            product_id: product.into(),
            quantity: 1,
        }],
        wait_timeout: dur(secs(5)),
    }
}

/// Waits (at most `within`) until lock `name` reports exactly `count` waiters.
pub async fn wait_for_waiters(
    client: &LockServiceClient<Channel>,
    name: &str,
    count: u32,
    within: Duration,
) {
    wait_until(within, || async {
        inspect(client, name).await.waiters == count
    })
    .await;
}

/// The seed of a randomized test: LATCHKEY_TEST_SEED when set (to replay a failure), else
/// random. Printed, so a failing run can be replayed.
pub fn test_seed() -> u64 {
    let seed = std::env::var("LATCHKEY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (replay with LATCHKEY_TEST_SEED={seed})");
    seed
}
