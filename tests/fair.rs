//! Fair locks: first come, first served, across several latchkey processes sharing one Redis,
//! and a queue that never stalls on waiters that went away.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use fred::prelude::*;
use latchkey::grpc::pb;

const NAME: &str = "tickets/front-row";

fn fair(name: &str, lease: Duration, wait: Duration) -> pb::AcquireRequest {
    pb::AcquireRequest {
        fair: true,
        ..acquire(name, lease, wait)
    }
}

/// How many EVALSHA calls Redis has served (every latchkey script call is one).
async fn script_calls(redis: &Client) -> u64 {
    command_calls(redis, "evalsha").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_waiters_on_three_processes_get_the_lock_in_the_order_they_joined() {
    let redis = RedisServer::start();
    let processes = [
        LatchkeyProcess::start(&redis).await,
        LatchkeyProcess::start(&redis).await,
        LatchkeyProcess::start(&redis).await,
    ];
    let mut observer = processes[0].locks().await;
    let held = observer
        .acquire(fair(NAME, secs(30), Duration::ZERO))
        .await
        .unwrap()
        .into_inner();
    assert!(held.acquired);

    let granted = Arc::new(Mutex::new(Vec::new()));
    let mut waiting = Vec::new();
    for i in 0..50u32 {
        let mut client = processes[i as usize % 3].locks().await;
        let granted = granted.clone();
        waiting.push(tokio::spawn(async move {
            let grant = client
                .acquire(fair(NAME, secs(30), secs(120)))
                .await
                .unwrap()
                .into_inner();
            assert!(grant.acquired, "waiter {i} timed out");
            granted.lock().unwrap().push(i);
            let_go(&client, NAME, &grant.token).await;
        }));
        // Joined (queued in Redis) before the next one starts: the join order is 0, 1, 2, ...
        wait_for_waiters(&observer, NAME, i + 1, secs(10)).await;
    }

    let_go(&observer, NAME, &held.token).await;
    for waiter in waiting {
        tokio::time::timeout(secs(60), waiter)
            .await
            .expect("every waiter got its turn")
            .unwrap();
    }
    assert_eq!(*granted.lock().unwrap(), (0..50).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_wakes_only_the_head_of_the_queue_in_whichever_process_it_waits() {
    let redis = RedisServer::start();
    // Three servers; queue refreshes every 20 s, so none falls into the measured hand-off.
    let mut servers = Vec::new();
    for _ in 0..3 {
        let mut config = test_config(&redis);
        config.locks.fair_waiter_timeout = secs(60);
        servers.push(Latchkey::start_with(config).await);
    }
    let mut holder = servers[0].locks().await;
    let held = holder
        .acquire(fair(NAME, secs(30), Duration::ZERO))
        .await
        .unwrap()
        .into_inner();
    let mut queued = Vec::new();
    for i in 0..9 {
        let mut client = servers[(i as usize + 1) % 3].locks().await;
        queued.push(tokio::spawn(async move {
            client.acquire(fair(NAME, secs(30), secs(60))).await
        }));
        wait_for_waiters(&holder, NAME, i + 1, secs(10)).await;
    }

    // Each waiter makes one more attempt right after it subscribed; let those settle.
    tokio::time::sleep(ms(500)).await;
    let redis_client = redis.client().await;
    let before = script_calls(&redis_client).await;
    let_go(&holder, NAME, &held.token).await;
    let first = queued.remove(0);
    let grant = tokio::time::timeout(secs(10), first)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .into_inner();
    assert!(grant.acquired);
    tokio::time::sleep(ms(200)).await; // room for any other (wrongly) woken waiter to try
    let after = script_calls(&redis_client).await;
    // The release and the head's winning attempt (plus, on a very loaded machine, one waiter's
    // post-subscription attempt that the settling pause did not cover). A wake-up per process
    // would cost 4 calls, a wake-up per waiter 10.
    let calls = after - before;
    assert!(
        (2..=3).contains(&calls),
        "{calls} script calls for one hand-off"
    );
    assert_eq!(inspect(&holder, NAME).await.waiters, 8);
    for waiter in queued {
        waiter.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_behind_a_killed_process_get_the_lock_within_the_purge_bound() {
    let redis = RedisServer::start();
    let holder_process = LatchkeyProcess::start(&redis).await;
    let mut doomed = LatchkeyProcess::start(&redis).await;
    let survivor = LatchkeyProcess::start(&redis).await;
    let mut holder = holder_process.locks().await;
    let held = holder
        .acquire(fair(NAME, secs(30), Duration::ZERO))
        .await
        .unwrap()
        .into_inner();

    // First in line: two waiters on the process that will die. Behind them: one that lives.
    for n in 1..=2 {
        let mut client = doomed.locks().await;
        tokio::spawn(async move { client.acquire(fair(NAME, secs(30), secs(120))).await });
        wait_for_waiters(&holder, NAME, n, secs(10)).await;
    }
    let mut client = survivor.locks().await;
    let behind = tokio::spawn(async move {
        let grant = client.acquire(fair(NAME, secs(30), secs(120))).await;
        (grant, Instant::now())
    });
    wait_for_waiters(&holder, NAME, 3, secs(10)).await;

    doomed.kill9();
    let killed_at = Instant::now();
    let_go(&holder, NAME, &held.token).await;
    let (grant, granted_at) = behind.await.unwrap();
    assert!(grant.unwrap().into_inner().acquired);
    let stalled = granted_at - killed_at;
    // The bound is 4/3 x fair_waiter_timeout = 2 s; 1.5 s more for a loaded machine.
    assert!(
        stalled < ms(3500),
        "the queue stalled {stalled:?} on dead waiters"
    );

    let redis_client = redis.client().await;
    let queue: i64 = redis_client
        .zcard("latchkey:{tickets/front-row}:queue")
        .await
        .unwrap();
    assert_eq!(queue, 0, "the dead waiters were purged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_queue_entry_lapsed_while_its_process_was_frozen_still_gets_the_freed_lock()
{
    let redis = RedisServer::start();
    let holder_process = LatchkeyProcess::start(&redis).await;
    let frozen = LatchkeyProcess::start(&redis).await;
    let mut holder = holder_process.locks().await;
    // A long lease: the waiter's fallback bound (the holder's remaining lease) is two minutes
    // away, so only a wake-up can bring it the lock within the test's 20 s.
    let held = holder
        .acquire(fair(NAME, secs(120), Duration::ZERO))
        .await
        .unwrap()
        .into_inner();
    assert!(held.acquired);
    let mut client = frozen.locks().await;
    let waiter = tokio::spawn(async move { client.acquire(fair(NAME, secs(30), secs(120))).await });
    wait_for_waiters(&holder, NAME, 1, secs(10)).await;

    // Frozen for twice its queue entry's lifetime (fair_waiter_timeout, 1.5 s), its process
    // cannot refresh the entry, which lapses. The release then finds nobody live in the queue:
    // it purges the entry and frees the lock for all, naming no waiter.
    signal(frozen.pid(), "STOP");
    tokio::time::sleep(secs(3)).await;
    let_go(&holder, NAME, &held.token).await;
    let redis_client = redis.client().await;
    let queue: i64 = redis_client
        .zcard("latchkey:{tickets/front-row}:queue")
        .await
        .unwrap();
    assert_eq!(queue, 0, "the frozen waiter's entry lapsed and was purged");
    signal(frozen.pid(), "CONT");

    let grant = tokio::time::timeout(secs(20), waiter)
        .await
        .expect("the waiter was woken by the release, not left to its two-minute fallback")
        .unwrap()
        .unwrap()
        .into_inner();
    assert!(grant.acquired);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_waiters_that_time_out_or_are_cancelled_leave_no_trace() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut holder = server.locks().await;
    let held = holder
        .acquire(fair(NAME, secs(30), Duration::ZERO))
        .await
        .unwrap()
        .into_inner();

    let mut impatient = server.locks().await;
    let answer = impatient
        .acquire(fair(NAME, secs(30), ms(300)))
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.acquired && std_dur(answer.holder_ttl) > secs(20));

    let mut cancelling = server.locks().await;
    let call =
        tokio::spawn(async move { cancelling.acquire(fair(NAME, secs(30), secs(60))).await });
    wait_for_waiters(&holder, NAME, 1, secs(10)).await;
    call.abort();
    wait_for_waiters(&holder, NAME, 0, secs(10)).await;

    let redis_client = redis.client().await;
    let queue: i64 = redis_client
        .zcard("latchkey:{tickets/front-row}:queue")
        .await
        .unwrap();
    let entries: i64 = redis_client
        .zcard("latchkey:{tickets/front-row}:waiters")
        .await
        .unwrap();
    assert_eq!((queue, entries), (0, 0), "no trace in Redis");

    // Nobody is (invisibly) ahead: a try-once fair acquire gets the freed lock at once.
    let_go(&holder, NAME, &held.token).await;
    let next = holder
        .acquire(fair(NAME, secs(30), Duration::ZERO))
        .await
        .unwrap()
        .into_inner();
    assert!(next.acquired);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_goes_to_the_first_ten_of_a_hundred_buyers_in_arrival_order() {
    let redis = RedisServer::start();
    // stock_fair is on by default. Group commit is off here so that every order waits in the
    // Redis queue on its own, where the test can see it arrive (with group commit, orders
    // queue inside the process, in the same arrival order, behind one queued leader).
    let mut config = test_config(&redis);
    config.stock.stock_group_commit = false;
    let server = Latchkey::start_with(config).await;
    let mut stock = server.stock().await;
    let locks = server.locks().await;
    set_stock(&mut stock, "console", 10).await;
    let held = take(&locks, "stock/console", secs(60)).await;

    let mut buyers = Vec::new();
    for i in 0..100u32 {
        let mut client = server.stock().await;
        buyers.push(tokio::spawn(async move {
            let order = pb::ReduceStockRequest {
                order_id: format!("arrival-{i}"),
                items: vec![pb::StockItem {
                    product_id: "console".into(),
                    quantity: 1,
                }],
                wait_timeout: dur(secs(120)),
            };
            (i, client.reduce_stock(order).await.map_err(|s| s.code()))
        }));
        wait_for_waiters(&locks, "stock/console", i + 1, secs(10)).await;
    }
    let_go(&locks, "stock/console", &held.token).await;

    let mut winners = Vec::new();
    for buyer in buyers {
        let (i, outcome) = tokio::time::timeout(secs(120), buyer)
            .await
            .unwrap()
            .unwrap();
        match outcome {
            Ok(_) => winners.push(i),
            Err(code) => assert_eq!(code, tonic::Code::FailedPrecondition, "buyer {i}"),
        }
    }
    assert_eq!(
        winners,
        (0..10).collect::<Vec<_>>(),
        "the first ten arrivals, nobody else"
    );
}
