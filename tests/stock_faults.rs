//! The stock ledger under real faults: random multi-item ReduceStock / RestoreStock traffic
//! while Redis is killed and restarted (every lock lost at once), and a latchkey process frozen
//! with SIGSTOP in the middle of a transaction. Whatever happens, stock never goes below zero,
//! no order applies twice, every acknowledged order is in the database, and for every product
//! initial - acknowledged reductions + acknowledged restores = final.

mod common;

use std::{
    collections::{HashMap, HashSet},
    time::Instant,
};

use common::*;
use latchkey::grpc::pb::{self, stock_service_client::StockServiceClient};
use rand::{
    RngExt, SeedableRng,
    rngs::StdRng,
    seq::{IndexedRandom, SliceRandom},
};
use sqlx::Row;
use tonic::{Code, transport::Channel};

const PRODUCTS: [&str; 4] = ["led-a", "led-b", "led-c", "led-d"];
const INITIAL: u64 = 60;

#[derive(Default)]
struct Acknowledged {
    reduced: HashMap<String, Vec<(String, u64)>>,
    restored: HashSet<String>,
}

async fn traffic(
    mut client: StockServiceClient<Channel>,
    seed: u64,
    until: Instant,
) -> Acknowledged {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ack = Acknowledged::default();
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        let restore_one = !ack.reduced.is_empty() && rng.random_bool(0.2);
        if restore_one {
            let ids: Vec<&String> = ack
                .reduced
                .keys()
                .filter(|id| !ack.restored.contains(*id))
                .collect();
            if let Some(id) = ids.choose(&mut rng).map(|id| (*id).clone()) {
                let request = pb::RestoreStockRequest {
                    order_id: id.clone(),
                    wait_timeout: dur(secs(3)),
                };
                match client.restore_stock(request).await {
                    Ok(_) => {
                        ack.restored.insert(id);
                    }
                    Err(s) => assert!(
                        matches!(s.code(), Code::Unavailable | Code::Aborted),
                        "seed {seed}: restore {id}: {s:?}"
                    ),
                }
                continue;
            }
        }
        let mut products = PRODUCTS.to_vec();
        products.shuffle(&mut rng);
        let items: Vec<(String, u64)> = products[..rng.random_range(1..=3)]
            .iter()
            .map(|p| (p.to_string(), rng.random_range(1..=4)))
            .collect();
        let id = format!("c{seed}-{n}");
        let request = pb::ReduceStockRequest {
            order_id: id.clone(),
            items: items
                .iter()
                .map(|(p, q)| pb::StockItem {
                    product_id: p.clone(),
                    quantity: *q,
                })
                .collect(),
            wait_timeout: dur(secs(3)),
        };
        match client.reduce_stock(request).await {
            Ok(answer) => {
                let answer = answer.into_inner();
                assert!(!answer.replayed, "seed {seed}: {id} is new");
                ack.reduced.insert(id, items);
            }
            Err(s) => assert!(
                matches!(
                    s.code(),
                    Code::FailedPrecondition | Code::Unavailable | Code::Aborted
                ),
                "seed {seed}: reduce {id}: {s:?}"
            ),
        }
    }
    ack
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_balances_through_a_redis_crash() {
    let seed = test_seed();
    let mut redis = RedisServer::start();
    let db = TestDb::new(DbKind::Sqlite).await;
    let servers = [
        Latchkey::start_on(&redis, &db).await,
        Latchkey::start_on(&redis, &db).await,
    ];
    let mut admin = servers[0].stock().await;
    for product in PRODUCTS {
        set_stock(&mut admin, product, INITIAL).await;
    }
    let until = Instant::now() + secs(5);
    let mut clients = Vec::new();
    for c in 0..8u64 {
        let client = servers[c as usize % 2].stock().await;
        clients.push(tokio::spawn(traffic(client, seed.wrapping_add(c), until)));
    }
    tokio::time::sleep(ms(1500)).await;
    redis.restart(); // every product lock vanishes mid-traffic
    tokio::time::sleep(ms(1500)).await;
    redis.restart();

    let mut reduced: HashMap<String, Vec<(String, u64)>> = HashMap::new();
    let mut restored = HashSet::new();
    for client in clients {
        let ack = client.await.unwrap();
        reduced.extend(ack.reduced);
        restored.extend(ack.restored);
    }
    assert!(
        reduced.len() > 20,
        "seed {seed}: only {} orders went through",
        reduced.len()
    );

    let pool = db.pool().await;
    let rows = sqlx::query("SELECT id, restored_ms FROM orders")
        .fetch_all(&pool)
        .await
        .unwrap();
    let stored: HashMap<String, bool> = rows
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<Option<i64>, _>(1).is_some()))
        .collect();
    for id in reduced.keys() {
        assert!(
            stored.contains_key(id),
            "seed {seed}: acknowledged order {id} is not in the database"
        );
    }
    for id in &restored {
        assert_eq!(
            stored.get(id),
            Some(&true),
            "seed {seed}: acknowledged restore of {id} is not recorded"
        );
    }
    let mut stock = servers[1].stock().await;
    for product in PRODUCTS {
        // Every order in the database applied exactly once (its id is the primary key), so the
        // stock must be the initial stock minus what the unrestored orders hold. Orders whose
        // answer was lost in a fault are in there too, each applied once.
        let held: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(i.quantity), 0) AS BIGINT) FROM order_items i JOIN orders o ON o.id = i.order_id \
             WHERE i.product_id = $1 AND o.restored_ms IS NULL",
        )
        .bind(product)
        .fetch_one(&pool)
        .await
        .unwrap();
        let left = stock
            .get_stock(pb::GetStockRequest {
                product_id: product.into(),
            })
            .await
            .unwrap();
        let left = left.into_inner().level.unwrap().stock;
        assert_eq!(
            left as i64,
            INITIAL as i64 - held,
            "seed {seed}: {product}: the ledger does not balance"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_frozen_past_its_lease_mid_transaction_writes_nothing() {
    let redis = RedisServer::start();
    let db = TestDb::new(DbKind::Postgres).await;
    // The frozen one: product leases of 300 ms, 1.5 s inside each transaction before writing.
    let frozen = LatchkeyProcess::start_with_env(
        &redis,
        &[
            ("LATCHKEY_DATABASE_URL", db.url.as_str()),
            ("LATCHKEY_STOCK_LEASE", "300ms"),
            ("LATCHKEY_FAULT_TXN_DELAY", "1500ms"),
        ],
    )
    .await;
    let healthy = Latchkey::start_on(&redis, &db).await;
    let mut stock = healthy.stock().await;
    set_stock(&mut stock, "fuse", 5).await;

    let mut victim = frozen.stock().await;
    let stale = tokio::spawn(async move {
        let order = pb::ReduceStockRequest {
            order_id: "frozen-1".into(),
            items: vec![pb::StockItem {
                product_id: "fuse".into(),
                quantity: 5,
            }],
            wait_timeout: dur(secs(5)),
        };
        victim.reduce_stock(order).await
    });
    let locks = healthy.locks().await;
    wait_until(secs(10), || {
        let mut locks = locks.clone();
        async move {
            locks
                .inspect(pb::InspectRequest {
                    name: "stock/fuse".into(),
                })
                .await
                .unwrap()
                .get_ref()
                .held
        }
    })
    .await;
    // Into the transaction's pause (after its checks, before its writes), then frozen.
    tokio::time::sleep(ms(300)).await;
    signal(frozen.pid(), "STOP");
    // While it is frozen, its lease runs out and another buyer takes 3 units.
    let order = pb::ReduceStockRequest {
        order_id: "healthy-1".into(),
        items: vec![pb::StockItem {
            product_id: "fuse".into(),
            quantity: 3,
        }],
        wait_timeout: dur(secs(10)),
    };
    let sold = stock.reduce_stock(order).await.unwrap().into_inner();
    assert_eq!(sold.remaining[0].stock, 2);
    signal(frozen.pid(), "CONT");

    // ABORTED (its fenced write or its pre-commit lease check refused it). On a machine so
    // loaded that the freeze landed before its checks, it finds the stock short instead.
    // Either way it wrote nothing.
    let status = stale.await.unwrap().unwrap_err();
    assert!(
        matches!(status.code(), Code::Aborted | Code::FailedPrecondition),
        "{status:?}"
    );
    let left = stock
        .get_stock(pb::GetStockRequest {
            product_id: "fuse".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        left.into_inner().level.unwrap().stock,
        2,
        "never oversold, the healthy sale stands"
    );
}
