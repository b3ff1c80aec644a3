//! `latchkey-bench`: latchkey's own benchmark.
//!
//! By default it starts its own private redis-server and the release `latchkey` binary next to
//! it (so the server runs in its own process, as in production, and its CPU and RSS can be
//! read); with `--addr` it loads a latchkey that is already running instead. Either way it
//! drives load with real gRPC clients, prints a table, and optionally writes JSON.
//!
//! ```text
//! cargo build --release
//! target/release/latchkey-bench all --postgres-url postgres://... --json target/bench.json
//! target/release/latchkey-bench uncontended hot-lock --addr 10.0.0.5:50051 \
//!     --redis-url redis://10.0.0.6:6379
//! ```

mod conn;
mod cpu;
mod machine;
// The tests' private redis-server harness; the bench uses only part of it.
#[allow(dead_code)]
#[path = "../../../tests/common/redis.rs"]
mod redis;
// The database `--postgres-url` runs use, dropped when the run ends (shared with the tests).
#[path = "../../../tests/common/postgres.rs"]
mod postgres;
mod report;
mod scenarios;

use std::{
    num::NonZeroUsize,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use cpu::CpuMeter;
use postgres::PgDatabase;
use redis::{RedisServer, free_port};
use report::Row;

#[derive(Debug, Parser)]
#[command(
    name = "latchkey-bench",
    about = "Benchmark latchkey against its targets"
)]
struct Cli {
    /// What to run.
    #[arg(value_enum, default_value = "all")]
    scenarios: Vec<Scenario>,
    /// How long each timed scenario runs.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Clients on the one hot lock (the target is for 64; 2 shows the bare hand-off chain).
    #[arg(long, default_value_t = 64)]
    hot_lock_clients: usize,
    /// ReduceStock requests per run.
    #[arg(long, default_value_t = 10_000)]
    requests: u64,
    /// A PostgreSQL server where the benchmark may create a database, for the PostgreSQL
    /// reduce-stock runs (skipped without it). The database is dropped when the run ends.
    #[arg(long, env = "LATCHKEY_BENCH_POSTGRES_URL")]
    postgres_url: Option<String>,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Load a latchkey that is already running at HOST:PORT instead of starting one. Its
    /// locks and products are named `bench/<run id>/...`; the memory scenario does not run
    /// (it flushes Redis and reads latchkey's RSS), and only the bench's own CPU is reported.
    #[arg(long)]
    addr: Option<String>,
    /// With --addr: the Redis that latchkey uses, for the baselines that bypass latchkey (the
    /// lock scripts without gRPC, and SET NX polling); without it they are skipped.
    #[arg(long, requires = "addr")]
    redis_url: Option<String>,
    /// Tokio worker threads of the latchkey the bench starts (its TOKIO_WORKER_THREADS);
    /// without it, latchkey's default of one per core. The table's first line says which.
    #[arg(long, conflicts_with = "addr")]
    server_worker_threads: Option<NonZeroUsize>,
    /// The Redis the bench starts also listens on a Unix socket, and the latchkey it starts
    /// reaches Redis there (`redis+unix://`) instead of over loopback TCP. The baselines keep
    /// TCP. The table's first line says which.
    #[arg(long, conflicts_with = "addr")]
    redis_unix_socket: bool,
}

impl Cli {
    /// How the bench starts its own latchkey.
    fn server_options(&self) -> ServerOptions {
        ServerOptions {
            workers: self.server_worker_threads,
            redis_unix_socket: self.redis_unix_socket,
        }
    }
}

/// How the bench starts its own latchkey (`--server-worker-threads`, `--redis-unix-socket`).
#[derive(Debug, Clone, Copy)]
struct ServerOptions {
    workers: Option<NonZeroUsize>,
    redis_unix_socket: bool,
}

impl ServerOptions {
    /// For the table's first line and the JSON's `server`.
    fn describe(&self) -> String {
        let workers = match self.workers {
            None => "a Tokio worker per core".to_owned(),
            Some(n) => format!("{n} Tokio worker(s) (TOKIO_WORKER_THREADS={n})"),
        };
        let redis = if self.redis_unix_socket {
            ", Redis over a Unix socket"
        } else {
            ""
        };
        format!("loopback, latchkey with {workers}{redis}")
    }
}

/// What every load row is measured with: each process's CPU and wake-ups (see `cpu`), and
/// the machine's loopback round trip right before and right after the row (see `machine`).
struct RowMeter {
    cpu: CpuMeter,
    round_trip_before_us: f64,
}

impl RowMeter {
    /// The probe runs before the CPU reading starts, so its own CPU and switches are not
    /// counted as the row's.
    async fn start(processes: Vec<(&'static str, u32)>) -> anyhow::Result<Self> {
        let round_trip_before_us = machine::round_trip_us().await?;
        Ok(Self {
            cpu: CpuMeter::start(&processes)?,
            round_trip_before_us,
        })
    }

    async fn finish(self, row: Row) -> anyhow::Result<Row> {
        let row = self.cpu.finish(row)?;
        let after_us = machine::round_trip_us().await?;
        Ok(row.detail(
            "loopback round trip us before / after",
            format!("{:.0} / {:.0}", self.round_trip_before_us, after_us),
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    All,
    Uncontended,
    HotLock,
    ReduceStock,
    Memory,
}

/// The `latchkey` binary, run as a child process for the benchmark.
struct Server {
    addr: String,
    child: Child,
    _dir: Option<tempfile_dir::Dir>,
}

mod tempfile_dir {
    /// A directory removed on drop (std only: the bench has no dev-dependencies).
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Server {
    async fn start(
        redis: &RedisServer,
        database_url: Option<&str>,
        options: ServerOptions,
    ) -> anyhow::Result<Self> {
        let port = free_port();
        let binary = std::env::current_exe()?.with_file_name("latchkey");
        anyhow::ensure!(
            binary.exists(),
            "{} is missing: run `cargo build --release` first",
            binary.display()
        );
        let (url, dir) = match database_url {
            Some(url) => (url.to_owned(), None),
            None => {
                let dir = std::env::temp_dir()
                    .join(format!("latchkey-bench-{}-{port}", std::process::id()));
                std::fs::create_dir_all(&dir)?;
                (
                    format!("sqlite://{}", dir.join("bench.db").display()),
                    Some(tempfile_dir::Dir(dir)),
                )
            }
        };
        let mut command = Command::new(binary);
        command
            .arg("serve")
            .env("LATCHKEY_LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "LATCHKEY_REDIS_URL",
                if options.redis_unix_socket {
                    redis.unix_url()
                } else {
                    redis.url()
                },
            )
            .env("LATCHKEY_DATABASE_URL", url)
            .env("LATCHKEY_DATABASE_POOL_SIZE", "16")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        // Only what --server-worker-threads says, never a TOKIO_WORKER_THREADS the bench
        // itself happened to be started with, so the table's first line is true.
        match options.workers {
            Some(n) => command.env("TOKIO_WORKER_THREADS", n.to_string()),
            None => command.env_remove("TOKIO_WORKER_THREADS"),
        };
        let child = command.spawn()?;
        let server = Self {
            addr: format!("127.0.0.1:{port}"),
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(channel) = conn::Conn::connect(&server.addr).await {
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                let check = health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
                if matches!(check, Ok(r) if r.get_ref().status == 1) {
                    return Ok(server);
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "latchkey did not become healthy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    match guest_halt_polling() {
        Some(polling) => format!("{cores} cores, {cpu}, {polling}"),
        None => format!("{cores} cores, {cpu}"),
    }
}

/// On a KVM guest idling with the haltpoll driver: how long an idle core polls before it
/// halts. Waking a halted core goes through the hypervisor: on the VM measured, polling made a
/// wake-up five times cheaper (see the README), so the table says which way the machine was
/// set. None on other machines.
fn guest_halt_polling() -> Option<String> {
    let driver = std::fs::read_to_string("/sys/devices/system/cpu/cpuidle/current_driver").ok()?;
    if driver.trim() != "haltpoll" {
        return None;
    }
    let ns: u64 = std::fs::read_to_string("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(if ns == 0 {
        "guest halt polling off".to_owned()
    } else {
        format!("guest halt polling up to {} us", ns / 1_000)
    })
}

/// Where the load goes.
enum Target {
    /// A private redis-server and latchkey this run started, stopped when dropped: latchkey
    /// first (fields drop in order), so it never sees its Redis go away and logs about it.
    Own { server: Server, redis: RedisServer },
    /// A latchkey that was already running, and optionally the Redis it uses.
    Running {
        addr: String,
        redis_url: Option<String>,
    },
}

impl Target {
    fn addr(&self) -> &str {
        match self {
            Target::Own { server, .. } => &server.addr,
            Target::Running { addr, .. } => addr,
        }
    }

    fn redis_url(&self) -> Option<String> {
        match self {
            Target::Own { redis, .. } => Some(redis.url()),
            Target::Running { redis_url, .. } => redis_url.clone(),
        }
    }

    /// The processes whose CPU time and context switches every row reports: all three when
    /// the bench started them (`latchkey`: another of its servers to measure instead of the
    /// first, such as the PostgreSQL one), else only its own.
    fn processes(&self, latchkey: Option<&Server>) -> Vec<(&'static str, u32)> {
        let bench = ("bench", std::process::id());
        match self {
            Target::Own { redis, server } => vec![
                ("latchkey", latchkey.unwrap_or(server).child.id()),
                ("Redis", redis.pid()),
                bench,
            ],
            Target::Running { .. } => vec![bench],
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // A stopped run drops its state, and with it the servers and the database it started:
    // `kill` or `timeout` must not leave a redis-server or latchkey behind.
    tokio::select! {
        result = run(cli) => result,
        signal = termination() => anyhow::bail!(
            "stopped by {signal}; the servers and database this run started were removed"
        ),
    }
}

/// Resolves with the signal's name on the first SIGTERM or SIGINT (never, if the handlers
/// cannot be installed: the default action then stops the bench, as before).
async fn termination() -> &'static str {
    match latchkey::server::termination_signal().await {
        Ok(signal) => signal,
        Err(error) => {
            eprintln!(
                "cannot install signal handlers ({error}): a stopped bench may leave its servers running"
            );
            std::future::pending().await
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let explicitly = |s: Scenario| cli.scenarios.contains(&s);
    let wants = |s: Scenario| cli.scenarios.contains(&Scenario::All) || explicitly(s);
    // The database of the PostgreSQL rows is made before anything runs, so a --postgres-url
    // that cannot be reached fails the run at once, not after every row before those. Declared
    // before the servers, so dropped after them: after the latchkey that uses it stopped.
    let pg_database = match (&cli.addr, &cli.postgres_url) {
        (None, Some(admin)) if wants(Scenario::ReduceStock) => Some(
            PgDatabase::create(admin, "latchkey_bench")
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot create a database on the PostgreSQL server {} (--postgres-url): {e}",
                        latchkey::config::redacted_url(admin)
                    )
                })?,
        ),
        _ => None,
    };
    let target = match &cli.addr {
        None => {
            let redis = if cli.redis_unix_socket {
                RedisServer::start_with_unix_socket()
            } else {
                RedisServer::start()
            };
            let server = Server::start(&redis, None, cli.server_options()).await?;
            Target::Own { redis, server }
        }
        Some(addr) => {
            anyhow::ensure!(
                !explicitly(Scenario::Memory),
                "the memory scenario flushes Redis and reads latchkey's RSS, so it runs only \
                 against the bench's own servers: drop --addr"
            );
            conn::Conn::connect(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot reach latchkey: {e:#}"))?;
            // The baselines need this Redis only after the rows before them: find out now.
            if let Some(url) = &cli.redis_url {
                let probe = scenarios::redis_client(url).await.map_err(|e| {
                    anyhow::anyhow!("cannot reach the Redis --redis-url names: {e:#}")
                })?;
                let _ = fred::interfaces::ClientLike::quit(&probe).await;
            }
            Target::Running {
                addr: addr.clone(),
                redis_url: cli.redis_url.clone(),
            }
        }
    };
    let addr = target.addr();
    let server = match &target {
        Target::Own { .. } => cli.server_options().describe(),
        Target::Running { addr, .. } => format!("against the running latchkey at {addr}"),
    };
    println!(
        "latchkey-bench on {}, {} build, {server}",
        machine(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    );
    // Names of locks and products this run creates, so a run never trips over what an
    // earlier, interrupted one left behind on a long-running server.
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let redis_url = target.redis_url();
    let no_redis = |what: &str| {
        eprintln!(
            "{what} skipped: the latchkey at {addr} runs on a Redis unknown to the bench (--redis-url)"
        );
    };

    // Every row says what each process spent per operation (see `cpu`), and how fast the
    // machine woke a thread right before and after it (see `machine`).
    let meter = || RowMeter::start(target.processes(None));
    let mut rows: Vec<Row> = Vec::new();
    let calibration = cli.duration.min(Duration::from_secs(3));
    rows.push(machine::loopback_round_trip("before", calibration).await?);
    if wants(Scenario::Uncontended) {
        let m = meter().await?;
        rows.push(
            m.finish(scenarios::uncontended(addr, &run, cli.duration, 64).await?)
                .await?,
        );
        // Callers in one process usually share one channel: what that saves.
        let m = meter().await?;
        rows.push(
            m.finish(scenarios::uncontended(addr, &run, cli.duration, 1).await?)
                .await?,
        );
        let m = meter().await?;
        rows.push(
            m.finish(scenarios::uncontended_grpc_only(addr, cli.duration).await?)
                .await?,
        );
        if let Some(url) = &redis_url {
            let m = meter().await?;
            rows.push(
                m.finish(scenarios::uncontended_floor(url, &run, cli.duration).await?)
                    .await?,
            );
        } else {
            no_redis("the no-gRPC baseline");
        }
    }
    if wants(Scenario::HotLock) {
        let clients = cli.hot_lock_clients;
        let m = meter().await?;
        let (plain, plain_p99) =
            scenarios::hot_lock(addr, &run, cli.duration, clients, false).await?;
        let plain = m.finish(plain).await?;
        let m = meter().await?;
        let (fair, fair_p99) = scenarios::hot_lock(addr, &run, cli.duration, clients, true).await?;
        let fair = m.finish(fair).await?;
        let polling = match &redis_url {
            Some(url) => {
                let m = meter().await?;
                let (row, p99) = scenarios::hot_lock_polling(url, &run, cli.duration).await?;
                Some((m.finish(row).await?, p99))
            }
            None => {
                no_redis("the polling baseline");
                None
            }
        };
        // The targets are for 64 clients, against the 64-client polling baseline.
        let judge = |row: Row, p99: f64, target: &str| match (&polling, clients) {
            (_, c) if c != 64 => row.no_target("n/a: the target is for 64 clients"),
            (None, _) => row.no_target(
                "not judged: the wait target compares with the polling baseline (--redis-url)",
            ),
            (Some((_, polling_p99)), _) => {
                let ratio = polling_p99 / p99.max(0.001);
                let met = row.target_met.unwrap_or(false) && ratio >= 10.0;
                row.detail(
                    "polling / this hand-off wait p99",
                    format!("{ratio:.1} (target >= 10)"),
                )
                .target(target, met)
            }
        };
        rows.push(judge(
            plain,
            plain_p99,
            ">= 5000 hand-offs/s, spread <= 2, hand-off wait p99 10x below polling",
        ));
        rows.push(judge(
            fair,
            fair_p99,
            ">= 3000 hand-offs/s, spread <= 1.1, 0 out of order, hand-off wait p99 10x below polling",
        ));
        rows.extend(polling.map(|(row, _)| row));
    }
    if wants(Scenario::ReduceStock) {
        let database = match &target {
            Target::Own { .. } => "SQLite",
            Target::Running { .. } => "the server's database",
        };
        for stock in [cli.requests, 100] {
            let m = meter().await?;
            let row = scenarios::reduce_stock(addr, database, stock, cli.requests, &run).await?;
            rows.push(m.finish(row).await?);
        }
        match (&target, &pg_database) {
            (Target::Own { redis, .. }, Some(database)) => {
                let pg = Server::start(redis, Some(&database.url), cli.server_options()).await?;
                // PostgreSQL's own CPU is not counted: it runs as many processes.
                for stock in [cli.requests, 100] {
                    let m = RowMeter::start(target.processes(Some(&pg))).await?;
                    let row =
                        scenarios::reduce_stock(&pg.addr, "PostgreSQL", stock, cli.requests, &run)
                            .await?;
                    rows.push(m.finish(row).await?);
                }
            }
            (Target::Own { .. }, None) => {
                eprintln!("reduce-stock on PostgreSQL skipped: no --postgres-url");
            }
            (Target::Running { .. }, _) => {
                if cli.postgres_url.is_some() {
                    eprintln!("--postgres-url ignored: the running latchkey uses its own database");
                }
            }
        }
    }
    if wants(Scenario::Memory) {
        match &target {
            Target::Own { redis, server } => {
                let redis_client = scenarios::redis_client(&redis.url()).await?;
                rows.extend(scenarios::memory(addr, &redis_client, server.child.id()).await?);
            }
            Target::Running { .. } => {
                eprintln!("memory skipped: it runs only against the bench's own servers");
            }
        }
    }
    rows.push(machine::loopback_round_trip("after", calibration).await?);

    report::print(&rows);
    if let Some(path) = &cli.json {
        let json = serde_json::json!({ "machine": machine(), "server": server, "rows": rows });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
        println!("wrote {}", path.display());
    }
    let failed = rows.iter().filter(|r| !r.check_passed).count();
    anyhow::ensure!(failed == 0, "{failed} correctness check(s) failed");
    Ok(())
}
