//! The Prometheus endpoint: lock and order outcomes and Redis health as an on-call dashboard
//! reads them. Its own test binary: the metrics recorder is process-global.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
};

use common::*;
use latchkey::grpc::pb;

fn scrape(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint listens");
    stream.set_read_timeout(Some(secs(5))).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

/// Scrapes the endpoint and fails the test unless every `expected` line is in it.
fn assert_scrape_shows(port: u16, expected: &[&str]) {
    let body = scrape(port);
    for line in expected {
        assert!(body.contains(line), "{line:?} missing from:\n{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_acquire_latency_wait_release_and_order_outcomes_and_redis_health() {
    let redis = RedisServer::start();
    let mut config = test_config(&redis);
    let port = free_port();
    config.server.metrics_listen = Some(([127, 0, 0, 1], port).into());
    let server = Latchkey::start_with(config).await;
    let mut c = server.locks().await;

    let held = take(&c, "m/1", secs(30)).await;
    let waited = c
        .acquire(acquire("m/1", secs(30), ms(100)))
        .await
        .unwrap()
        .into_inner();
    assert!(held.acquired && !waited.acquired);
    assert_scrape_shows(
        port,
        &[
            "latchkey_acquire_seconds_count{outcome=\"granted\"} 1",
            "latchkey_acquire_seconds_count{outcome=\"timed_out\"} 1",
            "latchkey_wait_outcomes_total{outcome=\"timed_out\"} 1",
            "latchkey_redis_up 1",
        ],
    );
    // Release RPCs by outcome: one frees its lock, one comes after its lease ran out.
    let_go(&c, "m/1", &held.token).await;
    let lapsed = take(&c, "m/2", ms(50)).await;
    tokio::time::sleep(ms(300)).await;
    let late = c
        .release(pb::ReleaseRequest {
            name: "m/2".into(),
            token: lapsed.token,
            request_id: String::new(),
        })
        .await
        .expect_err("the lease ran out");
    assert!(late.message().starts_with("expired"), "{late:?}");
    assert_scrape_shows(
        port,
        &[
            "latchkey_releases_total{outcome=\"freed\"} 1",
            "latchkey_releases_total{outcome=\"expired\"} 1",
        ],
    );

    // One unit of a product: an order sells it, the same order again is a replay, and a second
    // order finds nothing left.
    let mut stock = server.stock().await;
    set_stock(&mut stock, "lamp", 1).await;
    let sold = stock
        .reduce_stock(one_unit_order("o-1", "lamp"))
        .await
        .expect("sold");
    let replayed = stock
        .reduce_stock(one_unit_order("o-1", "lamp"))
        .await
        .expect("replayed");
    assert!(!sold.into_inner().replayed && replayed.into_inner().replayed);
    let short = stock
        .reduce_stock(one_unit_order("o-2", "lamp"))
        .await
        .expect_err("none left");
    assert_eq!(short.code(), tonic::Code::FailedPrecondition, "{short:?}");

    assert_scrape_shows(
        port,
        &[
            "latchkey_reduce_stock_seconds_count{outcome=\"sold\"} 1",
            "latchkey_reduce_stock_seconds_count{outcome=\"replayed\"} 1",
            "latchkey_reduce_stock_seconds_count{outcome=\"insufficient\"} 1",
        ],
    );
}
