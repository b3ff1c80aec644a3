//! The tonic server: LockService, StockService, gRPC health and reflection, the health watcher
//! (Redis, database), and graceful shutdown.
//!
//! `run` takes an already bound listener and a shutdown future, so tests bind port 0 and stop
//! the server when they like. On shutdown: health turns NOT_SERVING, waits end with
//! UNAVAILABLE, Hold streams release their locks and tell their clients LOST, the server stops
//! accepting and drains connections, all within `shutdown_grace`.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{info, warn};

use crate::{
    config::{Config, redacted_url},
    grpc::{LockApi, StockApi, pb},
    lock::{
        LockEngine,
        store::{LockStore, fred_builder},
        waiters::Waiters,
    },
    stock::{StockEngine, store::StockStore},
    telemetry,
};

/// How often the health watcher pings Redis.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// Health service names: the whole server, and each service by its full name.
const WHOLE: &str = "";
const LOCKS: &str = "latchkey.v1.LockService";
const STOCK: &str = "latchkey.v1.StockService";
const SERVICES: [&str; 3] = [WHOLE, LOCKS, STOCK];

/// Resolves with the signal's name on the first SIGTERM or SIGINT: what stops a server (see
/// `main.rs`) or a benchmark run. Fails at once if the handlers cannot be installed.
pub async fn termination_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Serves latchkey on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let stop = CancellationToken::new();

    let store = LockStore::connect(&config.redis, &config.locks)?;
    let waiters = Waiters::start(fred_builder(&config.redis)?.build_subscriber_client()?);
    let engine = LockEngine::start(store, waiters, stop.clone(), &config.locks);
    let stock_store = StockStore::connect(&config.stock).await.map_err(|e| {
        let database = redacted_url(&config.stock.database_url);
        anyhow::anyhow!("cannot open the stock database {database}: {e}")
    })?;
    info!(backend = ?stock_store.backend(), "stock database ready");
    let stock = Arc::new(StockEngine::new(
        engine.clone(),
        stock_store,
        config.stock.clone(),
        config.locks.clone(),
    )?);

    if let Some(listen) = config.server.metrics_listen {
        telemetry::serve_metrics(listen)?;
        info!(%listen, "serving Prometheus metrics on /metrics");
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    for service in SERVICES {
        health
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
    tokio::spawn(watch_health(
        engine.clone(),
        stock.clone(),
        health.clone(),
        stop.clone(),
    ));

    // v1 for current tools, v1alpha for older grpcurl/grpcui builds that only speak that.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let lock_api = LockApi::new(engine.clone(), config.locks.clone());
    let stock_api = StockApi::new(stock, config.stock.clone(), config.locks.clone());
    let redis = redacted_url(&config.redis.redis_url);
    info!(listen = %listener.local_addr()?, %redis, "latchkey serving");

    let stopping = stop.clone();
    // Small replies must leave at once, not wait behind Nagle's algorithm for an ACK. (The
    // builder's own tcp_nodelay only applies to listeners it binds itself.)
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = Server::builder()
        // Detects clients that vanished without closing (network gone, host frozen), so their
        // Hold streams release instead of renewing forever.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(lock_api.into_service())
        .add_service(stock_api.into_service())
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            info!("shutting down: ending waits, releasing held locks, draining connections");
            stopping.cancel();
        });

    let grace = config.server.shutdown_grace;
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result?,
        () = async { stop.cancelled().await; tokio::time::sleep(grace).await } => {
            warn!(?grace, "connections still open after the shutdown grace; exiting anyway");
        }
    }
    for service in SERVICES {
        health
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
    info!("latchkey stopped");
    Ok(())
}

/// Keeps health in line with what each service needs until shutdown: LockService needs Redis,
/// StockService needs Redis and the database, the whole server needs both.
async fn watch_health(
    locks: Arc<LockEngine>,
    stock: Arc<StockEngine>,
    health: HealthReporter,
    stop: CancellationToken,
) {
    let mut last = None;
    loop {
        let (redis, db) = tokio::join!(locks.store().ping(), stock.store().ping());
        let now = (redis.is_ok(), db.is_ok());
        if last != Some(now) {
            match (&redis, &db) {
                (Ok(()), Ok(())) => info!("Redis and the database are reachable; serving"),
                (Err(error), _) => {
                    warn!(%error, "Redis is unreachable; NOT_SERVING until it answers again");
                }
                (Ok(()), Err(error)) => {
                    warn!(%error, "the database is unreachable; StockService NOT_SERVING");
                }
            }
            let (redis_up, db_up) = now;
            let status = |up: bool| {
                if up {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                }
            };
            health.set_service_status(LOCKS, status(redis_up)).await;
            health
                .set_service_status(STOCK, status(redis_up && db_up))
                .await;
            health
                .set_service_status(WHOLE, status(redis_up && db_up))
                .await;
            metrics::gauge!(telemetry::REDIS_UP).set(if redis_up { 1.0 } else { 0.0 });
            metrics::gauge!(telemetry::DATABASE_UP).set(if db_up { 1.0 } else { 0.0 });
            last = Some(now);
        }
        tokio::select! {
            () = tokio::time::sleep(HEALTH_INTERVAL) => {}
            () = stop.cancelled() => {
                for service in SERVICES {
                    health.set_service_status(service, ServingStatus::NotServing).await;
                }
                return;
            }
        }
    }
}
