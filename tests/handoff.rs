//! Hand-off: a release made in the waiter's own latchkey process gives the lock straight to it.
//! These tests prove the hand-off never loses a wake-up, never strands a lock when waiters give
//! up at the last moment, never passes over a waiter of another replica, and serves the
//! process's own waiters in the order they arrived.
//!
//! Every lease here is 60 s and the fair refresh period 20 s: a waiter that missed its wake-up
//! would sit out one of those, far beyond the waits these tests allow, so each lost wake-up or
//! stranded lock fails a test instead of merely slowing it down.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{link::Link, *};
use latchkey::grpc::pb::{self, lock_service_client::LockServiceClient};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use tokio::task::JoinSet;
use tonic::transport::Channel;

const LEASE: Duration = Duration::from_secs(60);

/// latchkey whose fair refresher (the fallback that rescues a fair waiter that missed its
/// wake-up) only runs every 20 s.
async fn latchkey(redis: &RedisServer) -> Latchkey {
    let mut config = test_config(redis);
    config.locks.fair_waiter_timeout = Duration::from_secs(60);
    Latchkey::start_with(config).await
}

fn request(name: &str, wait: Duration, fair: bool) -> pb::AcquireRequest {
    pb::AcquireRequest {
        fair,
        ..acquire(name, LEASE, wait)
    }
}

/// Two clients pass one lock back and forth `rounds` times each. Every wait must end in a
/// grant well before the 60 s lease (or the 20 s fair refresh) could have rescued it.
async fn ping_pong(server: &Latchkey, name: &str, fair: bool, rounds: usize) {
    let mut players = JoinSet::new();
    let fences = Arc::new(Mutex::new(Vec::new()));
    for _ in 0..2 {
        let mut client = server.locks().await;
        let name = name.to_owned();
        let fences = fences.clone();
        players.spawn(async move {
            for round in 0..rounds {
                let grant = client
                    .acquire(request(&name, secs(10), fair))
                    .await
                    .expect("acquire")
                    .into_inner();
                assert!(
                    grant.acquired,
                    "round {round}: the wait ran out while the other client passed the lock on: a wake-up was lost"
                );
                fences.lock().unwrap().push(grant.fence);
                let_go(&client, &name, &grant.token).await;
            }
        });
    }
    while let Some(done) = players.join_next().await {
        done.expect("player");
    }
    let fences = fences.lock().unwrap().clone();
    assert_eq!(fences.len(), 2 * rounds);
    assert!(
        fences.windows(2).all(|w| w[0] < w[1]),
        "fences must increase with every grant"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_passing_a_plain_lock_back_and_forth_never_miss_a_wake_up() {
    let redis = RedisServer::start();
    let server = latchkey(&redis).await;
    ping_pong(&server, "pingpong/plain", false, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_passing_a_fair_lock_back_and_forth_never_miss_a_wake_up() {
    // Each wait here usually starts while the lock's unlock channel has no subscriber left,
    // so it subscribes anew: the race between that SUBSCRIBE and the holder's release is what
    // this test keeps hitting.
    let redis = RedisServer::start();
    let server = latchkey(&redis).await;
    ping_pong(&server, "pingpong/fair", true, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_hands_the_lock_to_local_waiters_in_the_order_they_arrived() {
    let redis = RedisServer::start();
    let server = latchkey(&redis).await;
    let name = "queue/plain";
    let mut holder = server.locks().await;
    let first = holder
        .acquire(request(name, Duration::ZERO, false))
        .await
        .unwrap()
        .into_inner();
    assert!(first.acquired);

    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = JoinSet::new();
    for waiter in 0..4 {
        let mut client = server.locks().await;
        let order = order.clone();
        waiters.spawn(async move {
            let grant = client
                .acquire(request(name, secs(30), false))
                .await
                .unwrap()
                .into_inner();
            assert!(grant.acquired, "waiter {waiter} was not granted");
            order.lock().unwrap().push((waiter, grant.fence));
            let_go(&client, name, &grant.token).await;
        });
        // Let each waiter register before the next one arrives.
        wait_for_waiters(&holder, name, waiter + 1, secs(10)).await;
    }
    let_go(&holder, name, &first.token).await;
    while let Some(done) = waiters.join_next().await {
        done.expect("waiter");
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(
        order.iter().map(|(w, _)| *w).collect::<Vec<_>>(),
        vec![0, 1, 2, 3],
        "local waiters are served first come, first served"
    );
    assert!(order.windows(2).all(|w| w[0].1 < w[1].1));
    assert!(order[0].1 > first.fence);
    let state = inspect(&holder, name).await;
    assert!(!state.held, "the last waiter released: the lock is free");
    assert_eq!(state.waiters, 0, "no waiter entry is left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_giving_up_while_the_lock_is_passed_around_never_strand_it() {
    let seed = test_seed();
    let redis = RedisServer::start();
    let server = latchkey(&redis).await;
    let name = "storm/mixed";
    let mut clients = JoinSet::new();
    for c in 0..16u64 {
        let mut client = server.locks().await;
        clients.spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ c);
            let fair = c % 2 == 0;
            let mut granted = 0u32;
            for _ in 0..60 {
                // Waits of 0-19 ms: they run out at every moment of a hand-off, so waiters
                // leave the line just before, while and just after a release picks them.
                let wait = Duration::from_millis(rng.random_range(0..20));
                let answer = client.acquire(request(name, wait, fair)).await;
                let grant = answer.expect("acquire").into_inner();
                if grant.acquired {
                    granted += 1;
                    let_go(&client, name, &grant.token).await;
                }
            }
            granted
        });
    }
    let mut granted = 0;
    while let Some(done) = clients.join_next().await {
        granted += done.expect("client");
    }
    assert!(granted > 0, "some of the attempts must have been granted");

    // Every grant was released by its client, or given back by latchkey when its waiter had
    // left: the lock must be free again now, not held for the rest of a 60 s lease.
    let observer = server.locks().await;
    wait_until(secs(10), || async {
        let state = inspect(&observer, name).await;
        !state.held && state.waiters == 0
    })
    .await;
    let mut client = server.locks().await;
    let grant = client
        .acquire(request(name, Duration::ZERO, false))
        .await
        .unwrap()
        .into_inner();
    assert!(grant.acquired, "nobody holds the lock any more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_hand_offs_never_pass_over_a_waiter_of_another_replica() {
    let redis = RedisServer::start();
    let busy = latchkey(&redis).await;
    let other = latchkey(&redis).await;
    let name = "shared/plain";

    // Eight clients of one replica pass the lock among themselves without pause: a release
    // there nearly always finds a local waiter to hand it to.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut locals = JoinSet::new();
    for _ in 0..8 {
        let mut client = busy.locks().await;
        let stop = stop.clone();
        locals.spawn(async move {
            while !stop.is_cancelled() {
                let grant = client
                    .acquire(request(name, secs(30), false))
                    .await
                    .unwrap()
                    .into_inner();
                if grant.acquired {
                    let_go(&client, name, &grant.token).await;
                }
            }
        });
    }
    let observer = busy.locks().await;
    wait_until(secs(10), || async {
        inspect(&observer, name).await.waiters >= 1
    })
    .await;

    // A caller of the other replica joins: it must get the lock within its wait, not after
    // the 60 s lease of whoever holds the lock when it arrives.
    let mut remote = other.locks().await;
    let grant = remote
        .acquire(request(name, secs(10), false))
        .await
        .unwrap()
        .into_inner();
    stop.cancel();
    assert!(
        grant.acquired,
        "the other replica's waiter was passed over by local hand-offs"
    );
    let_go(&remote, name, &grant.token).await;
    while let Some(done) = locals.join_next().await {
        done.expect("local client");
    }
}

/// A waiting client's task: the client and the answer to its Acquire.
type Waiting = tokio::task::JoinHandle<(
    LockServiceClient<Channel>,
    Result<tonic::Response<pb::AcquireResponse>, tonic::Status>,
)>;

/// A lock taken by `holder` (1 s lease) and a client of the same server waiting for it (20 s),
/// returned once the waiter made both acquire attempts it makes before it sleeps (one before
/// subscribing, one after), so a fault aimed at the holder's release cannot catch either.
/// Redis (`admin`) counts the scripts it ran.
async fn held_with_a_waiter(
    server: &Latchkey,
    admin: &fred::prelude::Client,
    name: &'static str,
    fair: bool,
) -> (LockServiceClient<Channel>, pb::AcquireResponse, Waiting) {
    let mut holder = server.locks().await;
    let held = holder
        .acquire(request(name, secs(1), fair))
        .await
        .expect("acquire")
        .into_inner();
    assert!(held.acquired, "the lock starts free");
    let scripts_before = command_calls(admin, "evalsha").await;
    let mut waiter = server.locks().await;
    let waiting = tokio::spawn(async move {
        let grant = waiter.acquire(request(name, secs(20), fair)).await;
        (waiter, grant)
    });
    wait_until(secs(10), || async {
        command_calls(admin, "evalsha").await >= scripts_before + 2
    })
    .await;
    (holder, held, waiting)
}

/// The waiter of `held_with_a_waiter` got the lock the holder's release handed it: a new
/// grant, held once, and it releases it.
async fn assert_handed_to_the_waiter(
    holder: &LockServiceClient<Channel>,
    held_fence: u64,
    waiting: Waiting,
    name: &str,
) {
    let (waiter, grant) = waiting.await.expect("waiter task");
    let grant = grant.expect("acquire").into_inner();
    assert!(
        grant.acquired,
        "the lock the release handed over never reached its waiter"
    );
    assert!(grant.fence > held_fence, "a hand-off is a new grant");
    let state = inspect(holder, name).await;
    assert!(state.held && state.hold_count == 1, "{state:?}");
    let_go(&waiter, name, &grant.token).await;
    assert!(!inspect(holder, name).await.held);
}

/// Redis is paused (CLIENT PAUSE) past the release's Redis timeout: the holder hears
/// UNAVAILABLE, but its release script runs once the pause ends and hands the lock to the
/// waiting client. That client must get the lock then, not at the end of the 60 s lease it
/// now owns in Redis without knowing.
async fn a_hand_off_whose_release_lost_its_answer_still_reaches_the_waiter(fair: bool) {
    let redis = RedisServer::start();
    let mut config = test_config(&redis);
    config.locks.fair_waiter_timeout = secs(60);
    config.redis.redis_timeout = ms(300);
    let server = Latchkey::start_with(config).await;
    let name = if fair { "lost/fair" } else { "lost/plain" };

    let mut holder = server.locks().await;
    // One release first, so Redis has the release script loaded: a release that must load it
    // again (NOSCRIPT) after its first try timed out never runs at all.
    let warm_up = holder
        .acquire(request("lost/warm-up", secs(1), fair))
        .await
        .expect("acquire")
        .into_inner();
    let_go(&holder, "lost/warm-up", &warm_up.token).await;
    let admin = redis.client().await;
    let (mut holder, held, waiting) = held_with_a_waiter(&server, &admin, name, fair).await;

    pause_clients(&admin, 1500).await;
    let lost = holder
        .release(pb::ReleaseRequest {
            name: name.into(),
            token: held.token,
            ..Default::default()
        })
        .await
        .expect_err("Redis is paused past the release's timeout");
    assert_eq!(lost.code(), tonic::Code::Unavailable, "{lost:?}");
    assert_handed_to_the_waiter(&holder, held.fence, waiting, name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_hand_off_whose_release_lost_its_answer_still_reaches_the_waiter() {
    a_hand_off_whose_release_lost_its_answer_still_reaches_the_waiter(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fair_hand_off_whose_release_lost_its_answer_still_reaches_the_waiter() {
    a_hand_off_whose_release_lost_its_answer_still_reaches_the_waiter(true).await;
}

/// The Redis connection closes after the release script handed the lock over but before its
/// answer arrived, and the release runs again after reconnecting (fred retries it), to find
/// the lock owned by the waiter ("another owner"). The holder must hear that its release
/// worked, and the waiter must get the lock now, not at the end of the 60 s lease.
async fn a_hand_off_whose_answer_a_dropped_connection_lost_is_answered_once_and_delivered(
    fair: bool,
) {
    let redis = RedisServer::start();
    let link = Link::to(redis.port).await;
    let mut config = test_config(&redis);
    config.locks.fair_waiter_timeout = secs(60);
    config.redis.redis_url = link.url();
    let server = Latchkey::start_with(config).await;
    let name = if fair { "cut/fair" } else { "cut/plain" };

    let admin = redis.client().await;
    let (mut holder, held, waiting) = held_with_a_waiter(&server, &admin, name, fair).await;

    let released = link
        .losing_answer_to(
            "EVALSHA",
            holder.release(pb::ReleaseRequest {
                name: name.into(),
                token: held.token,
                ..Default::default()
            }),
        )
        .await
        .expect("the release worked; only its first answer was lost")
        .into_inner();
    assert!(
        released.released && released.hold_count == 0,
        "{released:?}"
    );
    assert_handed_to_the_waiter(&holder, held.fence, waiting, name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_hand_off_whose_answer_a_dropped_connection_lost_is_answered_once_and_delivered() {
    a_hand_off_whose_answer_a_dropped_connection_lost_is_answered_once_and_delivered(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fair_hand_off_whose_answer_a_dropped_connection_lost_is_answered_once_and_delivered() {
    a_hand_off_whose_answer_a_dropped_connection_lost_is_answered_once_and_delivered(true).await;
}

/// What a release that lost its answer asks Redis: did *this* release hand the lock to this
/// waiter? A waiter that owns the lock because it took it by itself must not count: its own
/// attempt told it, and treating the lock as a lost hand-off would answer a stranger's release
/// with success, or release the waiter's lock for it once it left the line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_release_that_handed_the_lock_over_is_told_it_did() {
    use latchkey::lock::{
        Lease, Linger, LockName, Token,
        store::{Attempt, HandOff, LockStore, Op, ReleaseReply},
    };
    let redis = RedisServer::start();
    let config = test_config(&redis);
    let store = LockStore::connect(&config.redis, &config.locks).expect("store");
    let lease = Lease::parse(Some(LEASE), &config.locks).expect("lease");
    let (holder, waiter, stranger) = (Token::generate(), Token::generate(), Token::generate());

    // The waiter takes a free lock by itself.
    let own = LockName::parse("probe/own".into(), &config.locks).expect("name");
    let took = store.acquire(&own, holder, None, lease, None).await;
    assert!(matches!(took, Ok(Attempt::Granted(_))), "{took:?}");
    let took = store.acquire(&own, waiter, None, lease, None).await;
    assert!(matches!(took, Ok(Attempt::Busy { .. })), "{took:?}");
    let freed = store
        .release(&own, holder, None, Linger::Keep, Op::of(None))
        .await;
    assert!(
        matches!(freed, Ok(Ok(ReleaseReply::Released(_)))),
        "{freed:?}"
    );
    let took = store.acquire(&own, waiter, None, lease, None).await;
    assert!(matches!(took, Ok(Attempt::Granted(_))), "{took:?}");
    for from in [holder, stranger] {
        assert_eq!(
            store.handed_to(&own, waiter, from).await.expect("handed"),
            None,
            "a lock the waiter took by itself passed for a hand-off"
        );
    }

    // The holder's release hands the lock to the registered waiter.
    let handed = LockName::parse("probe/handed".into(), &config.locks).expect("name");
    let took = store.acquire(&handed, holder, None, lease, None).await;
    assert!(matches!(took, Ok(Attempt::Granted(_))), "{took:?}");
    let waiter_id = waiter.waiter_id();
    let queued = store
        .acquire(&handed, waiter, None, lease, Some((&waiter_id, LEASE)))
        .await;
    assert!(matches!(queued, Ok(Attempt::Busy { .. })), "{queued:?}");
    let hand_off = HandOff {
        to: waiter,
        lease,
        fair: false,
        plain_waiters: 1,
    };
    let released = store
        .release(&handed, holder, Some(hand_off), Linger::Keep, Op::of(None))
        .await
        .expect("release");
    let Ok(ReleaseReply::Handed(granted)) = released else {
        panic!("the only waiter, registered, was not handed the lock: {released:?}");
    };
    let told = store
        .handed_to(&handed, waiter, holder)
        .await
        .expect("handed");
    assert_eq!(told.map(|g| g.fence), Some(granted.fence));
    assert_eq!(
        store
            .handed_to(&handed, waiter, stranger)
            .await
            .expect("handed"),
        None,
        "another token's release was told it handed the lock over"
    );
}
