//! Hold streams: the watchdog in the server. A lock held by an open stream outlives its lease,
//! is released the moment its client goes away, and is reported LOST when Redis stops
//! recording it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use latchkey::grpc::pb::{
    self, HoldRequest, HoldResponse, hold_request::Action, hold_response::Event,
    lock_service_client::LockServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming, transport::Channel};

const NAME: &str = "jobs/nightly";

/// An open Hold stream: the sending half and the server's answers.
struct Hold {
    send: mpsc::Sender<HoldRequest>,
    answers: Streaming<HoldResponse>,
}

impl Hold {
    async fn open(client: &mut LockServiceClient<Channel>, request: pb::AcquireRequest) -> Self {
        let (send, outgoing) = mpsc::channel(4);
        send.send(HoldRequest {
            action: Some(Action::Acquire(request)),
        })
        .await
        .unwrap();
        let answers = client
            .hold(ReceiverStream::new(outgoing))
            .await
            .unwrap()
            .into_inner();
        Self { send, answers }
    }

    async fn next(&mut self) -> Option<Event> {
        let answer = tokio::time::timeout(secs(10), self.answers.message())
            .await
            .expect("the server answers within 10 s");
        answer
            .expect("the stream did not fail")
            .map(|a| a.event.expect("every answer has an event"))
    }

    /// The next answer that is not a renewal notice.
    async fn next_besides_renewals(&mut self) -> Option<Event> {
        loop {
            match self.next().await {
                Some(Event::Renewed(_)) => continue,
                other => return other,
            }
        }
    }

    async fn granted(&mut self) -> pb::AcquireResponse {
        match self.next().await {
            Some(Event::Acquired(grant)) => grant,
            other => panic!("expected the grant, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_stream_keeps_its_lock_past_several_leases_and_releases_on_request() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut client = server.locks().await;
    let lease = ms(300);
    let mut hold = Hold::open(&mut client, acquire(NAME, lease, Duration::ZERO)).await;
    let grant = hold.granted().await;
    assert!(grant.acquired);

    // Five lease periods later the lock is still ours, renewed by the server.
    let mut renewals = 0;
    let until = Instant::now() + ms(1500);
    while Instant::now() < until {
        match tokio::time::timeout(until - Instant::now(), hold.answers.message()).await {
            Ok(Ok(Some(HoldResponse {
                event: Some(Event::Renewed(renewed)),
            }))) => {
                assert_eq!(std_dur(renewed.lease), lease);
                renewals += 1;
            }
            Ok(other) => panic!("unexpected answer while holding: {other:?}"),
            Err(_elapsed) => break,
        }
    }
    assert!(renewals >= 3, "only {renewals} renewals in 5 lease periods");
    let state = inspect(&client, NAME).await;
    assert!(state.held && state.fence == grant.fence, "{state:?}");
    let other = client
        .acquire(acquire(NAME, secs(30), Duration::ZERO))
        .await
        .unwrap()
        .into_inner();
    assert!(!other.acquired);

    hold.send
        .send(HoldRequest {
            action: Some(Action::Release(pb::HoldRelease {})),
        })
        .await
        .unwrap();
    match hold.next_besides_renewals().await {
        Some(Event::Released(released)) => assert!(released.released),
        other => panic!("expected the release, got {other:?}"),
    }
    assert!(
        hold.next().await.is_none(),
        "the stream ends after the release"
    );
    assert!(!inspect(&client, NAME).await.held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_stream_whose_client_disconnects_frees_the_lock_at_once() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let observer = server.locks().await;
    {
        // Its own connection, dropped whole: what the server sees when a client process dies.
        let mut client = server.locks().await;
        let mut hold = Hold::open(&mut client, acquire(NAME, secs(30), Duration::ZERO)).await;
        assert!(hold.granted().await.acquired);
        assert!(inspect(&observer, NAME).await.held);
    }
    let gone_at = Instant::now();
    wait_until(secs(5), || async { !inspect(&observer, NAME).await.held }).await;
    assert!(
        gone_at.elapsed() < secs(5),
        "freed at once, not at the 30 s lease end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_stream_closed_by_its_client_releases_and_says_so() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut client = server.locks().await;
    let mut hold = Hold::open(&mut client, acquire(NAME, secs(30), Duration::ZERO)).await;
    assert!(hold.granted().await.acquired);
    drop(hold.send); // half-close: the client is done
    match hold.answers.message().await.unwrap().and_then(|a| a.event) {
        Some(Event::Released(released)) => assert!(released.released),
        other => panic!("expected the release, got {other:?}"),
    }
    assert!(!inspect(&client, NAME).await.held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_whose_lock_was_force_released_is_told_it_is_lost() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut client = server.locks().await;
    let mut hold = Hold::open(&mut client, acquire(NAME, ms(300), Duration::ZERO)).await;
    assert!(hold.granted().await.acquired);
    let forced = client
        .force_release(pb::ForceReleaseRequest {
            name: NAME.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(forced.get_ref().released);
    match hold.next_besides_renewals().await {
        Some(Event::Lost(lost)) => assert_eq!(lost.reason(), pb::LostReason::NotHeld),
        other => panic!("expected LOST, got {other:?}"),
    }
    assert!(hold.next().await.is_none(), "the stream ends after LOST");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_whose_redis_lost_its_data_is_told_it_is_lost() {
    let mut redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut client = server.locks().await;
    let mut hold = Hold::open(&mut client, acquire(NAME, secs(30), Duration::ZERO)).await;
    assert!(hold.granted().await.acquired);
    redis.restart();
    let restarted_at = Instant::now();
    match hold.next_besides_renewals().await {
        Some(Event::Lost(lost)) => assert_eq!(lost.reason(), pb::LostReason::NotHeld),
        other => panic!("expected LOST, got {other:?}"),
    }
    // The reconnect triggers the check; the next renewal would be 10 s away.
    assert!(
        restarted_at.elapsed() < secs(8),
        "LOST came {:?} after the restart",
        restarted_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_that_cannot_get_the_lock_in_time_says_so_and_ends() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut client = server.locks().await;
    take(&client, NAME, secs(30)).await;
    let mut hold = Hold::open(&mut client, acquire(NAME, secs(30), ms(200))).await;
    let answer = hold.granted().await;
    assert!(!answer.acquired && std_dur(answer.holder_ttl) > secs(20));
    assert!(hold.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_stream_must_start_with_acquire_and_only_release_may_follow() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut client = server.locks().await;

    let (send, outgoing) = mpsc::channel(4);
    send.send(HoldRequest {
        action: Some(Action::Release(pb::HoldRelease {})),
    })
    .await
    .unwrap();
    let mut answers = client
        .hold(ReceiverStream::new(outgoing))
        .await
        .unwrap()
        .into_inner();
    let status = answers.message().await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("action"),
        "{}",
        status.message()
    );

    let mut hold = Hold::open(&mut client, acquire(NAME, secs(30), Duration::ZERO)).await;
    assert!(hold.granted().await.acquired);
    let again = HoldRequest {
        action: Some(Action::Acquire(acquire(NAME, secs(30), Duration::ZERO))),
    };
    hold.send.send(again).await.unwrap();
    let status = hold.answers.message().await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        !inspect(&client, NAME).await.held,
        "a broken stream gives its lock back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_hold_locks_ends_waits_and_exits_zero_within_seconds() {
    let redis = RedisServer::start();
    let observer_server = Latchkey::start(&redis).await;
    let observer = observer_server.locks().await;
    let mut process = LatchkeyProcess::start(&redis).await;
    let mut client = process.locks().await;

    let mut hold = Hold::open(&mut client, acquire(NAME, secs(30), Duration::ZERO)).await;
    assert!(hold.granted().await.acquired);
    take(&observer, "jobs/busy", secs(30)).await;
    let mut waiter = process.locks().await;
    let waiting = tokio::spawn(async move {
        waiter
            .acquire(acquire("jobs/busy", secs(30), secs(60)))
            .await
    });
    wait_for_waiters(&observer, "jobs/busy", 1, secs(5)).await;

    let code = tokio::task::spawn_blocking(move || process.terminate(secs(10)))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "latchkey exits 0 within seconds of SIGTERM");
    match hold.next_besides_renewals().await {
        Some(Event::Lost(lost)) => assert_eq!(lost.reason(), pb::LostReason::ServerShutdown),
        other => panic!("expected LOST at shutdown, got {other:?}"),
    }
    let status = waiting.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        !inspect(&observer, NAME).await.held,
        "the held lock was released at shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latchkey_process_killed_with_holds_and_waiters_does_not_stop_the_others() {
    let redis = RedisServer::start();
    let survivor = Latchkey::start(&redis).await;
    let mut others = survivor.locks().await;
    let mut doomed = LatchkeyProcess::start(&redis).await;
    let mut client = doomed.locks().await;

    // On the doomed process: a Hold stream holding `jobs/held` (1 s lease, renewed while the
    // process lives), and waiters, fair and plain, on locks the survivor's clients hold.
    let mut hold = Hold::open(&mut client, acquire("jobs/held", secs(1), Duration::ZERO)).await;
    assert!(hold.granted().await.acquired);
    let plain = take(&others, "jobs/plain", secs(30)).await;
    let fair_req = |wait| pb::AcquireRequest {
        fair: true,
        ..acquire("jobs/fair", secs(30), wait)
    };
    let fair = others
        .acquire(fair_req(Duration::ZERO))
        .await
        .unwrap()
        .into_inner();
    for (name, request) in [
        ("jobs/plain", acquire("jobs/plain", secs(30), secs(60))),
        ("jobs/fair", fair_req(secs(60))),
    ] {
        let mut waiter = doomed.locks().await;
        tokio::spawn(async move { waiter.acquire(request).await });
        wait_for_waiters(&others, name, 1, secs(10)).await;
    }
    tokio::time::sleep(secs(2)).await; // the hold has been renewed past its first lease
    assert!(inspect(&others, "jobs/held").await.held);

    doomed.kill9();
    let killed_at = Instant::now();
    // The held lock frees at its lease end (nobody renews it any more).
    let next = others
        .acquire(acquire("jobs/held", secs(30), secs(10)))
        .await
        .unwrap()
        .into_inner();
    assert!(next.acquired);
    assert!(
        killed_at.elapsed() < secs(3),
        "took {:?}",
        killed_at.elapsed()
    );
    // The dead waiters take nothing: a release goes to a live waiter at once (plain), or
    // within the purge bound (fair, 2 s).
    for (name, token, fair) in [
        ("jobs/plain", plain.token, false),
        ("jobs/fair", fair.token, true),
    ] {
        let mut waiter = survivor.locks().await;
        let request = pb::AcquireRequest {
            fair,
            ..acquire(name, secs(30), secs(20))
        };
        let waiting = tokio::spawn(async move { waiter.acquire(request).await });
        tokio::time::sleep(ms(200)).await;
        let released_at = Instant::now();
        let_go(&others, name, &token).await;
        assert!(
            waiting.await.unwrap().unwrap().into_inner().acquired,
            "{name}"
        );
        assert!(
            released_at.elapsed() < secs(4),
            "{name} took {:?}",
            released_at.elapsed()
        );
    }
}
