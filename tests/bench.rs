//! The benchmark pointed at a latchkey that is already running (`latchkey-bench --addr`), as a
//! user would run it against a deployed server, and starting its own redis-server and latchkey
//! as `deploy/bench.sh` does. These tests prove the run completes and its correctness checks
//! hold, not its numbers: this is a dev build on a shared machine, and the numbers come from
//! `deploy/bench.sh`.

mod common;

use std::{
    io::Read,
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use common::*;
use fred::interfaces::ClientLike;
use serde_json::Value;

fn bench_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_latchkey-bench"));
    command.args(args);
    command
}

fn bench(args: &[&str]) -> Output {
    bench_command(args).output().expect("run latchkey-bench")
}

/// The rows of a `--json` report, as (scenario, variant, row).
fn rows(json: &std::path::Path) -> Vec<(String, String, Value)> {
    let report: Value =
        serde_json::from_slice(&std::fs::read(json).expect("the bench wrote its JSON"))
            .expect("valid JSON");
    report["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|row| {
            (
                row["scenario"].as_str().unwrap_or_default().to_owned(),
                row["variant"].as_str().unwrap_or_default().to_owned(),
                row.clone(),
            )
        })
        .collect()
}

/// A row's detail `key` (details are `[key, value]` pairs).
fn detail<'a>(row: &'a Value, key: &str) -> Option<&'a str> {
    row["details"].as_array()?.iter().find(|kv| kv[0] == key)?[1].as_str()
}

#[tokio::test]
async fn the_bench_loads_a_running_latchkey_and_every_check_holds() {
    let redis = RedisServer::start();
    // A dev build under 64 clients on a loaded machine: give Redis calls room, so a slow
    // moment is not reported as Redis being unavailable (what this test checks is correctness).
    let server =
        LatchkeyProcess::start_with_env(&redis, &[("LATCHKEY_REDIS_TIMEOUT", "10s")]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("bench.json");
    let addr = server.addr.to_string();
    let out = bench(&[
        "uncontended",
        "hot-lock",
        "reduce-stock",
        "--addr",
        &addr,
        "--redis-url",
        &redis.url(),
        "--duration",
        "1s",
        "--hot-lock-clients",
        "8",
        "--requests",
        "200",
        "--json",
        json.to_str().expect("utf-8 temp path"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("against the running latchkey at {addr}")),
        "{stdout}"
    );

    let rows = rows(&json);
    let variants: Vec<&str> = rows.iter().map(|(_, v, _)| v.as_str()).collect();
    for expected in [
        "gRPC, 64 clients / 64 names",
        "baseline: gRPC only, 2 health checks per pair",
        "baseline: scripts, no gRPC",
        "gRPC, non-fair, 8 clients / 1 name",
        "gRPC, fair, 8 clients / 1 name",
        "baseline: SET NX + 10 ms polling",
        "the server's database, stock 200, 100 clients",
        "the server's database, stock 100, 100 clients",
    ] {
        assert!(
            variants.contains(&expected),
            "no row {expected:?} in {variants:?}"
        );
    }
    for (scenario, variant, row) in &rows {
        assert_eq!(row["check_passed"], true, "{scenario} / {variant}: {row}");
        if scenario == "machine" {
            continue;
        }
        assert!(
            row["ops"].as_u64().unwrap_or(0) > 0,
            "{scenario} / {variant}: {row}"
        );
        // Only the bench's own process is measured: latchkey may be on another machine.
        let cpu = detail(row, "CPU us/op").unwrap_or_default();
        assert!(
            cpu.starts_with("bench ") && !cpu.contains("latchkey"),
            "{scenario} / {variant}: CPU {cpu:?}"
        );
        let waited = detail(row, "waited for a core us/op").unwrap_or_default();
        assert!(
            waited.starts_with("bench ") && !waited.contains("latchkey"),
            "{scenario} / {variant}: waited {waited:?}"
        );
        assert_busy_share(row);
        assert_round_trips(row);
    }
    let sold = |variant: &str| {
        let (_, _, row) = rows.iter().find(|(_, v, _)| v == variant).expect("row");
        detail(row, "sold")
    };
    assert_eq!(
        sold("the server's database, stock 200, 100 clients"),
        Some("200")
    );
    assert_eq!(
        sold("the server's database, stock 100, 100 clients"),
        Some("100")
    );

    // Every lock the run took (the products' locks included) was released, and nobody is
    // left waiting: Inspect each name Redis knows (a released lock's key lingers a while to
    // keep its fence).
    let client = redis.client().await;
    let keys: Vec<String> = client
        .custom(fred::cmd!("KEYS"), vec!["latchkey:*:lock"])
        .await
        .expect("KEYS");
    let names: Vec<&str> = keys
        .iter()
        .filter_map(|k| k.strip_prefix("latchkey:{")?.strip_suffix("}:lock"))
        .collect();
    assert!(names.len() > 64, "the run's locks are in Redis: {keys:?}");
    let locks = server.locks().await;
    for name in names {
        let state = inspect(&locks, name).await;
        assert!(!state.held && state.waiters == 0, "{name}: {state:?}");
    }
}

#[test]
fn the_memory_scenario_refuses_a_running_latchkey() {
    // It would flush that server's Redis; refused before anything connects.
    let out = bench(&["memory", "--addr", "127.0.0.1:1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("memory scenario flushes Redis") && stderr.contains("drop --addr"),
        "{stderr}"
    );
}

/// A row's "cores busy" reads "N% (steal M%)" with shares between 0 and 100.
fn assert_busy_share(row: &Value) {
    let busy = detail(row, "cores busy").unwrap_or_default();
    let shares: Vec<f64> = busy
        .split(|c: char| !c.is_ascii_digit())
        .filter(|n| !n.is_empty())
        .map(|n| n.parse().expect("a number"))
        .collect();
    assert!(
        busy.contains("% (steal ")
            && shares.len() == 2
            && shares.iter().all(|s| (0.0..=100.0).contains(s)),
        "cores busy: {busy:?} in {row}"
    );
}

/// A load row's "loopback round trip us before / after" reads "N / M": the probes that
/// bracket it, each a positive mean.
fn assert_round_trips(row: &Value) {
    let probes = detail(row, "loopback round trip us before / after").unwrap_or_default();
    let means: Vec<u64> = probes.split(" / ").filter_map(|n| n.parse().ok()).collect();
    assert!(
        means.len() == 2 && means.iter().all(|&us| us >= 1),
        "round trips: {probes:?} in {row}"
    );
}

/// A bench started in the background with its own servers. If a test ends while it still
/// runs, it gets SIGTERM, on which it removes what it started; any server the test saw it
/// start that still runs after that is killed, so a failing test leaves nothing behind.
struct BenchProcess {
    child: Child,
    stdout: Captured,
    stderr: Captured,
    /// The bench's servers that `wait_for_child` found.
    servers: Vec<u32>,
}

/// One output pipe of the bench, read by a thread until it closes.
struct Captured {
    bytes: Arc<Mutex<Vec<u8>>>,
    reader: std::thread::JoinHandle<()>,
}

impl Captured {
    fn read(mut pipe: impl Read + Send + 'static) -> Self {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&bytes);
        let reader = std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend_from_slice(&chunk[..n]);
            }
        });
        Self { bytes, reader }
    }

    /// What was read, once the pipe closed or `grace` passed; the bool says it closed.
    fn take(&self, grace: Duration) -> (Vec<u8>, bool) {
        let deadline = Instant::now() + grace;
        while !self.reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let bytes = self
            .bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        (bytes, self.reader.is_finished())
    }
}

impl BenchProcess {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = bench_command(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run latchkey-bench");
        let stdout = Captured::read(child.stdout.take().expect("piped stdout"));
        let stderr = Captured::read(child.stderr.take().expect("piped stderr"));
        Self {
            child,
            stdout,
            stderr,
            servers: Vec::new(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The bench's child processes whose command is `comm` (found through `/proc`).
    fn children_named(&self, comm: &str) -> Vec<u32> {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return Vec::new();
        };
        tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
            .flat_map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
            })
            .collect()
    }

    /// Waits (at most a minute) until the bench runs a child named `comm`; returns its pid.
    fn wait_for_child(&mut self, comm: &str) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(&pid) = self.children_named(comm).first() {
                self.servers.push(pid);
                return pid;
            }
            assert!(Instant::now() < deadline, "the bench never started {comm}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most `within`) for the bench to end by itself, and returns what it printed.
    fn finish(&mut self, within: Duration) -> Output {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("the bench's status") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the bench did not end within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // A server the bench left running keeps its stderr open: do not wait for that.
        let (stdout, _) = self.stdout.take(Duration::from_secs(5));
        let (mut stderr, closed) = self.stderr.take(Duration::from_secs(5));
        if !closed {
            stderr.extend_from_slice(b"\n[a process the bench started still holds its stderr]");
        }
        Output {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for BenchProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for pid in self.servers.iter().filter(|pid| !gone(**pid)) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// Whether process `pid` is gone (or a zombie: dead, only not yet reaped).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Runs the bench, and while it runs reads the environment of the `latchkey` process it
/// started.
fn bench_reading_its_server_env(args: &[&str], env: &[(&str, &str)]) -> (Output, Vec<String>) {
    let mut bench = BenchProcess::spawn(args, env);
    let latchkey = bench.wait_for_child("latchkey");
    let server_env = environment_of(latchkey);
    (bench.finish(Duration::from_secs(120)), server_env)
}

/// The environment process `pid` was started with (`NAME=value` entries). A process takes its
/// new name part-way through `execve`, before the kernel has set up the new program's
/// environment, and `/proc/PID/environ` reads empty until then (2 of 300 `latchkey` starts
/// polled in a tight loop on a loaded machine read so): wait, at most a minute, for it.
fn environment_of(pid: u32) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("latchkey's environ");
        if !environ.is_empty() {
            return environ
                .split(|b| *b == 0)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "process {pid}'s environment stayed empty"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The values of variable `name` in an environment (`NAME=value` entries).
fn setting<'a>(env: &'a [String], name: &str) -> Vec<&'a str> {
    env.iter()
        .filter_map(|v| v.strip_prefix(name)?.strip_prefix('='))
        .collect()
}

#[test]
fn the_bench_starts_its_own_latchkey_with_the_worker_count_asked_for() {
    // The bench itself is started with another TOKIO_WORKER_THREADS: its latchkey must get
    // only what --server-worker-threads says, and nothing of the bench's own when unset.
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("bench.json");
    let (out, server_env) = bench_reading_its_server_env(
        &[
            "hot-lock",
            "--duration",
            "1s",
            "--hot-lock-clients",
            "4",
            "--server-worker-threads",
            "1",
            "--json",
            json.to_str().expect("utf-8 temp path"),
        ],
        &[("TOKIO_WORKER_THREADS", "7")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    assert_eq!(setting(&server_env, "TOKIO_WORKER_THREADS"), ["1"]);
    let said = "loopback, latchkey with 1 Tokio worker(s) (TOKIO_WORKER_THREADS=1)";
    assert!(
        stdout.lines().next().unwrap_or_default().contains(said),
        "{stdout}"
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("JSON")).expect("valid JSON");
    assert_eq!(report["server"], said);
    // Its own servers: the rows measure latchkey and Redis as well, and every check held.
    let rows = rows(&json);
    let hot: Vec<_> = rows.iter().filter(|(s, _, _)| s == "hot-lock").collect();
    assert_eq!(hot.len(), 3, "{rows:?}");
    for (scenario, variant, row) in &rows {
        assert_eq!(row["check_passed"], true, "{scenario} / {variant}: {row}");
    }
    let (_, _, plain) = hot[0];
    for key in ["CPU us/op", "switches/op", "waited for a core us/op"] {
        let per_process = detail(plain, key).unwrap_or_default();
        assert!(
            ["latchkey ", "Redis ", "bench "]
                .iter()
                .all(|p| per_process.contains(p)),
            "{key}: {per_process:?}"
        );
    }
    assert_busy_share(plain);
    assert_round_trips(plain);

    let (out, server_env) = bench_reading_its_server_env(
        &["uncontended", "--duration", "200ms"],
        &[("TOKIO_WORKER_THREADS", "7")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed:\n{stdout}");
    assert_eq!(
        setting(&server_env, "TOKIO_WORKER_THREADS"),
        Vec::<&str>::new()
    );
    assert!(
        stdout.contains("loopback, latchkey with a Tokio worker per core"),
        "{stdout}"
    );
    assert!(
        matches!(setting(&server_env, "LATCHKEY_REDIS_URL")[..],
            [url] if url.starts_with("redis://127.0.0.1:")),
        "{server_env:?}"
    );
}

#[test]
fn the_bench_can_have_its_latchkey_reach_redis_over_a_unix_socket() {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("bench.json");
    let (out, server_env) = bench_reading_its_server_env(
        &[
            "uncontended",
            "--duration",
            "500ms",
            "--redis-unix-socket",
            "--json",
            json.to_str().expect("utf-8 temp path"),
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    assert!(
        matches!(setting(&server_env, "LATCHKEY_REDIS_URL")[..],
            [url] if url.starts_with("redis+unix:///") && url.ends_with("/redis.sock")),
        "{server_env:?}"
    );
    let said = "loopback, latchkey with a Tokio worker per core, Redis over a Unix socket";
    assert!(
        stdout.lines().next().unwrap_or_default().contains(said),
        "{stdout}"
    );
    // Every lock of the run went through that socket and every check held.
    let rows = rows(&json);
    let target_row = rows
        .iter()
        .find(|(s, v, _)| s == "uncontended" && v == "gRPC, 64 clients / 64 names");
    let (_, _, row) = target_row.unwrap_or_else(|| panic!("no target row in {rows:?}"));
    assert!(row["ops"].as_u64().unwrap_or(0) > 0, "{row}");
    for (scenario, variant, row) in &rows {
        assert_eq!(row["check_passed"], true, "{scenario} / {variant}: {row}");
    }
}

#[test]
fn a_terminated_bench_stops_the_servers_it_started() {
    let mut bench = BenchProcess::spawn(
        &["hot-lock", "--duration", "30s", "--hot-lock-clients", "4"],
        &[],
    );
    let redis = bench.wait_for_child("redis-server");
    let latchkey = bench.wait_for_child("latchkey");
    signal(bench.pid(), "TERM");
    let out = bench.finish(Duration::from_secs(30));
    let survivors: Vec<u32> = [redis, latchkey]
        .into_iter()
        .filter(|p| !gone(*p))
        .collect();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        survivors.is_empty(),
        "still running: {survivors:?}; {stderr}"
    );
    assert!(!out.status.success(), "a stopped run is not a success");
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
}

#[tokio::test]
async fn the_bench_drops_the_postgresql_database_it_created() {
    let postgres = PgCluster::start();
    let bench_databases = || async {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&postgres.url())
            .await
            .expect("connect to the test PostgreSQL");
        let names: Vec<(String,)> =
            sqlx::query_as("SELECT datname FROM pg_database WHERE datname LIKE 'latchkey_bench%'")
                .fetch_all(&mut conn)
                .await
                .expect("list databases");
        names.into_iter().map(|(n,)| n).collect::<Vec<_>>()
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("bench.json");
    let out = bench(&[
        "reduce-stock",
        "--requests",
        "200",
        "--postgres-url",
        &postgres.url(),
        "--json",
        json.to_str().expect("utf-8 temp path"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    // It did use a database there (the PostgreSQL rows ran, and sold what they should)...
    let rows = rows(&json);
    for (variant, sold) in [
        ("PostgreSQL, stock 200, 100 clients", "200"),
        ("PostgreSQL, stock 100, 100 clients", "100"),
    ] {
        let (_, _, row) = rows
            .iter()
            .find(|(_, v, _)| v == variant)
            .unwrap_or_else(|| panic!("no row {variant:?} in {rows:?}"));
        assert_eq!(row["check_passed"], true, "{variant}: {row}");
        assert_eq!(detail(row, "sold"), Some(sold), "{variant}: {row}");
    }
    // ...and left none behind.
    assert_eq!(bench_databases().await, Vec::<String>::new());
}

/// A run that gave up before starting anything: it failed, saying `why`, without the password
/// (`secret`) of the URL it was given, and before the table's first line, which comes once its
/// servers are up.
fn assert_refused_at_start(out: &Output, why: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains(why), "{stderr}");
    assert!(
        !stderr.contains("secret"),
        "the password was printed: {stderr}"
    );
    assert!(!stdout.contains("latchkey-bench on"), "{stdout}");
}

#[test]
fn an_unreachable_postgresql_fails_the_run_before_any_row() {
    // Nothing listens on this port. Four uncontended rows of ten minutes would come first if
    // the bench only found out when it reached the PostgreSQL rows.
    let url = format!(
        "postgres://postgres:secret@127.0.0.1:{}/postgres",
        free_port()
    );
    let mut bench = BenchProcess::spawn(
        &[
            "uncontended",
            "reduce-stock",
            "--duration",
            "10m",
            "--postgres-url",
            &url,
        ],
        &[],
    );
    let out = bench.finish(Duration::from_secs(120));
    assert_refused_at_start(
        &out,
        "cannot create a database on the PostgreSQL server postgres://postgres@127.0.0.1:",
    );
}

#[tokio::test]
async fn an_unreachable_redis_url_fails_a_run_against_a_running_latchkey_before_any_row() {
    let redis = RedisServer::start();
    let server = LatchkeyProcess::start(&redis).await;
    let addr = server.addr.to_string();
    // Nothing listens there; the baselines that use it would come after ten minutes of rows.
    let wrong = format!("redis://:secret@127.0.0.1:{}", free_port());
    let mut bench = BenchProcess::spawn(
        &[
            "uncontended",
            "--addr",
            &addr,
            "--redis-url",
            &wrong,
            "--duration",
            "10m",
        ],
        &[],
    );
    let out = bench.finish(Duration::from_secs(120));
    assert_refused_at_start(&out, "cannot reach the Redis --redis-url names");
}

/// The number after `label` in `text`, digits only.
fn number_after(text: &str, label: &str) -> Option<u64> {
    let rest = &text[text.find(label)? + label.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[test]
fn the_instruction_count_is_taken_over_pairs_a_latchkey_under_callgrind_served() {
    let binaries = std::path::Path::new(env!("CARGO_BIN_EXE_latchkey"))
        .parent()
        .expect("the binaries' directory");
    // Kept out of target/, where it would replace the profile of a release build someone is
    // reading.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let kept = dir.path().join("test.callgrind");
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/instructions.sh"
    ))
    .arg("3")
    .env("LATCHKEY_BIN_DIR", binaries)
    .env("LATCHKEY_CALLGRIND_OUT", &kept)
    .output()
    .expect("run deploy/instructions.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pairs = number_after(&stdout, "),").expect("the pair count");
    let per_pair = number_after(&stdout, "Acquire+Release pair:").expect("the count per pair");
    assert!(pairs > 0 && per_pair > 0, "{stdout}");
    let annotate = format!("callgrind_annotate {}", kept.display());
    assert!(
        stdout.contains(&annotate) && kept.is_file(),
        "the data is not kept where LATCHKEY_CALLGRIND_OUT said:\n{stdout}"
    );
    let functions: Vec<&str> = stdout
        .lines()
        .skip_while(|line| !line.starts_with("the functions"))
        .skip(1)
        .collect();
    assert_eq!(functions.len(), 20, "the top 20 functions:\n{stdout}");
    assert!(
        functions.iter().all(|line| line.contains("%)")),
        "each with its count and share:\n{stdout}"
    );
    // Functions of the binary it ran, not only of libc or valgrind (a row ends with the object
    // file; a long function name may cut it off).
    let object = format!("{}]", binaries.join("latchkey").display());
    assert!(
        functions.iter().any(|line| line.ends_with(&object)),
        "no function of {object} among the top ones:\n{stdout}"
    );
    let addr = stdout
        .split_whitespace()
        .nth(2)
        .expect("the address latchkey served on");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the latchkey it started still answers at {addr}"
    );
}
