//! The benchmark scenarios. Each drives real gRPC clients (one connection each, unless a row
//! says they share) against a latchkey process over loopback, measures, and checks what must
//! hold.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fred::{
    interfaces::{ClientLike, KeysInterface, LuaInterface},
    prelude::Client,
    types::{
        Expiration, SetOptions,
        config::{Config as RedisConfig, PerformanceConfig},
    },
};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use latchkey::{
    config::Config,
    grpc::pb::{
        self, lock_service_client::LockServiceClient, stock_service_client::StockServiceClient,
    },
    lock::{
        AcquireRequest, Acquired, Lease, LockEngine, LockName, WaitTimeout, store::LockStore,
        waiters::Waiters,
    },
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{
    conn::Conn,
    report::{Row, histogram, record},
};

/// A Redis client for the bench's own commands, each bounded so a stalled Redis fails the
/// row rather than hanging the bench. (Not the server's `fred_builder`: that one keeps
/// reconnecting to a Redis that is not there at start, right for the server, wrong for a
/// bench given a mistyped `--redis-url`.)
pub async fn redis_client(redis_url: &str) -> anyhow::Result<Client> {
    let performance = PerformanceConfig {
        default_command_timeout: Duration::from_secs(10),
        ..PerformanceConfig::default()
    };
    let client = Client::new(
        RedisConfig::from_url(redis_url)?,
        Some(performance),
        None,
        None,
    );
    client.init().await?;
    Ok(client)
}

fn proto(d: Duration) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

fn acquire(name: &str, lease: Duration, wait: Duration, fair: bool) -> pb::AcquireRequest {
    pb::AcquireRequest {
        name: name.into(),
        lease: proto(lease),
        wait_timeout: proto(wait),
        token: String::new(),
        fair,
        request_id: String::new(),
    }
}

/// A progress bar that fills with elapsed time.
fn timed_bar(label: &str, duration: Duration) -> ProgressBar {
    let bar = ProgressBar::new(duration.as_millis() as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>24} [{bar:40}] {elapsed_precise} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    let ticker = bar.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        while !ticker.is_finished() {
            ticker.set_position(started.elapsed().as_millis() as u64);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    bar
}

fn counted_bar(label: &str, total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>24} [{bar:40}] {pos}/{len} {elapsed_precise}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    bar
}

/// Per-client latencies and counters, merged at the end.
struct Tally {
    hist: Histogram<u64>,
    ops: u64,
    errors: Vec<String>,
}

impl Tally {
    fn new() -> Self {
        Self {
            hist: histogram(),
            ops: 0,
            errors: Vec::new(),
        }
    }

    fn merge(&mut self, other: Tally) {
        let _ = self.hist.add(&other.hist);
        self.ops += other.ops;
        self.errors.extend(other.errors.into_iter().take(3));
    }
}

/// Waits for every client task, merges what they measured, and clears the progress bar.
/// Returns the merged tally and the time since `started`.
async fn gather(
    mut tasks: JoinSet<Tally>,
    started: Instant,
    bar: &ProgressBar,
) -> anyhow::Result<(Tally, Duration)> {
    let mut total = Tally::new();
    while let Some(tally) = tasks.join_next().await {
        total.merge(tally?);
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    Ok((total, elapsed))
}

/// 64 clients, 64 names, Acquire+Release pairs over gRPC, the clients spread over
/// `connections` HTTP/2 connections (64: one each).
pub async fn uncontended(
    addr: &str,
    run: &str,
    duration: Duration,
    connections: usize,
) -> anyhow::Result<Row> {
    const CLIENTS: usize = 64;
    let bar = timed_bar("uncontended", duration);
    let mut channels = Vec::new();
    for _ in 0..connections.clamp(1, CLIENTS) {
        channels.push(Conn::connect(addr).await?);
    }
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = JoinSet::new();
    for c in 0..CLIENTS {
        let mut client = LockServiceClient::new(channels[c % channels.len()].clone());
        let name = format!("bench/{run}/uncontended/{c}");
        tasks.spawn(async move {
            let mut tally = Tally::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let grant = client
                    .acquire(acquire(
                        &name,
                        Duration::from_secs(30),
                        Duration::ZERO,
                        false,
                    ))
                    .await;
                let grant = match grant {
                    Ok(g) if g.get_ref().acquired => g.into_inner(),
                    other => {
                        tally.errors.push(format!("acquire: {other:?}"));
                        continue;
                    }
                };
                let released = client
                    .release(pb::ReleaseRequest {
                        name: name.clone(),
                        token: grant.token,
                        request_id: String::new(),
                    })
                    .await;
                if !matches!(&released, Ok(r) if r.get_ref().released) {
                    tally.errors.push(format!("release: {released:?}"));
                }
                record(&mut tally.hist, t.elapsed());
                tally.ops += 1;
            }
            tally
        });
    }
    let (total, elapsed) = gather(tasks, started, &bar).await?;
    let shared = channels.len() < CLIENTS;
    let variant = if shared {
        format!(
            "gRPC, 64 clients / 64 names, {} shared connection(s)",
            channels.len()
        )
    } else {
        "gRPC, 64 clients / 64 names".to_owned()
    };
    let row = Row::new("uncontended", &variant)
        .throughput(total.ops, elapsed, "pairs/s")
        .latency(&total.hist)
        .check(
            total.errors.is_empty(),
            format!(
                "every acquire granted, every release freed ({} errors)",
                total.errors.len()
            ),
        );
    if shared {
        return Ok(
            row.no_target("comparison only: the target row gives each client its own connection")
        );
    }
    let met = row.throughput >= 20_000.0 && row.p99_ms <= 5.0;
    Ok(row.target(">= 20000 pairs/s, p99 <= 5 ms", met))
}

/// The transport's ceiling: the same 64 clients and connections, each "pair" two gRPC health
/// checks answered from memory by the latchkey process: no lock logic, no Redis.
pub async fn uncontended_grpc_only(addr: &str, duration: Duration) -> anyhow::Result<Row> {
    const CLIENTS: usize = 64;
    let bar = timed_bar("uncontended (gRPC only)", duration);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = JoinSet::new();
    for _ in 0..CLIENTS {
        let mut client =
            tonic_health::pb::health_client::HealthClient::new(Conn::connect(addr).await?);
        tasks.spawn(async move {
            let mut tally = Tally::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                for _ in 0..2 {
                    let check = client
                        .check(tonic_health::pb::HealthCheckRequest {
                            service: String::new(),
                        })
                        .await;
                    if let Err(e) = check {
                        tally.errors.push(e.to_string());
                    }
                }
                record(&mut tally.hist, t.elapsed());
                tally.ops += 1;
            }
            tally
        });
    }
    let (total, elapsed) = gather(tasks, started, &bar).await?;
    Ok(Row::new(
        "uncontended",
        "baseline: gRPC only, 2 health checks per pair",
    )
    .throughput(total.ops, elapsed, "pairs/s")
    .latency(&total.hist)
    .check(
        total.errors.is_empty(),
        format!("every check answered ({} errors)", total.errors.len()),
    ))
}

/// The floor: the same scripts through the lock engine in this process, no gRPC.
pub async fn uncontended_floor(
    redis_url: &str,
    run: &str,
    duration: Duration,
) -> anyhow::Result<Row> {
    const CLIENTS: usize = 64;
    let config = Config::for_redis("127.0.0.1:0".parse()?, redis_url);
    let store = LockStore::connect(&config.redis, &config.locks)?;
    let waiters = Waiters::start(
        latchkey::lock::store::fred_builder(&config.redis)?.build_subscriber_client()?,
    );
    let stop = CancellationToken::new();
    let engine = LockEngine::start(store, waiters, stop.clone(), &config.locks);
    engine.store().ping().await?;
    let lease = Lease::parse(Some(Duration::from_secs(30)), &config.locks)?;
    let bar = timed_bar("uncontended (floor)", duration);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = JoinSet::new();
    for c in 0..CLIENTS {
        let engine = engine.clone();
        let name = LockName::parse(format!("bench/{run}/floor/{c}"), &config.locks)?;
        tasks.spawn(async move {
            let mut tally = Tally::new();
            let request = AcquireRequest {
                name: name.clone(),
                lease,
                wait: WaitTimeout::default(),
                reenter: None,
                fair: false,
            };
            while Instant::now() < deadline {
                let t = Instant::now();
                match engine
                    .acquire(
                        &request,
                        tokio::time::Instant::now(),
                        std::future::pending(),
                    )
                    .await
                {
                    Ok(Acquired::Granted(grant)) => {
                        if let Err(e) = engine.release(&name, grant.token, None).await {
                            tally.errors.push(e.to_string());
                        }
                    }
                    other => tally.errors.push(format!("{other:?}")),
                }
                record(&mut tally.hist, t.elapsed());
                tally.ops += 1;
            }
            tally
        });
    }
    let (total, elapsed) = gather(tasks, started, &bar).await?;
    stop.cancel();
    Ok(Row::new("uncontended", "baseline: scripts, no gRPC")
        .throughput(total.ops, elapsed, "pairs/s")
        .latency(&total.hist)
        .check(
            total.errors.is_empty(),
            format!("every acquire granted ({} errors)", total.errors.len()),
        ))
}

/// One grant of a hot lock, logged while the lock was held (so the log is in grant order).
#[derive(Debug, Clone, Copy)]
struct Logged {
    client: usize,
    /// Fair grants: when the client joined the queue (Redis us); 0 otherwise.
    queued_at: u64,
    /// How long the client's Acquire took.
    waited: Duration,
}

type Grants = Arc<Mutex<Vec<Logged>>>;

/// Counts a grant `client` waited `waited` for, and logs it. Call it while holding the lock:
/// the log's order is then the grant order.
fn log_grant(tally: &mut Tally, grants: &Grants, client: usize, queued_at: u64, waited: Duration) {
    record(&mut tally.hist, waited);
    tally.ops += 1;
    grants.lock().expect("grant log").push(Logged {
        client,
        queued_at,
        waited,
    });
}

/// What a hot-lock run shows beyond its throughput and latency columns.
struct HotFigures {
    handoffs_per_s: f64,
    spread: f64,
    /// p99 wait of the grants that were hand-offs (ms). A grant back to the previous holder
    /// never waited for anybody else's release, so it is left out: comparing this figure
    /// between latchkey and the polling baseline compares the wait for someone else's lock.
    handoff_p99_ms: f64,
}

fn hot_lock_figures(
    row: Row,
    grants: &[Logged],
    clients: usize,
    elapsed: Duration,
) -> (Row, HotFigures) {
    let mut handoff_waits = histogram();
    let mut handoffs = 0u64;
    for pair in grants.windows(2) {
        if pair[0].client != pair[1].client {
            handoffs += 1;
            record(&mut handoff_waits, pair[1].waited);
        }
    }
    let mut per_client = vec![0u64; clients];
    for g in grants {
        per_client[g.client] += 1;
    }
    let most = per_client.iter().copied().max().unwrap_or(0);
    let fewest = per_client.iter().copied().min().unwrap_or(0);
    let spread = if fewest == 0 {
        f64::INFINITY
    } else {
        most as f64 / fewest as f64
    };
    let handoffs_per_s = handoffs as f64 / elapsed.as_secs_f64();
    let handoff_p99_ms = handoff_waits.value_at_quantile(0.99) as f64 / 1000.0;
    let row = row
        .detail(
            "grants/s",
            format!("{:.0}", grants.len() as f64 / elapsed.as_secs_f64()),
        )
        .detail("hand-offs/s", format!("{handoffs_per_s:.0}"))
        .detail(
            "spread (most/fewest)",
            format!("{spread:.2} ({most}/{fewest})"),
        )
        .detail("hand-off wait p99 ms", format!("{handoff_p99_ms:.2}"));
    (
        row,
        HotFigures {
            handoffs_per_s,
            spread,
            handoff_p99_ms,
        },
    )
}

/// Grants that went out while a waiter that had joined the queue earlier was still waiting.
fn out_of_order(grants: &[Logged]) -> usize {
    let mut later_min = u64::MAX;
    let mut count = 0;
    for g in grants.iter().rev() {
        if g.queued_at == 0 {
            continue;
        }
        if later_min < g.queued_at {
            count += 1;
        }
        later_min = later_min.min(g.queued_at);
    }
    count
}

/// `clients` (64 for the target) on one name: Acquire (waiting) + Release, fair or not.
pub async fn hot_lock(
    addr: &str,
    run: &str,
    duration: Duration,
    clients: usize,
    fair: bool,
) -> anyhow::Result<(Row, f64)> {
    let label = if fair {
        "hot-lock (fair)"
    } else {
        "hot-lock (non-fair)"
    };
    let name = format!("bench/{run}/hot/{}", if fair { "fair" } else { "plain" });
    let bar = timed_bar(label, duration);
    let grants: Grants = Arc::default();
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = JoinSet::new();
    for c in 0..clients {
        let mut client = LockServiceClient::new(Conn::connect(addr).await?);
        let (grants, name) = (grants.clone(), name.clone());
        tasks.spawn(async move {
            let mut tally = Tally::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let grant = client
                    .acquire(acquire(
                        &name,
                        Duration::from_secs(5),
                        Duration::from_secs(30),
                        fair,
                    ))
                    .await;
                let grant = match grant {
                    Ok(g) if g.get_ref().acquired => g.into_inner(),
                    other => {
                        tally.errors.push(format!("acquire: {other:?}"));
                        continue;
                    }
                };
                log_grant(&mut tally, &grants, c, grant.queued_at, t.elapsed());
                let released = client
                    .release(pb::ReleaseRequest {
                        name: name.clone(),
                        token: grant.token,
                        request_id: String::new(),
                    })
                    .await;
                if !matches!(&released, Ok(r) if r.get_ref().released) {
                    tally.errors.push(format!("release: {released:?}"));
                }
            }
            tally
        });
    }
    let (total, elapsed) = gather(tasks, started, &bar).await?;
    let grants = grants.lock().expect("grant log").clone();
    let variant = format!(
        "gRPC, {}, {clients} clients / 1 name",
        if fair { "fair" } else { "non-fair" }
    );
    let row = Row::new("hot-lock", &variant)
        .throughput(total.ops, elapsed, "grants/s")
        .latency(&total.hist);
    let (mut row, figures) = hot_lock_figures(row, &grants, clients, elapsed);
    let HotFigures {
        handoffs_per_s: handoffs,
        spread,
        handoff_p99_ms: p99,
    } = figures;
    if fair {
        let late = out_of_order(&grants);
        row = row
            .detail("out-of-order grants", late)
            .check(
                total.errors.is_empty() && late == 0,
                format!("0 out-of-order grants, {} errors", total.errors.len()),
            )
            .target(
                ">= 3000 hand-offs/s, spread <= 1.1, 0 out of order",
                handoffs >= 3000.0 && spread <= 1.1 && late == 0,
            );
    } else {
        row = row
            .check(
                total.errors.is_empty(),
                format!("every wait granted ({} errors)", total.errors.len()),
            )
            .target(
                ">= 5000 hand-offs/s, spread <= 2",
                handoffs >= 5000.0 && spread <= 2.0,
            );
    }
    Ok((row, p99))
}

/// The polling baseline: SET NX PX, retry every 10 ms, what many Redis lock libraries do.
pub async fn hot_lock_polling(
    redis_url: &str,
    run: &str,
    duration: Duration,
) -> anyhow::Result<(Row, f64)> {
    const CLIENTS: usize = 64;
    let client = redis_client(redis_url).await?;
    let bar = timed_bar("hot-lock (polling)", duration);
    let grants: Grants = Arc::default();
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = JoinSet::new();
    for c in 0..CLIENTS {
        let client = client.clone();
        let grants = grants.clone();
        let key = format!("bench:{run}:polling");
        tasks.spawn(async move {
            let mut tally = Tally::new();
            let token = format!("client-{c}");
            while Instant::now() < deadline {
                let t = Instant::now();
                loop {
                    let set: Result<Option<String>, _> = client
                        .set(key.as_str(), token.as_str(), Some(Expiration::PX(5000)), Some(SetOptions::NX), false)
                        .await;
                    match set {
                        Ok(Some(_)) => break,
                        Ok(None) => tokio::time::sleep(Duration::from_millis(10)).await,
                        Err(e) => {
                            tally.errors.push(e.to_string());
                            // A healthy Redis grants every poller in the end (the others stop
                            // at the deadline), so its full wait is measured; a failing one
                            // must not keep the loop going past it.
                            if Instant::now() >= deadline {
                                return tally;
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                log_grant(&mut tally, &grants, c, 0, t.elapsed());
                let del: Result<i64, _> = client
                    .eval(
                        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
                        key.as_str(),
                        token.as_str(),
                    )
                    .await;
                if !matches!(del, Ok(1)) {
                    tally.errors.push(format!("release: {del:?}"));
                }
            }
            tally
        });
    }
    let (total, elapsed) = gather(tasks, started, &bar).await?;
    let grants = grants.lock().expect("grant log").clone();
    let row = Row::new("hot-lock", "baseline: SET NX + 10 ms polling")
        .throughput(total.ops, elapsed, "grants/s")
        .latency(&total.hist);
    let (row, figures) = hot_lock_figures(row, &grants, CLIENTS, elapsed);
    let p99 = figures.handoff_p99_ms;
    Ok((
        row.check(
            total.errors.is_empty(),
            format!("{} errors", total.errors.len()),
        ),
        p99,
    ))
}

/// 10,000 ReduceStock requests from 100 clients on one product.
pub async fn reduce_stock(
    addr: &str,
    database: &str,
    stock: u64,
    requests: u64,
    run: &str,
) -> anyhow::Result<Row> {
    const CLIENTS: u64 = 100;
    let product = format!("bench/{run}/{stock}");
    let mut admin = StockServiceClient::new(Conn::connect(addr).await?);
    admin
        .set_stock(pb::SetStockRequest {
            product_id: product.clone(),
            stock,
        })
        .await?;
    let bar = counted_bar(&format!("reduce-stock ({database}, {stock})"), requests);
    let sold = Arc::new(Mutex::new(0u64));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for c in 0..CLIENTS {
        let mut client = StockServiceClient::new(Conn::connect(addr).await?);
        let (product, bar, sold) = (product.clone(), bar.clone(), sold.clone());
        tasks.spawn(async move {
            let mut tally = Tally::new();
            for n in 0..requests / CLIENTS {
                let order = pb::ReduceStockRequest {
                    order_id: format!("{product}-{c}-{n}"),
                    items: vec![pb::StockItem {
                        product_id: product.clone(),
                        quantity: 1,
                    }],
                    wait_timeout: proto(Duration::from_secs(60)),
                };
                let t = Instant::now();
                match client.reduce_stock(order).await {
                    Ok(_) => *sold.lock().expect("sold") += 1,
                    Err(status) if status.code() == tonic::Code::FailedPrecondition => {}
                    Err(status) => tally.errors.push(format!("{status:?}")),
                }
                record(&mut tally.hist, t.elapsed());
                tally.ops += 1;
                bar.inc(1);
            }
            tally
        });
    }
    let (total, elapsed) = gather(tasks, started, &bar).await?;
    let sold = *sold.lock().expect("sold");
    let left = admin
        .get_stock(pb::GetStockRequest {
            product_id: product,
        })
        .await?
        .into_inner()
        .level
        .map_or(0, |l| l.stock);
    let oversold = sold.saturating_sub(stock);
    let accounted = stock.checked_sub(sold) == Some(left);
    let expected = stock.min(requests);
    let throughput = total.ops as f64 / elapsed.as_secs_f64();
    let row = Row::new(
        "reduce-stock",
        &format!("{database}, stock {stock}, 100 clients"),
    )
    .throughput(total.ops, elapsed, "orders/s")
    .latency(&total.hist)
    .detail("sold", sold)
    .detail("oversold units", oversold)
    .check(
        oversold == 0 && accounted && sold == expected && total.errors.is_empty(),
        format!(
            "sold {sold} of {expected}, {left} left, 0 oversold, {} errors",
            total.errors.len()
        ),
    );
    let goal = match database {
        "SQLite" => Some(5000.0),
        "PostgreSQL" => Some(2000.0),
        // A running latchkey's database is not known to the bench.
        _ => None,
    };
    Ok(match goal {
        Some(goal) if stock >= requests => row.target(
            &format!(">= {goal:.0} orders/s, 0 oversold"),
            throughput >= goal && oversold == 0,
        ),
        _ => row,
    })
}

/// Memory: bytes per held lock in Redis, and latchkey's RSS with 10,000 waiters on 1,000 names.
/// The memory scenario's held locks: each of 64 clients' (name, token) pairs.
type HeldLocks = Vec<Vec<(String, String)>>;

/// Takes `count` locks bench/memory/NNNNNN, 600 s leases, on 64 connections. Given the locks
/// a first pass holds, each client instead releases each of its locks and takes it again (a
/// new token), so the names are re-used ones. Returns the locks held and how many calls failed.
async fn hold_memory_locks(
    addr: &str,
    count: u64,
    held: Option<HeldLocks>,
) -> anyhow::Result<(HeldLocks, u64)> {
    const CLIENTS: u64 = 64;
    let label = if held.is_some() {
        "memory: release, take again"
    } else {
        "memory: 100k locks"
    };
    // Each client's names, with the token that holds each (empty: a fresh name).
    let work = held.unwrap_or_else(|| {
        (0..CLIENTS)
            .map(|c| {
                (c..count)
                    .step_by(CLIENTS as usize)
                    .map(|i| (format!("bench/memory/{i:06}"), String::new()))
                    .collect()
            })
            .collect()
    });
    let bar = counted_bar(label, count);
    let mut tasks = JoinSet::new();
    for before in work {
        let mut client = LockServiceClient::new(Conn::connect(addr).await?);
        let bar = bar.clone();
        tasks.spawn(async move {
            let (mut failed, mut now_held) = (0u64, Vec::with_capacity(before.len()));
            for (name, token) in before {
                if !token.is_empty() {
                    let release = pb::ReleaseRequest {
                        name: name.clone(),
                        token,
                        request_id: String::new(),
                    };
                    match client.release(release).await {
                        Ok(r) if r.get_ref().released => {}
                        _ => failed += 1,
                    }
                }
                let lease = Duration::from_secs(600);
                match client
                    .acquire(acquire(&name, lease, Duration::ZERO, false))
                    .await
                {
                    Ok(g) if g.get_ref().acquired => {
                        let token = g.into_inner().token;
                        now_held.push((name, token));
                    }
                    _ => failed += 1,
                }
                bar.inc(1);
            }
            (now_held, failed)
        });
    }
    let (mut all, mut failed) = (Vec::new(), 0);
    while let Some(done) = tasks.join_next().await {
        let (now_held, f) = done?;
        all.push(now_held);
        failed += f;
    }
    bar.finish_and_clear();
    Ok((all, failed))
}

pub async fn memory(addr: &str, redis: &Client, latchkey_pid: u32) -> anyhow::Result<Vec<Row>> {
    let used = |info: String| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    redis.flushall::<()>(false).await?;
    let before = used(redis.info(Some(fred::types::InfoKind::Memory)).await?);
    const LOCKS: u64 = 100_000;
    let (held, failed) = hold_memory_locks(addr, LOCKS, None).await?;
    let after = used(redis.info(Some(fred::types::InfoKind::Memory)).await?);
    let per_lock = after.saturating_sub(before) as f64 / LOCKS as f64;
    // The same names once more, each released and taken again: what a lock on a re-used name
    // costs (the freed lock's hash lingers, and the grant keeps the release's id).
    let (_, failed_again) = hold_memory_locks(addr, LOCKS, Some(held)).await?;
    let after_again = used(redis.info(Some(fred::types::InfoKind::Memory)).await?);
    let per_lock_again = after_again.saturating_sub(before) as f64 / LOCKS as f64;
    let mut rows = vec![
        Row::new("memory", "100,000 held locks (Redis used_memory delta)")
            .detail("bytes per lock", format!("{per_lock:.0}"))
            .check(failed == 0, format!("{failed} acquires failed"))
            .target("<= 250 bytes per lock", per_lock <= 250.0),
        Row::new("memory", "the same 100,000, each released and taken again")
            .detail("bytes per lock", format!("{per_lock_again:.0}"))
            .check(
                failed_again == 0,
                format!("{failed_again} releases or acquires failed"),
            )
            .target("<= 250 bytes per lock", per_lock_again <= 250.0),
    ];
    redis.flushall::<()>(false).await?;

    // 10,000 callers waiting on 1,000 held names.
    const NAMES: usize = 1_000;
    const WAITERS: usize = 10_000;
    let rss_idle = rss_kib(latchkey_pid);
    let mut admin = LockServiceClient::new(Conn::connect(addr).await?);
    for i in 0..NAMES {
        admin
            .acquire(acquire(
                &format!("bench/wait/{i:04}"),
                Duration::from_secs(600),
                Duration::ZERO,
                false,
            ))
            .await?;
    }
    let bar = counted_bar("memory: 10k waiters", WAITERS as u64);
    let mut channels = Vec::new();
    for _ in 0..100 {
        channels.push(Conn::connect(addr).await?);
    }
    let mut waiting = JoinSet::new();
    for w in 0..WAITERS {
        let mut client = LockServiceClient::new(channels[w % channels.len()].clone());
        waiting.spawn(async move {
            let _ = client
                .acquire(acquire(
                    &format!("bench/wait/{:04}", w % NAMES),
                    Duration::from_secs(60),
                    Duration::from_secs(120),
                    false,
                ))
                .await;
        });
    }
    // All registered: every name reports its 10 waiters.
    let settle = Instant::now() + Duration::from_secs(60);
    let mut counted = 0;
    while Instant::now() < settle {
        counted = 0;
        for i in (0..NAMES).step_by(10) {
            let state = admin
                .inspect(pb::InspectRequest {
                    name: format!("bench/wait/{i:04}"),
                })
                .await?
                .into_inner();
            counted += state.waiters as usize;
        }
        bar.set_position((counted * 10) as u64);
        if counted * 10 >= WAITERS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_and_clear();
    let rss_waiting = rss_kib(latchkey_pid);
    let clients: String = redis.custom(fred::cmd!("CLIENT"), vec!["LIST"]).await?;
    let subscribers = clients.lines().filter(|l| l.contains("flags=P")).count();
    waiting.abort_all();
    redis.flushall::<()>(false).await?;
    let rss_mb = rss_waiting as f64 / 1024.0;
    rows.push(
        Row::new("memory", "10,000 waiters on 1,000 names (latchkey RSS)")
            .detail("RSS idle MiB", format!("{:.1}", rss_idle as f64 / 1024.0))
            .detail("RSS waiting MiB", format!("{rss_mb:.1}"))
            .detail("subscriber connections", subscribers)
            .check(
                counted * 10 >= WAITERS && subscribers == 1,
                format!(
                    "{} waiters registered (sampled), {subscribers} subscriber connection(s)",
                    counted * 10
                ),
            )
            .target(
                "< 200 MB RSS on one subscriber connection",
                rss_mb < 200.0 && subscribers == 1,
            ),
    );
    Ok(rows)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .map(|v| v.trim().trim_end_matches("kB").trim().to_owned())
            })
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The grant log helpers are pure; keep them honest.
#[cfg(test)]
mod tests {
    use super::*;

    fn log(entries: &[(usize, u64, u64)]) -> Vec<Logged> {
        entries
            .iter()
            .map(|&(client, queued_at, waited_ms)| Logged {
                client,
                queued_at,
                waited: Duration::from_millis(waited_ms),
            })
            .collect()
    }

    #[test]
    fn a_grant_ahead_of_an_earlier_joiner_is_out_of_order() {
        assert_eq!(
            out_of_order(&log(&[(0, 0, 1), (1, 10, 1), (2, 20, 1), (3, 30, 1)])),
            0
        );
        assert_eq!(out_of_order(&log(&[(0, 10, 1), (1, 30, 1), (2, 20, 1)])), 1);
        assert_eq!(out_of_order(&log(&[(0, 30, 1), (1, 20, 1), (2, 10, 1)])), 2);
    }

    #[test]
    fn spread_compares_the_busiest_and_the_idlest_client() {
        let grants = log(&[(0, 0, 1), (1, 0, 1), (0, 0, 1), (1, 0, 1), (0, 0, 1)]);
        let (row, figures) =
            hot_lock_figures(Row::new("t", "t"), &grants, 2, Duration::from_secs(1));
        assert_eq!(figures.handoffs_per_s, 4.0);
        assert_eq!(figures.spread, 1.5);
        assert!(row.details.iter().any(|(k, _)| k == "hand-offs/s"));
    }

    #[test]
    fn only_hand_offs_count_towards_the_hand_off_wait() {
        // Client 0 re-grabs its own lock at once twice; client 1 waited 200 ms for it.
        let grants = log(&[(0, 0, 1), (0, 0, 0), (0, 0, 0), (1, 0, 200)]);
        let (_, figures) = hot_lock_figures(Row::new("t", "t"), &grants, 2, Duration::from_secs(1));
        assert!((figures.handoff_p99_ms - 200.0).abs() < 1.0);
    }
}
