//! Every setting of latchkey in one place: its flag, its environment variable, its default and,
//! for limits, what it bounds. `README.md` has the same table for operators.
//!
//! Flags win over environment variables, which win over defaults (clap's `env` feature).
//! Durations are written the humantime way: `500ms`, `30s`, `5m`. A URL setting reaches a log
//! line or an error only through `redacted_url`, without its password.

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand};

/// The `latchkey` command line.
#[derive(Debug, Parser)]
#[command(
    name = "latchkey",
    version,
    about = "Distributed locks on Redis, served over gRPC"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server.
    Serve(Config),
}

/// Everything `latchkey serve` needs, composed of one config per subsystem.
#[derive(Debug, Clone, Args)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerConfig,
    #[command(flatten)]
    pub redis: RedisConfig,
    #[command(flatten)]
    pub locks: LockConfig,
    #[command(flatten)]
    pub stock: StockConfig,
}

#[derive(Debug, Clone, Args)]
pub struct ServerConfig {
    /// Address the gRPC server listens on.
    #[arg(long, env = "LATCHKEY_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Address of the Prometheus `/metrics` endpoint; no endpoint when unset.
    #[arg(long, env = "LATCHKEY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// How long a shutdown (SIGTERM/SIGINT) may take to end waits, release Hold-stream locks
    /// and drain connections before the process exits anyway.
    #[arg(long, env = "LATCHKEY_SHUTDOWN_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct RedisConfig {
    /// Redis to keep locks in: `redis://`, `redis-cluster://`, `redis-sentinel://`, or
    /// `redis+unix:///path/to/redis.sock` for a Redis on the same host (fred's URL syntax).
    /// TLS URLs (`rediss://`...) are refused: this build has no TLS, and would connect in
    /// plain text.
    #[arg(
        long,
        env = "LATCHKEY_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,

    /// Longest time one Redis command may take before the RPC that needs it fails with
    /// UNAVAILABLE. Bounds every RPC while Redis is unreachable. Allowed: above zero.
    #[arg(long, env = "LATCHKEY_REDIS_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub redis_timeout: Duration,

    /// Number of Redis connections for lock commands (the pub/sub connection is extra).
    /// Allowed: 1 to 256.
    #[arg(long, env = "LATCHKEY_REDIS_POOL_SIZE", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub redis_pool_size: u16,
}

#[derive(Debug, Clone, Args)]
pub struct LockConfig {
    /// Prefix of every Redis key and channel latchkey uses (`PREFIX:{name}:lock`, ...).
    /// Several deployments can share one Redis with different prefixes. Allowed: not empty,
    /// no `{` or `}`.
    #[arg(long, env = "LATCHKEY_KEY_PREFIX", default_value = "latchkey")]
    pub key_prefix: String,

    /// Longest lock name, in bytes of UTF-8. Allowed: 1 to 65536.
    #[arg(long, env = "LATCHKEY_MAX_NAME_LEN", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub max_name_len: u32,

    /// Lease granted when a request leaves `lease` unset. Allowed: from --min-lease to
    /// --max-lease.
    #[arg(long, env = "LATCHKEY_DEFAULT_LEASE", default_value = "30s", value_parser = parse_duration)]
    pub default_lease: Duration,

    /// Shortest lease a request may ask for. Allowed: from 1ms to --max-lease.
    #[arg(long, env = "LATCHKEY_MIN_LEASE", default_value = "10ms", value_parser = parse_duration)]
    pub min_lease: Duration,

    /// Longest lease a request may ask for.
    #[arg(long, env = "LATCHKEY_MAX_LEASE", default_value = "1h", value_parser = parse_duration)]
    pub max_lease: Duration,

    /// Longest `wait_timeout` a request may ask for.
    #[arg(long, env = "LATCHKEY_MAX_WAIT", default_value = "5m", value_parser = parse_duration)]
    pub max_wait: Duration,

    /// How long a lock's Redis hash outlives the end of its lease. While it lingers, a late
    /// Release/Extend is told "expired" rather than "not held", and the stored fence keeps the
    /// next grant's fence above every earlier one even if Redis' clock stepped back by less.
    #[arg(long = "lock-linger", env = "LATCHKEY_LOCK_LINGER", default_value = "60s", value_parser = parse_duration)]
    pub linger: Duration,

    /// Most callers of this server waiting on one lock name at once (Acquire waits, Hold
    /// streams waiting for their grant, ReduceStock orders queued for one product set). More
    /// are refused with RESOURCE_EXHAUSTED. Allowed: at least 1.
    #[arg(long, env = "LATCHKEY_MAX_WAITERS_PER_NAME", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_waiters_per_name: u32,

    /// Most callers waiting on this server at once, over all names. Allowed: at least 1.
    #[arg(long, env = "LATCHKEY_MAX_WAITERS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_waiters: u32,

    /// Most Hold streams open on this server at once. Allowed: at least 1.
    #[arg(long, env = "LATCHKEY_MAX_HOLD_STREAMS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_hold_streams: u32,

    /// How long a queued fair waiter stays in its lock's queue without its latchkey process
    /// refreshing it (every third of this). A waiter whose process died is skipped at most
    /// 4/3 of this after the death: 2s by default. Allowed: at least 30ms.
    #[arg(long, env = "LATCHKEY_FAIR_WAITER_TIMEOUT", default_value = "1500ms", value_parser = parse_duration)]
    pub fair_waiter_timeout: Duration,

    /// Most lost grants given back at once. An Acquire that timed out on a stalled Redis may
    /// still be run by it later, granting the lock to a token nobody was told; latchkey
    /// releases that grant in the background, retrying for at most its lease. In a long outage
    /// every failing Acquire starts one; past this many, such a grant frees at its lease's end.
    /// Allowed: at least 1.
    #[arg(long, env = "LATCHKEY_MAX_LOST_GRANT_RELEASES", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_lost_grant_releases: u32,
}

#[derive(Debug, Clone, Args)]
pub struct StockConfig {
    /// Database of stock levels and orders: `sqlite://FILE` or `postgres://...`. Default: the
    /// SQLite file `latchkey.db` in the working directory (created if missing, WAL mode).
    /// Several latchkey replicas must share a PostgreSQL database.
    #[arg(
        long,
        env = "LATCHKEY_DATABASE_URL",
        default_value = "sqlite://latchkey.db"
    )]
    pub database_url: String,

    /// PostgreSQL connections. SQLite always uses one connection: it has one writer anyway,
    /// and queueing in latchkey is cheaper than SQLite's busy-retry loop. Allowed: 1 to 1024.
    #[arg(long, env = "LATCHKEY_DATABASE_POOL_SIZE", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub database_pool_size: u32,

    /// Longest time to get a database connection or wait on a database lock before the RPC
    /// fails with UNAVAILABLE.
    #[arg(long, env = "LATCHKEY_DATABASE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub database_timeout: Duration,

    /// Most items one order may have, counted as sent (before repeated products are merged).
    /// Allowed: 1 to 10000.
    #[arg(long, env = "LATCHKEY_MAX_ORDER_ITEMS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_order_items: u32,

    /// Longest order_id, in bytes. Allowed: 1 to 4096.
    #[arg(long, env = "LATCHKEY_MAX_ORDER_ID_LEN", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_order_id_len: u32,

    /// Longest product_id, in bytes. The product's lock is named `stock/PRODUCT_ID`, so this
    /// plus 6 must fit in --max-name-len. Allowed: 1 to 4096, and at most --max-name-len
    /// minus 6.
    #[arg(long, env = "LATCHKEY_MAX_PRODUCT_ID_LEN", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_product_id_len: u32,

    /// Lease of the product locks a stock operation takes. A transaction still running when it
    /// ends is aborted (ABORTED), never committed. Allowed: from --min-lease to --max-lease.
    #[arg(long, env = "LATCHKEY_STOCK_LEASE", default_value = "10s", value_parser = parse_duration)]
    pub stock_lease: Duration,

    /// Take product locks fairly (FIFO), so stock goes to buyers in arrival order. `false`:
    /// plain locks (whoever's retry reaches Redis first).
    #[arg(long, env = "LATCHKEY_STOCK_FAIR", default_value_t = true, action = clap::ArgAction::Set)]
    pub stock_fair: bool,

    /// Group commit: ReduceStock orders for the same products waiting in this process are
    /// applied under one lock hold and one transaction (each with its own outcome).
    #[arg(long, env = "LATCHKEY_STOCK_GROUP_COMMIT", default_value_t = true, action = clap::ArgAction::Set)]
    pub stock_group_commit: bool,

    /// Most orders in one group-commit transaction. Allowed: 1 to 100000.
    #[arg(long, env = "LATCHKEY_STOCK_MAX_BATCH", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub stock_max_batch: u32,

    /// Wait for product locks when a request leaves `wait_timeout` unset. Allowed: at most
    /// --max-wait.
    #[arg(long, env = "LATCHKEY_STOCK_WAIT", default_value = "5s", value_parser = parse_duration)]
    pub stock_wait: Duration,

    /// Fault injection for tests: a pause inside every stock transaction, after its checks and
    /// before its writes. Never set it in production.
    #[arg(long, env = "LATCHKEY_FAULT_TXN_DELAY", default_value = "0s", value_parser = parse_duration, hide = true)]
    pub fault_txn_delay: Duration,

    /// Fault injection for tests: a group-commit batch holding an order with this id panics
    /// after its checks, with its product locks held and its transaction open. Never set it in
    /// production.
    #[arg(long, env = "LATCHKEY_FAULT_PANIC_ORDER", hide = true)]
    pub fault_panic_order: Option<String>,
}

impl Config {
    /// Checks relations between settings that clap cannot express one flag at a time.
    pub fn validate(&self) -> anyhow::Result<()> {
        let l = &self.locks;
        anyhow::ensure!(
            l.min_lease >= Duration::from_millis(1) && l.min_lease <= l.max_lease,
            "--min-lease must be at least 1ms and at most --max-lease"
        );
        anyhow::ensure!(
            l.default_lease >= l.min_lease && l.default_lease <= l.max_lease,
            "--default-lease must lie between --min-lease and --max-lease"
        );
        anyhow::ensure!(
            !l.key_prefix.is_empty() && !l.key_prefix.contains(['{', '}']),
            "--key-prefix must be non-empty and contain no '{{' or '}}' (they delimit Redis hash tags)"
        );
        anyhow::ensure!(
            l.fair_waiter_timeout >= Duration::from_millis(30),
            "--fair-waiter-timeout must be at least 30ms"
        );
        anyhow::ensure!(
            !self.redis.redis_timeout.is_zero(),
            "--redis-timeout must be above zero"
        );
        // fred, built without a TLS feature, takes a TLS URL, logs a warning and connects in
        // plain text: a setting that silently does not do what it says.
        let scheme = self
            .redis
            .redis_url
            .split_once("://")
            .map_or("", |(s, _)| s);
        anyhow::ensure!(
            !(scheme.starts_with("rediss") || scheme.starts_with("valkeys")),
            "--redis-url {scheme}://... asks for TLS, which this build of latchkey does not \
             have (it would connect in plain text): use redis:// on a network you trust, or \
             reach a TLS Redis through a local TLS tunnel"
        );
        let st = &self.stock;
        anyhow::ensure!(
            st.max_product_id_len + 6 <= l.max_name_len,
            "--max-product-id-len plus 6 (the `stock/` lock-name prefix) must fit in --max-name-len"
        );
        anyhow::ensure!(
            st.stock_lease >= l.min_lease && st.stock_lease <= l.max_lease,
            "--stock-lease must lie between --min-lease and --max-lease"
        );
        anyhow::ensure!(
            st.stock_wait <= l.max_wait,
            "--stock-wait must not exceed --max-wait"
        );
        Ok(())
    }

    /// A config with every default, listening on `listen` and using `redis_url`. Tests and the
    /// benchmark start from this.
    pub fn for_redis(listen: SocketAddr, redis_url: &str) -> Self {
        let mut cli = Cli::parse_from(["latchkey", "serve"]);
        let Command::Serve(ref mut config) = cli.command;
        config.server.listen = listen;
        config.redis.redis_url = redis_url.to_owned();
        config.clone()
    }
}

fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// A Redis or database URL fit for a log line or an error: the URL without its password.
pub fn redacted_url(url: &str) -> String {
    match url::Url::parse(url) {
        // A URL with a host: its password, if any, is where the URL standard puts it.
        Ok(mut parsed) if !parsed.cannot_be_a_base() => {
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        // Anything else may hide one anywhere: shown only when it has no user part at all.
        _ if !url.contains('@') => url.to_owned(),
        _ => "a URL that cannot be read".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_redis_url(url: &str) -> anyhow::Result<()> {
        Config::for_redis("127.0.0.1:0".parse().expect("an address"), url).validate()
    }

    #[test]
    fn a_redacted_url_keeps_everything_but_the_password() {
        for (url, label) in [
            (
                "postgres://latchkey:s3cret@db.internal:5433/stock?sslmode=require",
                "postgres://latchkey@db.internal:5433/stock?sslmode=require",
            ),
            (
                "postgres://latchkey@db/stock",
                "postgres://latchkey@db/stock",
            ),
            ("sqlite://latchkey.db", "sqlite://latchkey.db"),
            (
                "sqlite:///var/lib/latchkey/stock.db",
                "sqlite:///var/lib/latchkey/stock.db",
            ),
            ("sqlite::memory:", "sqlite::memory:"),
            ("redis://:s3cret@10.0.0.5:6379/2", "redis://10.0.0.5:6379/2"),
            (
                "redis+unix:///run/redis.sock",
                "redis+unix:///run/redis.sock",
            ),
            ("not a url", "not a url"),
            ("user:s3cret@host", "a URL that cannot be read"),
        ] {
            assert_eq!(redacted_url(url), label, "{url}");
        }
    }

    #[test]
    fn a_tls_redis_url_is_refused_rather_than_used_in_plain_text() {
        for url in [
            "rediss://10.0.0.5:6380",
            "rediss-cluster://10.0.0.5:6380",
            "rediss-sentinel://10.0.0.5:26379/mymaster",
            "valkeys://10.0.0.5:6380",
        ] {
            let error = with_redis_url(url).expect_err(url).to_string();
            assert!(
                error.contains("--redis-url") && error.contains("TLS"),
                "{url}: {error}"
            );
        }
    }

    /// The `Allowed: A to B` and `Allowed: at least A` of a numeric setting's help (what the
    /// README's table repeats) are the bounds clap enforces.
    #[test]
    fn every_numeric_bound_in_the_help_is_the_bound_enforced() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").expect("a serve subcommand");
        let parses = |flag: &str, value: u64| {
            Cli::try_parse_from(["latchkey", "serve", flag, &value.to_string()]).is_ok()
        };
        let mut checked = 0;
        for arg in serve.get_arguments() {
            let (Some(long), Some(help)) = (arg.get_long(), arg.get_long_help().or(arg.get_help()))
            else {
                continue;
            };
            let help = help.to_string();
            let Some(allowed) = help.split("Allowed: ").nth(1) else {
                continue;
            };
            let words: Vec<&str> = allowed.split([' ', ',']).collect();
            let number = |w: &str| w.parse::<u64>().ok();
            let flag = format!("--{long}");
            let (low, high) = match words.as_slice() {
                ["at", "least", n, ..] => match number(n) {
                    Some(low) => (low, None),
                    None => continue, // a duration: see validate
                },
                [a, "to", b, ..] => match (number(a), number(b)) {
                    (Some(low), Some(high)) => (low, Some(high)),
                    _ => continue,
                },
                _ => continue, // a relation to another setting: see validate
            };
            assert!(parses(&flag, low), "{flag} {low} refused: {help}");
            if low > 0 {
                assert!(!parses(&flag, low - 1), "{flag} {} taken: {help}", low - 1);
            }
            if let Some(high) = high {
                assert!(parses(&flag, high), "{flag} {high} refused: {help}");
                assert!(
                    !parses(&flag, high + 1),
                    "{flag} {} taken: {help}",
                    high + 1
                );
            }
            checked += 1;
        }
        assert!(
            checked >= 11,
            "only {checked} numeric bounds found in the help"
        );
    }

    #[test]
    fn a_min_lease_below_redis_millisecond_resolution_is_refused() {
        let mut config = Config::for_redis("127.0.0.1:0".parse().expect("an address"), "redis://x");
        config.locks.min_lease = Duration::from_micros(999);
        let error = config.validate().expect_err("999us").to_string();
        assert!(
            error.contains("--min-lease must be at least 1ms"),
            "{error}"
        );
        config.locks.min_lease = Duration::from_millis(1);
        config.validate().expect("1ms");
    }

    #[test]
    fn plain_cluster_sentinel_and_unix_socket_redis_urls_are_accepted() {
        for url in [
            "redis://127.0.0.1:6379",
            "redis-cluster://10.0.0.5:7000",
            "redis-sentinel://10.0.0.5:26379?sentinelServiceName=mymaster",
            "redis+unix:///run/redis/redis.sock",
        ] {
            with_redis_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            // And the Redis client takes it (unix sockets need fred's unix-sockets feature).
            let config = Config::for_redis("127.0.0.1:0".parse().expect("an address"), url);
            crate::lock::store::fred_builder(&config.redis)
                .unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }
}
