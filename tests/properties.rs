//! Property tests against a live server: generated request messages and generated sequences of
//! lock operations, each answer checked against a model of what latchkey promises.

mod common;

use std::{collections::HashMap, time::Duration};

use common::*;
use fred::prelude::*;
use latchkey::grpc::pb::{self, lock_service_client::LockServiceClient};
use proptest::{
    prelude::*,
    test_runner::{TestCaseError, TestRunner},
};
use tokio::runtime::Runtime;
use tonic::{Code, transport::Channel};

/// One Redis and one latchkey for all cases of one property, on a runtime of their own. Each
/// property owns its `Live`, so its redis-server is stopped when the property ends (a shared
/// static would never be dropped, and its redis-server would outlive the test run).
struct Live {
    // Dropped in this order: the server, then Redis, then the runtime they ran on.
    server: Latchkey,
    redis_client: Client,
    _redis: RedisServer,
    runtime: Runtime,
}

impl Live {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let redis = RedisServer::start();
        let (server, redis_client) =
            runtime.block_on(async { (Latchkey::start(&redis).await, redis.client().await) });
        Self {
            server,
            redis_client,
            _redis: redis,
            runtime,
        }
    }

    fn client(&self) -> LockServiceClient<Channel> {
        self.runtime.block_on(self.server.locks())
    }

    /// Runs `case` on `cases` generated values of `strategy`; panics with the smallest failing
    /// value proptest finds.
    fn check<S: Strategy>(
        &self,
        cases: u32,
        strategy: S,
        case: impl Fn(S::Value) -> Result<(), TestCaseError>,
    ) {
        let config = ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        if let Err(failure) = TestRunner::new(config).run(&strategy, case) {
            panic!("{failure}");
        }
    }
}

fn duration() -> impl Strategy<Value = Option<prost_types::Duration>> {
    prop_oneof![
        Just(None),
        (-5i64..4000, -10i32..1_000_000_010)
            .prop_map(|(seconds, nanos)| Some(prost_types::Duration { seconds, nanos })),
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| Some(prost_types::Duration { seconds, nanos })),
    ]
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z/]{1,20}",
        "\\PC{0,300}",
        ".{0,10}",
        Just("x".repeat(257)),
        Just(String::new()),
    ]
}

/// Any AcquireRequest is answered OK or INVALID_ARGUMENT (naming a field), never an internal
/// error; a refused one creates no Redis key.
#[test]
fn any_acquire_request_is_granted_refused_or_rejected_by_field() {
    let live = Live::start();
    let token = prop_oneof![Just(String::new()), "[0-9a-f-]{0,40}"];
    let request_id = prop_oneof![
        Just(String::new()),
        "[0-9a-f-]{0,40}",
        Just(uuid::Uuid::new_v4().to_string())
    ];
    live.check(
        200,
        (name(), duration(), duration(), token, request_id),
        |(name, lease, wait, token, request_id)| {
            let mut c = live.client();
            let request = pb::AcquireRequest {
                name: name.clone(),
                lease,
                wait_timeout: wait,
                token,
                fair: false,
                request_id,
            };
            // This name's lock as Redis holds it, before and after (other cases run in parallel
            // on the same Redis, so only this name's keys are compared).
            let key = format!("latchkey:{{{name}}}:lock");
            let answer = live.runtime.block_on(async {
                let before: HashMap<String, String> =
                    live.redis_client.hgetall(&key).await.unwrap();
                let answer =
                    tokio::time::timeout(Duration::from_secs(10), c.acquire(request)).await;
                let after: HashMap<String, String> = live.redis_client.hgetall(&key).await.unwrap();
                (answer, before, after)
            });
            let (answer, before, after) = answer;
            let answer = answer.expect("answered at once: names are fresh, so nobody holds them");
            match answer {
                Ok(granted) => {
                    let granted = granted.into_inner();
                    if granted.acquired {
                        let mut c = live.client();
                        let released = live.runtime.block_on(c.release(pb::ReleaseRequest {
                            name,
                            token: granted.token,
                            ..Default::default()
                        }));
                        prop_assert!(released.is_ok());
                    }
                }
                Err(status) => {
                    prop_assert!(
                        matches!(
                            status.code(),
                            Code::InvalidArgument | Code::FailedPrecondition
                        ),
                        "{status:?}"
                    );
                    if status.code() == Code::InvalidArgument {
                        let field = status.message().split(':').next().unwrap_or_default();
                        prop_assert!(
                            ["name", "lease", "wait_timeout", "token", "request_id"]
                                .contains(&field),
                            "{status:?}"
                        );
                        prop_assert_eq!(before, after, "a rejected request touched Redis");
                    }
                }
            }
            Ok(())
        },
    );
}

#[derive(Debug, Clone)]
enum Op {
    Acquire { name: usize },
    Reenter { name: usize, token: usize },
    Release { name: usize, token: usize },
    Extend { name: usize, token: usize },
    Inspect { name: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3usize).prop_map(|name| Op::Acquire { name }),
        (0..3usize, 0..8usize).prop_map(|(name, token)| Op::Reenter { name, token }),
        (0..3usize, 0..8usize).prop_map(|(name, token)| Op::Release { name, token }),
        (0..3usize, 0..8usize).prop_map(|(name, token)| Op::Extend { name, token }),
        (0..3usize).prop_map(|name| Op::Inspect { name }),
    ]
}

/// Sequences of operations on a few names, with tokens that are current, stale, of another lock
/// or never issued: every answer matches the model (at most one owner per name, hold counts,
/// only the owner's token acts), and Inspect agrees.
#[test]
fn operation_sequences_match_the_lock_model() {
    let live = Live::start();
    live.check(40, prop::collection::vec(op(), 1..30), |ops| {
        let mut c = live.client();
        let run = uuid::Uuid::new_v4().simple().to_string();
        let names: Vec<String> = (0..3).map(|i| format!("model/{run}/{i}")).collect();
        // Tokens seen so far (some never issued), and the model: name -> (token, holds).
        let mut tokens: Vec<String> = (0..2).map(|_| uuid::Uuid::new_v4().to_string()).collect();
        let mut model: HashMap<usize, (String, u32)> = HashMap::new();
        let lease = dur(Duration::from_secs(600));
        for op in ops {
            live.runtime.block_on(async {
                match op {
                    Op::Acquire { name } => {
                        let request = pb::AcquireRequest {
                            name: names[name].clone(),
                            lease,
                            ..Default::default()
                        };
                        let answer = c.acquire(request).await.expect("acquire").into_inner();
                        match model.get(&name) {
                            Some(_) => assert!(!answer.acquired, "{name} is held: no second owner"),
                            None => {
                                assert!(answer.acquired && answer.hold_count == 1);
                                tokens.push(answer.token.clone());
                                model.insert(name, (answer.token, 1));
                            }
                        }
                    }
                    Op::Reenter { name, token } => {
                        let token = tokens[token % tokens.len()].clone();
                        let request = pb::AcquireRequest {
                            name: names[name].clone(),
                            lease,
                            token: token.clone(),
                            ..Default::default()
                        };
                        let answer = c.acquire(request).await;
                        match model.get_mut(&name) {
                            Some((owner, holds)) if *owner == token => {
                                *holds += 1;
                                assert_eq!(
                                    answer.expect("re-entry").into_inner().hold_count,
                                    *holds
                                );
                            }
                            _ => assert_eq!(
                                answer.expect_err("not the owner").code(),
                                Code::FailedPrecondition
                            ),
                        }
                    }
                    Op::Release { name, token } => {
                        let token = tokens[token % tokens.len()].clone();
                        let answer = c
                            .release(pb::ReleaseRequest {
                                name: names[name].clone(),
                                token: token.clone(),
                                ..Default::default()
                            })
                            .await;
                        match model.get_mut(&name) {
                            Some((owner, holds)) if *owner == token => {
                                *holds -= 1;
                                let answer = answer.expect("the owner releases").into_inner();
                                assert_eq!(
                                    (answer.released, answer.hold_count),
                                    (*holds == 0, *holds)
                                );
                                if *holds == 0 {
                                    model.remove(&name);
                                }
                            }
                            _ => assert_eq!(
                                answer.expect_err("not the owner").code(),
                                Code::FailedPrecondition
                            ),
                        }
                    }
                    Op::Extend { name, token } => {
                        let token = tokens[token % tokens.len()].clone();
                        let answer = c
                            .extend(pb::ExtendRequest {
                                name: names[name].clone(),
                                token: token.clone(),
                                lease,
                            })
                            .await;
                        match model.get(&name) {
                            Some((owner, _)) if *owner == token => assert!(answer.is_ok()),
                            _ => assert_eq!(
                                answer.expect_err("not the owner").code(),
                                Code::FailedPrecondition
                            ),
                        }
                    }
                    Op::Inspect { name } => {
                        let state = c
                            .inspect(pb::InspectRequest {
                                name: names[name].clone(),
                            })
                            .await
                            .expect("inspect")
                            .into_inner();
                        match model.get(&name) {
                            Some((_, holds)) => assert!(state.held && state.hold_count == *holds),
                            None => assert!(!state.held),
                        }
                    }
                }
            });
        }
        // Clean up what the model still holds.
        for (name, (token, _)) in model {
            let mut c = live.client();
            let _ = live
                .runtime
                .block_on(c.force_release(pb::ForceReleaseRequest {
                    name: names[name].clone(),
                    ..Default::default()
                }));
            let _ = token;
        }
        Ok(())
    });
}

#[derive(Debug, Clone)]
enum StockOp {
    Reduce {
        order: usize,
        items: Vec<(usize, u64)>,
    },
    Restore {
        order: usize,
    },
}

fn stock_op() -> impl Strategy<Value = StockOp> {
    prop_oneof![
        3 => (0..12usize, prop::collection::vec((0..3usize, 1..6u64), 1..4))
            .prop_map(|(order, items)| StockOp::Reduce { order, items }),
        1 => (0..12usize).prop_map(|order| StockOp::Restore { order }),
    ]
}

/// Sequences of ReduceStock / RestoreStock (order ids reused on purpose) against a model: all or
/// nothing, once per order id, restores once, and the stock always equals the model.
#[test]
fn stock_operation_sequences_match_the_ledger_model() {
    let live = Live::start();
    live.check(25, prop::collection::vec(stock_op(), 1..25), |ops| {
        let run = uuid::Uuid::new_v4().simple().to_string();
        let products: Vec<String> = (0..3).map(|i| format!("prop-{run}-{i}")).collect();
        let mut levels = [10u64; 3];
        // order -> (merged items, restored)
        let mut orders: HashMap<usize, (Vec<(usize, u64)>, bool)> = HashMap::new();
        live.runtime.block_on(async {
            let mut stock =
                pb::stock_service_client::StockServiceClient::new(live.server.channel().await);
            for product in &products {
                set_stock(&mut stock, product, 10).await;
            }
            for op in ops {
                match op {
                    StockOp::Reduce { order, items } => {
                        let mut merged: std::collections::BTreeMap<usize, u64> = Default::default();
                        for (p, q) in &items {
                            *merged.entry(*p).or_default() += q;
                        }
                        let merged: Vec<(usize, u64)> = merged.into_iter().collect();
                        let request = pb::ReduceStockRequest {
                            order_id: format!("{run}-{order}"),
                            items: items
                                .iter()
                                .map(|(p, q)| pb::StockItem {
                                    product_id: products[*p].clone(),
                                    quantity: *q,
                                })
                                .collect(),
                            wait_timeout: None,
                        };
                        let answer = stock.reduce_stock(request).await;
                        match orders.get(&order) {
                            Some((previous, _)) if *previous == merged => {
                                assert!(answer.expect("a replay").into_inner().replayed);
                            }
                            Some(_) => assert_eq!(
                                answer.expect_err("reused id").code(),
                                Code::AlreadyExists
                            ),
                            None if merged.iter().all(|(p, q)| levels[*p] >= *q) => {
                                let answer = answer.expect("enough stock").into_inner();
                                assert!(!answer.replayed);
                                for (p, q) in &merged {
                                    levels[*p] -= q;
                                }
                                orders.insert(order, (merged, false));
                            }
                            None => assert_eq!(
                                answer.expect_err("short").code(),
                                Code::FailedPrecondition
                            ),
                        }
                    }
                    StockOp::Restore { order } => {
                        let request = pb::RestoreStockRequest {
                            order_id: format!("{run}-{order}"),
                            wait_timeout: None,
                        };
                        let answer = stock.restore_stock(request).await;
                        match orders.get_mut(&order) {
                            Some((items, restored)) => {
                                let answer = answer.expect("a known order").into_inner();
                                assert_eq!(answer.replayed, *restored);
                                if !*restored {
                                    for (p, q) in items.iter() {
                                        levels[*p] += q;
                                    }
                                    *restored = true;
                                }
                            }
                            None => assert_eq!(
                                answer.expect_err("unknown order").code(),
                                Code::NotFound
                            ),
                        }
                    }
                }
                for (i, product) in products.iter().enumerate() {
                    let level = stock
                        .get_stock(pb::GetStockRequest {
                            product_id: product.clone(),
                        })
                        .await
                        .unwrap();
                    assert_eq!(
                        level.into_inner().level.unwrap().stock,
                        levels[i],
                        "{product}"
                    );
                }
            }
        });
        Ok(())
    });
}
