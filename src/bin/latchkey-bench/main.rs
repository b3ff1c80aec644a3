//! `latchkey-bench`: latchkey's own benchmark.
//!
//! It starts its own private redis-server and the release `latchkey` binary next to it (so the
//! server runs in its own process, as in production, and its RSS can be read), drives load with
//! real gRPC clients over loopback, prints a table, and optionally writes JSON.
//!
//! ```text
//! cargo build --release
//! target/release/latchkey-bench all --postgres-url postgres://... --json target/bench.json
//! ```

// The tests' private redis-server harness; the bench uses only part of it.
mod cpu;
mod machine;
#[allow(dead_code)]
#[path = "../../../tests/common/redis.rs"]
mod redis;
mod report;
mod scenarios;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use cpu::CpuMeter;
use fred::{interfaces::ClientLike, prelude::Client};
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
    /// reduce-stock runs (skipped without it).
    #[arg(long, env = "LATCHKEY_BENCH_POSTGRES_URL")]
    postgres_url: Option<String>,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
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
    async fn start(redis: &RedisServer, database_url: Option<&str>) -> anyhow::Result<Self> {
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
        let child = Command::new(binary)
            .arg("serve")
            .env("LATCHKEY_LISTEN", format!("127.0.0.1:{port}"))
            .env("LATCHKEY_REDIS_URL", redis.url())
            .env("LATCHKEY_DATABASE_URL", url)
            .env("LATCHKEY_DATABASE_POOL_SIZE", "16")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?;
        let server = Self {
            addr: format!("127.0.0.1:{port}"),
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(channel) = scenarios::connect(&server.addr).await {
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

/// A fresh database on the PostgreSQL server at `admin_url`.
async fn postgres_database(admin_url: &str) -> anyhow::Result<String> {
    use sqlx::{Connection, Executor};
    let name = format!("latchkey_bench_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await?;
    let base = admin_url
        .rsplit_once('/')
        .map_or(admin_url, |(base, _)| base);
    Ok(format!("{base}/{name}"))
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
    format!("{cores} cores, {cpu}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let wants = |s: Scenario| cli.scenarios.contains(&Scenario::All) || cli.scenarios.contains(&s);
    let redis = RedisServer::start();
    let server = Server::start(&redis, None).await?;
    let redis_client = Client::new(
        fred::types::config::Config::from_url(&redis.url())?,
        None,
        None,
        None,
    );
    redis_client.init().await?;
    println!("latchkey-bench on {}, release build, loopback", machine());

    // Every row says what each process spent per operation (see `cpu`).
    let processes = |latchkey: &Server| {
        [
            ("latchkey", latchkey.child.id()),
            ("Redis", redis.pid()),
            ("bench", std::process::id()),
        ]
    };
    let meter = || CpuMeter::start(&processes(&server));
    let mut rows: Vec<Row> = Vec::new();
    let calibration = Duration::from_secs(3);
    rows.push(machine::loopback_round_trip("before", calibration).await?);
    if wants(Scenario::Uncontended) {
        let m = meter()?;
        rows.push(m.finish(scenarios::uncontended(&server.addr, cli.duration, 64).await?)?);
        // Callers in one process usually share one channel: what that saves.
        let m = meter()?;
        rows.push(m.finish(scenarios::uncontended(&server.addr, cli.duration, 1).await?)?);
        let m = meter()?;
        rows.push(m.finish(scenarios::uncontended_grpc_only(&server.addr, cli.duration).await?)?);
        let m = meter()?;
        rows.push(m.finish(scenarios::uncontended_floor(&redis.url(), cli.duration).await?)?);
    }
    if wants(Scenario::HotLock) {
        let m = meter()?;
        let (plain, plain_p99) =
            scenarios::hot_lock(&server.addr, cli.duration, cli.hot_lock_clients, false).await?;
        let plain = m.finish(plain)?;
        let m = meter()?;
        let (fair, fair_p99) =
            scenarios::hot_lock(&server.addr, cli.duration, cli.hot_lock_clients, true).await?;
        let fair = m.finish(fair)?;
        let m = meter()?;
        let (polling, polling_p99) =
            scenarios::hot_lock_polling(&redis.url(), cli.duration).await?;
        let polling = m.finish(polling)?;
        let vs = |p99: f64| {
            let ratio = polling_p99 / p99.max(0.001);
            (format!("{ratio:.1} (target >= 10)"), ratio >= 10.0)
        };
        // The targets are for 64 clients, against the 64-client polling baseline.
        let for_target = cli.hot_lock_clients == 64;
        let other_load = "n/a: the target is for 64 clients";
        let (text, met) = vs(plain_p99);
        let plain = plain.detail("polling / this hand-off wait p99", &text);
        let plain_met = plain.target_met.unwrap_or(false) && met;
        rows.push(if for_target {
            plain.target(
                ">= 5000 hand-offs/s, spread <= 2, hand-off wait p99 10x below polling",
                plain_met,
            )
        } else {
            plain.no_target(other_load)
        });
        let (text, met) = vs(fair_p99);
        let fair = fair.detail("polling / this hand-off wait p99", &text);
        let fair_met = fair.target_met.unwrap_or(false) && met;
        rows.push(if for_target {
            fair.target(
                ">= 3000 hand-offs/s, spread <= 1.1, 0 out of order, hand-off wait p99 10x below polling",
                fair_met,
            )
        } else {
            fair.no_target(other_load)
        });
        rows.push(polling);
    }
    if wants(Scenario::ReduceStock) {
        let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        for stock in [cli.requests, 100] {
            let m = meter()?;
            let row =
                scenarios::reduce_stock(&server.addr, "SQLite", stock, cli.requests, &run).await?;
            rows.push(m.finish(row)?);
        }
        if let Some(admin) = &cli.postgres_url {
            let pg = Server::start(&redis, Some(&postgres_database(admin).await?)).await?;
            // PostgreSQL's own CPU is not counted: it runs as many processes.
            for stock in [cli.requests, 100] {
                let m = CpuMeter::start(&processes(&pg))?;
                let row =
                    scenarios::reduce_stock(&pg.addr, "PostgreSQL", stock, cli.requests, &run)
                        .await?;
                rows.push(m.finish(row)?);
            }
        } else {
            eprintln!("reduce-stock on PostgreSQL skipped: no --postgres-url");
        }
    }
    if wants(Scenario::Memory) {
        rows.extend(scenarios::memory(&server.addr, &redis_client, server.child.id()).await?);
    }
    rows.push(machine::loopback_round_trip("after", calibration).await?);

    report::print(&rows);
    if let Some(path) = &cli.json {
        let json = serde_json::json!({ "machine": machine(), "rows": rows });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
        println!("wrote {}", path.display());
    }
    let failed = rows.iter().filter(|r| !r.check_passed).count();
    anyhow::ensure!(failed == 0, "{failed} correctness check(s) failed");
    Ok(())
}
