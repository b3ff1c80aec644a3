//! LockService against a real, private redis-server: acquire, contend, wait, release, extend,
//! re-entry, fences, and the faults a lock service must survive.

mod common;

use std::time::{Duration, Instant};

use common::{link::Link, *};
use fred::prelude::*;
use latchkey::grpc::pb::{self, lock_service_client::LockServiceClient};
use tonic::{Code, Request, transport::Channel};

const NAME: &str = "orders/42";

/// What a waiter was answered, and when.
type Waiting = tokio::task::JoinHandle<(
    Result<tonic::Response<pb::AcquireResponse>, tonic::Status>,
    Instant,
)>;

/// NAME taken on `server` (lease 30 s) by a holder, and a second caller waiting for it (up to
/// 20 s): the holder's client and grant, and the waiter's answer to come.
async fn held_with_a_waiter(
    server: &Latchkey,
) -> (LockServiceClient<Channel>, pb::AcquireResponse, Waiting) {
    let holder = server.locks().await;
    let mut waiter = server.locks().await;
    let held = take(&holder, NAME, secs(30)).await;
    let waiting = tokio::spawn(async move {
        let answer = waiter.acquire(acquire(NAME, secs(30), secs(20))).await;
        (answer, Instant::now())
    });
    wait_for_waiters(&holder, NAME, 1, secs(5)).await;
    (holder, held, waiting)
}

/// Takes NAME on `server`, lets a second caller wait for it, releases it, and returns how long
/// after the release the waiter had the lock (it must get it; the lease is 30 s, so only an
/// unlock message gets it there sooner).
async fn release_to_a_waiter(server: &Latchkey) -> Duration {
    let (holder, held, waiting) = held_with_a_waiter(server).await;
    tokio::time::sleep(ms(100)).await; // the waiter is asleep now

    let released_at = Instant::now();
    let_go(&holder, NAME, &held.token).await;
    let (answer, answered_at) = waiting.await.unwrap();
    assert!(answer.unwrap().into_inner().acquired);
    answered_at - released_at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_goes_to_one_caller_and_is_free_again_after_release() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut a = server.locks().await;
    let mut b = server.locks().await;

    let first = take(&a, NAME, secs(30)).await;
    assert_eq!(first.hold_count, 1);
    assert_eq!(std_dur(first.lease), secs(30));
    assert!(uuid::Uuid::parse_str(&first.token).is_ok());

    let second = b
        .acquire(acquire(NAME, secs(30), Duration::ZERO))
        .await
        .unwrap()
        .into_inner();
    assert!(!second.acquired);
    assert!(second.token.is_empty() && second.fence == 0);
    let holder_ttl = std_dur(second.holder_ttl);
    assert!(
        holder_ttl > secs(20) && holder_ttl <= secs(30),
        "{holder_ttl:?}"
    );

    let state = inspect(&b, NAME).await;
    assert!(state.held && state.fence == first.fence && state.hold_count == 1);

    let released = a
        .release(pb::ReleaseRequest {
            name: NAME.into(),
            token: first.token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(released.released);
    assert_eq!(released.hold_count, 0);

    let third = take(&b, NAME, secs(30)).await;
    assert_ne!(third.token, first.token);
    assert!(third.fence > first.fence);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_wakes_a_waiter_within_milliseconds_although_the_lease_is_30s() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let woken_after = release_to_a_waiter(&server).await;
    assert!(
        woken_after < secs(1),
        "woken {woken_after:?} after the release"
    );
    assert_eq!(inspect(&server.locks().await, NAME).await.waiters, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_work_with_redis_over_a_unix_socket_and_a_release_wakes_the_waiter() {
    let redis = RedisServer::start_with_unix_socket();
    let mut config = test_config(&redis);
    config.redis.redis_url = redis.unix_url();
    let server = Latchkey::start_with(config).await;
    // Woken by the unlock message (pub/sub over the socket too), not by the lease's end.
    assert!(release_to_a_waiter(&server).await < secs(10));

    // And the lock really is in that Redis: the TCP side of the same server sees it.
    let client = redis.client().await;
    let owner: Option<String> = client
        .hget(format!("latchkey:{{{NAME}}}:lock"), "owner")
        .await
        .unwrap();
    assert!(owner.is_some(), "the lock hash is in this Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_unlock_message_was_lost_gets_the_lock_when_the_holders_lease_ends() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut holder = server.locks().await;
    let mut waiter = server.locks().await;
    let lease = ms(1500);
    let granted_at = Instant::now();
    assert!(
        holder
            .acquire(acquire(NAME, lease, Duration::ZERO))
            .await
            .unwrap()
            .get_ref()
            .acquired
    );

    let waiting = tokio::spawn(async move {
        let answer = waiter.acquire(acquire(NAME, secs(30), secs(10))).await;
        (answer, Instant::now())
    });
    wait_for_waiters(&holder, NAME, 1, secs(5)).await;
    // Behind latchkey's back: the lock vanishes and no unlock message is ever published.
    let deleted: i64 = redis
        .client()
        .await
        .del("latchkey:{orders/42}:lock")
        .await
        .unwrap();
    assert_eq!(deleted, 1);

    let (answer, answered_at) = waiting.await.unwrap();
    assert!(answer.unwrap().into_inner().acquired);
    let waited = answered_at - granted_at;
    // It slept until the holder's lease end (no polling before), and not until its own deadline.
    assert!(
        waited >= ms(1300),
        "acquired after {waited:?}, before the lease ended: polling?"
    );
    assert!(
        waited < secs(6),
        "acquired after {waited:?}: the lease bound did not wake it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_holders_lock_frees_itself_when_its_lease_ends() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut crashing = LatchkeyProcess::start(&redis).await;
    let mut observer = server.locks().await;

    let lease = ms(1500);
    let granted_at = Instant::now();
    let grant = crashing
        .locks()
        .await
        .acquire(acquire(NAME, lease, Duration::ZERO))
        .await
        .unwrap()
        .into_inner();
    assert!(grant.acquired);
    crashing.kill9();

    let right_after = observer
        .acquire(acquire(NAME, secs(30), Duration::ZERO))
        .await
        .unwrap()
        .into_inner();
    assert!(!right_after.acquired, "the lease has not ended yet");
    let after_lease = observer
        .acquire(acquire(NAME, secs(30), secs(10)))
        .await
        .unwrap()
        .into_inner();
    assert!(after_lease.acquired);
    assert!(granted_at.elapsed() >= ms(1400));
    assert!(after_lease.fence > grant.fence);
}

fn assert_refused(
    result: Result<tonic::Response<impl std::fmt::Debug>, tonic::Status>,
    code: Code,
    words: &str,
) {
    let status = result.expect_err("the call must fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(words),
        "{:?} does not say {words:?}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_and_extend_with_a_wrong_or_stale_token_change_nothing() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut c = server.locks().await;
    let owner = take(&c, NAME, secs(30)).await;
    let stranger = uuid::Uuid::new_v4().to_string();
    let release = |token: &str| pb::ReleaseRequest {
        name: NAME.into(),
        token: token.into(),
        ..Default::default()
    };
    let extend = |token: &str| pb::ExtendRequest {
        name: NAME.into(),
        token: token.into(),
        lease: dur(secs(600)),
    };

    let before = inspect(&c, NAME).await;
    assert_refused(
        c.release(release(&stranger)).await,
        Code::FailedPrecondition,
        "held by another owner",
    );
    assert_refused(
        c.extend(extend(&stranger)).await,
        Code::FailedPrecondition,
        "held by another owner",
    );
    let after = inspect(&c, NAME).await;
    assert!(after.held && after.fence == before.fence && after.hold_count == 1);
    assert!(
        std_dur(after.ttl) <= std_dur(before.ttl),
        "the stranger's extend must not lengthen the lease"
    );

    // The token of another lock is no key to this one.
    let other = take(&c, "orders/43", secs(30)).await;
    assert_refused(
        c.release(release(&other.token)).await,
        Code::FailedPrecondition,
        "held by another owner",
    );

    assert!(
        c.release(release(&owner.token))
            .await
            .unwrap()
            .get_ref()
            .released
    );
    assert_refused(
        c.release(release(&owner.token)).await,
        Code::FailedPrecondition,
        "not held",
    );
    assert_refused(
        c.extend(extend(&owner.token)).await,
        Code::FailedPrecondition,
        "not held",
    );
    assert!(
        !inspect(&c, NAME).await.held,
        "a refused extend must not revive the lock"
    );

    let short = take(&c, NAME, ms(200)).await;
    tokio::time::sleep(ms(400)).await;
    assert_refused(
        c.release(release(&short.token)).await,
        Code::FailedPrecondition,
        "expired",
    );
    assert_refused(
        c.extend(extend(&short.token)).await,
        Code::FailedPrecondition,
        "expired",
    );
    assert!(!inspect(&c, NAME).await.held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_moves_the_lease_end_for_the_owner() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut c = server.locks().await;
    let owner = take(&c, NAME, ms(500)).await;
    let extended = c
        .extend(pb::ExtendRequest {
            name: NAME.into(),
            token: owner.token.clone(),
            lease: dur(secs(60)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(std_dur(extended.lease), secs(60));
    tokio::time::sleep(ms(700)).await;
    let state = inspect(&c, NAME).await;
    assert!(state.held && std_dur(state.ttl) > secs(55), "{state:?}");
    assert_eq!(state.fence, owner.fence);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reentering_with_the_owners_token_counts_holds_and_keeps_the_fence() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut c = server.locks().await;
    let first = take(&c, NAME, secs(30)).await;
    let mut again = acquire(NAME, secs(30), Duration::ZERO);
    again.token = first.token.clone();
    let second = c.acquire(again.clone()).await.unwrap().into_inner();
    assert!(second.acquired);
    assert_eq!(
        (second.token.as_str(), second.fence, second.hold_count),
        (first.token.as_str(), first.fence, 2)
    );
    assert_eq!(inspect(&c, NAME).await.hold_count, 2);

    let release = pb::ReleaseRequest {
        name: NAME.into(),
        token: first.token.clone(),
        ..Default::default()
    };
    let once = c.release(release.clone()).await.unwrap().into_inner();
    assert!(!once.released && once.hold_count == 1);
    assert!(inspect(&c, NAME).await.held);
    let twice = c.release(release).await.unwrap().into_inner();
    assert!(twice.released && twice.hold_count == 0);

    // A stale token cannot re-enter, and a stranger's token cannot re-enter a held lock.
    assert_refused(
        c.acquire(again.clone()).await,
        Code::FailedPrecondition,
        "not held",
    );
    take(&c, NAME, secs(30)).await;
    assert_refused(
        c.acquire(again).await,
        Code::FailedPrecondition,
        "held by another owner",
    );
}

/// A latchkey whose Redis calls time out after 300 ms, and `NAME` held twice by one caller
/// (taken, then re-entered), for a Release lost to a stalled Redis.
struct HeldTwice {
    redis: RedisServer,
    _server: Latchkey,
    c: LockServiceClient<Channel>,
    first: pb::AcquireResponse,
}

async fn held_twice_over_a_300ms_redis_timeout() -> HeldTwice {
    let redis = RedisServer::start();
    let mut config = test_config(&redis);
    config.redis.redis_timeout = ms(300);
    let server = Latchkey::start_with(config).await;
    let mut c = server.locks().await;
    // One release first, so Redis has the release script loaded: a release that must load it
    // again (NOSCRIPT) after its first try timed out never runs at all, and would prove nothing.
    let warm_up = take(&c, "warm-up", secs(1)).await;
    let_go(&c, "warm-up", &warm_up.token).await;
    let first = take(&c, NAME, secs(60)).await;
    let reentered = c
        .acquire(pb::AcquireRequest {
            token: first.token.clone(),
            ..acquire(NAME, secs(60), Duration::ZERO)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        reentered.acquired && reentered.hold_count == 2,
        "{reentered:?}"
    );
    HeldTwice {
        redis,
        _server: server,
        c,
        first,
    }
}

/// Sends `release` while Redis is paused (CLIENT PAUSE, 2 s) past latchkey's 300 ms Redis
/// timeout: its caller hears UNAVAILABLE, and Redis runs it once it resumes.
async fn lose_to_a_paused_redis(
    redis: &RedisServer,
    c: &mut LockServiceClient<Channel>,
    release: pb::ReleaseRequest,
) {
    pause_clients(&redis.client().await, 2000).await;
    let lost = c
        .release(release)
        .await
        .expect_err("Redis is paused past the release's timeout");
    assert_eq!(lost.code(), Code::Unavailable, "{lost:?}");
}

/// `call`, again and again while it fails with UNAVAILABLE (Redis still paused), until it is
/// answered; fails the test after 15 s.
async fn once_redis_answers<T, F>(mut call: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let give_up = Instant::now() + secs(15);
    loop {
        match call().await {
            Ok(answer) => return answer.into_inner(),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(Instant::now() < give_up, "Redis never answered again");
            }
        }
    }
}

/// A Release of one of two holds times out on a stalled Redis (CLIENT PAUSE past
/// `redis_timeout`): its caller hears UNAVAILABLE, yet the release runs once Redis resumes.
/// What the README tells a re-entering caller without a request_id to do before repeating it
/// works: Inspect shows the caller's own grant (the same fence) with one hold left, and the one
/// Release still due frees the lock. (Repeating the lost Release instead would have freed it a
/// hold early.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_release_lost_to_a_stalled_redis_inspect_shows_the_holder_what_is_left() {
    let held = held_twice_over_a_300ms_redis_timeout().await;
    let (redis, mut c, first) = (&held.redis, held.c.clone(), &held.first);
    let release = pb::ReleaseRequest {
        name: NAME.into(),
        token: first.token.clone(),
        ..Default::default()
    };
    lose_to_a_paused_redis(redis, &mut c, release).await;

    // Inspect fails too while Redis is paused; once it answers, the lost release has run.
    let state = once_redis_answers(|| {
        let mut c = c.clone();
        async move { c.inspect(pb::InspectRequest { name: NAME.into() }).await }
    })
    .await;
    assert!(
        state.held && state.fence == first.fence && state.hold_count == 1,
        "the caller's own grant with one hold left: {state:?}"
    );
    let_go(&c, NAME, &first.token).await;
}

/// Asserts that `name` is held once, by the grant with `fence`.
async fn assert_held_once_by(c: &LockServiceClient<Channel>, name: &str, fence: u64) {
    let state = inspect(c, name).await;
    assert!(
        state.held && state.fence == fence && state.hold_count == 1,
        "expected the grant with fence {fence}, held once: {state:?}"
    );
}

/// A Release carrying `request_id`, the same id as the Release the caller retries.
fn release_as(name: &str, token: &str, request_id: &str) -> pb::ReleaseRequest {
    pb::ReleaseRequest {
        name: name.into(),
        token: token.into(),
        request_id: request_id.into(),
    }
}

fn fresh_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A caller that retries a re-entry or a Release with the request_id of the first try (its
/// answer lost, as far as the caller knows) is answered, not counted again: the hold count only
/// moves once per id, and a retried Release that freed the lock still says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reentry_or_release_retried_with_its_request_id_counts_once() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut c = server.locks().await;
    let first = take(&c, NAME, secs(60)).await;
    let reenter = pb::AcquireRequest {
        token: first.token.clone(),
        request_id: fresh_id(),
        ..acquire(NAME, secs(60), Duration::ZERO)
    };
    for attempt in ["first try", "retry"] {
        let answer = c.acquire(reenter.clone()).await.unwrap().into_inner();
        assert!(
            answer.acquired && answer.hold_count == 2 && answer.fence == first.fence,
            "{attempt}: {answer:?}"
        );
    }

    let give_back_one = release_as(NAME, &first.token, &fresh_id());
    for attempt in ["first try", "retry", "second retry"] {
        let answer = c.release(give_back_one.clone()).await.unwrap().into_inner();
        assert!(
            !answer.released && answer.hold_count == 1,
            "{attempt}: {answer:?}"
        );
    }
    let state = inspect(&c, NAME).await;
    assert!(state.held && state.hold_count == 1, "{state:?}");

    let free_it = release_as(NAME, &first.token, &fresh_id());
    for attempt in ["first try", "retry"] {
        let answer = c.release(free_it.clone()).await.unwrap().into_inner();
        assert!(answer.released, "{attempt}: {answer:?}");
    }
    // A new id is a new Release: the lock is free, so there is nothing left to give back.
    assert_refused(
        c.release(release_as(NAME, &first.token, &fresh_id())).await,
        Code::FailedPrecondition,
        "not held",
    );
    // Another caller's grant does not make the old retry give back its hold either.
    let next = take(&c, NAME, secs(60)).await;
    let answer = c.release(free_it).await.unwrap().into_inner();
    assert!(answer.released, "{answer:?}");
    assert_held_once_by(&c, NAME, next.fence).await;
}

/// A retried Release whose first run handed the lock to a waiter finds the waiter holding it:
/// the retry answers `released`, as the first run did, and the waiter keeps its grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_retried_after_it_handed_the_lock_on_leaves_the_new_holder_alone() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let (mut holder, held, waiting) = held_with_a_waiter(&server).await;

    let release = release_as(NAME, &held.token, &fresh_id());
    let answer = holder.release(release.clone()).await.unwrap().into_inner();
    assert!(answer.released, "{answer:?}");
    let granted = waiting.await.unwrap().0.unwrap().into_inner();
    assert!(granted.acquired, "{granted:?}");

    let retried = holder.release(release).await.unwrap().into_inner();
    assert!(retried.released, "{retried:?}");
    assert_held_once_by(&holder, NAME, granted.fence).await;
    // A Release of its own (a new id) is refused: the lock is the waiter's now.
    assert_refused(
        holder
            .release(release_as(NAME, &held.token, &fresh_id()))
            .await,
        Code::FailedPrecondition,
        "held by another owner",
    );
    let_go(&holder, NAME, &granted.token).await;
}

/// The same Release of one of two holds as above, lost to a stalled Redis (CLIENT PAUSE past
/// `redis_timeout`), but retried with its request_id, as the README advises: every retry sent
/// while Redis is paused runs too once it resumes, and each finds the first run and gives back
/// nothing more, so the caller still holds the lock it re-entered, with one hold left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_lost_to_a_stalled_redis_and_retried_with_its_request_id_leaves_one_hold() {
    let held = held_twice_over_a_300ms_redis_timeout().await;
    let (redis, mut c, first) = (&held.redis, held.c.clone(), &held.first);
    let release = release_as(NAME, &first.token, &fresh_id());
    lose_to_a_paused_redis(redis, &mut c, release.clone()).await;

    let retried = once_redis_answers(|| {
        let (mut c, release) = (c.clone(), release.clone());
        async move { c.release(release).await }
    })
    .await;
    assert!(
        !retried.released && retried.hold_count == 1,
        "the retry counted again: {retried:?}"
    );
    assert_held_once_by(&c, NAME, first.fence).await;
    let_go(&c, NAME, &first.token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_strictly_increase_across_grants_and_across_a_redis_restart_that_lost_all_data() {
    let mut redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut c = server.locks().await;
    let mut last = 0;
    for _ in 0..20 {
        let grant = take(&c, NAME, secs(30)).await;
        assert!(grant.fence > last, "fence {} after {last}", grant.fence);
        last = grant.fence;
        let_go(&c, NAME, &grant.token).await;
    }
    // Re-entry does not bump the fence.
    let held = take(&c, NAME, secs(30)).await;
    assert!(held.fence > last);
    last = held.fence;

    redis.restart();
    let keys: i64 = redis.client().await.dbsize().await.unwrap();
    assert_eq!(keys, 0, "the restarted Redis must have lost everything");
    server.wait_serving().await;
    // The pool reconnects on its own; the first calls may still fail with UNAVAILABLE.
    let deadline = Instant::now() + secs(10);
    let after = loop {
        match c.acquire(acquire(NAME, secs(30), Duration::ZERO)).await {
            Ok(answer) => break answer.into_inner(),
            Err(status) if Instant::now() < deadline => {
                assert_eq!(status.code(), Code::Unavailable)
            }
            Err(status) => panic!("latchkey did not recover: {status:?}"),
        }
        tokio::time::sleep(ms(50)).await;
    };
    assert!(after.acquired, "the old hold was lost with Redis' data");
    assert!(
        after.fence > last,
        "fence {} after a restart, {last} before",
        after.fence
    );
}

/// src/lock/*.lua, the prelude aside.
const LOCK_SCRIPTS: u64 = 9;

/// How many SCRIPT LOAD calls Redis has served since it started (Redis 7 counts the
/// subcommand on its own line, Redis 6 every SCRIPT call on one).
async fn script_loads(redis: &Client) -> u64 {
    command_calls(redis, "script|load")
        .await
        .max(command_calls(redis, "script").await)
}

/// Waits until each of latchkey's `connections` has loaded every lock script (each loads
/// them all when it connects).
async fn wait_for_script_loads(redis: &Client, connections: u16) {
    wait_until(secs(10), || async {
        script_loads(redis).await >= LOCK_SCRIPTS * u64::from(connections)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_redis_gets_the_scripts_back_before_any_call_needs_them() {
    let mut redis = RedisServer::start();
    let config = test_config(&redis);
    let connections = config.redis.redis_pool_size;
    let server = Latchkey::start_with(config).await;

    redis.restart(); // kill -9, then an empty Redis: no keys, no scripts
    server.wait_serving().await;
    let admin = redis.client().await;
    // Nobody calls latchkey, yet every pooled connection loads the scripts on reconnecting.
    wait_for_script_loads(&admin, connections).await;

    // So the first calls after the restart never meet NOSCRIPT.
    let mut c = server.locks().await;
    let grant = c
        .acquire(acquire(NAME, secs(30), Duration::ZERO))
        .await
        .expect("acquire after the restart")
        .into_inner();
    assert!(grant.acquired);
    c.extend(pb::ExtendRequest {
        name: NAME.into(),
        token: grant.token.clone(),
        lease: dur(secs(20)),
    })
    .await
    .expect("extend after the restart");
    inspect(&c, NAME).await;
    c.release(pb::ReleaseRequest {
        name: NAME.into(),
        token: grant.token,
        ..Default::default()
    })
    .await
    .expect("release after the restart");
    let errors: String = admin
        .custom(fred::cmd!("INFO"), vec!["errorstats"])
        .await
        .expect("INFO errorstats");
    assert!(
        !errors.contains("NOSCRIPT"),
        "a call after the restart met a missing script: {errors}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_deadline_passes_or_who_cancels_never_acquires() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let holder = server.locks().await;
    let held = take(&holder, NAME, secs(30)).await;

    // 1. The gRPC deadline (300 ms) is shorter than the requested wait (20 s). latchkey ends
    //    the wait 20 ms before it and answers `acquired: false`. When that answer cannot make
    //    it in time (on a loaded machine its last steps, a Redis call among them, can take
    //    longer), tonic's timer for the deadline, in the client or in the server, ends the call
    //    instead, with tonic's status for a passed deadline: CANCELLED "Timeout expired".
    let mut impatient = server.locks().await;
    let mut request = Request::new(acquire(NAME, secs(30), secs(20)));
    request.set_timeout(ms(300));
    let started = Instant::now();
    match impatient.acquire(request).await {
        Ok(answer) => assert!(!answer.get_ref().acquired),
        Err(status) => assert_eq!(
            (status.code(), status.message()),
            (Code::Cancelled, "Timeout expired"),
            "{status:?}"
        ),
    }
    assert!(started.elapsed() < secs(3), "the deadline was not honoured");

    // 2. The client gives up mid-wait (its call future is dropped: RST_STREAM).
    let mut cancelling = server.locks().await;
    let call =
        tokio::spawn(async move { cancelling.acquire(acquire(NAME, secs(30), secs(20))).await });
    wait_for_waiters(&holder, NAME, 1, secs(5)).await;
    call.abort();
    wait_for_waiters(&holder, NAME, 0, secs(5)).await;

    // Once the holder lets go, nobody may have taken the lock on behalf of the gone callers.
    let_go(&holder, NAME, &held.token).await;
    tokio::time::sleep(ms(500)).await;
    let state = inspect(&holder, NAME).await;
    assert!(
        !state.held,
        "a cancelled waiter acquired the lock: {state:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_one_lock_share_one_subscription_that_ends_with_the_last_waiter() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let holder = server.locks().await;
    let held = take(&holder, NAME, secs(30)).await;

    let mut waiters = Vec::new();
    for _ in 0..20 {
        let mut c = server.locks().await;
        waiters.push(tokio::spawn(async move {
            let grant = c
                .acquire(acquire(NAME, secs(30), secs(60)))
                .await
                .unwrap()
                .into_inner();
            assert!(grant.acquired);
            let_go(&c, NAME, &grant.token).await;
        }));
    }
    wait_for_waiters(&holder, NAME, 20, secs(10)).await;

    let redis_client = redis.client().await;
    let channel = "latchkey:{orders/42}:unlock";
    let numsub: Vec<(String, i64)> = redis_client.pubsub_numsub(channel).await.unwrap();
    assert_eq!(
        numsub,
        vec![(channel.to_owned(), 1)],
        "one subscription for 20 local waiters"
    );
    let clients: String = redis_client
        .custom(fred::cmd!("CLIENT"), vec!["LIST"])
        .await
        .unwrap();
    let subscribers = clients.lines().filter(|l| l.contains("flags=P")).count();
    assert_eq!(
        subscribers, 1,
        "one subscriber connection per process:\n{clients}"
    );

    // Each release hands the lock to the next waiter, through unlock messages only.
    let_go(&holder, NAME, &held.token).await;
    for waiter in waiters {
        tokio::time::timeout(secs(20), waiter)
            .await
            .expect("every waiter got its turn")
            .unwrap();
    }
    wait_until(secs(5), || async {
        let numsub: Vec<(String, i64)> = redis_client.pubsub_numsub(channel).await.unwrap();
        numsub == vec![(channel.to_owned(), 0)]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_release_frees_a_held_lock_and_wakes_its_waiter() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut admin = server.locks().await;
    let mut waiter = server.locks().await;
    take(&admin, NAME, secs(30)).await;
    let waiting =
        tokio::spawn(async move { waiter.acquire(acquire(NAME, secs(30), secs(20))).await });
    wait_for_waiters(&admin, NAME, 1, secs(5)).await;

    let forced_at = Instant::now();
    let forced = admin
        .force_release(pb::ForceReleaseRequest {
            name: NAME.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(forced.get_ref().released);
    assert!(waiting.await.unwrap().unwrap().get_ref().acquired);
    assert!(forced_at.elapsed() < secs(1));

    let free = admin
        .force_release(pb::ForceReleaseRequest {
            name: "orders/free".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!free.get_ref().released);
}

/// An operator who retries a ForceRelease with its request_id after someone took the freed
/// lock is told it was freed, and the new holder keeps the lock; a ForceRelease with a new id
/// frees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_force_release_retried_with_its_request_id_leaves_the_next_holder_alone() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut admin = server.locks().await;
    take(&admin, NAME, secs(60)).await;
    let force = pb::ForceReleaseRequest {
        name: NAME.into(),
        request_id: fresh_id(),
    };
    let forced = admin.force_release(force.clone()).await.unwrap();
    assert!(forced.get_ref().released);

    let next = take(&admin, NAME, secs(60)).await;
    let retried = admin.force_release(force).await.unwrap();
    assert!(
        retried.get_ref().released,
        "the retry must say what the first run did"
    );
    assert_held_once_by(&admin, NAME, next.fence).await;

    let again = admin
        .force_release(pb::ForceReleaseRequest {
            name: NAME.into(),
            request_id: fresh_id(),
        })
        .await
        .unwrap();
    assert!(again.get_ref().released);
    assert!(!inspect(&admin, NAME).await.held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_wait_answers_by_the_deadline_and_the_server_recovers_after_restart() {
    let mut redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut holder = server.locks().await;
    let mut waiter = server.locks().await;
    take(&holder, NAME, secs(30)).await;
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        (
            waiter.acquire(acquire(NAME, secs(30), secs(3))).await,
            started.elapsed(),
        )
    });
    wait_for_waiters(&holder, NAME, 1, secs(5)).await;

    redis.kill9();
    let (answer, took) = waiting.await.unwrap();
    match answer {
        Ok(answer) => assert!(!answer.get_ref().acquired),
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
    }
    // wait (3 s) + one Redis timeout (1 s) + slack for a loaded machine
    assert!(took < secs(7), "the wait outlived its deadline: {took:?}");

    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    wait_until(secs(10), || async { server.health().await == not_serving }).await;
    let started = Instant::now();
    let status = holder
        .inspect(pb::InspectRequest { name: NAME.into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        started.elapsed() < secs(4),
        "an RPC hung while Redis was down"
    );
    // It says why Redis does not answer, not only that it timed out, in words an operator
    // reads (not the Debug form of Rust's io::Error).
    assert!(
        status
            .message()
            .contains("IO Error: Connection refused (os error 111)"),
        "{status:?}"
    );
    assert!(!status.message().contains("Os {"), "{status:?}");

    redis.restart();
    server.wait_serving().await;
    // Redis lost the old hold; the lock works again, including wake-ups by unlock messages.
    assert!(release_to_a_waiter(&server).await < secs(1));
}

/// The network fails after Redis granted the lock but before its answer arrived: the
/// connection closes, latchkey reconnects and runs the same acquire again (fred retries a
/// command a dropped connection caught). The grant must still reach its caller; told "busy" by
/// its own grant, the caller would walk away and leave the lock dead until the lease ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_whose_answer_a_dropped_connection_lost_still_gets_its_grant() {
    let (_redis, link, server) = latchkey_behind_a_link().await;
    let mut c = server.locks().await;

    let cases = [
        ("orders/try", false, Duration::ZERO),
        ("orders/wait", false, secs(20)),
        ("orders/fair-try", true, Duration::ZERO),
        ("orders/fair-wait", true, secs(20)),
    ];
    for (name, fair, wait) in cases {
        let started = Instant::now();
        let granted = link
            .losing_answer_to(
                "EVALSHA",
                c.acquire(pb::AcquireRequest {
                    fair,
                    ..acquire(name, secs(60), wait)
                }),
            )
            .await
            .unwrap()
            .into_inner();
        assert!(
            granted.acquired,
            "{name}: told busy by its own grant (after {:?})",
            started.elapsed()
        );
        let state = inspect(&c, name).await;
        assert!(
            state.held && state.fence == granted.fence,
            "{name}: {state:?}"
        );
        // The token it got is the one that holds the lock: it can release it.
        let_go(&c, name, &granted.token).await;
    }
}

/// The same fault on the calls that count holds: a re-entry, a Release of one of two holds,
/// and the last Release, each losing its answer to a dropped connection, so latchkey sends it
/// again. Each must count once. A Release counted twice frees the lock while its holder still
/// holds it once (someone else may take it); a re-entry counted twice keeps it held after the
/// holder's last Release; and the last Release, run again, would answer "not held".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reentry_or_release_whose_answer_a_dropped_connection_lost_counts_once() {
    const NAME: &str = "orders/reentrant";
    let (_redis, link, server) = latchkey_behind_a_link().await;
    let mut c = server.locks().await;
    let granted = take(&c, NAME, secs(60)).await;

    let reentered = link
        .losing_answer_to(
            "EVALSHA",
            c.acquire(pb::AcquireRequest {
                token: granted.token.clone(),
                ..acquire(NAME, secs(60), Duration::ZERO)
            }),
        )
        .await
        .unwrap()
        .into_inner();
    assert!(reentered.acquired && reentered.fence == granted.fence);
    assert_eq!(reentered.hold_count, 2, "the re-entry was counted twice");
    assert_eq!(inspect(&c, NAME).await.hold_count, 2);

    let release = || pb::ReleaseRequest {
        name: NAME.into(),
        token: granted.token.clone(),
        ..Default::default()
    };
    let once = link
        .losing_answer_to("EVALSHA", c.release(release()))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !once.released && once.hold_count == 1,
        "the release of one of two holds was counted twice: {once:?}"
    );
    let state = inspect(&c, NAME).await;
    assert!(state.held && state.hold_count == 1, "{state:?}");

    let last = link
        .losing_answer_to("EVALSHA", c.release(release()))
        .await
        .expect("the last release, run again, must answer as it did the first time")
        .into_inner();
    assert!(last.released && last.hold_count == 0, "{last:?}");
    assert!(!inspect(&c, NAME).await.held);

    // A second Release of its own (not a repeat) is still told the lock is not held.
    let again = c.release(release()).await.expect_err("the lock is free");
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
}

/// The on-call person force-releases a stuck lock and the answer is lost to a dropped
/// connection; run again, the ForceRelease must still say it freed the lock, not "was not
/// held", which would send them looking for a lock that was never stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_force_release_whose_answer_a_dropped_connection_lost_says_it_freed_the_lock() {
    const NAME: &str = "orders/stuck";
    let (_redis, link, server) = latchkey_behind_a_link().await;
    let mut c = server.locks().await;
    take(&c, NAME, secs(60)).await;

    let forced = link
        .losing_answer_to(
            "EVALSHA",
            c.force_release(pb::ForceReleaseRequest {
                name: NAME.into(),
                ..Default::default()
            }),
        )
        .await
        .unwrap()
        .into_inner();
    assert!(forced.released, "told the lock was not held");
    assert!(!inspect(&c, NAME).await.held);

    // A ForceRelease of its own on the free lock still says it was not held.
    let again = c
        .force_release(pb::ForceReleaseRequest {
            name: NAME.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.released);
}

/// The on-call person force-releases a stuck lock, the answer is lost to a dropped connection,
/// and a caller of another replica takes the freed lock before latchkey sends the ForceRelease
/// again. The repeat must say it freed the lock, and must not free the new holder's lock: that
/// would let a third caller in beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_force_release_repeated_after_someone_else_took_the_lock_leaves_the_new_holder_alone() {
    const NAME: &str = "orders/stuck-then-taken";
    let HeldBehindALink {
        link,
        mut holder,
        mut other_replica,
        _servers,
        ..
    } = held_behind_a_link(NAME).await;

    let (forced, taken) = link
        .losing_answer_to_while(
            "EVALSHA",
            holder.force_release(pb::ForceReleaseRequest {
                name: NAME.into(),
                ..Default::default()
            }),
            other_replica.acquire(acquire(NAME, secs(60), Duration::ZERO)),
        )
        .await;
    let taken = taken.unwrap().into_inner();
    assert!(taken.acquired, "the first run did not free the lock");
    assert!(
        forced.unwrap().into_inner().released,
        "told the lock was not held"
    );

    let state = inspect(&holder, NAME).await;
    assert!(
        state.held && state.fence == taken.fence,
        "the repeated ForceRelease freed the new holder's lock: {state:?}"
    );
    let third = holder
        .acquire(acquire(NAME, secs(60), Duration::ZERO))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !third.acquired,
        "a third caller got in beside the new holder"
    );
}

/// A holder's last Release loses its answer to a dropped connection, and a caller of another
/// replica takes the freed lock before latchkey sends the Release again. The holder's lock
/// really is gone, so the repeat must say "released", as its first run did, not "held by
/// another owner" (the holder would think its Release failed); and it must leave the new
/// holder's lock alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_repeated_after_someone_else_took_the_lock_still_says_it_released_it() {
    const NAME: &str = "orders/released-then-taken";
    let HeldBehindALink {
        link,
        mut holder,
        held,
        mut other_replica,
        _servers,
        ..
    } = held_behind_a_link(NAME).await;
    let release = || pb::ReleaseRequest {
        name: NAME.into(),
        token: held.token.clone(),
        ..Default::default()
    };

    let (released, taken) = link
        .losing_answer_to_while(
            "EVALSHA",
            holder.release(release()),
            other_replica.acquire(acquire(NAME, secs(60), Duration::ZERO)),
        )
        .await;
    let taken = taken.unwrap().into_inner();
    assert!(taken.acquired, "the first run did not free the lock");
    let released = released
        .expect("the repeat must answer as the first run did: released")
        .into_inner();
    assert!(
        released.released && released.hold_count == 0,
        "{released:?}"
    );

    assert_held_once_by(&holder, NAME, taken.fence).await;
    // A Release of its own (not a repeat) is refused: the lock is someone else's now.
    let again = holder
        .release(release())
        .await
        .expect_err("another owner holds it");
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
}

/// What lets that repeat answer "released" is the Release's id, kept on the lock hash through
/// the next grant. It must not make a lock taken again after a release cost Redis more than a
/// lock taken for the first time: names are reused all the time, and the memory target (250
/// bytes per held lock) holds for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_taken_again_after_a_release_costs_redis_no_more_than_a_fresh_one() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut c = server.locks().await;
    let take = |name: &'static str| acquire(name, secs(60), Duration::ZERO);
    let (fresh, reused) = ("orders/fresh-1", "orders/again-1");

    assert!(c.acquire(take(fresh)).await.unwrap().into_inner().acquired);
    let first = c.acquire(take(reused)).await.unwrap().into_inner();
    assert!(first.acquired);
    let_go(&c, reused, &first.token).await;
    assert!(c.acquire(take(reused)).await.unwrap().into_inner().acquired);

    let client = redis.client().await;
    let key = |name: &str| format!("latchkey:{{{name}}}:lock");
    let op: Option<String> = client.hget(key(reused), "op").await.unwrap();
    assert!(op.is_some(), "the re-taken lock keeps the release's id");
    let usage = |name: &str| {
        client.custom::<i64, _>(fred::cmd!("MEMORY"), vec!["USAGE".to_owned(), key(name)])
    };
    let (fresh_bytes, reused_bytes) = (usage(fresh).await.unwrap(), usage(reused).await.unwrap());
    assert!(
        reused_bytes <= fresh_bytes,
        "a re-taken lock costs {reused_bytes} bytes, a fresh one {fresh_bytes}"
    );
}

/// Redis stalls (CLIENT PAUSE) past the acquire's Redis timeout: the caller hears
/// UNAVAILABLE, but Redis runs the acquire script once the pause ends and grants the lock to a
/// token nobody was ever told. latchkey must give that grant back, not leave the lock dead for
/// its 60 s lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_that_lost_its_answer_to_a_stalled_redis_leaves_no_lock_behind() {
    let (_redis, server, admin) = latchkey_that_times_out_on_redis(|_| {}).await;
    let mut c = server.locks().await;

    for (name, fair) in [("stalled/fair", true), ("stalled/plain", false)] {
        let request = || pb::AcquireRequest {
            fair,
            ..acquire(name, secs(60), Duration::ZERO)
        };
        let grants_before = redis_grants(&admin, name).await;
        pause_clients(&admin, 1500).await;
        let lost = c
            .acquire(request())
            .await
            .expect_err("Redis is paused past the acquire's timeout");
        assert_eq!(lost.code(), Code::Unavailable, "{name}: {lost:?}");

        // Redis ran the acquire after the pause (the fence moved), and the lock is free again
        // long before its lease would have ended.
        wait_until(secs(10), || async {
            redis_grants(&admin, name).await > grants_before
                && inspect_if_up(&c, name).await.is_some_and(|s| !s.held)
        })
        .await;
        let again = c.acquire(request()).await.unwrap().into_inner();
        assert!(
            again.acquired,
            "{name}: the lock stayed taken by the lost grant"
        );
        let_go(&c, name, &again.token).await;
    }
}

/// In a long outage every failing Acquire would start a background release of what it may
/// have granted, each retrying for its whole lease: `max_lost_grant_releases` caps them. With
/// the cap at 2, four Acquires lose their answers to one stall at the same time. Redis runs
/// all four once the stall ends; two of the locks are given back at once, the other two stay
/// taken by their lost grants until the lease ends, as a crashed holder's would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_grants_past_max_lost_grant_releases_free_at_lease_end() {
    const NAMES: [&str; 4] = ["capped/a", "capped/b", "capped/c", "capped/d"];
    let (_redis, server, admin) =
        latchkey_that_times_out_on_redis(|config| config.locks.max_lost_grant_releases = 2).await;
    let c = server.locks().await;

    // The two releases that get a permit keep it, retrying, until the stall ends, long after
    // all four Acquires failed (at 300 ms).
    pause_clients(&admin, 2500).await;
    let mut acquires = tokio::task::JoinSet::new();
    for name in NAMES {
        let mut c = c.clone();
        acquires.spawn(async move {
            let result = c.acquire(acquire(name, secs(60), Duration::ZERO)).await;
            (name, result)
        });
    }
    while let Some(joined) = acquires.join_next().await {
        let (name, result) = joined.expect("the acquire task");
        let status = result.expect_err("Redis is paused past the acquire's timeout");
        assert_eq!(status.code(), Code::Unavailable, "{name}: {status:?}");
    }

    let held = || async {
        let mut held = 0;
        for name in NAMES {
            if redis_grants(&admin, name).await == 0 {
                return None; // Redis has not run this acquire yet
            }
            held += usize::from(inspect_if_up(&c, name).await?.held);
        }
        Some(held)
    };
    wait_until(secs(10), || async { held().await == Some(2) }).await;
    tokio::time::sleep(secs(1)).await;
    assert_eq!(
        held().await,
        Some(2),
        "past the cap, a lost grant holds its lock until the lease ends"
    );
}

/// latchkey that gives up on a Redis command after 300 ms (with `configure` applied), and a
/// client to stall that Redis with. Returns once every pooled connection has loaded the
/// scripts: a script Redis does not have yet when it finally runs a late acquire (NOSCRIPT)
/// would make that acquire never run at all, and a test of late acquires prove nothing.
async fn latchkey_that_times_out_on_redis(
    configure: impl FnOnce(&mut latchkey::config::Config),
) -> (RedisServer, Latchkey, Client) {
    let redis = RedisServer::start();
    let mut config = test_config(&redis);
    config.redis.redis_timeout = ms(300);
    configure(&mut config);
    let connections = config.redis.redis_pool_size;
    let server = Latchkey::start_with(config).await;
    let admin = redis.client().await;
    wait_for_script_loads(&admin, connections).await;
    (redis, server, admin)
}

/// latchkey with all its Redis connections through a `Link`, so a test can lose the answer to
/// a command Redis ran. The Redis server stops when the first value is dropped.
async fn latchkey_behind_a_link() -> (RedisServer, Link, Latchkey) {
    latchkey_behind_a_link_with(|_| {}).await
}

/// `latchkey_behind_a_link`, with `configure` applied to latchkey's config.
async fn latchkey_behind_a_link_with(
    configure: impl FnOnce(&mut latchkey::config::Config),
) -> (RedisServer, Link, Latchkey) {
    let redis = RedisServer::start();
    let link = Link::to(redis.port).await;
    let mut config = test_config(&redis);
    config.redis.redis_url = link.url();
    configure(&mut config);
    let server = Latchkey::start_with(config).await;
    (redis, link, server)
}

/// Two latchkey replicas on one Redis, the first behind a link that can lose an answer, and a
/// caller of the first holding a lock.
struct HeldBehindALink {
    link: Link,
    /// The first replica's caller, who holds the lock, and its grant.
    holder: LockServiceClient<Channel>,
    held: pb::AcquireResponse,
    other_replica: LockServiceClient<Channel>,
    /// Redis and both replicas: bind it, or they stop (`..` drops what it leaves out).
    _servers: (RedisServer, Latchkey, Latchkey),
}

async fn held_behind_a_link(name: &str) -> HeldBehindALink {
    // A Redis timeout of 10 s: latchkey must not give up on a command while the link holds
    // its connection open.
    let (redis, link, behind_link) =
        latchkey_behind_a_link_with(|config| config.redis.redis_timeout = secs(10)).await;
    let other = Latchkey::start(&redis).await;
    let (holder, other_replica) = (behind_link.locks().await, other.locks().await);
    let held = take(&holder, name, secs(60)).await;
    HeldBehindALink {
        link,
        holder,
        held,
        other_replica,
        _servers: (redis, behind_link, other),
    }
}

/// The fence Redis last granted `name` under (0 before the first grant): it moves with every
/// grant, whoever was told of it.
async fn redis_grants(redis: &Client, name: &str) -> u64 {
    let fence: Option<u64> = redis
        .hget(format!("latchkey:{{{name}}}:lock"), "fence")
        .await
        .expect("HGET fence");
    fence.unwrap_or(0)
}

/// Inspect, or None while latchkey answers UNAVAILABLE.
async fn inspect_if_up(
    c: &pb::lock_service_client::LockServiceClient<tonic::transport::Channel>,
    name: &str,
) -> Option<pb::InspectResponse> {
    let mut c = c.clone();
    c.inspect(pb::InspectRequest { name: name.into() })
        .await
        .ok()
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latchkey_starts_while_redis_is_down_and_serves_once_it_appears() {
    let mut redis = RedisServer::start();
    redis.kill9();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = test_config(&redis);
    let task = tokio::spawn(latchkey::server::run(
        config,
        listener,
        std::future::pending(),
    ));
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap();
    let mut c = pb::lock_service_client::LockServiceClient::new(channel.connect_lazy());
    let started = Instant::now();
    let status = c
        .acquire(acquire(NAME, secs(30), Duration::ZERO))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(started.elapsed() < secs(4));

    redis.restart();
    wait_until(secs(15), || {
        let mut c = c.clone();
        async move {
            c.acquire(acquire(NAME, secs(30), Duration::ZERO))
                .await
                .is_ok()
        }
    })
    .await;
    task.abort();
}
