//! Logs and metrics: the tracing subscriber (level from `RUST_LOG`), the Prometheus exporter,
//! and the name of every metric latchkey records, so dashboards have one place to look.

use std::net::SocketAddr;

/// Histogram, seconds from Acquire (or Hold's acquire) to its answer; label `outcome`:
/// granted, timed_out, refused, cancelled, shutting_down, exhausted, error.
pub const ACQUIRE_SECONDS: &str = "latchkey_acquire_seconds";
/// Counter of Release RPCs by `outcome`: freed, held (holds left), not_held, other_owner,
/// expired (the caller's lease had run out: it held the lock past its lease), cancelled,
/// shutting_down, exhausted, error.
pub const RELEASES: &str = "latchkey_releases_total";
/// Counter of acquires that had to wait.
pub const WAITS_STARTED: &str = "latchkey_waits_started_total";
/// Counter of finished waits; label `outcome`: granted, timed_out, cancelled, shutting_down, error.
pub const WAIT_OUTCOMES: &str = "latchkey_wait_outcomes_total";
/// Counter of locks a release handed straight to a waiter of this process.
pub const HAND_OFFS: &str = "latchkey_hand_offs_total";
/// Gauge of locks held by this process's open Hold streams.
pub const LIVE_HOLDS: &str = "latchkey_live_holds";
/// Counter of failed Redis calls; label `op`.
pub const REDIS_ERRORS: &str = "latchkey_redis_errors_total";
/// Histogram, seconds from a valid ReduceStock order reaching the stock engine to its answer;
/// label `outcome`: sold, replayed, insufficient, unknown_product, order_id_reused,
/// lock_timeout, lease_lost, conflict, cancelled, shutting_down, exhausted, error.
pub const REDUCE_STOCK_SECONDS: &str = "latchkey_reduce_stock_seconds";
/// Histogram of ReduceStock orders per group-commit transaction.
pub const STOCK_BATCH_SIZE: &str = "latchkey_stock_batch_size";
/// Gauge, 1 while Redis answers the health check, 0 otherwise.
pub const REDIS_UP: &str = "latchkey_redis_up";
/// Gauge, 1 while the stock database answers the health check, 0 otherwise.
pub const DATABASE_UP: &str = "latchkey_database_up";

/// Installs the log subscriber: lines to stderr (so a fatal start-up error lands where a shell
/// or a supervisor looks for one), `RUST_LOG` sets the level (default `info`).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Err only when a subscriber is already installed (tests starting several servers).
    // Colours only for a person at a terminal, not for journald or log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_ansi(ansi)
        .try_init();
}

/// Serves `/metrics` on `listen`. Must run inside the tokio runtime.
pub fn serve_metrics(listen: SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(listen)
        .install()?;
    Ok(())
}
