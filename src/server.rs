//! The tonic server: LockService, gRPC health and reflection, the Redis health watcher, and
//! graceful shutdown.
//!
//! `run` takes an already bound listener and a shutdown future, so tests bind port 0 and stop
//! the server when they like. On shutdown: health turns NOT_SERVING, waits end with
//! UNAVAILABLE, Hold streams release their locks and tell their clients LOST, the server stops
//! accepting and drains connections, all within `shutdown_grace`.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{info, warn};

use crate::{
    config::Config,
    grpc::{LockApi, pb},
    lock::{
        LockEngine,
        store::{LockStore, fred_builder},
        waiters::Waiters,
    },
    telemetry,
};

/// How often the health watcher pings Redis.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// The gRPC service names whose health follows Redis.
const SERVICES: [&str; 2] = ["", "latchkey.v1.LockService"];

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
    let engine = Arc::new(LockEngine::new(store, waiters, stop.clone()));

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
    tokio::spawn(watch_redis(engine.clone(), health.clone(), stop.clone()));

    // v1 for current tools, v1alpha for older grpcurl/grpcui builds that only speak that.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let lock_api = LockApi::new(engine.clone(), config.locks.clone());
    info!(listen = %listener.local_addr()?, redis = %config.redis.redis_url, "latchkey serving");

    let stopping = stop.clone();
    let server = Server::builder()
        .tcp_nodelay(true)
        // Detects clients that vanished without closing (network gone, host frozen), so their
        // Hold streams release instead of renewing forever.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(lock_api.into_service())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
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

/// Keeps the health status in line with Redis reachability until shutdown.
async fn watch_redis(engine: Arc<LockEngine>, health: HealthReporter, stop: CancellationToken) {
    let mut up = None;
    loop {
        let now_up = engine.store().ping().await.is_ok();
        if up != Some(now_up) {
            let status = if now_up {
                info!("Redis is reachable; serving");
                ServingStatus::Serving
            } else {
                warn!("Redis is unreachable; NOT_SERVING until it answers again");
                ServingStatus::NotServing
            };
            for service in SERVICES {
                health.set_service_status(service, status).await;
            }
            metrics::gauge!(telemetry::REDIS_UP).set(if now_up { 1.0 } else { 0.0 });
            up = Some(now_up);
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
