//! StockService against real Redis and a real database; every scenario runs on SQLite and on
//! PostgreSQL.

mod common;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use common::*;
use latchkey::grpc::pb::{self, stock_service_client::StockServiceClient};
use rand::{RngExt, SeedableRng, rngs::StdRng, seq::SliceRandom};
use sqlx::Row;
use tonic::{Code, transport::Channel};

/// Runs each scenario once per database backend.
macro_rules! on_both_databases {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::DbKind::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::DbKind::Postgres).await
                }
            )*
        }
    };
}

on_both_databases!(
    a_hundred_units_go_to_exactly_a_hundred_of_a_thousand_buyers,
    multi_item_orders_over_overlapping_products_never_deadlock_or_apply_partly,
    the_transaction_begins_only_after_the_product_lock_is_held,
    a_lease_lost_mid_transaction_aborts_and_the_sale_made_meanwhile_stands,
    the_same_order_sent_twice_at_once_is_applied_once,
    an_order_that_may_not_wait_sells_if_the_product_is_free_and_else_aborts_at_once,
    an_order_whose_buyer_gave_up_mid_transaction_applies_once_and_its_retry_says_so,
    a_batch_that_panics_applies_nothing_and_the_order_queued_behind_it_still_sells,
    restore_gives_an_order_back_exactly_once,
    unknown_products_and_orders_are_not_found_and_change_nothing,
    a_short_order_names_each_short_product_and_changes_nothing,
    set_stock_waits_for_the_product_lock,
    bad_input_is_refused_naming_the_field_and_changes_nothing,
);

fn item(product: &str, quantity: u64) -> pb::StockItem {
    pb::StockItem {
        product_id: product.into(),
        quantity,
    }
}

fn order(id: &str, items: Vec<pb::StockItem>, wait: Duration) -> pb::ReduceStockRequest {
    pb::ReduceStockRequest {
        order_id: id.into(),
        items,
        wait_timeout: dur(wait),
    }
}

/// Sends `request` on a clone of `stock` from a task of its own, so the test goes on meanwhile
/// (or aborts the task: a caller who gives up).
fn in_background(
    stock: &StockServiceClient<Channel>,
    request: pb::ReduceStockRequest,
) -> tokio::task::JoinHandle<Result<tonic::Response<pb::ReduceStockResponse>, tonic::Status>> {
    let mut client = stock.clone();
    tokio::spawn(async move { client.reduce_stock(request).await })
}

async fn level(stock: &StockServiceClient<Channel>, product: &str) -> u64 {
    let answer = stock
        .clone()
        .get_stock(pb::GetStockRequest {
            product_id: product.into(),
        })
        .await;
    answer
        .expect("get stock")
        .into_inner()
        .level
        .expect("a level")
        .stock
}

/// (orders recorded, units recorded) for `product`, read from the database itself.
async fn ledger(db: &TestDb, product: &str) -> (i64, i64) {
    let pool = db.pool().await;
    let row = sqlx::query(
        "SELECT COUNT(*), CAST(COALESCE(SUM(i.quantity), 0) AS BIGINT) FROM order_items i \
         JOIN orders o ON o.id = i.order_id WHERE i.product_id = $1 AND o.restored_ms IS NULL",
    )
    .bind(product)
    .fetch_one(&pool)
    .await
    .unwrap();
    (row.get(0), row.get(1))
}

async fn a_hundred_units_go_to_exactly_a_hundred_of_a_thousand_buyers(kind: DbKind) {
    let redis = RedisServer::start();
    let db = TestDb::new(kind).await;
    let server = Latchkey::start_on(&redis, &db).await;
    set_stock(&mut server.stock().await, "last-tickets", 100).await;

    let mut buyers = Vec::new();
    for buyer in 0..100 {
        // 100 clients, each with a connection of its own, each placing 10 orders of 1 unit.
        let mut client = server.stock().await;
        buyers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for n in 0..10 {
                let id = format!("buyer-{buyer}-order-{n}");
                let answer = client
                    .reduce_stock(order(&id, vec![item("last-tickets", 1)], secs(120)))
                    .await;
                outcomes.push(
                    answer
                        .map(|a| a.into_inner())
                        .map_err(|s| (s.code(), s.message().to_owned())),
                );
            }
            outcomes
        }));
    }
    let (mut sold, mut refused) = (0, 0);
    for buyer in buyers {
        for outcome in buyer.await.unwrap() {
            match outcome {
                Ok(answer) => {
                    assert!(!answer.replayed);
                    sold += 1;
                }
                Err((Code::FailedPrecondition, message)) => {
                    assert!(message.contains("0 available"), "{message}");
                    refused += 1;
                }
                Err(other) => panic!("unexpected answer: {other:?}"),
            }
        }
    }
    assert_eq!((sold, refused), (100, 900));
    let stock = server.stock().await;
    assert_eq!(level(&stock, "last-tickets").await, 0);
    assert_eq!(
        ledger(&db, "last-tickets").await,
        (100, 100),
        "100 - 100 sold = 0 left"
    );
}

async fn multi_item_orders_over_overlapping_products_never_deadlock_or_apply_partly(kind: DbKind) {
    let seed = test_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let redis = RedisServer::start();
    let db = TestDb::new(kind).await;
    let server = Latchkey::start_on(&redis, &db).await;
    let products = ["p-a", "p-b", "p-c", "p-d", "p-e"];
    let initial = 40;
    for product in products {
        set_stock(&mut server.stock().await, product, initial).await;
    }

    // 200 orders of 1..=3 different products (listed in random order, sometimes one product
    // twice), quantities 1..=3, sent by 40 clients at once.
    let mut orders = Vec::new();
    for n in 0..200 {
        let mut picked = products.to_vec();
        picked.shuffle(&mut rng);
        let mut items: Vec<pb::StockItem> = picked[..rng.random_range(1..=3)]
            .iter()
            .map(|p| item(p, rng.random_range(1..=3)))
            .collect();
        if rng.random_bool(0.2) {
            let again = items[0].product_id.clone();
            items.push(item(&again, 1));
        }
        orders.push(order(&format!("mix-{n}"), items, secs(120)));
    }
    let mut clients = Vec::new();
    for chunk in orders.chunks(5) {
        let mut client = server.stock().await;
        let chunk = chunk.to_vec();
        clients.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for request in chunk {
                let answer = client.reduce_stock(request.clone()).await;
                results.push((
                    request,
                    answer.map(|a| a.into_inner()).map_err(|s| s.code()),
                ));
            }
            results
        }));
    }
    let mut sold: HashMap<String, u64> = HashMap::new();
    let mut applied = 0;
    for client in clients {
        for (request, answer) in client.await.unwrap() {
            match answer {
                Ok(_) => {
                    applied += 1;
                    for item in &request.items {
                        *sold.entry(item.product_id.clone()).or_default() += item.quantity;
                    }
                }
                Err(Code::FailedPrecondition) => {}
                Err(code) => panic!("seed {seed}: order {} got {code:?}", request.order_id),
            }
        }
    }
    assert!(applied > 0, "seed {seed}: some orders must go through");
    let stock = server.stock().await;
    for product in products {
        let sold = sold.get(product).copied().unwrap_or(0);
        assert_eq!(
            level(&stock, product).await,
            initial - sold,
            "seed {seed}: {product}"
        );
        let (_, recorded) = ledger(&db, product).await;
        assert_eq!(
            recorded as u64, sold,
            "seed {seed}: the ledger of {product}"
        );
    }
}

async fn the_transaction_begins_only_after_the_product_lock_is_held(kind: DbKind) {
    let redis = RedisServer::start();
    let db = TestDb::new(kind).await;
    let server = Latchkey::start_on(&redis, &db).await;
    let mut stock = server.stock().await;
    let locks = server.locks().await;
    set_stock(&mut stock, "gpu", 10).await;

    let held = take(&locks, "stock/gpu", secs(30)).await;
    let mut buyer = server.stock().await;
    let buying = tokio::spawn(async move {
        buyer
            .reduce_stock(order("o-1", vec![item("gpu", 5)], secs(30)))
            .await
    });
    wait_for_waiters(&locks, "stock/gpu", 1, secs(10)).await;

    // While ReduceStock waits for the lock, the stock changes in the database. A transaction
    // begun before the lock would have read 10.
    let pool = db.pool().await;
    sqlx::query("UPDATE products SET stock = 3 WHERE id = 'gpu'")
        .execute(&pool)
        .await
        .unwrap();
    let_go(&locks, "stock/gpu", &held.token).await;

    let status = buying.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status
            .message()
            .contains("product gpu has 3 available, 5 requested"),
        "{}",
        status.message()
    );
    assert_eq!(level(&stock, "gpu").await, 3);
    assert_eq!(ledger(&db, "gpu").await, (0, 0));
}

async fn a_lease_lost_mid_transaction_aborts_and_the_sale_made_meanwhile_stands(kind: DbKind) {
    let redis = RedisServer::start();
    let db = TestDb::new(kind).await;
    // The slow server: product leases of 300 ms, and 1.5 s spent inside each transaction.
    let mut slow_config = test_config_on(&redis, &db);
    slow_config.stock.stock_lease = ms(300);
    slow_config.stock.fault_txn_delay = ms(1500);
    let slow = Latchkey::start_with(slow_config).await;
    let fast = Latchkey::start_on(&redis, &db).await;
    let mut stock = fast.stock().await;
    set_stock(&mut stock, "camera", 10).await;

    let mut slow_buyer = slow.stock().await;
    let stale = tokio::spawn(async move {
        slow_buyer
            .reduce_stock(order("slow-1", vec![item("camera", 4)], secs(5)))
            .await
    });
    let locks = fast.locks().await;
    wait_until(secs(10), || {
        let mut locks = locks.clone();
        async move {
            locks
                .inspect(pb::InspectRequest {
                    name: "stock/camera".into(),
                })
                .await
                .unwrap()
                .get_ref()
                .held
        }
    })
    .await;
    // This buyer gets the lock once the slow holder's lease ran out, and sells while the slow
    // transaction still sleeps.
    let sale = stock
        .reduce_stock(order("fast-1", vec![item("camera", 1)], secs(20)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sale.remaining[0].stock, 9);

    let status = stale.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("lease"), "{}", status.message());
    assert_eq!(
        level(&stock, "camera").await,
        9,
        "the stale holder wrote nothing and undid nothing"
    );
    assert_eq!(ledger(&db, "camera").await, (1, 1));
}

async fn the_same_order_sent_twice_at_once_is_applied_once(kind: DbKind) {
    let redis = RedisServer::start();
    let db = TestDb::new(kind).await;
    let server = Latchkey::start_on(&redis, &db).await;
    let mut stock = server.stock().await;
    set_stock(&mut stock, "mug", 10).await;
    set_stock(&mut stock, "tea", 10).await;

    let request = order(
        "double-click",
        vec![item("mug", 3), item("tea", 1)],
        secs(20),
    );
    let (mut a, mut b) = (server.stock().await, server.stock().await);
    let (ra, rb) = (request.clone(), request.clone());
    let (first, second) = tokio::join!(a.reduce_stock(ra), b.reduce_stock(rb));
    let (first, second) = (first.unwrap().into_inner(), second.unwrap().into_inner());
    assert_eq!(
        first.replayed as u8 + second.replayed as u8,
        1,
        "exactly one of them applied"
    );
    assert_eq!(
        first.remaining, second.remaining,
        "the replay repeats the original answer"
    );
    assert_eq!(
        (level(&stock, "mug").await, level(&stock, "tea").await),
        (7, 9)
    );

    // Later, and with the items listed the other way round: still the same order.
    let later = order(
        "double-click",
        vec![item("tea", 1), item("mug", 2), item("mug", 1)],
        secs(20),
    );
    let later = stock.reduce_stock(later).await.unwrap().into_inner();
    assert!(later.replayed);
    assert_eq!(later.remaining, first.remaining);

    // The same id for other items is a client bug, refused without change.
    let status = stock
        .reduce_stock(order("double-click", vec![item("mug", 1)], secs(20)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(
        (level(&stock, "mug").await, level(&stock, "tea").await),
        (7, 9)
    );
}

/// `wait_timeout` 0: the order tries the product lock once. It sells when the product is free
/// (with group commit on, the default, as with it off), and is ABORTED at once, changing
/// nothing, while another holds the lock.
async fn an_order_that_may_not_wait_sells_if_the_product_is_free_and_else_aborts_at_once(
    kind: DbKind,
) {
    let redis = RedisServer::start();
    let db = TestDb::new(kind).await;
    let server = Latchkey::start_on(&redis, &db).await;
    let mut stock = server.stock().await;
    let locks = server.locks().await;
    set_stock(&mut stock, "pen", 10).await;

    let sold = stock
        .reduce_stock(order("now-1", vec![item("pen", 1)], Duration::ZERO))
        .await
        .expect("the product is free")
        .into_inner();
    assert_eq!(sold.remaining[0].stock, 9);

    let held = take(&locks, "stock/pen", secs(30)).await;
    let status = stock
        .reduce_stock(order("now-2", vec![item("pen", 1)], Duration::ZERO))
        .await
        .expect_err("the product's lock is held");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    let_go(&locks, "stock/pen", &held.token).await;
    assert_eq!(level(&stock, "pen").await, 9);
    assert_eq!(ledger(&db, "pen").await, (1, 1));
}

/// The buyer's gRPC deadline passes while its order's transaction runs. The call ends at the
/// deadline, but the transaction is not cut off halfway: it runs on without its caller and
/// commits. The buyer, who cannot know that, sends the same order again and is told what was
/// done (`replayed`); the units are taken once.
async fn an_order_whose_buyer_gave_up_mid_transaction_applies_once_and_its_retry_says_so(
    kind: DbKind,
) {
    let redis = RedisServer::start();
    let db = TestDb::new(kind).await;
    // 3 s inside every ReduceStock transaction; the buyer's deadline is 1 s.
    let mut config = test_config_on(&redis, &db);
    config.stock.fault_txn_delay = secs(3);
    let server = Latchkey::start_with(config).await;
    let mut stock = server.stock().await;
    set_stock(&mut stock, "lamp", 10).await;

    let mut request = tonic::Request::new(order("late-1", vec![item("lamp", 4)], secs(20)));
    request.set_timeout(secs(1));
    let status = stock
        .reduce_stock(request)
        .await
        .expect_err("the deadline passes inside the transaction");
    // tonic's status for a passed deadline (see tests/lock.rs).
    assert_eq!(
        (status.code(), status.message()),
        (Code::Cancelled, "Timeout expired"),
        "{status:?}"
    );

    let retry = tokio::time::timeout(
        secs(60),
        stock.reduce_stock(order("late-1", vec![item("lamp", 4)], secs(20))),
    )
    .await
    .expect("the retry is answered within its 20 s wait")
    .expect("the retry is answered")
    .into_inner();
    assert!(
        retry.replayed,
        "the first call's order went through: {retry:?}"
    );
    assert_eq!(retry.remaining[0].stock, 6);
    assert_eq!(level(&stock, "lamp").await, 6);
    assert_eq!(ledger(&db, "lamp").await, (1, 4));
}

/// A group-commit batch panics (the hidden `fault_panic_order`) after its checks, with the
/// product lock held and its transaction open. Its order is answered INTERNAL and nothing of it
/// is applied (the open transaction is rolled back). The batch still hands leadership on: the
/// order queued behind it leads the next batch, which takes the product lock once the dead
/// batch's lease (1 s) ran out, and sells.
async fn a_batch_that_panics_applies_nothing_and_the_order_queued_behind_it_still_sells(
    kind: DbKind,
) {
    let redis = RedisServer::start();
    let db = TestDb::new(kind).await;
    let mut config = test_config_on(&redis, &db);
    config.stock.stock_lease = secs(1);
    config.stock.fault_panic_order = Some("poison".into());
    let server = Latchkey::start_with(config).await;
    let mut stock = server.stock().await;
    let locks = server.locks().await;
    set_stock(&mut stock, "jar", 10).await;
    let held = take(&locks, "stock/jar", secs(30)).await;

    // "poison" leads a batch that waits for the lock; "next" arrives later and queues behind
    // that batch, for the next one.
    let poison = in_background(&stock, order("poison", vec![item("jar", 1)], secs(30)));
    wait_for_waiters(&locks, "stock/jar", 1, secs(10)).await;
    let next = in_background(&stock, order("next", vec![item("jar", 2)], secs(20)));
    tokio::time::sleep(ms(300)).await;
    let_go(&locks, "stock/jar", &held.token).await;

    let status = poison.await.unwrap().expect_err("its batch panicked");
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    let sold = next
        .await
        .unwrap()
        .expect("the order queued behind the dead batch sells");
    assert_eq!(sold.into_inner().remaining[0].stock, 8);
    assert_eq!(level(&stock, "jar").await, 8, "poison took nothing");
    assert_eq!(ledger(&db, "jar").await, (1, 2), "only next is recorded");
}

async fn restore_gives_an_order_back_exactly_once(kind: DbKind) {
    let redis = RedisServer::start();
    let db = TestDb::new(kind).await;
    let server = Latchkey::start_on(&redis, &db).await;
    let mut stock = server.stock().await;
    set_stock(&mut stock, "lamp", 10).await;
    set_stock(&mut stock, "bulb", 20).await;
    let sold = stock
        .reduce_stock(order(
            "o-77",
            vec![item("lamp", 4), item("bulb", 8)],
            secs(20),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        sold.remaining.iter().map(|l| l.stock).collect::<Vec<_>>(),
        vec![12, 6]
    );

    let restore = pb::RestoreStockRequest {
        order_id: "o-77".into(),
        wait_timeout: None,
    };
    let first = stock
        .restore_stock(restore.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!first.replayed);
    assert_eq!(
        first
            .remaining
            .iter()
            .map(|l| (l.product_id.as_str(), l.stock))
            .collect::<Vec<_>>(),
        vec![("bulb", 20), ("lamp", 10)]
    );
    let second = stock.restore_stock(restore).await.unwrap().into_inner();
    assert!(second.replayed);
    assert_eq!(
        (level(&stock, "lamp").await, level(&stock, "bulb").await),
        (10, 20)
    );

    // The order id stays used: sending the order again replays it and sells nothing.
    let again = stock
        .reduce_stock(order(
            "o-77",
            vec![item("lamp", 4), item("bulb", 8)],
            secs(20),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    assert_eq!(
        (level(&stock, "lamp").await, level(&stock, "bulb").await),
        (10, 20)
    );
}

async fn unknown_products_and_orders_are_not_found_and_change_nothing(kind: DbKind) {
    let redis = RedisServer::start();
    let db = TestDb::new(kind).await;
    let server = Latchkey::start_on(&redis, &db).await;
    let mut stock = server.stock().await;
    set_stock(&mut stock, "known", 5).await;

    let status = stock
        .reduce_stock(order(
            "o-1",
            vec![item("known", 1), item("ghost", 1)],
            secs(5),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("ghost"), "{}", status.message());
    assert_eq!(level(&stock, "known").await, 5);
    // The order took both product locks; the unknown product's is gone from Redis at once,
    // while the known one's lingers as every released lock does (for its fence).
    let redis_client = redis.client().await;
    let lock_key = |product: &str| format!("latchkey:{{stock/{product}}}:lock");
    let exists = |key: String| {
        let redis_client = redis_client.clone();
        async move {
            let n: i64 = fred::interfaces::KeysInterface::exists(&redis_client, key)
                .await
                .unwrap();
            n == 1
        }
    };
    assert!(
        exists(lock_key("known")).await,
        "the known product's lock lingers"
    );
    assert!(
        !exists(lock_key("ghost")).await,
        "an order for an unknown product left its lock in Redis"
    );
    // The same without group commit (one transaction per order).
    let mut config = test_config_on(&redis, &db);
    config.stock.stock_group_commit = false;
    let ungrouped = Latchkey::start_with(config).await;
    let status = ungrouped
        .stock()
        .await
        .reduce_stock(order("o-2", vec![item("phantom", 1)], secs(5)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(!exists(lock_key("phantom")).await);

    let status = stock
        .get_stock(pb::GetStockRequest {
            product_id: "ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = stock
        .restore_stock(pb::RestoreStockRequest {
            order_id: "never-placed".into(),
            wait_timeout: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("never-placed"));
    assert_eq!(ledger(&db, "known").await, (0, 0));
}

async fn a_short_order_names_each_short_product_and_changes_nothing(kind: DbKind) {
    let redis = RedisServer::start();
    let db = TestDb::new(kind).await;
    let server = Latchkey::start_on(&redis, &db).await;
    let mut stock = server.stock().await;
    set_stock(&mut stock, "p1", 2).await;
    set_stock(&mut stock, "p2", 1).await;
    set_stock(&mut stock, "p3", 10).await;
    let status = stock
        .reduce_stock(order(
            "short",
            vec![item("p3", 1), item("p1", 3), item("p2", 2)],
            secs(5),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let message = status.message();
    assert!(
        message.contains("product p1 has 2 available, 3 requested"),
        "{message}"
    );
    assert!(
        message.contains("product p2 has 1 available, 2 requested"),
        "{message}"
    );
    assert!(!message.contains("p3"), "{message}");
    assert_eq!(
        (
            level(&stock, "p1").await,
            level(&stock, "p2").await,
            level(&stock, "p3").await
        ),
        (2, 1, 10),
        "all or nothing"
    );
}

async fn set_stock_waits_for_the_product_lock(kind: DbKind) {
    let redis = RedisServer::start();
    let db = TestDb::new(kind).await;
    let server = Latchkey::start_on(&redis, &db).await;
    let mut stock = server.stock().await;
    let locks = server.locks().await;
    set_stock(&mut stock, "desk", 1).await;
    let held = take(&locks, "stock/desk", secs(30)).await;
    let mut setter = server.stock().await;
    let setting = tokio::spawn(async move {
        setter
            .set_stock(pb::SetStockRequest {
                product_id: "desk".into(),
                stock: 50,
            })
            .await
    });
    wait_for_waiters(&locks, "stock/desk", 1, secs(10)).await;
    assert_eq!(
        level(&stock, "desk").await,
        1,
        "not set while the lock is held elsewhere"
    );
    let_go(&locks, "stock/desk", &held.token).await;
    let set = setting.await.unwrap().unwrap().into_inner();
    assert_eq!(set.level.unwrap().stock, 50);
    assert_eq!(level(&stock, "desk").await, 50);
}

async fn bad_input_is_refused_naming_the_field_and_changes_nothing(kind: DbKind) {
    let redis = RedisServer::start();
    let db = TestDb::new(kind).await;
    let server = Latchkey::start_on(&redis, &db).await;
    let mut stock = server.stock().await;
    set_stock(&mut stock, "pen", 5).await;
    let max = i64::MAX as u64;
    let wait = secs(5);
    // Each case: what is wrong, the request, the field its message must start with, and words
    // it must contain (the limit broken, and the setting that sets it where one does).
    let cases: Vec<(&str, pb::ReduceStockRequest, &str, &str)> = vec![
        (
            "empty order id",
            order("", vec![item("pen", 1)], wait),
            "order_id:",
            "must not be empty",
        ),
        (
            "129-byte order id",
            order(&"o".repeat(129), vec![item("pen", 1)], wait),
            "order_id:",
            "the limit is 128 bytes (max_order_id_len)",
        ),
        (
            "control char in order id",
            order("o\u{7}", vec![item("pen", 1)], wait),
            "order_id:",
            "control characters (found U+0007)",
        ),
        (
            "no items",
            order("o", vec![], wait),
            "items:",
            "must not be empty",
        ),
        (
            "101 items",
            order("o", (0..101).map(|_| item("pen", 1)).collect(), wait),
            "items:",
            "the limit is 100 (max_order_items)",
        ),
        (
            "zero quantity",
            order("o", vec![item("pen", 1), item("pen", 0)], wait),
            "items[1].quantity:",
            "at least 1",
        ),
        (
            "u64::MAX quantity",
            order("o", vec![item("pen", u64::MAX)], wait),
            "items[0].quantity:",
            "above 9223372036854775807 (SQL BIGINT)",
        ),
        (
            "merged overflow",
            order("o", vec![item("pen", max), item("pen", max)], wait),
            "items:",
            "more than 9223372036854775807",
        ),
        (
            "empty product id",
            order("o", vec![item("", 1)], wait),
            "items[0].product_id:",
            "must not be empty",
        ),
        (
            "129-byte product id",
            order("o", vec![item(&"p".repeat(129), 1)], wait),
            "items[0].product_id:",
            "the limit is 128 bytes (max_product_id_len)",
        ),
        (
            "brace in product id",
            order("o", vec![item("p{1}", 1)], wait),
            "items[0].product_id:",
            "'{' or '}'",
        ),
        (
            "over-max wait",
            order("o", vec![item("pen", 1)], secs(301)),
            "wait_timeout:",
            "maximum wait of 5m (max_wait)",
        ),
    ];
    for (case, request, field, words) in cases {
        let status = stock.reduce_stock(request).await.expect_err(case);
        assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
        assert!(
            status.message().starts_with(field) && status.message().contains(words),
            "{case}: {:?} does not start with {field} or does not say {words:?}",
            status.message()
        );
    }
    let status = stock
        .set_stock(pb::SetStockRequest {
            product_id: "pen".into(),
            stock: u64::MAX,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("stock:"),
        "{}",
        status.message()
    );
    let status = stock
        .restore_stock(pb::RestoreStockRequest {
            order_id: String::new(),
            wait_timeout: None,
        })
        .await
        .unwrap_err();
    assert!(status.code() == Code::InvalidArgument && status.message().starts_with("order_id:"));

    assert_eq!(level(&stock, "pen").await, 5);
    assert_eq!(ledger(&db, "pen").await, (0, 0));
    // The largest quantity SQL can hold is valid input; there is just not that much stock.
    let status = stock
        .reduce_stock(order("huge", vec![item("pen", max)], wait))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(level(&stock, "pen").await, 5);
    // 100 items (the limit) of one product is fine: merged, it is one item of 100 units.
    let status = stock
        .reduce_stock(order("o", (0..100).map(|_| item("pen", 1)).collect(), wait))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("5 available, 100 requested"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_group_commit_each_order_has_its_own_transaction_and_the_count_still_holds() {
    let redis = RedisServer::start();
    let db = TestDb::new(DbKind::Sqlite).await;
    let mut config = test_config_on(&redis, &db);
    config.stock.stock_group_commit = false;
    let server = Latchkey::start_with(config).await;
    set_stock(&mut server.stock().await, "solo", 20).await;
    let mut buyers = Vec::new();
    for buyer in 0..20 {
        let mut client = server.stock().await;
        buyers.push(tokio::spawn(async move {
            let mut sold = 0;
            for n in 0..3 {
                let id = format!("solo-{buyer}-{n}");
                match client
                    .reduce_stock(order(&id, vec![item("solo", 1)], secs(120)))
                    .await
                {
                    Ok(_) => sold += 1,
                    Err(status) => {
                        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}")
                    }
                }
            }
            sold
        }));
    }
    let mut sold = 0;
    for buyer in buyers {
        sold += buyer.await.unwrap();
    }
    assert_eq!(sold, 20);
    assert_eq!(level(&server.stock().await, "solo").await, 0);
    assert_eq!(ledger(&db, "solo").await, (20, 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_who_gives_up_in_the_group_commit_queue_strands_nobody_behind_him() {
    let redis = RedisServer::start();
    let db = TestDb::new(DbKind::Sqlite).await;
    let server = Latchkey::start_on(&redis, &db).await;
    let mut stock = server.stock().await;
    let locks = server.locks().await;
    set_stock(&mut stock, "kiosk", 10).await;
    let held = take(&locks, "stock/kiosk", secs(30)).await;

    // A leads (waits for the lock); B and C queue behind it in the process; B gives up.
    let spawn_order = |id: &str| in_background(&stock, order(id, vec![item("kiosk", 1)], secs(30)));
    let a = spawn_order("queue-a");
    wait_for_waiters(&locks, "stock/kiosk", 1, secs(10)).await;
    let b = spawn_order("queue-b");
    let c = spawn_order("queue-c");
    tokio::time::sleep(ms(300)).await;
    b.abort();
    tokio::time::sleep(ms(100)).await;
    let_go(&locks, "stock/kiosk", &held.token).await;

    assert_eq!(a.await.unwrap().unwrap().into_inner().remaining[0].stock, 9);
    let c = tokio::time::timeout(secs(20), c)
        .await
        .expect("C is served, not stranded");
    assert!(c.unwrap().is_ok());
    let pool = db.pool().await;
    let mut ids: Vec<String> = sqlx::query_scalar("SELECT id FROM orders")
        .fetch_all(&pool)
        .await
        .unwrap();
    ids.sort();
    assert_eq!(
        ids,
        vec!["queue-a".to_owned(), "queue-c".to_owned()],
        "B gave up before its batch"
    );
    assert_eq!(level(&stock, "kiosk").await, 8);
}

/// An order queued behind a batch whose leader waits for the product lock (held elsewhere)
/// answers ABORTED by its own wait timeout (1 s), not when that batch's 20 s wait ends, and is
/// not applied; the batch ahead of it sells once the lock is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_order_answers_by_its_own_wait_timeout_not_by_the_batch_ahead_of_it() {
    let redis = RedisServer::start();
    let db = TestDb::new(DbKind::Sqlite).await;
    let server = Latchkey::start_on(&redis, &db).await;
    let mut stock = server.stock().await;
    let locks = server.locks().await;
    set_stock(&mut stock, "desk", 10).await;
    let held = take(&locks, "stock/desk", secs(30)).await;

    let first = in_background(&stock, order("long-1", vec![item("desk", 1)], secs(20)));
    wait_for_waiters(&locks, "stock/desk", 1, secs(10)).await; // its leader waits for the lock

    let asked = Instant::now();
    let status = stock
        .reduce_stock(order("short-1", vec![item("desk", 1)], secs(1)))
        .await
        .expect_err("the lock stays held past its wait");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(
        asked.elapsed() < secs(10),
        "answered after {:?}, not by its own 1 s wait",
        asked.elapsed()
    );

    let_go(&locks, "stock/desk", &held.token).await;
    let sold = first.await.unwrap().expect("the first order sells");
    assert_eq!(sold.into_inner().remaining[0].stock, 9);
    assert_eq!(level(&stock, "desk").await, 9);
    assert_eq!(ledger(&db, "desk").await, (1, 1), "short-1 was not applied");
}

/// The same inside a batch: two orders queue behind a first one (2 s wait) that times out on a
/// lock held elsewhere; the next batch takes both and waits for the lock as long as the longer
/// of their waits (20 s). The other, with a 3 s wait, answers ABORTED by it and is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_in_a_batch_answers_by_its_own_wait_timeout_not_by_its_batch_mates() {
    let redis = RedisServer::start();
    let db = TestDb::new(DbKind::Sqlite).await;
    let server = Latchkey::start_on(&redis, &db).await;
    let mut stock = server.stock().await;
    let locks = server.locks().await;
    set_stock(&mut stock, "shelf", 10).await;
    let held = take(&locks, "stock/shelf", secs(30)).await;

    let spawn_order =
        |id: &str, wait| in_background(&stock, order(id, vec![item("shelf", 1)], wait));
    let first = spawn_order("first", secs(2));
    wait_for_waiters(&locks, "stock/shelf", 1, secs(10)).await;
    let patient = spawn_order("patient", secs(20));
    let asked = Instant::now();
    let hasty = spawn_order("hasty", secs(3));

    assert_eq!(first.await.unwrap().unwrap_err().code(), Code::Aborted);
    let status = hasty
        .await
        .unwrap()
        .expect_err("the lock stays held past its wait");
    let took = asked.elapsed(); // an upper bound: read once the test has the answer
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(
        took < secs(10),
        "answered after {took:?}, not by its own 3 s wait"
    );

    let_go(&locks, "stock/shelf", &held.token).await;
    let sold = patient.await.unwrap().expect("it sells");
    assert_eq!(sold.into_inner().remaining[0].stock, 9);
    assert_eq!(ledger(&db, "shelf").await, (1, 1), "only the patient order");
}

/// PostgreSQL only: with SQLite's `BEGIN IMMEDIATE` the second transaction starts after the
/// first committed, sees its order and never reaches the duplicate-key path this test aims at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_id_raced_for_other_products_applies_once_and_its_batch_mates_still_apply() {
    let redis = RedisServer::start();
    let db = TestDb::new(DbKind::Postgres).await;
    let mut config = test_config_on(&redis, &db);
    // Every transaction pauses 1 s between its reads and its writes, so the two batches below
    // both find order "twin" absent before either of them inserts it.
    config.stock.fault_txn_delay = secs(1);
    let server = Latchkey::start_with(config).await;
    let mut stock = server.stock().await;
    let locks = server.locks().await;
    set_stock(&mut stock, "left", 10).await;
    set_stock(&mut stock, "right", 10).await;

    // "twin" (right) leads a batch on "right" and waits for its lock; "solo" queues behind it
    // in the same process and joins that batch.
    let held = take(&locks, "stock/right", secs(30)).await;
    let spawn_order = |id: &str, product: &str| {
        in_background(&stock, order(id, vec![item(product, 1)], secs(30)))
    };
    let twin_right = spawn_order("twin", "right");
    wait_for_waiters(&locks, "stock/right", 1, secs(10)).await;
    let solo = spawn_order("solo", "right");
    tokio::time::sleep(ms(300)).await;

    // The same order id for "left" starts its own transaction at once; the "right" batch
    // starts as soon as its lock is free, well within the other's 1 s pause.
    let twin_left = spawn_order("twin", "left");
    tokio::time::sleep(ms(100)).await;
    let_go(&locks, "stock/right", &held.token).await;

    let left = twin_left.await.unwrap().expect("the first twin applies");
    assert_eq!(left.into_inner().remaining[0].stock, 9);
    let status = twin_right.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let solo = solo
        .await
        .unwrap()
        .expect("solo, batched with the loser, still applies");
    assert_eq!(solo.into_inner().remaining[0].stock, 9);

    assert_eq!(level(&stock, "left").await, 9);
    assert_eq!(level(&stock, "right").await, 9, "only solo took from right");
    let pool = db.pool().await;
    let mut rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT o.id, i.product_id FROM orders o JOIN order_items i ON i.order_id = o.id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    rows.sort();
    assert_eq!(
        rows,
        vec![
            ("solo".to_owned(), "right".to_owned()),
            ("twin".to_owned(), "left".to_owned())
        ]
    );
}
