//! A Jepsen-style fenced-mutex check under real Redis faults: many clients loop
//! acquire -> critical section -> release on a few names with short leases, through two
//! latchkey servers, while Redis is killed and restarted (losing its data), paused
//! (CLIENT PAUSE) and blocked (DEBUG SLEEP) for longer than a lease.
//!
//! What must hold:
//! - two critical sections whose releases both succeeded never overlap in time;
//! - fences of one name strictly increase in the order the grants were handed out;
//! - a fenced store that refuses writes older than the newest accepted fence never accepts a
//!   stale holder's write;
//! - a stranger's token never releases a held lock;
//! - after the faults, every name is granted again within a lease plus a small bound.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use fred::prelude::*;
use latchkey::grpc::pb::{self, lock_service_client::LockServiceClient};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use tonic::{Code, transport::Channel};

const NAMES: [&str; 3] = ["fenced/a", "fenced/b", "fenced/c"];
const LEASE: Duration = Duration::from_millis(300);

/// One critical section as the client saw it.
#[derive(Debug, Clone)]
struct Section {
    name: &'static str,
    fence: u64,
    granted_at: Instant,
    released_at: Instant,
    released: bool,
}

/// A store that accepts a write only if its fence is at least the newest accepted one.
#[derive(Default)]
struct FencedStore {
    newest: Mutex<HashMap<&'static str, u64>>,
}

impl FencedStore {
    fn write(&self, name: &'static str, fence: u64) -> bool {
        let mut newest = self.newest.lock().unwrap();
        let last = newest.entry(name).or_insert(0);
        if fence < *last {
            return false;
        }
        *last = fence;
        true
    }
}

async fn client_loop(
    mut client: LockServiceClient<Channel>,
    seed: u64,
    until: Instant,
    store: Arc<FencedStore>,
    log: Arc<Mutex<Vec<Section>>>,
) -> (usize, usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut stale_writes_refused, mut stranger_refusals) = (0, 0);
    while Instant::now() < until {
        let name = NAMES[rng.random_range(0..NAMES.len())];
        let request = pb::AcquireRequest {
            name: name.into(),
            lease: dur(LEASE),
            wait_timeout: dur(secs(2)),
            ..Default::default()
        };
        let asked = Instant::now();
        let answer = client.acquire(request).await;
        // No RPC outlives its deadline: the 2 s wait, plus one Redis timeout (1 s) for an
        // attempt caught in a fault, plus slack for a loaded machine.
        let took = asked.elapsed();
        assert!(
            took < secs(5),
            "seed {seed}: an acquire with a 2 s wait took {took:?}"
        );
        let grant = match answer {
            Ok(g) if g.get_ref().acquired => g.into_inner(),
            // Timed out, or Redis unavailable during a fault: try again.
            Ok(_) | Err(_) => {
                tokio::time::sleep(ms(20)).await;
                continue;
            }
        };
        let granted_at = Instant::now();
        // The critical section: a fenced write, some work (now and then longer than the lease,
        // as a stalled holder would), a second fenced write.
        let first = store.write(name, grant.fence);
        let work = if rng.random_bool(0.05) {
            ms(450)
        } else {
            ms(rng.random_range(0..15))
        };
        tokio::time::sleep(work).await;
        let second = store.write(name, grant.fence);
        stale_writes_refused += usize::from(!first) + usize::from(!second);

        if rng.random_bool(0.1) {
            let stranger = uuid::Uuid::new_v4().to_string();
            let refused = client
                .release(pb::ReleaseRequest {
                    name: name.into(),
                    token: stranger,
                    ..Default::default()
                })
                .await;
            match refused {
                Err(status) if status.code() == Code::FailedPrecondition => stranger_refusals += 1,
                Err(status) if status.code() == Code::Unavailable => {}
                other => panic!("seed {seed}: a stranger's token released {name}: {other:?}"),
            }
        }
        let released_at = Instant::now();
        let released = client
            .release(pb::ReleaseRequest {
                name: name.into(),
                token: grant.token,
                ..Default::default()
            })
            .await
            .is_ok_and(|r| r.get_ref().released);
        log.lock().unwrap().push(Section {
            name,
            fence: grant.fence,
            granted_at,
            released_at,
            released,
        });
    }
    (stale_writes_refused, stranger_refusals)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_and_fences_hold_through_redis_crashes_pauses_and_stalls() {
    let seed = test_seed();
    let mut redis = RedisServer::start();
    let servers = [Latchkey::start(&redis).await, Latchkey::start(&redis).await];
    let store = Arc::new(FencedStore::default());
    let log = Arc::new(Mutex::new(Vec::new()));
    let until = Instant::now() + secs(6);
    let mut clients = Vec::new();
    for c in 0..8u64 {
        let client = servers[c as usize % 2].locks().await;
        clients.push(tokio::spawn(client_loop(
            client,
            seed.wrapping_add(c),
            until,
            store.clone(),
            log.clone(),
        )));
    }

    // The faults, one after another, while the clients run.
    tokio::time::sleep(secs(1)).await;
    redis.restart(); // kill -9, then an empty Redis: every lock is lost at once
    tokio::time::sleep(ms(1500)).await;
    let admin = redis.client().await;
    pause_clients(&admin, 600).await;
    tokio::time::sleep(secs(1)).await;
    let slow = redis.client().await;
    // DEBUG SLEEP blocks Redis itself; answered after 0.6 s.
    let _: Result<(), _> = slow.custom(fred::cmd!("DEBUG"), vec!["SLEEP", "0.6"]).await;

    let mut stale_refused = 0;
    let mut stranger_refusals = 0;
    for client in clients {
        let (stale, stranger) = client.await.unwrap();
        stale_refused += stale;
        stranger_refusals += stranger;
    }

    let sections = log.lock().unwrap().clone();
    assert!(
        sections.len() > 50,
        "seed {seed}: only {} critical sections ran",
        sections.len()
    );
    assert!(
        stranger_refusals > 0,
        "seed {seed}: the stranger check never ran"
    );
    for name in NAMES {
        let mut mine: Vec<&Section> = sections.iter().filter(|s| s.name == name).collect();
        mine.sort_by_key(|s| s.fence);
        for pair in mine.windows(2) {
            assert!(
                pair[0].fence < pair[1].fence,
                "seed {seed}: {name} granted fence {} twice",
                pair[0].fence
            );
            // Grants in fence order were received in time order, up to a lease of client-side
            // scheduling jitter (a later fence is never handed out before an earlier one).
            assert!(
                pair[0].granted_at <= pair[1].granted_at + LEASE,
                "seed {seed}: {name} fence {} was granted after fence {}",
                pair[0].fence,
                pair[1].fence
            );
        }
        let valid: Vec<&&Section> = mine.iter().filter(|s| s.released).collect();
        for pair in valid.windows(2) {
            assert!(
                pair[0].released_at < pair[1].granted_at,
                "seed {seed}: {name}: sections with fences {} and {} overlapped although both released cleanly",
                pair[0].fence,
                pair[1].fence
            );
        }
    }
    println!(
        "seed {seed}: {} sections, {stale_refused} stale writes refused by the fence",
        sections.len()
    );

    // Liveness after the faults: every name is free or frees within a lease.
    let mut client = servers[0].locks().await;
    for name in NAMES {
        let started = Instant::now();
        let request = pb::AcquireRequest {
            name: name.into(),
            lease: dur(secs(5)),
            wait_timeout: dur(secs(5)),
            ..Default::default()
        };
        let grant = client.acquire(request).await.unwrap().into_inner();
        assert!(grant.acquired, "seed {seed}: {name} was not granted again");
        assert!(
            started.elapsed() < LEASE + secs(2),
            "seed {seed}: {name} took {:?}",
            started.elapsed()
        );
    }
}
