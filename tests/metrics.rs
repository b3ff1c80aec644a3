//! The Prometheus endpoint. Its own test binary: the metrics recorder is process-global.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
};

use common::*;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_acquire_latency_wait_outcomes_holds_and_redis_health() {
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

    let body = scrape(port);
    for expected in [
        "latchkey_acquire_seconds_count{outcome=\"granted\"} 1",
        "latchkey_acquire_seconds_count{outcome=\"timed_out\"} 1",
        "latchkey_wait_outcomes_total{outcome=\"timed_out\"} 1",
        "latchkey_redis_up 1",
    ] {
        assert!(
            body.contains(expected),
            "{expected:?} missing from:\n{body}"
        );
    }
    let_go(&c, "m/1", &held.token).await;
}
