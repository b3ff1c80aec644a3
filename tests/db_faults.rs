//! The stock database unreachable for a while: ReduceStock fails cleanly with UNAVAILABLE,
//! its product locks are released, nothing is half-written, and service resumes by itself.
//! Unreachable at start: latchkey exits, naming the database (not its password) and the cause.

mod common;

use std::time::Instant;

use common::*;
use latchkey::grpc::pb;
use sqlx::{Connection, Executor};
use tonic::Code;

async fn lock_is_free(server: &Latchkey, product: &str) -> bool {
    let mut locks = server.locks().await;
    let state = locks
        .inspect(pb::InspectRequest {
            name: format!("stock/{product}"),
        })
        .await;
    !state.unwrap().into_inner().held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_sqlite_file_gives_unavailable_releases_the_locks_and_writes_nothing() {
    let redis = RedisServer::start();
    let db = TestDb::new(DbKind::Sqlite).await;
    let mut config = test_config_on(&redis, &db);
    config.stock.database_timeout = ms(500);
    let server = Latchkey::start_with(config).await;
    let mut stock = server.stock().await;
    set_stock(&mut stock, "disk", 10).await;

    // Another process takes SQLite's write lock and keeps it.
    let path = db.url.trim_start_matches("sqlite://");
    let mut blocker = sqlx::SqliteConnection::connect(&format!("sqlite://{path}"))
        .await
        .unwrap();
    blocker.execute("BEGIN EXCLUSIVE").await.unwrap();

    let started = Instant::now();
    let status = stock
        .reduce_stock(one_unit_order("o-1", "disk"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(started.elapsed() < secs(4), "took {:?}", started.elapsed());
    assert!(
        lock_is_free(&server, "disk").await,
        "the product lock was released"
    );

    blocker.execute("ROLLBACK").await.unwrap();
    let level = stock
        .get_stock(pb::GetStockRequest {
            product_id: "disk".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        level.into_inner().level.unwrap().stock,
        10,
        "nothing was written"
    );
    // The same order goes through once the database is back, and only once.
    let sold = stock
        .reduce_stock(one_unit_order("o-1", "disk"))
        .await
        .unwrap()
        .into_inner();
    assert!(!sold.replayed && sold.remaining[0].stock == 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_down_gives_unavailable_and_service_resumes_when_it_returns() {
    let redis = RedisServer::start();
    let pg = PgCluster::start();
    let mut config = test_config(&redis);
    config.stock.database_url = pg.url();
    config.stock.database_timeout = ms(1000);
    let server = Latchkey::start_with(config).await;
    let mut stock = server.stock().await;
    set_stock(&mut stock, "tape", 10).await;
    stock
        .reduce_stock(one_unit_order("before", "tape"))
        .await
        .unwrap();

    pg.stop();
    let started = Instant::now();
    let status = stock
        .reduce_stock(one_unit_order("during", "tape"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(started.elapsed() < secs(5), "took {:?}", started.elapsed());
    assert!(
        lock_is_free(&server, "tape").await,
        "the product lock was released"
    );
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    wait_until(secs(10), || async { server.health().await == not_serving }).await;

    pg.restart();
    server.wait_serving().await;
    let deadline = Instant::now() + secs(15);
    let sold = loop {
        match stock.reduce_stock(one_unit_order("during", "tape")).await {
            Ok(sold) => break sold.into_inner(),
            Err(status) if Instant::now() < deadline && status.code() == Code::Unavailable => {
                tokio::time::sleep(ms(100)).await;
            }
            Err(status) => panic!("not back: {status:?}"),
        }
    };
    assert!(!sold.replayed, "the failed attempt wrote nothing");
    assert_eq!(sold.remaining[0].stock, 8, "10 - before - during");
}

#[test]
fn latchkey_that_cannot_reach_its_database_at_start_says_which_and_why() {
    // Nothing listens on either port; Redis is not needed to fail on the database.
    let database = format!("postgres://latchkey:s3cret@127.0.0.1:{}/stock", free_port());
    let redis = format!("redis://127.0.0.1:{}", free_port());
    let out = latchkey_until_exit(
        &[
            ("LATCHKEY_REDIS_URL", &redis),
            ("LATCHKEY_DATABASE_URL", &database),
            ("LATCHKEY_DATABASE_TIMEOUT", "1s"),
            ("RUST_LOG", "warn"),
        ],
        secs(60),
        "latchkey kept running without its database",
    );
    let logged = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "latchkey's exit: {logged}");
    let without_password = database.replace(":s3cret", "");
    assert!(
        logged.contains(&format!(
            "cannot open the stock database {without_password}:"
        )),
        "{logged}"
    );
    // The cause, not only the pool's "timed out".
    assert!(logged.contains("Connection refused"), "{logged}");
    assert!(
        !logged.contains("s3cret"),
        "the password was logged: {logged}"
    );
}
