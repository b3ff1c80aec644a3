//! The benchmark pointed at a latchkey that is already running (`latchkey-bench --addr`), as a
//! user would run it against a deployed server. These tests prove the run completes and its
//! correctness checks hold, not its numbers: this is a dev build on a shared machine, and the
//! numbers come from `deploy/bench.sh`.

mod common;

use std::process::{Command, Output};

use common::*;
use fred::interfaces::ClientLike;
use serde_json::Value;

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_latchkey-bench"))
        .args(args)
        .output()
        .expect("run latchkey-bench")
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
